"""Adapters over int8/int4 `Embedding` and tied `ReversibleEmbedding` bases."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers import quantized

Int4 = keras.quantizers.Int4QuantizationConfig
# (mode, config, policy); block size 4 makes two groups of the 8 columns.
CONFIGS = [
    ("int8", None, "int8_from_float32"),
    ("int4", Int4(block_size=-1), "int4/-1_from_float32"),
    ("int4", Int4(block_size=4), "int4/4_from_float32"),
]
IDS = ["int8", "int4_per_channel", "int4_b4"]


def quantized_embedding(mode, config, soft_cap=None):
    layer = keras.layers.ReversibleEmbedding(
        20, 8, tie_weights=True, logit_soft_cap=soft_cap, name="emb"
    )
    layer.build()
    layer.quantize(mode, config=config)
    return layer


def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=(4, 6)).astype("int32")
    return ids, rng.normal(size=(4, 6, 8)).astype("float32")


@pytest.mark.parametrize("mode, config, policy", CONFIGS, ids=IDS)
def test_quantized_embedding_lookup_and_tied_logits(mode, config, policy):
    emb = quantized_embedding(mode, config, soft_cap=30.0)
    ids, hidden = data()
    forward, logits = to_numpy(emb(ids)), to_numpy(emb(hidden, reverse=True))
    lora = kl.LoRAEmbedding(emb, rank=2)
    assert lora.quantization_mode == mode and emb.dtype_policy.name == policy
    # Fresh adapters (A = 0): bitwise the quantized layer, both ways.
    np.testing.assert_array_equal(to_numpy(lora(ids)), forward)
    np.testing.assert_array_equal(to_numpy(lora(hidden, reverse=True)), logits)
    # Disabled adapters: the quantized layer's own calls.
    lora.lora_a.assign(np.full(lora.lora_a.shape, 0.3, "float32"))
    lora.adapters_disabled = True
    np.testing.assert_array_equal(to_numpy(lora(ids)), forward)
    np.testing.assert_array_equal(to_numpy(lora(hidden, reverse=True)), logits)
    lora.adapters_disabled = False
    # The adapters count both ways, and depend on B.
    assert np.abs(to_numpy(lora(ids)) - forward).max() > 1e-3
    assert np.abs(to_numpy(lora(hidden, reverse=True)) - logits).max() > 1e-3
    out = to_numpy(lora(ids))
    lora.lora_b.assign(to_numpy(lora.lora_b) * 2.0)
    assert np.abs(to_numpy(lora(ids)) - out).max() > 1e-3

    merged = lora.merged_layer()
    assert type(merged) is type(emb) and merged.quantization_mode is None
    expected = to_numpy(quantized.dequantized_kernel(emb)) + to_numpy(lora.delta())
    np.testing.assert_allclose(
        to_numpy(merged.embeddings), expected, rtol=1e-6, atol=1e-6
    )
    # The quantized lookup is the dequantized table's rows (float32 rounding).
    np.testing.assert_allclose(to_numpy(merged(ids)), to_numpy(lora(ids)), atol=1e-6)
    requantized = lora.merged_layer(requantize=True)
    assert requantized.dtype_policy.name == policy
    assert [w.shape for w in requantized.weights] == [w.shape for w in emb.weights]


@pytest.mark.parametrize("mode, config, policy", CONFIGS, ids=IDS)
def test_quantized_embedding_trains_only_adapters(mode, config, policy):
    emb = quantized_embedding(mode, config)
    frozen = [to_numpy(w).copy() for w in emb.weights]
    ids, _ = data()
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Flatten()(kl.LoRAEmbedding(emb, rank=2)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    names = sorted(w.path.split("/")[-1] for w in model.trainable_weights)
    assert names == ["bias", "kernel", "lora_a", "lora_b"]
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(ids, np.ones((4, 1), "float32"), epochs=2, verbose=0)
    assert np.abs(to_numpy(model.layers[1].lora_a)).max() > 0  # A trained
    for w, value in zip(emb.weights, frozen, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value, err_msg=w.path)


def test_quantized_untied_reversible_embedding_is_refused():
    emb = keras.layers.ReversibleEmbedding(20, 8, tie_weights=False, name="emb")
    emb.build()
    emb.quantize("int8")
    with pytest.raises(
        ValueError, match="'emb' is a quantized \\('int8'\\).*tie_weights=False"
    ):
        kl.LoRAEmbedding(emb, rank=2)


@pytest.mark.parametrize("mode, config, policy", CONFIGS, ids=IDS)
def test_quantized_plain_embedding(mode, config, policy):
    emb = keras.layers.Embedding(20, 8, name="emb")
    emb.build()
    emb.quantize(mode, config=config)
    ids, _ = data()
    forward = to_numpy(emb(ids))
    lora = kl.LoRAEmbedding(emb, rank=2)
    np.testing.assert_array_equal(to_numpy(lora(ids)), forward)
    lora.lora_a.assign(np.full(lora.lora_a.shape, 0.3, "float32"))
    assert np.abs(to_numpy(lora(ids)) - forward).max() > 1e-3
    merged = lora.merged_layer()
    assert type(merged) is keras.layers.Embedding and merged.quantization_mode is None
    np.testing.assert_allclose(to_numpy(merged(ids)), to_numpy(lora(ids)), atol=1e-6)
    assert lora.merged_layer(requantize=True).dtype_policy.name == policy
