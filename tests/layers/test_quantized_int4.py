"""QLoRA over int4 bases (`model.quantize("int4")`), per-channel and
sub-channel, on `Dense` and `EinsumDense` (the attention projections)."""

import keras
import numpy as np
import pytest
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.layers import quantized
from keras_lora.model.surgery import lora_layers

TARGETS = ["d1", "query", "value", "attention_output"]
MHA_ATTRS = {
    "query": "_query_dense",
    "value": "_value_dense",
    "attention_output": "_output_dense",
}

# (block_size, Keras dtype policy of the quantized layers): -1 is one scale
# per output unit; 8 makes two groups of rows in the (16, ...) kernels.
CONFIGS = [(-1, "int4/-1_from_float32"), (8, "int4/8_from_float32")]


def int4_model(block_size):
    inputs = keras.Input((5, 16))
    x = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    model.quantize("int4", config=config)
    return model


def frozen_values(layer):
    """The packed int4 kernel and its scale (and zero point, group index)."""
    return {w.path: to_numpy(w).copy() for w in layer.weights}


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 16)).astype("float32")
    return x, np.tanh(x[:, :, :2].sum(axis=(1, 2)))[:, None]


def reference_requantized(merged_layer, mode_layer, float_kernel):
    """ "Dequantize, add the delta, quantize once": a fresh float copy of
    `merged_layer` holding `float_kernel`, quantized by Keras like the base
    `mode_layer`."""
    layer = merged_layer.__class__.from_config(merged_layer.get_config())
    layer.build_from_config(merged_layer.get_build_config())
    layer.set_weights(
        [
            float_kernel if w.path.endswith("kernel") else to_numpy(w)
            for w in merged_layer.weights
        ]
    )
    quantized.requantize(layer, "int4", mode_layer)
    return layer


@pytest.mark.parametrize("block_size, policy", CONFIGS, ids=["per_channel", "b8"])
def test_int4_bases_train_only_adapters_and_merge(block_size, policy):
    model = int4_model(block_size)
    x, y = data()
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=TARGETS, rank=2)
    layers = dict(lora_layers(lora_model))
    assert sorted(layers) == ["d1", "mha/attention_output", "mha/query", "mha/value"]
    for layer in layers.values():
        assert layer.quantization_mode == "int4"
        assert layer.layer.dtype_policy.name == policy
    # Right after apply_lora: bitwise the int4 model's output.
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    frozen = {p: frozen_values(layer.layer) for p, layer in layers.items()}
    assert all(
        w.path.split("/")[-1].startswith("lora_") for w in lora_model.trainable_weights
    )
    assert len(lora_model.trainable_weights) == 2 * len(layers)

    lora_model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    first = float(np.mean((to_numpy(lora_model(x)) - y) ** 2))
    lora_model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert float(np.mean((to_numpy(lora_model(x)) - y) ** 2)) < first
    for path, layer in layers.items():
        assert np.abs(to_numpy(layer.lora_b)).max() > 0  # B trained
        for name, value in frozen_values(layer.layer).items():
            np.testing.assert_array_equal(value, frozen[path][name], err_msg=name)
    out = to_numpy(lora_model(x))

    merged = kl.merge_lora(lora_model)
    requantized = kl.merge_lora(lora_model, requantize=True)
    for path, layer in layers.items():
        m = merged.get_layer(path.split("/")[0])
        r = requantized.get_layer(path.split("/")[0])
        if path.startswith("mha/"):
            attr = MHA_ATTRS[path.split("/")[1]]
            m, r = getattr(m, attr), getattr(r, attr)
        assert type(m) is type(layer.layer) and m.quantization_mode is None
        expected = to_numpy(quantized.dequantized_kernel(layer.layer)) + to_numpy(
            layer.delta()
        )
        np.testing.assert_allclose(to_numpy(m.kernel), expected, rtol=1e-6, atol=1e-6)
        # The base's exact mode and block size, and the same variables.
        assert r.dtype_policy.name == policy
        assert quantized.block_size(r) == block_size
        assert [w.shape for w in r.weights] == [w.shape for w in layer.layer.weights]
        # Quantizing the float merge once, independently: the same codes.
        ref = reference_requantized(m, layer.layer, to_numpy(m.kernel))
        for got, want in zip(r.weights, ref.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    # Merged in float: the int4 LoRA model's function (same float kernels);
    # the float and int4 products round differently (float32, ~1e-6).
    np.testing.assert_allclose(to_numpy(merged(x)), out, rtol=1e-4, atol=1e-5)
    assert np.isfinite(to_numpy(requantized(x))).all()


@pytest.mark.parametrize("block_size, policy", CONFIGS, ids=["per_channel", "b8"])
def test_int4_output_depends_on_b(block_size, policy):
    model = int4_model(block_size)
    x, _ = data()
    lora_model = kl.apply_lora(model, targets=TARGETS, rank=2)
    base = to_numpy(lora_model(x))
    for path, layer in lora_layers(lora_model):
        b = layer.lora_b
        b.assign(np.full(b.shape, 0.5, "float32"))
        changed = to_numpy(lora_model(x))
        assert np.abs(changed - base).max() > 1e-4, path
        with kl.disable_adapters(lora_model):  # the int4 base exactly
            np.testing.assert_array_equal(to_numpy(lora_model(x)), base)
        b.assign(np.zeros(b.shape, "float32"))
        np.testing.assert_array_equal(to_numpy(lora_model(x)), base)


def test_int4_lora_model_round_trips_through_keras_file(tmp_path):
    inputs = keras.Input((16,))
    h = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    model.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8))
    lora_model = randomize_adapters(kl.apply_lora(model, targets=["d1"], rank=2))
    x = np.random.default_rng(3).normal(size=(4, 16)).astype("float32")
    lora_model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = reloaded.get_layer("d1")
    assert isinstance(layer, kl.LoRADense)
    assert layer.layer.dtype_policy.name == "int4/8_from_float32"
    np.testing.assert_array_equal(to_numpy(reloaded(x)), to_numpy(lora_model(x)))


def test_int4_in_place_merge_and_exact_unmerge():
    model = int4_model(8)
    x, _ = data()
    lora_model = randomize_adapters(kl.apply_lora(model, targets=TARGETS, rank=2))
    out = to_numpy(lora_model(x))
    float_merge = to_numpy(kl.merge_lora(lora_model)(x))
    kl.merge_lora(lora_model, in_place=True)
    # In place, the layers multiply by the float merged kernel.
    np.testing.assert_allclose(to_numpy(lora_model(x)), float_merge, atol=1e-6)
    kl.unmerge_lora(lora_model)
    np.testing.assert_array_equal(to_numpy(lora_model(x)), out)
