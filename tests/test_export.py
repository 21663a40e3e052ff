import os

import numpy as np
import pytest
from conftest import mlp, randomize_adapters

import keras_lora as kl

X = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")


@pytest.fixture(scope="module")
def lora_model():
    return randomize_adapters(kl.apply_lora(mlp(), rank=4, alpha=8))


@pytest.fixture(scope="module")
def saved_model_dir(lora_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "saved"
    assert kl.export(lora_model, path) == path
    return path


def test_saved_model_serves_the_lora_models_outputs(lora_model, saved_model_dir):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    served = loaded.serve(tf.constant(X)).numpy()
    np.testing.assert_allclose(served, lora_model.predict(X, verbose=0), atol=1e-5)
    names = [v.name for v in loaded.variables]
    assert names and not [n for n in names if "lora" in n]
    # 3 kernels + 3 biases, merged: no adapter variables in the artifact.
    assert len(names) == 6


def test_export_replaces_an_earlier_export(lora_model, tmp_path):
    path = tmp_path / "out"
    os.makedirs(path)
    (path / "stale.txt").write_text("old")
    kl.export(lora_model, path)
    assert not (path / "stale.txt").exists()
    assert (path / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary leftovers


def test_keras_format(lora_model, tmp_path):
    import keras

    path = kl.export(lora_model, tmp_path / "merged.keras", format="keras")
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), lora_model.predict(X, verbose=0), atol=1e-5
    )
    with pytest.raises(ValueError, match="must end in '.keras'"):
        kl.export(lora_model, tmp_path / "merged.h5", format="keras")


def test_bad_export_requests_change_nothing(lora_model, tmp_path):
    with pytest.raises(ValueError, match=r"`format` must be one of .*format='onnx'"):
        kl.export(lora_model, tmp_path / "x", format="onnx")
    with pytest.raises(TypeError, match="`path` must be a str"):
        kl.export(lora_model, 42)
    with pytest.raises(ValueError, match="has no LoRA layers"):
        kl.export(mlp(), tmp_path / "plain")
    lora_model.get_layer("d1").lora_a.assign(np.full((16, 4), np.inf, "float32"))
    try:
        with pytest.raises(ValueError, match="'d1' gives NaN or Inf"):
            kl.export(lora_model, tmp_path / "bad")
    finally:
        randomize_adapters(lora_model)
    assert os.listdir(tmp_path) == []


def test_kerashub_task_exports_a_saved_model_serving_the_lora_logits(tmp_path):
    """A KerasHub task converted in place exports on every backend, also where
    Keras's own JAX export fails (a symbolic-shape comparison in
    `PositionEmbedding`) and on torch: through the TensorFlow backend, in a
    subprocess that imports keras_hub to rebuild the task's classes."""
    import keras
    import tensorflow as tf
    from tiny_kerashub import TEXT, gpt2_causal_lm

    task = gpt2_causal_lm()
    kl.apply_lora(task, targets=["query", "value"], rank=4, in_place=True)
    randomize_adapters(task)
    batch = {
        name: keras.ops.convert_to_numpy(value)
        for name, value in task.preprocessor(TEXT)[0].items()
    }
    expected = keras.ops.convert_to_numpy(task(batch))
    assert kl.export(task, tmp_path / "saved") == tmp_path / "saved"
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    served = loaded.serve(batch).numpy()
    # float32: the merged kernel W + s·A·B rounds differently from x·W + s·(x·A)·B.
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert not [v.name for v in loaded.variables if "lora" in v.name]
