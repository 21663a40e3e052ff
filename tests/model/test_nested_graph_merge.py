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


def segformer():
    encoder = keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 1],
        layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[8, 16],
        image_shape=(32, 32, 3),
    )
    return keras_hub.models.SegFormerBackbone(
        image_encoder=encoder, projection_filters=8
    )


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
