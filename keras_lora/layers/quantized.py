"""Quantized bases (QLoRA): frozen low-bit kernels under float adapters.

Keras quantizes `Dense` and `EinsumDense` with `layer.quantize(mode)`. As a
LoRA base:

- `"int8"` and `"int4"` (per-channel, `int4/-1`, or sub-channel with a
  block size, `int4/128`): the base's own quantized op (Keras's
  `quantized_call`) computes `x·W` and the adapters' update goes in before
  the bias and the activation. Merging dequantizes the kernel exactly as
  Keras's op does; `requantize=True` quantizes the merged kernel once, in
  the base's mode and block size.
- `"float8"` (Keras's float8 training): the kernel is a float kernel, its
  scaling state (`*_scale`, `*_amax_history`) belongs to the base and stays
  as frozen as the base's other weights.
- `"gptq"` and `"awq"` are refused (see `REFUSED`).

Keras's quantized calls end with the bias and the activation, so they run
on a read-only view of the base whose `bias` and `activation` are `None`:
the shared base layer itself is never modified (two threads, or two
models sharing the base, can call it at once).
"""

import types

import keras
from keras import ops

from keras_lora.layers import hot_path

# Modes a LoRA layer refuses, with the reason its error gives.
REFUSED = {
    "gptq": (
        "A GPTQ kernel is the output of a calibration (Hessian-weighted "
        "rounding over a calibration set): merging an adapter into it cannot "
        "give back a GPTQ layer without that set, so adapters over GPTQ "
        "bases are not supported. Apply LoRA to the float model and "
        "quantize the merged model with GPTQ afterwards."
    ),
    "awq": (
        "An AWQ kernel is the output of a calibration (activation-aware "
        "scales from a calibration set): merging an adapter into it cannot "
        "give back an AWQ layer without that set, so adapters over AWQ bases "
        "are not supported. Apply LoRA to the float model and quantize the "
        "merged model with AWQ afterwards."
    ),
}


class _WithoutEpilogue:
    """A read-only view of `layer` without bias and activation.

    The layer class's methods run bound to the view, so that the `self` of
    Keras's quantized call reads `bias` and `activation` from here; every
    other attribute (variables, quantizers, properties) is the layer's.
    """

    bias = None
    activation = None
    logit_soft_cap = None  # a ReversibleEmbedding's, applied after the adapters

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        method = getattr(type(self._layer), name, None)
        if isinstance(method, types.FunctionType):
            return types.MethodType(method, self)
        return getattr(self._layer, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"read-only view of layer '{self._layer.name}'")


def without_epilogue(layer):
    """A view of `layer` for `quantized_product`; make it once and keep it."""
    return _WithoutEpilogue(layer)


def quantized_product(view, inputs, training=None):
    """`x·W` by the quantized base's own op, before bias and activation."""
    layer = view._layer
    return type(layer).quantized_call(view, inputs, training=training)


def quantized_lookup(view, inputs, reverse=False):
    """An embedding's quantized lookup (or, with `reverse`, its logits
    before any soft cap) by the base's own op."""
    layer = view._layer
    if not reverse:  # a lookup has no epilogue: the layer's own call
        return layer.quantized_call(inputs)
    return type(layer).quantized_call(view, inputs, reverse=True)


def check_embedding(layer):
    """Raises for a quantized untied `ReversibleEmbedding`: its separate
    reverse table is quantized too, and a merge would copy its codes."""
    mode = getattr(layer, "quantization_mode", None)
    if mode and getattr(layer, "tie_weights", True) is False:
        raise ValueError(
            f"Layer '{layer.name}' is a quantized ({mode!r}) ReversibleEmbedding "
            "with tie_weights=False; LoRAEmbedding supports quantized "
            "Embedding and tied ReversibleEmbedding bases only."
        )


def add_bias(layer, x):
    """`x + bias` as the base's quantized call adds it: float8 rounds a
    float32 bias to bfloat16 first (Keras's `_float8_call`)."""
    bias = hot_path.value(layer.bias)
    if layer.quantization_mode == "float8" and (
        layer.dtype_policy.compute_dtype == "float32"
    ):
        bias = ops.cast(ops.cast(bias, "bfloat16"), bias.dtype)
    return x + bias


def block_size(layer):
    """The int4 block size of `layer`: a positive int (sub-channel), or -1
    (one scale per output unit)."""
    size = getattr(layer.dtype_policy, "block_size", None)
    if size is None:
        size = getattr(layer, "_int4_block_size", None)
    return -1 if size is None else int(size)


def dequantized_kernel(layer):
    """The float32 kernel a quantized `layer` stands for, computed as the
    layer's own quantized op dequantizes it."""
    mode = layer.quantization_mode
    if isinstance(layer, keras.layers.Embedding) and mode in ("int8", "int4"):
        return _dequantized_embeddings(layer)
    if mode == "int8":
        scale = ops.convert_to_tensor(layer.kernel_scale)
        adjust = getattr(layer, "_adjust_scale_for_dequant", None)
        if adjust is not None:
            scale = adjust(scale)
        kernel = ops.cast(layer._kernel, "float32")
        return ops.divide(kernel, ops.cast(scale, "float32"))
    if mode == "int4":
        return _dequantized_int4(layer)
    if mode == "float8":
        return ops.cast(layer.kernel, "float32")
    raise NotImplementedError(f"Dequantizing mode {mode!r}")


def _dequantized_embeddings(layer):
    # One scale per row (token), or per row and group of columns.
    table = ops.convert_to_tensor(layer._embeddings)
    if layer.quantization_mode == "int4":
        table = keras.quantizers.unpack_int4(
            table, layer._orig_output_dim, axis=-1, dtype="int8"
        )
    table = ops.cast(table, "float32")
    scale = ops.cast(ops.convert_to_tensor(layer.embeddings_scale), "float32")
    if layer.quantization_mode == "int8" or block_size(layer) == -1:
        return ops.divide(table, ops.expand_dims(scale, -1))
    groups = ops.cast(ops.convert_to_tensor(layer.g_idx), "int32")
    zero = ops.cast(ops.convert_to_tensor(layer.embeddings_zero), "float32")
    return ops.multiply(
        ops.subtract(table, ops.take(zero, groups, axis=1)),
        ops.take(scale, groups, axis=1),
    )


def _dequantized_int4(layer):
    # Keras keeps a 2-D `[rows, columns]` kernel, two int4 per byte along
    # the columns; an EinsumDense reshapes it to its kernel shape.
    columns = getattr(layer, "_int4_unpacked_column_size", None)
    if columns is None:
        columns = layer._orig_output_dim
    unpacked = keras.quantizers.unpack_int4(
        ops.convert_to_tensor(layer._kernel), columns, axis=-1, dtype="int8"
    )
    unpacked = ops.cast(unpacked, "float32")
    scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
    if block_size(layer) == -1:
        kernel = ops.divide(unpacked, scale)
    else:  # asymmetric groups of rows: (q - zero)·scale of the row's group
        groups = ops.cast(ops.convert_to_tensor(layer.g_idx), "int32")
        zero = ops.cast(ops.convert_to_tensor(layer.kernel_zero), "float32")
        kernel = ops.multiply(
            ops.subtract(unpacked, ops.take(zero, groups, axis=0)),
            ops.take(scale, groups, axis=0),
        )
    shape = getattr(layer, "original_kernel_shape", None)
    return kernel if shape is None else ops.reshape(kernel, shape)


def requantize(layer, mode, base):
    """Quantizes the float `layer` (a merged copy of `base`) in `base`'s
    mode: for int4 with `base`'s block size."""
    config = getattr(base, "quantization_config", None)
    if mode == "int4":
        block = block_size(base)
        if getattr(config, "block_size", block) != block:
            config = None
        if config is None:
            config = keras.quantizers.Int4QuantizationConfig(block_size=block)
    layer.quantize(mode, config=config)
