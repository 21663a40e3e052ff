"""Adapter files record each EinsumDense layer's factoring.

An EinsumDense entry without `factoring` holds Keras core's factoring
(`"keras"`), which is what every file written before the option holds; a
file with a standard-factored layer is format version 3, so that older
keras_lora refuses it instead of misreading it.
"""

import json
import os

import keras
import numpy as np
import pytest
import safetensors
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
TARGETS = ["query", "value", "proj"]


def mha_model(seed=0):
    """Input -> MultiHeadAttention(2 heads of 4) -> EinsumDense proj."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 5), name="proj")(x)
    return keras.Model(inputs, x)


def with_dense(seed=0):
    """The same with a Dense layer after it: two layer types in one file."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.Dense(6, name="dense")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))


X = np.random.default_rng(3).normal(size=(2, 3, 8)).astype("float32")


def metadata(path):
    with safetensors.safe_open(str(path), framework="np") as f:
        return json.loads(f.metadata()["keras_lora"])


def factorings(model):
    return {p: layer.factoring for p, layer in lora_layers(model)}


@pytest.mark.parametrize("factoring", ["standard", "keras"])
def test_files_record_the_factoring_and_load_it_back(tmp_path, factoring):
    lora = kl.apply_lora(mha_model(), targets=TARGETS, rank=2, factoring=factoring)
    randomize_adapters(lora, scale=0.3)
    path = kl.save_adapter(lora, tmp_path / "a.safetensors")
    info = metadata(path)
    assert {k: v.get("factoring") for k, v in info["layers"].items()} == {
        "mha/query": factoring,
        "mha/value": factoring,
        "proj": factoring,
    }
    assert info["format_version"] == (3 if factoring == "standard" else 1)
    restored = kl.load_adapter(mha_model(), path)
    assert set(factorings(restored).values()) == {factoring}
    np.testing.assert_allclose(to_numpy(restored(X)), to_numpy(lora(X)), atol=1e-6)


def test_a_factoring_mismatch_is_refused_and_changes_nothing(tmp_path):
    lora = kl.apply_lora(mha_model(), targets=TARGETS, rank=2, factoring="standard")
    path = kl.save_adapter(randomize_adapters(lora), tmp_path / "s.safetensors")
    target = kl.apply_lora(mha_model(), targets=TARGETS, rank=2, factoring="keras")
    randomize_adapters(target, seed=4)
    before = [to_numpy(w).copy() for w in target.weights]
    with pytest.raises(ValueError, match=r"'mha/query' factored 'standard'.*'keras'"):
        kl.load_adapter(target, path)
    for w, value in zip(target.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_an_entry_without_factoring_means_keras(tmp_path):
    lora = kl.apply_lora(mha_model(), targets=TARGETS, rank=2, factoring="keras")
    path = kl.save_adapter(randomize_adapters(lora), tmp_path / "k.safetensors")
    with safetensors.safe_open(str(path), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = f.metadata()
    info = json.loads(raw["keras_lora"])
    for entry in info["layers"].values():
        del entry["factoring"]
    old = tmp_path / "old.safetensors"
    safetensors.numpy.save_file(
        tensors, str(old), metadata={"keras_lora": json.dumps(info)}
    )
    restored = kl.load_adapter(mha_model(), old)
    assert set(factorings(restored).values()) == {"keras"}
    np.testing.assert_allclose(to_numpy(restored(X)), to_numpy(lora(X)), atol=1e-6)


def test_keras_factored_einsum_beside_dense_loads_into_a_plain_model(tmp_path):
    targets = ["query", "value", "dense"]
    lora = kl.apply_lora(with_dense(), targets=targets, rank=2, factoring="keras")
    path = kl.save_adapter(randomize_adapters(lora), tmp_path / "mixed.safetensors")
    assert "factoring" not in metadata(path)["layers"]["dense"]
    restored = kl.load_adapter(with_dense(), path)
    assert factorings(restored)["mha/query"] == "keras"
    np.testing.assert_allclose(to_numpy(restored(X)), to_numpy(lora(X)), atol=1e-6)


def test_the_legacy_adapter_file_loads_with_keras_core_factoring():
    # Written by the code before `factoring` existed (see
    # tests/data/make_legacy_fixture.py). Keras core's factoring means
    # kernel + scale·tensordot(A, B) over A's last axis: check the loaded
    # model against a plain model whose kernels got exactly that.
    path = os.path.join(DATA, "legacy_einsum_adapter.safetensors")
    info = metadata(path)
    assert all("factoring" not in entry for entry in info["layers"].values())
    base = mha_model()
    merged = keras.models.clone_model(base)
    merged.set_weights(base.get_weights())
    restored = kl.load_adapter(base, path)
    assert set(factorings(restored).values()) == {"keras"}
    layers = dict(iter_layers(merged))
    with safetensors.safe_open(path, framework="np") as f:
        for layer_path, entry in info["layers"].items():
            a = f.get_tensor(f"{layer_path}/lora_a")
            b = f.get_tensor(f"{layer_path}/lora_b")
            kernel = layers[layer_path].kernel
            delta = np.tensordot(a, b, axes=1) * entry["alpha"] / entry["rank"]
            kernel.assign(to_numpy(kernel) + delta)
    sample = np.load(os.path.join(DATA, "legacy_einsum_lora.npz"))["sample"]
    np.testing.assert_allclose(
        to_numpy(restored(sample)), to_numpy(merged(sample)), atol=1e-5
    )
    assert not np.allclose(to_numpy(restored(sample)), to_numpy(base(sample)))
