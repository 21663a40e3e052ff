"""`export` of a `mixed_adapter_model`: one SavedModel, many tenants.

Reloaded with `tf.saved_model.load` (in this process on every backend: the
export itself runs TensorFlow in a subprocess on JAX and torch), each row is
compared with the Keras served model's row, per adapter and for `-1`.
Tolerance 1e-5: the same float32 math, compiled by TensorFlow.
"""

import keras
import numpy as np
import pytest
from conftest import mlp
from keras import ops

import keras_lora as kl
from keras_lora.layers import LoRALayer
from keras_lora.model.walk import iter_layers

NAMES = ["default", "wide", "dora"]
X = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
INDEX = np.array([0, 1, 2, -1, 2, 1, 0, -1], "int32")


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, layer in iter_layers(model):
        if isinstance(layer, LoRALayer):
            for name in layer.adapter_names:
                b = layer.get_adapter(name).b
                b.assign(rng.normal(0, 0.3, b.shape).astype(b.dtype))
    return model


@pytest.fixture(scope="module")
def lora_model():
    model = kl.apply_lora(mlp(input_dim=6, hidden=8, outputs=3), rank=2)
    kl.add_adapter(model, "wide", rank=4, alpha=6.0, use_rslora=True)
    kl.add_adapter(model, "dora", rank=1, use_dora=True, targets=["d1"])
    return randomize(model)


@pytest.fixture(scope="module")
def exported(lora_model, tmp_path_factory):
    import tensorflow as tf

    served = kl.mixed_adapter_model(lora_model, NAMES)
    path = tmp_path_factory.mktemp("mixed") / "saved"
    assert kl.export(served, path) == path
    return served, tf.saved_model.load(str(path))


def test_saved_model_rows_match_the_keras_model(lora_model, exported):
    import tensorflow as tf

    served, loaded = exported
    want = ops.convert_to_numpy(served([X, INDEX]))
    got = loaded.serve(tf.constant(X), tf.constant(INDEX)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Each adapter alone, and the base, through the named signature.
    signature = loaded.signatures["serving_default"]
    _, specs = signature.structured_input_signature
    assert sorted(specs) == ["adapter_index", "inputs"]
    assert specs["adapter_index"].dtype == tf.int32
    with kl.disable_adapters(lora_model):
        base = ops.convert_to_numpy(lora_model(X))
    for k in range(-1, len(NAMES)):
        index = np.full((8,), k, "int32")
        rows = signature(inputs=tf.constant(X), adapter_index=tf.constant(index))
        rows = next(iter(rows.values())).numpy()
        want = ops.convert_to_numpy(served([X, index]))
        np.testing.assert_allclose(rows, want, atol=1e-5)
        if k == -1:
            np.testing.assert_allclose(rows, base, atol=1e-5)
        else:
            assert np.abs(rows - base).max() > 1e-3  # the adapter acts


def test_saved_model_isolates_out_of_range_indices(lora_model, exported):
    """A graph cannot raise: an index outside [-1, 3) gets the base row."""
    import tensorflow as tf

    _, loaded = exported
    bad = np.array([3, 4, -2, 2**31 - 1, -(2**31), 99, 0, -1], "int32")
    got = loaded.serve(tf.constant(X), tf.constant(bad)).numpy()
    with kl.disable_adapters(lora_model):
        base = ops.convert_to_numpy(lora_model(X))
    np.testing.assert_allclose(got[:6], base[:6], atol=1e-5)
    assert np.abs(got[6] - base[6]).max() > 1e-3


def test_dict_inputs_export_with_an_adapter_index_key(tmp_path):
    import tensorflow as tf

    a = keras.Input((4,), name="a")
    b = keras.Input((2,), name="b")
    x = keras.layers.Dense(5, name="d1")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2, name="out")(x))
    model = randomize(kl.apply_lora(model, rank=2))
    kl.add_adapter(model, "other", rank=3)
    randomize(model, seed=1)
    served = kl.mixed_adapter_model(model, ["default", "other"])
    rng = np.random.default_rng(1)
    feed = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(3, 2))}
    feed = {k: v.astype("float32") for k, v in feed.items()}
    index = np.array([1, -1, 0], "int32")
    want = ops.convert_to_numpy(served({**feed, "adapter_index": index}))
    kl.export(served, tmp_path / "saved")
    signature = tf.saved_model.load(str(tmp_path / "saved")).signatures[
        "serving_default"
    ]
    _, specs = signature.structured_input_signature
    assert sorted(specs) == ["a", "adapter_index", "b"]
    got = signature(**{k: tf.constant(v) for k, v in feed.items()}, adapter_index=index)
    np.testing.assert_allclose(next(iter(got.values())).numpy(), want, atol=1e-5)


def test_kerashub_task_converted_in_place(tmp_path):
    """A tiny GPT2 causal LM, LoRA in place, two adapters: logits per row."""
    import tensorflow as tf
    from tiny_kerashub import backbone_inputs, gpt2_causal_lm

    task = kl.apply_lora(gpt2_causal_lm(), rank=2, in_place=True)
    kl.add_adapter(task, "b", rank=3, alpha=6.0)
    randomize(task)
    served = kl.mixed_adapter_model(task, ["default", "b"])
    feed = backbone_inputs(task.backbone, batch=3)
    feed["token_ids"] %= task.backbone.vocabulary_size
    index = np.array([1, -1, 0], "int32")
    want = ops.convert_to_numpy(served({**feed, "adapter_index": index}))
    kl.export(served, tmp_path / "saved")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    signature = loaded.signatures["serving_default"]
    _, specs = signature.structured_input_signature
    assert sorted(specs) == ["adapter_index", "padding_mask", "token_ids"]
    feed = {k: tf.constant(v) for k, v in feed.items()}
    got = signature(**feed, adapter_index=tf.constant(index))
    np.testing.assert_allclose(next(iter(got.values())).numpy(), want, atol=1e-5)


def test_cached_stacks_export_the_current_adapters(lora_model, tmp_path):
    """`cache=True`: the SavedModel computes the adapters as they are when
    exported (on JAX and torch the `.keras` file carries no copy and the
    exported graph stacks the adapters; on TensorFlow the copy, fresh
    after the eager call, is exported)."""
    import tensorflow as tf

    served = kl.mixed_adapter_model(lora_model, NAMES, strategy="grouped", cache=True)
    want = ops.convert_to_numpy(served([X, INDEX]))
    uncached = kl.mixed_adapter_model(lora_model, NAMES, strategy="grouped")
    np.testing.assert_allclose(
        want, ops.convert_to_numpy(uncached([X, INDEX])), atol=1e-5
    )
    kl.export(served, tmp_path / "saved")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    got = loaded.serve(tf.constant(X), tf.constant(INDEX)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
