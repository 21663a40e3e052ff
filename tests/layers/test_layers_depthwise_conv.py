"""`LoRADepthwiseConv`: Keras's layer harness, exact outputs at init, the
exact merge, training of the adapters only, `.keras` and adapter files.

Tolerances: the unmerged path (a depthwise convolution per rank, then `B`)
and the merged kernel sum in different orders; 1e-5 on outputs of order 1
is float32 rounding, while every adapter moves the outputs by > 0.05.
"""

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import to_numpy
from keras.src import testing
from test_layer_harness import VARIANTS, _non_trainable

import keras_lora as kl
from keras_lora.layers import LoRADepthwiseConv


class LoRADepthwiseConvTest(testing.TestCase):
    @parameterized.named_parameters(*VARIANTS)
    def test_harness(self, options, trainable):
        self.run_layer_test(
            LoRADepthwiseConv,
            init_kwargs={
                "layer": keras.layers.DepthwiseConv2D(
                    3, depth_multiplier=2, padding="same"
                ),
                "rank": 2,
                **options,
            },
            input_shape=(2, 5, 5, 3),
            expected_output_shape=(2, 5, 5, 6),
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=_non_trainable(2, options),
            expected_num_seed_generators=1 if options.get("dropout") else 0,
        )


CASES = [
    # (layer class, kwargs, input shape without batch)
    (keras.layers.DepthwiseConv2D, {"kernel_size": 3, "padding": "same"}, (6, 5, 3)),
    (
        keras.layers.DepthwiseConv2D,
        {"kernel_size": (3, 2), "strides": 2, "depth_multiplier": 3},
        (7, 7, 2),
    ),
    (
        keras.layers.DepthwiseConv2D,
        {"kernel_size": 3, "dilation_rate": 2, "activation": "relu"},
        (9, 9, 2),
    ),
    (keras.layers.DepthwiseConv1D, {"kernel_size": 3, "depth_multiplier": 2}, (9, 4)),
    (
        keras.layers.DepthwiseConv1D,
        {"kernel_size": 5, "padding": "same", "use_bias": False},
        (9, 3),
    ),
]


def randomize(lora, seed=1):
    rng = np.random.default_rng(seed)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))


@pytest.mark.parametrize("cls,kwargs,input_shape", CASES)
def test_unmerged_path_equals_merged_kernel(cls, kwargs, input_shape):
    base = cls(name="dw", **kwargs)
    base.build((None,) + input_shape)
    if base.use_bias:
        base.bias.assign(np.linspace(-1, 1, base.bias.shape[0]).astype("float32"))
    x = np.random.default_rng(0).normal(size=(2,) + input_shape).astype("float32")
    lora = LoRADepthwiseConv(base, rank=2, alpha=4)
    kernel = tuple(base.kernel.shape)  # (*kernel_size, channels, multiplier)
    spatial = len(kernel) - 2
    assert tuple(lora.lora_a.shape) == kernel[:spatial] + (2,)
    assert tuple(lora.lora_b.shape) == (2,) + kernel[spatial:]
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))

    randomize(lora)
    got = to_numpy(lora(x))
    merged = lora.merged_layer()
    assert type(merged) is cls and merged.name == "dw"
    expected = to_numpy(merged(x))
    assert np.abs(expected - to_numpy(base(x))).max() > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The update: every output channel's filter mixes the same `rank` taps.
    a = to_numpy(lora.lora_a).reshape(-1, 2)
    delta = (a @ to_numpy(lora.lora_b).reshape(2, -1)).reshape(kernel) * 2.0
    np.testing.assert_allclose(
        to_numpy(merged.kernel), to_numpy(base.kernel) + delta, rtol=1e-6, atol=1e-6
    )


def test_channels_first(channels_first_conv):
    base = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, data_format="channels_first", name="dw"
    )
    base.build((None, 3, 6, 6))
    lora = LoRADepthwiseConv(base, rank=2)
    randomize(lora)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(lora(x)), to_numpy(lora.merged_layer()(x)), rtol=1e-5, atol=1e-5
    )


def test_refuses_other_layers():
    with pytest.raises(TypeError, match="LoRADepthwiseConv wraps"):
        LoRADepthwiseConv(keras.layers.Conv2D(4, 3), rank=2)
    with pytest.raises(TypeError, match="LoRADepthwiseConv wraps"):
        LoRADepthwiseConv(keras.layers.SeparableConv2D(4, 3), rank=2)


def mobile_block():
    """A MobileNet-style block: depthwise 3×3, pointwise 1×1, a head."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inputs)
    x = keras.layers.Conv2D(4, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def test_block_fit_merge_keras_file_and_adapter_file(tmp_path):
    model = mobile_block()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = x.std(axis=(1, 2, 3))[:, None] * 3.0
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["dw", "pw"], rank=2)
    assert type(lora_model.get_layer("dw")) is LoRADepthwiseConv
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    # Only the adapters train: A and B of both layers.
    assert len(lora_model.trainable_weights) == 4
    kernel = to_numpy(model.get_layer("dw").kernel).copy()

    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first = float(np.mean((to_numpy(lora_model(x)) - y) ** 2))
    lora_model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert float(np.mean((to_numpy(lora_model(x)) - y) ** 2)) < first
    np.testing.assert_array_equal(to_numpy(model.get_layer("dw").kernel), kernel)
    assert np.abs(to_numpy(lora_model.get_layer("dw").lora_b)).max() > 0

    out = to_numpy(lora_model(x))
    merged = kl.merge_lora(lora_model)
    assert type(merged.get_layer("dw")) is keras.layers.DepthwiseConv2D
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)

    lora_model.save(tmp_path / "block.keras")
    reloaded = keras.saving.load_model(tmp_path / "block.keras")
    assert type(reloaded.get_layer("dw")) is LoRADepthwiseConv
    np.testing.assert_array_equal(to_numpy(reloaded(x)), out)

    kl.save_adapter(lora_model, tmp_path / "adapter.safetensors")
    restored = kl.load_adapter(model, tmp_path / "adapter.safetensors")
    assert type(restored.get_layer("dw")) is LoRADepthwiseConv
    np.testing.assert_array_equal(to_numpy(restored(x)), out)


def test_peft_format_is_refused_with_the_reason(tmp_path):
    lora_model = kl.apply_lora(mobile_block(), targets=["dw"], rank=2)
    with pytest.raises(ValueError, match="'dw' is a DepthwiseConv2D.*no PEFT"):
        kl.save_adapter(lora_model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
