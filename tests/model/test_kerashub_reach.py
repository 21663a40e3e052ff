"""LoRA in place on 14 KerasHub text backbones, built tiny from config.

Each backbone gets adapters on its attention projections and its
feed-forward layers, in place: the object and its class are kept, its
outputs are unchanged right after conversion (B starts at zero), and one
training step moves the adapters and nothing else.
"""

import keras
import numpy as np
import pytest
import tiny_kerashub
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers

PROJECTIONS = (keras.layers.Dense, keras.layers.EinsumDense)


def block_projections(backbone):
    """The paths of the Dense/EinsumDense layers inside transformer blocks:
    attention query/key/value/output and the feed-forward layers."""
    return [
        path
        for path, layer in iter_layers(backbone)
        if isinstance(layer, PROJECTIONS) and "/" in path
    ]


@pytest.mark.parametrize("name", list(tiny_kerashub.BACKBONES))
def test_in_place_reach(name):
    backbone = tiny_kerashub.backbone(name)
    cls = type(backbone)
    x = tiny_kerashub.backbone_inputs(backbone)
    before = keras.tree.map_structure(to_numpy, backbone(x))
    targets = block_projections(backbone)
    # Attention (4 projections) and feed-forward (2 or 3) in one block.
    assert len(targets) >= 6

    result = kl.apply_lora(backbone, targets=targets, rank=2, in_place=True)

    assert result is backbone and type(backbone) is cls
    assert [p for p, _ in lora_layers(backbone)] == targets
    after = keras.tree.map_structure(to_numpy, backbone(x))
    for old, new in zip(
        keras.tree.flatten(before), keras.tree.flatten(after), strict=True
    ):
        np.testing.assert_array_equal(old, new)  # B = 0: exactly the same
    trainable = backbone.trainable_weights
    assert len(trainable) == 2 * len(targets)
    assert all(w.path.split("/")[-1] in ("lora_a", "lora_b") for w in trainable)

    weights = {id(w): to_numpy(w).copy() for w in backbone.weights}
    backbone.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=False)
    targets_y = keras.tree.map_structure(lambda a: np.ones_like(a), before)
    backbone.train_on_batch(x, targets_y)
    changed = [
        w.path
        for w in backbone.weights
        if not np.array_equal(to_numpy(w), weights[id(w)])
    ]
    assert changed and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in changed)
    # Every adapter is in the call path: giving one adapter weights moves
    # the output. Float32 noise on these O(1) outputs is about 1e-7; a
    # query adapter under near-uniform attention (tiny random weights) moves
    # them by about 3e-4, so 1e-5 separates the two.
    rng = np.random.default_rng(0)
    for path, layer in lora_layers(backbone):
        randomize_adapters(backbone, scale=0.0)  # all adapters off
        for w in (layer.lora_a, layer.lora_b):
            w.assign(rng.normal(0, 0.5, w.shape).astype(w.dtype))
        moved = keras.tree.map_structure(to_numpy, backbone(x))
        assert (
            max(
                np.abs(a - b).max()
                for a, b in zip(
                    keras.tree.flatten(before), keras.tree.flatten(moved), strict=True
                )
            )
            > 1e-5
        ), path
