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
- `"nf4"` (`keras_lora.quantize_nf4`, QLoRA's 4-bit NormalFloat; Keras
  has none): the kernel is stored as NF4 codes, two per byte, and one
  absmax per block (`layers.nf4`); its dequantization is a table lookup
  times the block's absmax (`dequantize_nf4`), here with the others.
- `"gptq"` and `"awq"` are refused (see `REFUSED`).

Keras's quantized calls end with the bias and the activation, so they run
on a read-only view of the base whose `bias` and `activation` are `None`:
the shared base layer itself is never modified (two threads, or two
models sharing the base, can call it at once).
"""

import types

import keras
import numpy as np
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
    """A view of `layer` for `quantized_product.base_call`; make it once and
    keep it."""
    return _WithoutEpilogue(layer)


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


def kernel_params(layer, reverse=False):
    """The backend tensors `layer`'s quantized kernel is stored as.

    Returns `(codes, scale)`, or `(codes, scale, zero, g_idx)` for
    sub-channel int4: the int8 codes (int4: two per byte), the scales and,
    for sub-channel int4, the zero points and each row's group. NF4:
    `(codes, absmax)`, or with double quantization `(codes, absmax_codes,
    absmax_scale, absmax_offset)` (see `dequantize_nf4`). With
    `reverse`, those of an untied `ReversibleEmbedding`'s reverse table
    (a tied one's reverse table is its embeddings).
    """
    if layer.quantization_mode == "nf4":
        untied = reverse and not getattr(layer, "tie_weights", True)
        return tuple(
            ops.convert_to_tensor(v) for v in layer.nf4_variables(reverse=untied)
        )
    if isinstance(layer, keras.layers.Embedding):
        untied = reverse and not getattr(layer, "tie_weights", True)
        names = (
            ("reverse_embeddings", "reverse_embeddings_scale")
            if untied
            else ("_embeddings", "embeddings_scale")
        )
        zero = "reverse_embeddings_zero" if untied else "embeddings_zero"
    else:
        names, zero = ("_kernel", "kernel_scale"), "kernel_zero"
    if layer.quantization_mode == "int4" and block_size(layer) != -1:
        names = names + (zero, "g_idx")
    return tuple(ops.convert_to_tensor(getattr(layer, name)) for name in names)


def dequantized_kernel(layer, params=None, dtype="float32", reverse=False):
    """The float kernel a quantized `layer` stands for, computed as the
    layer's own quantized op dequantizes it.

    The one dequantization of the package: merging uses it, and so does
    the backward pass of the quantized product (`layers.quantized_product`).

    Args:
        layer: a layer quantized to `"int8"`, `"int4"`, `"float8"` or
            `"nf4"`.
        params: its `kernel_params(layer, reverse)`; by default read from
            the layer. The quantized product passes the values it tied to
            its input with a barrier, so that the dequantization happens
            there and nowhere else.
        dtype: the float dtype of the result.
        reverse: for an untied `ReversibleEmbedding`, its reverse table
            (`(output_dim, input_dim)`); otherwise the kernel (an
            embedding's table, `(input_dim, output_dim)`).
    """
    mode = layer.quantization_mode
    if mode == "float8":
        return ops.cast(layer.kernel, dtype)
    if mode not in ("int8", "int4", "nf4"):
        raise NotImplementedError(f"Dequantizing mode {mode!r}")
    if params is None:
        params = kernel_params(layer, reverse)
    if mode == "nf4":
        shape = layer.nf4_kernel_shape
        kernel = dequantize_nf4(params, layer.nf4_block_size, _size(shape))
        kernel = ops.reshape(ops.cast(kernel, dtype), shape)
        if reverse and not getattr(layer, "tie_weights", True):
            # An untied reverse table is stored transposed (`layers.nf4`).
            return ops.transpose(kernel)
        return kernel
    if isinstance(layer, keras.layers.Embedding):
        if reverse and not getattr(layer, "tie_weights", True):
            return _dequantized_reverse(layer, params, dtype)
        return _dequantized_embeddings(layer, params, dtype)
    if mode == "int8":
        codes, scale = params
        adjust = getattr(layer, "_adjust_scale_for_dequant", None)
        if adjust is not None:
            scale = adjust(scale)
        return ops.divide(ops.cast(codes, dtype), ops.cast(scale, dtype))
    return _dequantized_int4(layer, params, dtype)


def _dequantized_embeddings(layer, params, dtype):
    # One scale per row (token), or per row and group of columns.
    table, scale = params[:2]
    if layer.quantization_mode == "int4":
        table = unpack_int4(table, layer._orig_output_dim, axis=-1)
    if layer.quantization_mode == "int8" or block_size(layer) == -1:
        return _per_channel(table, scale, dtype, axis=0)
    return ops.cast(dequantize_groups(table, *params[1:], axis=1), dtype)


def _dequantized_reverse(layer, params, dtype):
    # An untied reverse table `(output_dim, input_dim)`: one scale per
    # column (token), or per group of rows and column.
    table, scale = params[:2]
    if layer.quantization_mode == "int4":
        table = unpack_int4(table, layer.output_dim, axis=0)
    if layer.quantization_mode == "int8" or block_size(layer) == -1:
        return _per_channel(table, scale, dtype, axis=1)
    return ops.cast(dequantize_groups(table, *params[1:], axis=0), dtype)


def _dequantized_int4(layer, params, dtype):
    # Keras keeps a 2-D `[rows, columns]` kernel, two int4 per byte along
    # the columns; an EinsumDense reshapes it to its kernel shape.
    columns = getattr(layer, "_int4_unpacked_column_size", None)
    if columns is None:
        columns = layer._orig_output_dim
    unpacked = unpack_int4(params[0], columns, axis=-1)
    if len(params) == 2:  # one scale per output unit
        kernel = _per_channel(unpacked, params[1], dtype, axis=1)
    else:  # asymmetric groups of rows: (q - zero)·scale of the row's group
        kernel = ops.cast(dequantize_groups(unpacked, *params[1:], axis=0), dtype)
    shape = getattr(layer, "original_kernel_shape", None)
    return kernel if shape is None else ops.reshape(kernel, shape)


def _per_channel(codes, scale, dtype, axis):
    """`codes / scale`, one scale per index of `axis` of the 2-D `codes`."""
    if _TORCH:
        kernel = codes.to(_torch_dtype(dtype))
        scale = scale.to(kernel.dtype)
        return kernel.div_(scale if axis == 1 else scale[:, None])
    scale = ops.cast(scale, dtype)
    if axis == 0:
        scale = ops.expand_dims(scale, -1)
    return ops.divide(ops.cast(codes, dtype), scale)


def unpack_int4(packed, length, axis):
    """Keras's `keras.quantizers.unpack_int4(packed, length, axis)`: int8
    codes in `[-8, 7]`, the same values in the same memory layout; on
    torch by bit operations on the packed bytes (`(p << 4) >> 4`
    sign-extends the low nibble, `p >> 4` the high one), a few passes
    instead of Keras's dozen."""
    if not _TORCH:
        return keras.quantizers.unpack_int4(packed, length, axis=axis, dtype="int8")
    import torch

    axis = axis % packed.ndim
    if axis != 0:  # as Keras: unpack the axis moved first, then move it back
        perm = [axis] + [i for i in range(packed.ndim) if i != axis]
        inverse = [perm.index(i) for i in range(packed.ndim)]
        return unpack_int4(packed.permute(perm), length, 0).permute(inverse)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)
    high = torch.bitwise_right_shift(packed, 4)
    unpacked = torch.stack((low, high), dim=1)
    unpacked = unpacked.reshape((2 * packed.shape[0],) + tuple(packed.shape[1:]))
    return unpacked[:length]


def dequantize_groups(codes, scale, zero, g_idx, axis):
    """Keras's `dequantize_with_sz_map(codes, scale, zero, g_idx, axis)`:
    `(codes - zero)·scale` of each index's group along `axis` of the 2-D
    `codes`, in float32, the same values.

    When the groups are consecutive blocks of one size (Keras builds and
    quantizes int4 layers with `g_idx = arange // block_size`), the scales
    and zero points broadcast over a `(groups, block)` view instead of
    being gathered into two kernel-sized tensors: the same elementwise
    ops on the same operands, so the same values. On JAX that halves the
    temporaries of a jitted step (the gathers are not fused; measured on
    the LM head of a 2-layer Llama3 at hidden 2048, vocabulary 32,000:
    616 MiB of temporaries with gathers, 318 without). On torch the
    broadcast runs in place.
    """
    if _TORCH:
        fast = _torch_dequantize_blocks(codes, scale, zero, g_idx, axis)
        if fast is not None:
            return fast
    elif _regular_blocks(codes, scale, g_idx, axis):
        return _dequantize_blocks(codes, scale, zero, axis)
    groups = ops.cast(g_idx, "int32")  # Keras's `dequantize_with_sz_map`
    scale = ops.take(scale, groups, axis=axis)
    zero = ops.cast(ops.take(zero, groups, axis=axis), scale.dtype)
    return ops.multiply(ops.subtract(codes, zero), scale)


def _regular_blocks(codes, scale, g_idx, axis):
    """Whether `g_idx` is `arange // block` along `axis`: checked where
    `g_idx` has a value; inside a traced function (its value unknown) the
    group sizes decide: Keras builds and quantizes every int4 layer with
    that `g_idx`, and checks it when it has a value."""
    length, groups = codes.shape[axis], scale.shape[axis]
    if not groups or length % groups:
        return False
    try:
        values = ops.convert_to_numpy(g_idx)
    except Exception:  # a traced value: no value to check
        return True
    return bool(np.array_equal(values, np.arange(length) // (length // groups)))


def _dequantize_blocks(codes, scale, zero, axis):
    """`(codes - zero)·scale`, groups of consecutive rows (`axis=0`) or
    columns (`axis=1`) of the 2-D `codes` sharing a scale and zero."""
    rows, cols = codes.shape
    groups = scale.shape[axis]
    zero = ops.cast(zero, scale.dtype)
    if axis == 0:  # codes (rows, cols), scale (groups, cols)
        view = ops.reshape(codes, (groups, rows // groups, cols))
        scale, zero = scale[:, None, :], zero[:, None, :]
    else:  # codes (rows, cols), scale (rows, groups)
        view = ops.reshape(codes, (rows, groups, cols // groups))
        scale, zero = scale[:, :, None], zero[:, :, None]
    kernel = ops.multiply(ops.subtract(ops.cast(view, scale.dtype), zero), scale)
    return ops.reshape(kernel, (rows, cols))


def _torch_dequantize_blocks(codes, scale, zero, g_idx, axis):
    import torch

    length = codes.shape[axis]
    groups = scale.shape[axis]
    block = -(-length // groups)
    if groups * block != length or not torch.equal(
        g_idx, torch.arange(length, device=g_idx.device, dtype=g_idx.dtype) // block
    ):
        return None
    # In place, in the layout of `codes` (Keras's unpacked kernel is
    # column-major): on `kernel` itself or on its contiguous transpose.
    kernel = codes.to(scale.dtype)
    zero = zero.to(scale.dtype)
    target = kernel
    if not target.is_contiguous():
        target, scale, zero, axis = kernel.T, scale.T, zero.T, 1 - axis
        if not target.is_contiguous():
            return None
    if axis == 0:  # target (rows, cols), scale (groups, cols)
        view = target.view(groups, block, -1)
        view.sub_(zero[:, None, :]).mul_(scale[:, None, :])
    else:  # target (rows, cols), scale (rows, groups)
        view = target.view(target.shape[0], groups, block)
        view.sub_(zero[:, :, None]).mul_(scale[:, :, None])
    return kernel


def _torch_dtype(dtype):
    import torch

    return getattr(torch, keras.backend.standardize_dtype(dtype))


_TORCH = keras.backend.backend() == "torch"


def requantize(layer, mode, base):
    """Quantizes the float `layer` (a merged copy of `base`) in `base`'s
    mode: for int4 with `base`'s block size, for NF4 with its block size and
    double quantization (in place, as Keras's `quantize`)."""
    if mode == "nf4":
        base.requantize(layer)
        return
    config = getattr(base, "quantization_config", None)
    if mode == "int4":
        block = block_size(base)
        if getattr(config, "block_size", block) != block:
            config = None
        if config is None:
            config = keras.quantizers.Int4QuantizationConfig(block_size=block)
    layer.quantize(mode, config=config)


# ----- NF4 (QLoRA's 4-bit NormalFloat) ---------------------------------------

# The 16 NF4 levels (Dettmers et al. 2023, QLoRA, appendix E; bitsandbytes'
# table): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype="float32",
)

# Double quantization: the absmax scales in int8 blocks of this many (the
# paper's block size for the second quantization).
ABSMAX_BLOCK = 256


def dequantize_nf4(params, block, size):
    """The flat float32 kernel of NF4 `params`: `level[code]·absmax` of each
    code's block, the first `size` values.

    Args:
        params: `(codes, absmax)`, or `(codes, absmax_codes, absmax_scale,
            absmax_offset)` with double quantization. `codes` are int8, two
            4-bit codes per byte (the even element in the low nibble) of
            the kernel flattened in its own (row-major) order and padded
            with zeros to whole blocks; `absmax` is one float32 per block.
            Double-quantized, `absmax = absmax_codes·absmax_scale +
            absmax_offset`, one `absmax_scale` per `ABSMAX_BLOCK` of them.
        block: the NF4 block size (even).
        size: the kernel's number of elements, or `None` for every code's
            value (whole blocks: a slice of rows of an embedding table).
    """
    codes, absmax = nf4_plain(params)
    if _TORCH:
        return _torch_dequantize_nf4(codes, absmax, block, size)
    low = ops.bitwise_and(codes, 15)
    high = ops.bitwise_and(ops.right_shift(codes, 4), 15)
    index = ops.reshape(ops.stack([low, high], axis=-1), (-1, block))
    if absmax.shape[0] != index.shape[0]:  # double quantization pads to 256s
        absmax = absmax[: index.shape[0]]
    levels = ops.take(ops.convert_to_tensor(NF4_LEVELS), ops.cast(index, "int32"))
    kernel = ops.reshape(ops.multiply(levels, ops.expand_dims(absmax, -1)), (-1,))
    return kernel if size is None or kernel.shape[0] == size else kernel[:size]


def nf4_plain(params):
    """`(codes, absmax)` of NF4 `params`, double-quantized absmax values
    dequantized (one float32 per block: small)."""
    if len(params) == 2:
        return tuple(params)
    return params[0], _dequantized_absmax(*params[1:])


# On torch, each code byte's two levels at once: row `b` of this
# (256, 2) table is `(level[b & 15], level[b >> 4])` (made on first use).
_NF4_PAIRS = {}

# Code bytes looked up per step on torch: its int32 index is the only
# temporary besides the result (8 MiB).
nf4_torch_chunk = 2 * 2**20


def _torch_dequantize_nf4(codes, absmax, block, size):
    """`dequantize_nf4` on torch, the same values: each code byte's pair of
    levels looked up in a (256, 2) table straight into the result, a chunk
    of bytes at a time, then each block scaled in place by its absmax. The
    generic path (nibbles unpacked, stacked, cast, gathered, scaled) makes
    several kernel-sized temporaries per product, and eager torch runs it
    op by op; this makes the float32 result and an 8 MiB index."""
    import torch

    key = (codes.device, torch.float32)
    pairs = _NF4_PAIRS.get(key)
    if pairs is None:
        byte = np.arange(256)
        table = np.stack([NF4_LEVELS[byte & 15], NF4_LEVELS[byte >> 4]], axis=-1)
        pairs = _NF4_PAIRS[key] = torch.as_tensor(table, device=codes.device)
    flat = codes.reshape(-1).view(torch.uint8)
    if torch.compiler.is_compiling():  # one lookup: the compiler fuses it
        kernel = pairs[flat.to(torch.int32)]
        chunks = ()
    else:
        kernel = torch.empty(
            (flat.shape[0], 2), dtype=torch.float32, device=codes.device
        )
        chunks = range(0, flat.shape[0], nf4_torch_chunk)
    for start in chunks:
        stop = min(start + nf4_torch_chunk, flat.shape[0])
        index = flat[start:stop].to(torch.int32)
        torch.index_select(pairs, 0, index, out=kernel[start:stop])
    blocks = kernel.view(-1, block)
    blocks.mul_(absmax[: blocks.shape[0]].to(torch.float32)[:, None])
    kernel = kernel.view(-1)
    return kernel if size is None or kernel.shape[0] == size else kernel[:size]


def _dequantized_absmax(codes, scale, offset):
    blocks = ops.reshape(ops.cast(codes, "float32"), (-1, ABSMAX_BLOCK))
    absmax = ops.reshape(ops.multiply(blocks, ops.expand_dims(scale, -1)), (-1,))
    return ops.add(absmax, offset)


def _size(shape):
    return int(np.prod(shape))
