"""A layer whose owner does its math itself cannot take an adapter.

KerasHub's Gemma4 feed-forward computes `ops.matmul(x, self.gating_ffw.kernel)`
instead of calling `self.gating_ffw`: a LoRA layer put there would never be
used, and merging its adapter would change the model. Named targets like that
are refused; a rule (`"all-linear"`, `None`) leaves them out with a warning.
"""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers


@keras.saving.register_keras_serializable(package="test_bypassed")
class MatmulBlock(keras.layers.Layer):
    """Holds `proj` but multiplies by its kernel itself; `out` is called."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.Dense(8, use_bias=False, name="proj")
        self.out = keras.layers.Dense(4, name="out")

    def build(self, input_shape):
        self.proj.build(input_shape)
        self.out.build((*input_shape[:-1], 8))

    def call(self, x):
        return self.out(keras.ops.matmul(x, self.proj.kernel))


def block_model():
    inputs = keras.Input((6,))
    x = MatmulBlock(name="block")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


X = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_named_bypassed_target_is_refused_and_nothing_changes(in_place):
    model = block_model()
    before = keras.ops.convert_to_numpy(model(X))
    flags = [layer.trainable for _, layer in iter_layers(model)]
    with pytest.raises(ValueError, match=r"MatmulBlock.call reads `self.proj.kernel`"):
        kl.apply_lora(model, targets=["proj", "out"], rank=2, in_place=in_place)
    assert not lora_layers(model)
    assert [layer.trainable for _, layer in iter_layers(model)] == flags
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(X)), before)


def test_a_rule_leaves_bypassed_layers_out_with_a_warning():
    model = block_model()
    with pytest.warns(UserWarning, match=r"left out 'block/proj'"):
        lora = kl.apply_lora(model, targets="all-linear", rank=2)
    assert [p for p, _ in lora_layers(lora)] == ["block/out"]


@keras.saving.register_keras_serializable(package="test_bypassed")
class UnusedBranchBlock(keras.layers.Layer):
    """Holds `spare`, which its call never uses (it is never built)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.used = keras.layers.Dense(4, name="used")
        self.spare = keras.layers.Dense(4, name="spare")

    def call(self, x):
        return self.used(x)


def unused_branch_model():
    inputs = keras.Input((6,))
    x = UnusedBranchBlock(name="block")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_a_never_built_layer_is_refused_by_name_and_left_out_by_a_rule():
    model = unused_branch_model()
    assert not model.get_layer("block").spare.built
    with pytest.raises(ValueError, match=r"'block/spare' \(never built"):
        kl.apply_lora(model, targets=["used", "spare"], rank=2)
    assert not lora_layers(model)
    with pytest.warns(UserWarning, match=r"left out 'block/spare' \(never built"):
        lora = kl.apply_lora(model, targets="all-linear", rank=2)
    assert [p for p, _ in lora_layers(lora)] == ["block/used"]
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(np.ones(layer.lora_b.shape, "float32"))
    merged = kl.merge_lora(lora)  # no unbuilt LoRA layer to crash the merge
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged(X)),
        keras.ops.convert_to_numpy(lora(X)),
        atol=1e-5,  # float32 outputs of size ~1: a few ulps
    )


def test_gemma4_all_linear_keeps_what_trains_and_merges_exactly():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=64,
        image_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    with pytest.warns(UserWarning, match=r"reads `self.gating_ffw.kernel` itself"):
        kl.apply_lora(backbone, targets="all-linear", rank=2, in_place=True)
    adapted = sorted(p.rsplit("/", 1)[-1] for p, _ in lora_layers(backbone))
    assert adapted == ["attention_output", "key", "query", "value"]
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(backbone):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    inputs = {
        "token_ids": np.array([[1, 2, 3, 4]]),
        "padding_mask": np.ones((1, 4), "int32"),
        "position_ids": np.arange(4)[None],
    }
    lora_out = keras.ops.convert_to_numpy(backbone(inputs))
    merged = kl.merge_lora(backbone)
    assert type(merged) is type(backbone)
    # float32 hidden states of size ~1; the merge reorders one sum per
    # kernel: a few ulps, far below the 0.14 an ignored adapter gave.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged(inputs)), lora_out, atol=1e-5
    )
    with pytest.raises(
        ValueError, match=r"reads `self.gating_ffw.kernel` itself\) would never"
    ):
        kl.apply_lora(merged, targets=["ffw_gating"], rank=2, in_place=True)
