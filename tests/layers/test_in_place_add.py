"""Without autograd (Keras's `predict` on torch runs under `torch.no_grad()`),
`LoRADense` and `LoRAEinsumDense` add the adapter update and the bias into
the tensor their base product made (`hot_path.writable`), which saves two
output-sized buffers a layer on eager torch. That is only correct if
nothing else reads that tensor: here the call without autograd must equal
the call with it and the merged layer, for one adapter, two, a plain one
beside a DoRA one (DoRA reads `x·W` again), a hot-swappable scale and a
multi-head einsum; and the inputs and every variable must be left as
they were. On TensorFlow and JAX both calls take the same path.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl

# The same products summed in another order (one `addmm_` against a
# product then an add): float32 values of order one agree to a few ulps.
SAME = dict(rtol=1e-5, atol=1e-5)
# Against the merged kernel `W + s·A·B`, rounded once more per element.
MERGED = dict(rtol=1e-4, atol=1e-4)


def _dense():
    return keras.layers.Dense(6, activation="relu", name="proj"), (4, 5)


def _einsum():
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(4, 2, 3), bias_axes="de", name="proj"
    )
    return layer, (4, 5)


def _also(name, **options):
    """A second active adapter `name` beside `"default"`."""
    adapter = dict(name=name, rank=2, **options)
    return dict(adapters=[adapter], active_adapters=["default", name])


CASES = {
    "dense": (_dense, {}),
    "dense_two_adapters": (_dense, _also("second")),
    "dense_lora_beside_dora": (_dense, _also("dora", use_dora=True)),
    "dense_hotswap_scale": (_dense, dict(hotswap=True)),
    "einsum_heads": (_einsum, {}),
    "einsum_two_adapters": (_einsum, _also("second")),
}


def _model(make, options):
    base, input_shape = make()
    base.build((None,) + input_shape)
    rng = np.random.default_rng(0)
    if base.bias is not None:  # a non-zero bias, so that it is added too
        base.bias.assign(rng.normal(size=base.bias.shape).astype("float32"))
    lora = (
        kl.LoRAEinsumDense
        if isinstance(base, keras.layers.EinsumDense)
        else kl.LoRADense
    )(base, rank=3, alpha=6, **options)
    for name in lora.adapter_names:
        b = lora.get_adapter(name).b
        b.assign(rng.normal(size=b.shape).astype("float32"))
    model = keras.Sequential([keras.Input(input_shape), lora])
    x = rng.normal(size=(3,) + input_shape).astype("float32")
    return model, lora, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_call_without_autograd_equals_the_call_with_it(case):
    make, options = CASES[case]
    model, lora, x = _model(make, options)
    x_before = x.copy()
    weights_before = [to_numpy(v).copy() for v in model.weights]

    without = model.predict_on_batch(x)  # torch: under torch.no_grad()
    if keras.backend.backend() == "torch":  # `predict` copies its inputs
        import torch

        tensor = torch.from_numpy(x)  # shares `x`'s memory
        with torch.no_grad():
            np.testing.assert_array_equal(to_numpy(lora(tensor)), without)
    again = model.predict_on_batch(x)
    with_autograd = to_numpy(model(x))  # torch: the adapters require grad
    merged = to_numpy(lora.merged_layer(check_finite=False)(x))

    np.testing.assert_array_equal(x, x_before)
    for before, variable in zip(weights_before, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), before, err_msg=variable.path)
    np.testing.assert_array_equal(again, without)  # nothing accumulated
    np.testing.assert_allclose(without, with_autograd, **SAME)
    np.testing.assert_allclose(without, merged, **MERGED)
    # the update is there: the base alone differs by far more than MERGED
    base = to_numpy(lora.layer(x))
    assert np.abs(base - without).max() > 1e-2


@pytest.mark.parametrize(
    "strategy, cache",
    [("concat", False), ("concat", True), ("gather", False), ("grouped", False)]
    + [("grouped", True)],
)
def test_a_served_mixed_batch_adds_in_place_only_into_its_own_output(strategy, cache):
    """The mixed routes add each row's update into the base product's
    output too: rows must still be their own adapter's, and nothing else
    written."""
    inputs = keras.Input((5,))
    dense = keras.layers.Dense(6, activation="relu", name="proj")
    model = keras.Model(inputs, dense(inputs))
    rng = np.random.default_rng(1)
    dense.bias.assign(rng.normal(size=6).astype("float32"))
    lora = kl.apply_lora(model, targets=["proj"], rank=3)
    kl.add_adapter(lora, "second", rank=2, alpha=4)
    layer = lora.get_layer("proj")
    for name in layer.adapter_names:
        b = layer.get_adapter(name).b
        b.assign(rng.normal(size=b.shape).astype("float32"))
    served = kl.mixed_adapter_model(
        lora, ["default", "second"], strategy=strategy, cache=cache
    )
    x = rng.normal(size=(6, 5)).astype("float32")
    index = np.array([0, 1, -1, 1, 0, 1], "int32")
    x_before = x.copy()
    weights_before = [to_numpy(v).copy() for v in lora.weights]

    y = served.predict_on_batch([x, index])
    np.testing.assert_array_equal(served.predict_on_batch([x, index]), y)
    if keras.backend.backend() == "torch":
        import torch

        tensor = torch.from_numpy(x)  # shares `x`'s memory
        with torch.no_grad():
            served_y = served([tensor, torch.from_numpy(index)])
        np.testing.assert_array_equal(to_numpy(served_y), y)
    np.testing.assert_array_equal(x, x_before)
    for before, variable in zip(weights_before, lora.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), before, err_msg=variable.path)

    w, bias = to_numpy(layer.layer.kernel), to_numpy(layer.layer.bias)
    for row, k in enumerate(index):
        expected = x[row] @ w + bias
        if k >= 0:
            adapter = layer.get_adapter(["default", "second"][k])
            a, b = to_numpy(adapter.a), to_numpy(adapter.b)
            expected = expected + adapter.scale * (x[row] @ a) @ b
        np.testing.assert_allclose(y[row], np.maximum(expected, 0), **MERGED)


def test_a_subclass_update_is_still_called_without_autograd():
    """The in-place path computes `LoRADense`'s own update; a subclass that
    overrides `_update` keeps its update in `predict` too."""

    class Doubled(kl.LoRADense):
        def _update(self, inputs, adapter, dtype, training=None):
            return 2 * super()._update(inputs, adapter, dtype, training)

    base, input_shape = _dense()
    base.build((None,) + input_shape)
    layer = Doubled(base, rank=3)
    rng = np.random.default_rng(2)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    model = keras.Sequential([keras.Input(input_shape), layer])
    x = rng.normal(size=(3,) + input_shape).astype("float32")
    w, bias = to_numpy(base.kernel), to_numpy(base.bias)
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    doubled = np.maximum(x @ w + bias + 2 * layer.scale * (x @ a) @ b, 0)
    np.testing.assert_allclose(model.predict_on_batch(x), doubled, **MERGED)
    np.testing.assert_allclose(to_numpy(model(x)), doubled, **MERGED)


def test_a_bias_that_broadcasts_the_output_is_added_as_before():
    """An einsum bias over an axis the input has as 1 widens the output: the
    sum cannot go into the base product's tensor, and is what Keras gives."""
    base = keras.layers.EinsumDense(
        "abc,cd->abd", output_shape=(5, 4), bias_axes="bd", name="proj"
    )
    base.build((None, 5, 3))
    rng = np.random.default_rng(3)
    base.bias.assign(rng.normal(size=base.bias.shape).astype("float32"))
    layer = kl.LoRAEinsumDense(base, rank=2)
    x = rng.normal(size=(2, 1, 3)).astype("float32")
    expected = to_numpy(base(x))  # the adapter's B is zero: the base's output
    if keras.backend.backend() == "torch":  # as `predict` runs it
        import torch

        with torch.no_grad():
            y = to_numpy(layer(torch.from_numpy(x)))
    else:
        y = to_numpy(layer(x))
    assert y.shape == expected.shape == (2, 5, 4)
    np.testing.assert_allclose(y, expected, **SAME)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_kerashub_backbone_predicts_what_it_computes_with_autograd(name):
    """KerasHub's own attention and feed-forward layers (built from config)
    around the in-place adds: `predict` equals the call with autograd and
    the merged backbone."""
    from tiny_kerashub import backbone, backbone_inputs

    model = kl.apply_lora(backbone(name), rank=4, in_place=True)
    rng = np.random.default_rng(4)
    for layer in model._flatten_layers():
        if isinstance(layer, kl.LoRALayer):
            b = layer.lora_b
            b.assign(0.05 * rng.normal(size=b.shape).astype("float32"))
    inputs = backbone_inputs(model, batch=2)
    without = model.predict_on_batch(inputs)
    np.testing.assert_array_equal(model.predict_on_batch(inputs), without)
    np.testing.assert_allclose(without, to_numpy(model(inputs)), **SAME)
    merged = kl.merge_lora(model).predict_on_batch(inputs)
    np.testing.assert_allclose(without, merged, **MERGED)
    base = to_numpy(backbone(name)(inputs))  # the same seed: the frozen base
    assert np.abs(base - without).max() > 1e-2
