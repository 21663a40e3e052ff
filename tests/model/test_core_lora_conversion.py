"""`kl.from_core_lora`: from Keras core's `enable_lora` to keras_lora, with
the same outputs."""

import keras
import numpy as np
import pytest
import tiny_kerashub
from conftest import to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

# Core computes `x·(W + s·A·B)`, keras_lora `x·W + s·(x·A)·B`: the same sum
# in another order, so float32 rounding (about 1e-7 relative) differs.
ATOL = 1e-5


def randomize_core_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "lora" in w.path:
            w.assign(rng.normal(0, 0.3, w.shape).astype(w.dtype))


def core_lora_model():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(inputs)
    x = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 4), name="proj")(x)
    x = keras.layers.Reshape((5, 8))(x)
    x = keras.layers.Dense(6, name="dense")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    model.get_layer("embed").enable_lora(2)
    model.get_layer("proj").enable_lora(3)
    model.get_layer("dense").enable_lora(2, lora_alpha=4.0)  # scale 2, not 1
    randomize_core_lora(model)
    return model


def test_copy_keeps_outputs_and_factors():
    model = core_lora_model()
    x = np.random.default_rng(1).integers(0, 20, (3, 5)).astype("int32")
    out = to_numpy(model(x))

    converted = kl.from_core_lora(model)

    assert converted is not model and model.get_layer("dense").lora_enabled
    layers = dict(lora_layers(converted))
    assert sorted(layers) == ["dense", "embed", "proj"]
    assert layers["proj"].factoring == "keras"
    assert (layers["dense"].rank, layers["dense"].scale) == (2, 2.0)
    assert not any(
        getattr(layer.layer, "lora_enabled", False) for layer in layers.values()
    )
    np.testing.assert_allclose(to_numpy(converted(x)), out, atol=ATOL)
    np.testing.assert_array_equal(
        to_numpy(layers["proj"].lora_a), to_numpy(model.get_layer("proj").lora_kernel_a)
    )
    trainable = sorted(w.path for w in converted.trainable_weights)
    assert all(p.split("/")[-1] in ("lora_a", "lora_b") for p in trainable)
    assert len(trainable) == 6


def test_kerashub_backbone_with_enable_lora_in_place():
    backbone = tiny_kerashub.backbone("gpt2")
    backbone.enable_lora(2)  # KerasHub: query and value
    randomize_core_lora(backbone)
    x = tiny_kerashub.backbone_inputs(backbone)
    out = to_numpy(backbone(x))
    cls = type(backbone)

    assert kl.from_core_lora(backbone, in_place=True) is backbone

    assert type(backbone) is cls
    assert [p.split("/")[-1] for p, _ in lora_layers(backbone)] == ["query", "value"]
    np.testing.assert_allclose(to_numpy(backbone(x)), out, atol=ATOL)
    merged = kl.merge_lora(backbone)
    assert type(merged) is cls and not lora_layers(merged)
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=ATOL)


def test_bad_input():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no layer with Keras core LoRA"):
        kl.from_core_lora(model)
    with pytest.raises(TypeError, match="keras.Model"):
        kl.from_core_lora(keras.layers.Dense(2))
    model.layers[0].enable_lora(1)
    with pytest.raises(TypeError, match="in_place"):
        kl.from_core_lora(model, in_place=1)
    backbone = tiny_kerashub.backbone("gpt2")
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="in_place=True"):
        kl.from_core_lora(backbone)
    assert backbone.get_layer(
        "transformer_layer_0"
    )._self_attention_layer._query_dense.lora_enabled


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_projection_inside_multi_head_attention(in_place):
    """`enable_lora` on a projection of a `MultiHeadAttention`: the MHA's
    config does not record it, so the copy must enable it before taking the
    weights (it used to fail in Keras's `set_weights`)."""
    inputs = keras.Input((4, 8))
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(mha(inputs, inputs)))
    mha.query_dense.enable_lora(2, lora_alpha=6.0)
    randomize_core_lora(model)
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype("float32")
    out = to_numpy(model(x))

    converted = kl.from_core_lora(model, in_place=in_place)

    layers = dict(lora_layers(converted))
    assert list(layers) == ["mha/query"]
    assert (layers["mha/query"].rank, layers["mha/query"].scale) == (2, 3.0)
    np.testing.assert_allclose(to_numpy(converted(x)), out, atol=ATOL)


def test_core_dora_layers_are_refused_until_keras_releases_them():
    # Keras core's DoRA (open PRs keras#23382-23385) marks a layer with
    # `dora_enabled`; no released Keras sets it, so this stands in for one.
    inputs = keras.Input((8,))
    core = keras.layers.Dense(4, name="core")
    model = keras.Model(inputs, core(inputs))
    core.enable_lora(rank=2)
    core.dora_enabled = True
    with pytest.raises(ValueError, match=r"\['core'\].*Keras core's DoRA"):
        kl.from_core_lora(model)
    assert core.lora_enabled and model.get_layer("core") is core
