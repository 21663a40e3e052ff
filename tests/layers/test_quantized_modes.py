"""Every Keras quantization mode as a LoRA base: float8 adapters, GPTQ and
AWQ refusals, the requantization error bound, adapter files across modes."""

import keras
import numpy as np
import pytest
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.layers import quantized
from keras_lora.model.surgery import lora_layers


def mlp(quantize=None, config=None, units=32):
    inputs = keras.Input((16,))
    x = keras.layers.Dense(units, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(units, activation="relu", name="d2")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    if quantize:
        model.quantize(quantize, config=config)
    return model


def inputs(seed=0, shape=(16, 16)):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# ----- float8 -----------------------------------------------------------------


def float8_model():
    """Dense and a multi-head EinsumDense, every kernel layer adapted.

    Not a `MultiHeadAttention`, nor a float8 layer left without adapters:
    `merge_lora` copies those by `set_weights`, and Keras orders a float8
    layer's weights differently when it is built from its config (scales
    first) than when it was quantized after building (kernel first).
    """
    inputs_ = keras.Input((5, 8))
    x = keras.layers.Dense(8, activation="relu", name="d1")(inputs_)
    x = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de", name="heads"
    )(x)
    x = keras.layers.Reshape((5, 8))(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs_, keras.layers.Dense(4, name="head")(x))
    model.quantize("float8")
    return model


def test_float8_bases_keep_their_kernels_frozen():
    model = float8_model()
    x = inputs(shape=(16, 5, 8))
    y = np.tanh(x.sum(axis=1)[:, :4])
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["d1", "heads", "head"], rank=2)
    layers = dict(lora_layers(lora_model))
    assert sorted(layers) == ["d1", "head", "heads"]
    assert all(layer.quantization_mode == "float8" for layer in layers.values())
    # Bitwise the float8 model's output (its bias rounding included).
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    names = sorted(w.path.split("/")[-1] for w in lora_model.trainable_weights)
    assert names == ["lora_a"] * 3 + ["lora_b"] * 3
    frozen = {
        p: [to_numpy(w).copy() for w in layer.layer.weights]
        for p, layer in layers.items()
    }

    lora_model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    lora_model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for path, layer in layers.items():
        # The kernel, and here the scaling state too: it is the base's.
        for w, value in zip(layer.layer.weights, frozen[path], strict=True):
            np.testing.assert_array_equal(to_numpy(w), value, err_msg=w.path)
        assert np.abs(to_numpy(layer.lora_b)).max() > 0

    merged = kl.merge_lora(lora_model)
    requantized = kl.merge_lora(lora_model, requantize=True)
    for path, layer in layers.items():
        m, r = merged.get_layer(path), requantized.get_layer(path)
        assert type(m) is type(layer.layer) and m.quantization_mode is None
        expected = to_numpy(layer.layer.kernel) + to_numpy(layer.delta())
        np.testing.assert_allclose(to_numpy(m.kernel), expected, rtol=1e-6, atol=1e-6)
        assert r.dtype_policy.name == "float8_from_float32"
        np.testing.assert_array_equal(to_numpy(r.kernel), to_numpy(m.kernel))


def test_float8_output_depends_on_b():
    lora_model = kl.apply_lora(mlp("float8"), targets=["d1", "d2"], rank=2)
    x = inputs()
    base = to_numpy(lora_model(x))
    for path, layer in lora_layers(lora_model):
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.5, "float32"))
        assert np.abs(to_numpy(lora_model(x)) - base).max() > 1e-3, path
        with kl.disable_adapters(lora_model):  # the float8 base exactly
            np.testing.assert_array_equal(to_numpy(lora_model(x)), base)
        layer.lora_b.assign(np.zeros(layer.lora_b.shape, "float32"))


# ----- GPTQ and AWQ: refused, nothing changed ----------------------------------


def uncalibrated_config(mode):
    # Layer-level quantization builds a GPTQ/AWQ layer without calibrating
    # it; the mode, not the calibration, decides the refusal.
    config_class = {
        "gptq": keras.quantizers.GPTQConfig,
        "awq": keras.quantizers.AWQConfig,
    }
    return config_class[mode](dataset=["a"], tokenizer=lambda t: t, group_size=-1)


@pytest.mark.parametrize("mode, name", [("gptq", "GPTQ"), ("awq", "AWQ")])
def test_gptq_and_awq_bases_are_refused(mode, name):
    inputs_ = keras.Input((8,))
    dense = keras.layers.Dense(4, name="d")
    einsum = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, name="e")
    model = keras.Model(inputs_, [dense(inputs_), einsum(inputs_)])
    for layer in (dense, einsum):
        layer.quantize(mode, config=uncalibrated_config(mode))
        assert layer.quantization_mode == mode
    weights = [to_numpy(w).copy() for w in model.weights]
    for target in ("d", "e"):
        with pytest.raises(ValueError, match=rf"'{target}' is quantized \('{mode}'\)"):
            kl.apply_lora(model, targets=[target], rank=2)
        with pytest.raises(ValueError, match=rf"{name} kernel.*calibration"):
            kl.apply_lora(model, targets=[target], rank=2, in_place=True)
    assert model.get_layer("d") is dense and model.get_layer("e") is einsum
    for w, value in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)
    with pytest.raises(ValueError, match="LoRADense supports quantized bases"):
        kl.LoRADense(dense, rank=2)


# ----- the requantization error bound ------------------------------------------

# (mode, config, policy): the modes whose kernels a requantized merge rounds.
ROUNDING_MODES = [
    ("int8", None, "int8_from_float32"),
    ("int4", keras.quantizers.Int4QuantizationConfig(block_size=-1), "int4/-1"),
    ("int4", keras.quantizers.Int4QuantizationConfig(block_size=8), "int4/8"),
]


def steps(layer):
    """The quantization step of each element of a Dense layer's kernel."""
    scale = to_numpy(layer.kernel_scale).astype("float64")
    if layer.quantization_mode == "int4" and quantized.block_size(layer) != -1:
        return scale[to_numpy(layer.g_idx).astype(int)]  # (q - zero)·scale
    return np.broadcast_to(1.0 / scale, layer.kernel.shape)  # q / scale


def in_range(layer):
    """Where Keras's quantizer can reach the value: everywhere, except in a
    sub-channel int4 group whose zero point Keras clipped to [-8, 7] (a
    group whose values are all of one sign: Keras 3.15 saturates them)."""
    if layer.quantization_mode != "int4" or quantized.block_size(layer) == -1:
        return np.ones(layer.kernel.shape, bool)
    zero = to_numpy(layer.kernel_zero)[to_numpy(layer.g_idx).astype(int)]
    return (zero > -8) & (zero < 7)


def requantization_error(mode, config):
    """Measures a requantized merge against "dequantize, add the delta,
    quantize once" and against the float merge `W + delta`.

    Returns:
        `(policy, to_once, to_float, clipped)`: the max distance in steps
        to the quantize-once reference and to `W + delta` (where Keras's
        quantizer can reach it), and the share of elements it cannot.
    """
    lora_model = randomize_adapters(
        kl.apply_lora(mlp(mode, config), targets=["d1", "d2"], rank=4), scale=0.3
    )
    merged = kl.merge_lora(lora_model)
    requantized = kl.merge_lora(lora_model, requantize=True)
    to_once, to_float, clipped, total = 0.0, 0.0, 0, 0
    for name in ("d1", "d2"):
        float_layer, layer = merged.get_layer(name), requantized.get_layer(name)
        base = lora_model.get_layer(name).layer
        # The reference: the float merge, quantized once by Keras itself.
        once = keras.layers.Dense.from_config(float_layer.get_config())
        once.build_from_config(float_layer.get_build_config())
        once.set_weights(float_layer.get_weights())
        once.quantize(mode, config=config)
        step = steps(layer)
        got = to_numpy(quantized.dequantized_kernel(layer)).astype("float64")
        reference = to_numpy(quantized.dequantized_kernel(once)).astype("float64")
        float_kernel = to_numpy(float_layer.kernel).astype("float64")
        to_once = max(to_once, float(np.max(np.abs(got - reference) / step)))
        reach = in_range(layer)
        error = np.abs(got - float_kernel) / step
        to_float = max(to_float, float(np.max(error[reach])))
        clipped, total = clipped + int((~reach).sum()), total + reach.size
        assert base.quantization_mode == mode
    return layer.dtype_policy.name, to_once, to_float, clipped / total


@pytest.mark.parametrize(
    "mode, config, policy", ROUNDING_MODES, ids=["int8", "int4_pc", "int4_b8"]
)
def test_requantized_merge_is_within_one_step(mode, config, policy):
    name, to_once, to_float, _ = requantization_error(mode, config)
    assert name.startswith(policy)
    # The bound: within one step of quantizing the float merge once
    # (measured: 0, the same codes).
    assert to_once <= 1.0
    # Rounding to the nearest code: half a step from W + delta where the
    # quantizer reaches it (1e-4 of a step: float32 rounding of the division).
    assert to_float <= 0.5 + 1e-4


# ----- adapter files across modes ----------------------------------------------


@pytest.mark.parametrize("file_format", ["keras_lora", "peft"])
def test_adapter_trained_on_int4_loads_into_float_and_int8_models(
    tmp_path, file_format
):
    float_model = mlp()
    weights = float_model.get_weights()

    def copy(mode=None, config=None):
        model = mlp()
        model.set_weights(weights)
        if mode:
            model.quantize(mode, config=config)
        return model

    int4 = kl.apply_lora(
        copy("int4", keras.quantizers.Int4QuantizationConfig(block_size=8)),
        targets=["d1", "d2"],
        rank=2,
    )
    x = inputs(1)
    y = np.sin(x[:, :1])
    int4.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    int4.fit(x, y, epochs=2, batch_size=4, verbose=0)
    adapter_path = tmp_path / "int4_adapter"
    kl.save_adapter(int4, adapter_path, format=file_format)
    trained = {p: layer for p, layer in lora_layers(int4)}
    for mode in (None, "int8"):
        model = kl.apply_lora(copy(mode), targets=["d1", "d2"], rank=2)
        before = to_numpy(model(x))
        kl.load_adapter(model, adapter_path)
        for path, layer in lora_layers(model):
            assert layer.quantization_mode == mode
            for got, want in (
                (layer.lora_a, trained[path].lora_a),
                (layer.lora_b, trained[path].lora_b),
            ):
                np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
            # `delta()` is `(W + scale·A·B) - W` in float32: the same up to
            # the rounding at each base's W (|W| < 1 here: ulp 6e-8).
            np.testing.assert_allclose(
                to_numpy(layer.delta()),
                to_numpy(trained[path].delta()),
                rtol=0,
                atol=1e-6,
            )
        assert np.abs(to_numpy(model(x)) - before).max() > 1e-4


def test_int4_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        config = keras.quantizers.Int4QuantizationConfig(block_size=8)
        model = mlp("int4", config)
    finally:
        keras.config.set_dtype_policy("float32")
    x = inputs()
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["d1", "d2"], rank=2)
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    d1 = lora_model.get_layer("d1")
    assert d1.lora_a.dtype == "float32"  # adapters never train in 16-bit
    requantized = kl.merge_lora(lora_model, requantize=True)
    assert requantized.get_layer("d1").dtype_policy.name == (
        "int4/8_from_mixed_bfloat16"
    )


@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_calibrated_kerashub_causal_lm_is_refused(mode):
    """A tiny GPT2 causal LM quantized by Keras's own GPTQ/AWQ on a small
    calibration set: `apply_lora` refuses it, names the mode, changes
    nothing."""
    from tiny_kerashub import TEXT, gpt2_causal_lm

    lm = gpt2_causal_lm()
    tokenizer = lm.preprocessor.tokenizer
    # Keras 3.15's Model.quantize refuses a preprocessor's tokenizer as an
    # unbuilt layer (it has no weights to quantize); mark it built.
    tokenizer.built = True
    config_class = {
        "gptq": keras.quantizers.GPTQConfig,
        "awq": keras.quantizers.AWQConfig,
    }[mode]
    config = config_class(
        dataset=TEXT * 2,
        tokenizer=tokenizer,
        num_samples=4,
        sequence_length=8,
        group_size=-1,
    )
    lm.quantize(mode, config=config)
    dense = lm.backbone.get_layer("transformer_layer_0")._feedforward_output_dense
    assert dense.quantization_mode == mode
    assert getattr(dense, f"is_{mode}_calibrated")
    before = [to_numpy(w).copy() for w in lm.weights]
    with pytest.raises(ValueError, match=rf"quantized \('{mode}'\).*calibration"):
        kl.apply_lora(lm, in_place=True)
    assert (
        lm.backbone.get_layer("transformer_layer_0")._feedforward_output_dense is dense
    )
    for w, value in zip(lm.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_merge_copies_an_unadapted_float8_layer_by_variable_name():
    # A float8 layer rebuilt from its config lists its scales first; merge_lora
    # must still copy every variable of the unadapted head into its twin.
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    model.quantize("float8")
    lora = randomize_adapters(kl.apply_lora(model, targets=["d1"], rank=2))
    merged = kl.merge_lora(lora)
    old = {v.name: to_numpy(v) for v in lora.get_layer("head").weights}
    new = {v.name: to_numpy(v) for v in merged.get_layer("head").weights}
    assert old.keys() == new.keys()
    for name, value in old.items():
        np.testing.assert_array_equal(new[name], value, err_msg=name)
    assert merged.get_layer("head").quantization_mode == "float8"
