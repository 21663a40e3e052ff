"""Merging, keeping the class, a model whose blocks sit in a plain graph.

KerasHub's SegFormer (and BLIP-2) hold their image encoder as a plain
Functional model inside the backbone. Converted in place, a block there
with LoRA layers inside is held by a `LoRAContainer`; merging must see
through it to the block rebuilt from the plain config.

The model is called with `training=False`: a plain `SegFormerBackbone(x)`
runs its BatchNormalization in training mode (KerasHub 0.32; its moving
statistics change on every call), so frozen and unfrozen models differ.
"""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

keras_hub = pytest.importorskip("keras_hub")
import kerashub_families  # noqa: E402


def segformer():
    return kerashub_families.segformer()[0]


def test_segformer_in_place_lora_merges_exactly_keeping_its_class():
    model = segformer()
    images = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(model(images, training=False))
    assert kl.apply_lora(model, targets="all-linear", rank=2, in_place=True) is model
    assert type(model) is keras_hub.models.SegFormerBackbone
    # 4 attention and 2 MLP Dense per encoder block, 2 decoder projections.
    assert len(lora_layers(model)) == 2 * 6 + 2
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(images, training=False)), before
    )
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    lora_out = keras.ops.convert_to_numpy(model(images, training=False))
    assert np.abs(lora_out - before).max() > 1e-3  # the adapters matter
    merged = kl.merge_lora(model)
    assert type(merged) is keras_hub.models.SegFormerBackbone
    assert not lora_layers(merged)
    assert not any("LoRA" in type(layer).__name__ for _, layer in iter_layers(merged))
    # float32 features of size ~1; a merged kernel sums in another order.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged(images, training=False)), lora_out, atol=1e-5
    )


def blip2():
    return kerashub_families.blip2()[0]


def test_blip2_in_place_lora_merges_exactly_keeping_its_class():
    # BLIP-2's language model serializes its `language_projection` layer in
    # its own config: rebuilt from the plain config, it must come back plain.
    model = blip2()
    rng = np.random.default_rng(0)
    inputs = {
        "images": rng.uniform(size=(1, 16, 16, 3)).astype("float32"),
        "token_ids": np.ones((1, 8), "int32"),
        "padding_mask": np.ones((1, 8), "int32"),
    }
    before = keras.ops.convert_to_numpy(model(inputs, training=False))
    kl.apply_lora(model, targets="all-linear", rank=2, in_place=True)
    # `blip2_custom_opt/language_projection`, numbered on (`_1`) where the
    # session built a BLIP-2 before.
    paths = [p for p, _ in lora_layers(model)]
    assert any(
        p.startswith("blip2_custom_opt") and p.endswith("/language_projection")
        for p in paths
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(inputs, training=False)), before
    )
    for _, layer in lora_layers(model):
        layer.lora_b.assign(0.1 * rng.normal(size=layer.lora_b.shape).astype("float32"))
    lora_out = keras.ops.convert_to_numpy(model(inputs, training=False))
    assert np.abs(lora_out - before).max() > 1e-3  # the adapters matter
    merged = kl.merge_lora(model)
    assert type(merged) is keras_hub.models.BLIP2Backbone
    assert not any("LoRA" in type(layer).__name__ for _, layer in iter_layers(merged))
    # float32 hidden states of size ~1: a few ulps of reordered sums.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged(inputs, training=False)), lora_out, atol=1e-5
    )
