import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl


def mse(model, x, y):
    """The loss, computed eagerly: no extra compiled `evaluate` step."""
    return float(np.mean((to_numpy(model(x)) - y) ** 2))


CASES = [
    # (layer class, kwargs, input shape without batch)
    (
        keras.layers.Conv1D,
        {"kernel_size": 3, "padding": "causal", "dilation_rate": 2},
        (9, 3),
    ),
    (keras.layers.Conv1D, {"kernel_size": 3, "strides": 2}, (9, 3)),
    (keras.layers.Conv2D, {"kernel_size": (3, 2), "padding": "same"}, (6, 5, 3)),
    (
        keras.layers.Conv2D,
        {"kernel_size": 3, "strides": 2, "activation": "relu"},
        (7, 7, 3),
    ),
    (keras.layers.Conv3D, {"kernel_size": 2, "use_bias": False}, (4, 4, 4, 2)),
    # Grouped: the kernel (*kernel_size, in/groups, filters), A over it.
    (
        keras.layers.Conv2D,
        {"kernel_size": 3, "groups": 2, "padding": "same"},
        (6, 5, 6),
    ),
    (keras.layers.Conv1D, {"kernel_size": 3, "groups": 4, "strides": 2}, (9, 8)),
]


@pytest.mark.parametrize("cls,kwargs,input_shape", CASES)
def test_unmerged_path_equals_merged_kernel(cls, kwargs, input_shape):
    base = cls(4, name="conv", **kwargs)
    base.build((None,) + input_shape)
    if base.use_bias:
        base.bias.assign(np.linspace(-1, 1, 4).astype("float32"))
    x = np.random.default_rng(0).normal(size=(2,) + input_shape).astype("float32")
    lora = kl.LoRAConv(base, rank=2, alpha=4)
    kernel = tuple(base.kernel.shape)
    assert tuple(lora.lora_a.shape) == kernel[:-1] + (2,)
    assert tuple(lora.lora_b.shape) == (2, 4)
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))

    rng = np.random.default_rng(1)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    got = to_numpy(lora(x))
    merged = lora.merged_layer()
    assert type(merged) is cls and merged.name == "conv"
    expected = to_numpy(merged(x))
    assert np.abs(expected - to_numpy(base(x))).max() > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The delta's layout is Keras's `(*kernel_size, in, filters)`.
    a = to_numpy(lora.lora_a).reshape(-1, 2)
    delta = (a @ to_numpy(lora.lora_b)).reshape(kernel) * 2.0
    np.testing.assert_allclose(
        to_numpy(merged.kernel), to_numpy(base.kernel) + delta, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_channels_first_conv2d(channels_first_conv, groups):
    base = keras.layers.Conv2D(
        4, 3, data_format="channels_first", groups=groups, name="conv"
    )
    base.build((None, 4, 6, 6))
    lora = kl.LoRAConv(base, rank=2)
    rng = np.random.default_rng(1)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    x = rng.normal(size=(2, 4, 6, 6)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(lora(x)), to_numpy(lora.merged_layer()(x)), rtol=1e-5, atol=1e-5
    )


def test_grouped_update_stays_inside_the_groups():
    # Output channel o reads the channels of its group only, so the update
    # of a grouped kernel moves no output through another group's inputs.
    base = keras.layers.Conv2D(4, 1, groups=2, use_bias=False)
    base.build((None, 3, 3, 4))
    lora = kl.LoRAConv(base, rank=2)
    rng = np.random.default_rng(0)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    x = np.zeros((1, 3, 3, 4), "float32")
    x[..., 2:] = rng.normal(size=(1, 3, 3, 2))  # only the second group's inputs
    out = to_numpy(lora(x))
    np.testing.assert_array_equal(out[..., :2], 0.0)
    assert np.abs(out[..., 2:]).max() > 0.05


def test_refuses_transposed_and_depthwise():
    with pytest.raises(TypeError, match="LoRAConv wraps"):
        kl.LoRAConv(keras.layers.Conv2DTranspose(4, 3), rank=2)
    with pytest.raises(TypeError, match="LoRAConv wraps"):
        kl.LoRAConv(keras.layers.DepthwiseConv2D(3), rank=2)


def small_cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def test_cnn_with_conv2d_adapters_fit_merge_round_trip(tmp_path):
    model = small_cnn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = x.mean(axis=(1, 2, 3))[:, None] * 3.0
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(
        model, targets=lambda layer: isinstance(layer, keras.layers.Conv2D), rank=2
    )
    assert [type(lay).__name__ for lay in lora_model.layers[1:3]] == ["LoRAConv"] * 2
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    assert len(lora_model.trainable_weights) == 4
    kernel = to_numpy(model.get_layer("conv1").kernel).copy()

    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first = mse(lora_model, x, y)
    lora_model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert mse(lora_model, x, y) < first
    np.testing.assert_array_equal(to_numpy(model.get_layer("conv1").kernel), kernel)

    out = to_numpy(lora_model(x))
    merged = kl.merge_lora(lora_model)
    assert type(merged.get_layer("conv1")) is keras.layers.Conv2D
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)

    lora_model.save(tmp_path / "cnn.keras")
    reloaded = keras.saving.load_model(tmp_path / "cnn.keras")
    assert isinstance(reloaded.get_layer("conv2"), kl.LoRAConv)
    np.testing.assert_array_equal(to_numpy(reloaded(x)), out)

    # The adapter file alone, onto the base model, restores the outputs.
    kl.save_adapter(lora_model, tmp_path / "adapter.safetensors")
    restored = kl.load_adapter(model, tmp_path / "adapter.safetensors")
    np.testing.assert_array_equal(to_numpy(restored(x)), out)
