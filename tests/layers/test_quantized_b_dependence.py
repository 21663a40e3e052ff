"""The adapters count in every quantization mode `apply_lora` accepts.

One table, mode x layer type, as in docs/quantized.md: with `B = 0` the
LoRA layer gives its quantized base's output bitwise, with `B != 0` the
output moves, and setting `B` back to zero gives the base bitwise again.
(Keras core's own LoRA accepts an AWQ layer and never adds its adapter;
the GPTQ/AWQ refusals are tested in `test_quantized_modes.py`.)
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl

Int4 = keras.quantizers.Int4QuantizationConfig
MODES = {
    "int8": ("int8", None),
    "int4_per_channel": ("int4", Int4(block_size=-1)),
    "int4_block4": ("int4", Int4(block_size=4)),
    "float8": ("float8", None),
}


def dense():
    layer = keras.layers.Dense(8, name="dense")
    layer.build((None, 8))
    return layer, kl.LoRADense, np.random.default_rng(0).normal(size=(4, 8))


def einsum_dense():
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de", name="heads"
    )
    layer.build((None, 3, 8))
    x = np.random.default_rng(1).normal(size=(4, 3, 8))
    return layer, kl.LoRAEinsumDense, x


def embedding():
    layer = keras.layers.Embedding(20, 8, name="emb")
    layer.build()
    return layer, kl.LoRAEmbedding, np.arange(12).reshape(3, 4) % 20


LAYERS = {"Dense": dense, "EinsumDense": einsum_dense, "Embedding": embedding}
CASES = [
    (mode, layer_type)
    for mode in MODES
    for layer_type in LAYERS
    # Keras has no float8 embedding.
    if not (mode == "float8" and layer_type == "Embedding")
]


@pytest.mark.parametrize("mode, layer_type", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_output_depends_on_b_in_every_accepted_mode(mode, layer_type):
    base, lora_class, x = LAYERS[layer_type]()
    quantize_mode, config = MODES[mode]
    base.quantize(quantize_mode, config=config)
    assert base.quantization_mode == quantize_mode
    x = x.astype("int32" if layer_type == "Embedding" else "float32")
    quantized_output = to_numpy(base(x))

    lora = lora_class(base, rank=2)
    a, b = lora.lora_a, lora.lora_b
    # LoRAEmbedding starts with A = 0 (as PEFT's embeddings do): give every
    # type a non-zero A, so that B alone decides.
    a.assign(np.random.default_rng(2).normal(size=a.shape).astype("float32"))
    b.assign(np.zeros(b.shape, "float32"))
    # B = 0: the quantized layer's own output, bitwise.
    np.testing.assert_array_equal(to_numpy(lora(x)), quantized_output)
    b.assign(np.full(b.shape, 0.5, "float32"))
    moved = np.abs(to_numpy(lora(x)) - quantized_output).max()
    # A ~ N(0, 1) and B = 0.5 move the output by O(1); float8's bfloat16
    # rounding is ~1e-2 of O(1) values.
    assert moved > 1e-2, (mode, layer_type, moved)
    b.assign(np.zeros(b.shape, "float32"))
    np.testing.assert_array_equal(to_numpy(lora(x)), quantized_output)
