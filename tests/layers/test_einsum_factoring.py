"""Files written before `LoRAEinsumDense` had a `factoring` option load
exactly as they were saved (Keras core's factoring).

The fixtures in `tests/data/` were written by the code of commit f11f28d,
see `tests/data/make_legacy_fixture.py`.
"""

import os

import keras
import numpy as np
from conftest import to_numpy

import keras_lora as kl

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def legacy_outputs():
    data = np.load(os.path.join(DATA, "legacy_einsum_lora.npz"))
    shapes = {
        key.split(":", 1)[1]: tuple(int(d) for d in data[key])
        for key in data.files
        if key.startswith("shape:")
    }
    return data["sample"], data["expected"], shapes


def test_legacy_keras_file_loads_with_keras_factoring_and_same_outputs():
    sample, expected, shapes = legacy_outputs()
    model = keras.saving.load_model(os.path.join(DATA, "legacy_einsum_lora.keras"))
    lora = {
        p: layer
        for p, layer in kl.model.surgery.lora_layers(model)
        if isinstance(layer, kl.LoRAEinsumDense)
    }
    assert sorted(lora) == ["mha/query", "mha/value", "proj"]
    assert all(layer.factoring == "keras" for layer in lora.values())
    # Keyed by "<layer>/<variable>": the path prefixes may differ by version.
    got = {
        "/".join(v.path.split("/")[-2:]): tuple(v.shape)
        for v in model.weights
        if "lora_" in v.path
    }
    assert got == shapes
    # The same computation in float32: only the op order may differ.
    np.testing.assert_allclose(to_numpy(model(sample)), expected, atol=1e-5)


def test_new_layers_default_to_standard_and_round_trip(tmp_path):
    inputs = keras.Input((3, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    model = keras.Model(inputs, x)
    lora = kl.apply_lora(model, rank=2, targets=["query"])
    (query,) = [layer for _, layer in kl.model.surgery.lora_layers(lora)]
    assert query.factoring == "standard"
    assert tuple(query.lora_a.shape) == (8, 2)
    assert tuple(query.lora_b.shape) == (2, 2, 4)
    query.lora_b.assign(np.ones(query.lora_b.shape, "float32"))
    sample = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    lora.save(tmp_path / "new.keras")
    reloaded = keras.saving.load_model(tmp_path / "new.keras")
    np.testing.assert_array_equal(to_numpy(reloaded(sample)), to_numpy(lora(sample)))
