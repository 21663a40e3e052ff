"""QLoRA-style: adapters over frozen int8 kernels (`model.quantize("int8")`)."""

import keras
import numpy as np
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers


def mse(model, x, y):
    """The loss, computed eagerly: no extra compiled `evaluate` step."""
    return float(np.mean((to_numpy(model(x)) - y) ** 2))


# An int8 model quantizes its inputs too (per row, abs-max), so it differs
# from the float model with the same (dequantized) kernels by about 1% of the
# output's scale; measured 0.9-1.6% here. Merged models are compared to the
# int8 LoRA model within this bound, relative to the largest output.
ACTIVATION_ROUNDING = 0.05


def int8_mlp():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="d2")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    model.quantize("int8")
    return model


def dequantized(layer):
    scale = keras.ops.convert_to_tensor(layer.kernel_scale)
    if hasattr(layer, "_adjust_scale_for_dequant"):
        scale = layer._adjust_scale_for_dequant(scale)
    return to_numpy(layer._kernel).astype("float32") / to_numpy(scale)


def rel_max(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_int8_dense_trains_over_frozen_kernels_and_merges():
    model = int8_mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, rank=4)
    assert [p for p, _ in lora_layers(lora_model)] == ["d1", "d2"]
    d1 = lora_model.get_layer("d1")
    assert d1.quantization_mode == "int8" and d1.dtype_policy.name == "float32"
    # Fresh adapters: exactly the int8 model's output.
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    assert sorted(w.name for w in lora_model.trainable_weights) == [
        "lora_a",
        "lora_a",
        "lora_b",
        "lora_b",
    ]
    int8_kernel = to_numpy(d1.layer._kernel).copy()
    assert int8_kernel.dtype == np.int8

    lora_model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    first = mse(lora_model, x, y)
    lora_model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert mse(lora_model, x, y) < 0.9 * first
    np.testing.assert_array_equal(to_numpy(d1.layer._kernel), int8_kernel)
    np.testing.assert_array_equal(to_numpy(model(x)), before)

    out = to_numpy(lora_model(x))
    merged = kl.merge_lora(lora_model)
    m1 = merged.get_layer("d1")
    assert type(m1) is keras.layers.Dense and m1.quantization_mode is None
    assert m1.dtype_policy.name == "float32"
    assert merged.get_layer("head").quantization_mode == "int8"  # not adapted
    # The float merge is exact: dequantized int8 kernel + scale·A·B.
    expected = dequantized(d1.layer) + d1.scale * to_numpy(d1.lora_a) @ to_numpy(
        d1.lora_b
    )
    np.testing.assert_allclose(to_numpy(m1.kernel), expected, rtol=1e-6, atol=1e-6)
    assert rel_max(to_numpy(merged(x)), out) < ACTIVATION_ROUNDING

    requantized = kl.merge_lora(lora_model, requantize=True)
    r1 = requantized.get_layer("d1")
    assert type(r1) is keras.layers.Dense and r1.quantization_mode == "int8"
    # Rounding the merged kernel to int8: at most half a step per column.
    step = np.abs(expected).max(axis=0) / 127.0
    assert np.all(np.abs(dequantized(r1) - expected) <= 0.5 * step + 1e-6)
    assert rel_max(to_numpy(requantized(x)), out) < ACTIVATION_ROUNDING


def test_int8_mha_query_value_adapters():
    inputs = keras.Input((5, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    model.quantize("int8")
    x = np.random.default_rng(1).normal(size=(8, 5, 8)).astype("float32")
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["query", "value"], rank=2)
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    assert len(lora_model.trainable_weights) == 4
    randomize_adapters(lora_model)
    out = to_numpy(lora_model(x))
    assert np.abs(out - before).max() > 1e-3

    query = dict(lora_layers(lora_model))["mha/query"]
    merged = kl.merge_lora(lora_model)
    mq = merged.get_layer("mha")._query_dense
    assert type(mq) is keras.layers.EinsumDense and mq.quantization_mode is None
    # Standard factoring: A (dim, r), B (r, heads, head_dim).
    assert query.factoring == "standard" and tuple(query.lora_a.shape) == (8, 2)
    a, b = to_numpy(query.lora_a), to_numpy(query.lora_b).reshape(2, -1)
    delta = (a @ b).reshape(mq.kernel.shape) * query.scale
    np.testing.assert_allclose(
        to_numpy(mq.kernel), dequantized(query.layer) + delta, rtol=1e-6, atol=1e-6
    )
    assert merged.get_layer("mha")._key_dense.quantization_mode == "int8"
    assert rel_max(to_numpy(merged(x)), out) < ACTIVATION_ROUNDING
    # No `.keras` round trip here: Keras 3.15 cannot reload an int8
    # MultiHeadAttention even without LoRA (its config does not say that its
    # projections are quantized); use save_adapter/load_adapter.


def test_int8_round_trip_keeps_int8_base(tmp_path):
    lora_model = randomize_adapters(kl.apply_lora(int8_mlp(), rank=2))
    x = np.random.default_rng(2).normal(size=(4, 16)).astype("float32")
    lora_model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = reloaded.get_layer("d1")
    assert isinstance(layer, kl.LoRADense) and layer.layer.quantization_mode == "int8"
    np.testing.assert_array_equal(to_numpy(reloaded(x)), to_numpy(lora_model(x)))


def test_disabled_adapters_over_int8_bases_give_the_int8_output_exactly():
    inputs = keras.Input((6, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.Dense(8, activation="relu", name="d1")(attention)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    model.quantize("int8")
    x = np.random.default_rng(3).normal(size=(4, 6, 8)).astype("float32")
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["d1", "query", "value"], rank=2)
    randomize_adapters(lora_model, scale=0.5)
    assert rel_max(to_numpy(lora_model(x)), before) > 1e-3  # adapters count
    with kl.disable_adapters(lora_model):
        np.testing.assert_array_equal(to_numpy(lora_model(x)), before)


def test_int8_call_never_modifies_the_shared_base_layer():
    """The base layer may be shared (the model `apply_lora` was given, other
    threads): a LoRA call reads it and never sets its attributes, not even
    for the duration of Keras's quantized op."""
    dense = keras.layers.Dense(4, activation="relu", name="d")
    dense.build((None, 8))
    dense.quantize("int8")
    lora = kl.LoRADense(dense, rank=2)
    lora.lora_b.assign(np.ones(lora.lora_b.shape, "float32"))
    seen = []
    quantizer = dense.inputs_quantizer
    assert quantizer is not None  # Keras quantizes the inputs of int8 Dense

    def recording_quantizer(*args, **kwargs):
        seen.append((dense.activation, dense.bias))
        return quantizer(*args, **kwargs)

    object.__setattr__(dense, "inputs_quantizer", recording_quantizer)
    activation, bias = dense.activation, dense.bias
    state = dict(vars(dense))
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    out = to_numpy(lora(x))
    assert seen and all(a is activation and b is bias for a, b in seen)
    assert vars(dense) == state
    # Still the right output: relu(int8 product + update + bias).
    object.__setattr__(dense, "inputs_quantizer", quantizer)
    lora.adapters_disabled = True
    base = to_numpy(lora(x))
    lora.adapters_disabled = False
    assert np.abs(out - base).max() > 1e-3
    assert (out >= 0).all()
