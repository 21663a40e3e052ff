"""`apply_lora(..., rank_pattern=, alpha_pattern=)`: PEFT's per-layer ranks."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

X = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")


def mlp():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="fc1")(inputs)
    x = keras.layers.Dense(8, name="fc2")(x)
    x = keras.layers.Dense(8, name="up_proj")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def ranks_and_alphas(model):
    return {p: (layer.rank, layer.alpha) for p, layer in lora_layers(model)}


def test_patterns_set_rank_and_alpha_per_layer():
    lora = kl.apply_lora(
        mlp(),
        targets=["fc1", "fc2", "up_proj"],
        rank=4,
        alpha=8,
        rank_pattern={"fc2": 2, ".*proj": 6},
        alpha_pattern={"up_proj": 3},
    )
    assert ranks_and_alphas(lora) == {
        "fc1": (4, 8.0),
        "fc2": (2, 8.0),
        "up_proj": (6, 3.0),
    }
    # Parameters: (in + out)·r per layer, 8 in and 8 out (fc1: 6 in).
    assert sum(int(np.prod(v.shape)) for v in lora.trainable_weights) == (
        (6 + 8) * 4 + (8 + 8) * 2 + (8 + 8) * 6
    )


def test_alpha_none_is_each_layer_s_own_rank():
    lora = kl.apply_lora(mlp(), targets=["fc1", "fc2"], rank=4, rank_pattern={"fc2": 2})
    assert ranks_and_alphas(lora) == {"fc1": (4, 4.0), "fc2": (2, 2.0)}


def test_patterns_survive_the_keras_lora_file_and_the_keras_file(tmp_path):
    base = mlp()
    lora = kl.apply_lora(
        base,
        targets=["fc1", "fc2"],
        rank=4,
        rank_pattern={"fc2": 2},
        alpha_pattern={"fc1": 5},
    )
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    want = keras.ops.convert_to_numpy(lora(X))
    kl.save_adapter(lora, tmp_path / "a.safetensors")
    restored = kl.load_adapter(base, tmp_path / "a.safetensors")
    assert ranks_and_alphas(restored) == ranks_and_alphas(lora)
    # The same float32 weights and ops: equal up to summation order.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(X)), want, atol=1e-6)
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert ranks_and_alphas(loaded) == ranks_and_alphas(lora)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(X)), want, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rank_pattern": {"fc9": 2}}, ValueError, r"`rank_pattern` keys \['fc9'\]"),
        ({"alpha_pattern": {"head": 2}}, ValueError, r"`alpha_pattern` keys"),
        ({"rank_pattern": {"fc2": 0}}, ValueError, r"rank_pattern\['fc2'\]"),
        ({"rank_pattern": {"fc2": 1.5}}, TypeError, r"rank_pattern\['fc2'\]"),
        ({"alpha_pattern": {"fc2": -1}}, ValueError, r"alpha_pattern\['fc2'\]"),
        ({"rank_pattern": ["fc2"]}, TypeError, r"`rank_pattern` must map"),
    ],
    ids=["unmatched", "not_a_target", "zero", "float", "negative", "list"],
)
def test_bad_patterns_are_refused_and_change_nothing(kwargs, error, message):
    model = mlp()
    flags = [layer.trainable for _, layer in iter_layers(model)]
    with pytest.raises(error, match=message):
        kl.apply_lora(model, targets=["fc1", "fc2"], rank=4, **kwargs)
    assert not lora_layers(model)
    assert [layer.trainable for _, layer in iter_layers(model)] == flags
