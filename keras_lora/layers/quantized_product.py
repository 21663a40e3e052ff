"""The frozen quantized product `x·W_q`, with a backward that keeps no kernel.

Training over an int8/int4 base needs `dx = dy·Wᵀ` through every quantized
layer of the model (the adapters of earlier layers are reached through
them), never `dW`: the base is frozen. Keras's own quantized calls get
`dx` right but cost memory. On JAX their custom gradient saves the
unpacked int8 kernel of every layer for the backward pass, and the
backward's dequantization depends on the parameters only, so XLA shares
it with the forward's or schedules it early: every layer's float kernel
alive at once, more than the float model's kernels. On torch the closures
keep the unpacked kernels alive, and the dequantization (Keras ops,
scales and zero points gathered into kernel-sized tensors) is slow.

`product(layer, x)` computes the same `x·W_q` (before bias and
activation) as the layer's Keras quantized call, with the same ops in the
same order, so outputs stay bitwise the same, and writes the backward out
once per backend:

- forward: the packed codes and scales are tied to `x` (`tie`), so their
  dequantization runs just before its product and is freed after it;
  nothing kernel-sized is saved;
- backward: `dx = dy·W_deqᵀ` (for `EinsumDense`, the transposed einsum),
  dequantizing again from the packed codes tied to `dy`, so the compiler
  can neither reuse the forward's copy nor hoist it. The only residuals
  are the codes and scales, variables anyway.

The tie is a data dependency the compiler cannot see through: each
parameter plus (integers: or) a zero computed from the first element of
`x` (or `dy`) by a logical shift by the word's width, which is 0 for every
bit pattern. XLA's CPU compiler does not keep `optimization_barrier`'s
ordering: with a barrier, a jitted gradient through six int4 `Dense`
layers still dequantized all six kernels at the start (6 kernels of
temporaries, as Keras's own path; 1 with the tie). TensorFlow outside XLA
uses a control dependency on `x` (or `dy`), which its executor keeps.

It covers int8, int4 (per-channel and sub-channel) and NF4 (`layers.nf4`,
whose forward is the dequantized kernel's product) `Dense`,
`EinsumDense` and an `Embedding`'s reverse product (a `ReversibleEmbedding`'s
logits, tied or untied); a lookup has no kernel-sized backward and keeps
Keras's call, and float8 keeps Keras's path. LoRA layers use it for their
quantized base; `keras_lora.lean_quantized(model)` makes every other
quantized layer of a model use it.
"""

import functools
import math

import keras
from keras import ops

from keras_lora.layers import quantized

MODES = ("int8", "int4", "nf4")

# The reverse product (an LM head's logits) dequantizes its table in chunks
# of this many bytes or fewer, one at a time: the table is the largest
# kernel of a language model (32,000 x 2,048 floats: 250 MiB), and a whole
# dequantized copy (plus the matrix product's packed copy of it) would set
# the step's peak. Chunks change only the summation blocking, not the math.
vocabulary_chunk = 32 * 2**20


def applies(layer, reverse=False):
    """Whether `product` computes `layer`'s quantized call (int8 or int4,
    no Keras `enable_lora` adapter on it)."""
    if getattr(layer, "quantization_mode", None) not in MODES:
        return False
    if getattr(layer, "lora_enabled", False):
        return False
    if isinstance(layer, keras.layers.Embedding):
        return reverse and isinstance(layer, keras.layers.ReversibleEmbedding)
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def base_call(view, inputs, training=None):
    """`x·W` of a LoRA layer's quantized base, before bias and activation:
    for int8 and int4 the lean product, else the base's own op.

    Args:
        view: the base's `quantized.without_epilogue` view.
    """
    layer = view._layer
    if applies(layer):
        return product(layer, inputs)
    return type(layer).quantized_call(view, inputs, training=training)


def base_lookup(view, inputs, reverse=False):
    """A LoRA embedding's quantized base: its lookup by the base's own op
    or, with `reverse`, its logits before any soft cap (int8/int4: the lean
    product)."""
    layer = view._layer
    if not reverse:  # a lookup has no epilogue: the layer's own call
        return type(layer).quantized_call(layer, inputs)
    if applies(layer, reverse=True):
        return product(layer, inputs, reverse=True)
    return type(layer).quantized_call(view, inputs, reverse=True)


def product(layer, inputs, reverse=False):
    """`x·W_q` of the quantized `layer`, as its Keras quantized call
    computes it before bias and activation (for a `ReversibleEmbedding`
    with `reverse`, the logits before any soft cap).

    Args:
        layer: a `Dense`, `EinsumDense` or `ReversibleEmbedding` quantized
            to `"int8"` or `"int4"` (see `applies`).
        inputs: the float inputs, in the layer's compute dtype.
        reverse: the embedding's reverse product.
    """
    plan = _Plan(layer, reverse)
    return _PRODUCT(plan, inputs, quantized.kernel_params(layer, reverse))


def dense_call(layer, inputs):
    """`activation(x·W_q + bias)` of a quantized `Dense` or `EinsumDense`,
    its product lean: the call of an NF4 layer and of a layer on
    `lean_quantized`."""
    x = product(layer, inputs)
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


class _Plan:
    """One layer's forward and backward, given its kernel parameters.

    Hashable by identity (a static argument of JAX's `custom_vjp`).
    """

    __slots__ = ("layer", "kind")

    def __init__(self, layer, reverse):
        self.layer = layer
        if reverse:
            self.kind = "reverse"
        elif isinstance(layer, keras.layers.EinsumDense):
            self.kind = "einsum"
        else:
            self.kind = "dense"

    def forward(self, x, params):
        """Keras's quantized product, op for op."""
        if self.kind == "reverse":
            params = self._plain(params)
            chunks = self._vocabulary_chunks(params)
            if chunks:
                # One chunk of the table dequantized at a time, each tied
                # to the previous chunk's logits (see `vocabulary_chunk`).
                logits, anchor = [], x
                for start, stop in chunks:
                    part = _TIE(anchor, self._vocabulary_slice(params, start, stop))
                    anchor = self._reverse_forward(x, part)
                    logits.append(anchor)
                return ops.concatenate(logits, axis=-1)
        return getattr(self, f"_{self.kind}_forward")(x, params)

    def backward(self, dy, params):
        """`dy·W_deqᵀ`, the kernel dequantized from `params`."""
        if self.kind == "reverse":
            params = self._plain(params)
            chunks = self._vocabulary_chunks(params)
            if chunks:  # as in `forward`: the sum of each chunk's product
                dx = None
                for start, stop in chunks:
                    anchor = dy if dx is None else dx
                    part = _TIE(anchor, self._vocabulary_slice(params, start, stop))
                    term = self._backward(dy[..., start:stop], part)
                    dx = term if dx is None else ops.add(dx, term)
                return dx
        return self._backward(dy, params)

    def _plain(self, params):
        # NF4: double-quantized absmax values dequantized, so that a slice
        # of rows has its own (`_vocabulary_slice`).
        if self.layer.quantization_mode == "nf4":
            return quantized.nf4_plain(params)
        return params

    def _vocabulary_chunks(self, params):
        """`[(start, stop), ...]` over the reverse product's vocabulary, or
        `None` when its dequantized table fits in one `vocabulary_chunk`
        (or, for NF4, when a row is not whole blocks)."""
        layer = self.layer
        vocabulary, width = layer.input_dim, layer.output_dim
        if layer.quantization_mode == "nf4" and width % layer.nf4_block_size:
            return None
        itemsize = keras.backend.standardize_dtype(layer.compute_dtype)
        itemsize = 2 if itemsize in ("float16", "bfloat16") else 4
        rows = max(1, vocabulary_chunk // (width * itemsize))
        if rows >= vocabulary:
            return None
        return [(a, min(a + rows, vocabulary)) for a in range(0, vocabulary, rows)]

    def _vocabulary_slice(self, params, start, stop):
        """`params` of the vocabulary rows `start:stop`: axis 0 of a tied
        table's codes, scales and zero points, the last axis of an untied
        reverse table's; `g_idx` (over the width) whole. NF4 (both tables
        stored by rows, whole blocks each): the rows' codes and absmax."""
        layer = self.layer
        if layer.quantization_mode == "nf4":
            codes, absmax = params
            per_row = layer.output_dim // layer.nf4_block_size
            half = layer.output_dim // 2
            return (
                codes[start * half : stop * half],
                absmax[start * per_row : stop * per_row],
            )
        tied = getattr(layer, "tie_weights", True)
        sliced = []
        for i, param in enumerate(params):
            if i == 3:  # g_idx
                sliced.append(param)
            elif tied:
                sliced.append(param[start:stop])
            else:
                sliced.append(param[..., start:stop])
        return tuple(sliced)

    def _backward(self, dy, params):
        layer = self.layer
        dtype = layer.compute_dtype
        if self.kind == "reverse" and layer.quantization_mode == "nf4":
            return _matmul(dy, self._nf4_rows(params))  # dx = dy·table
        if self.kind == "einsum":
            kernel = quantized.dequantized_kernel(layer, params, dtype)
            return ops.einsum(layer._custom_gradient_equation, dy, kernel)
        if self.kind == "reverse" and getattr(layer, "tie_weights", True):
            # The table, (input_dim, output_dim): dx = dy·table.
            table = quantized.dequantized_kernel(layer, params, dtype)
            return _matmul(dy, table)
        kernel = quantized.dequantized_kernel(layer, params, dtype, reverse=True)
        return _matmul(dy, ops.transpose(kernel))

    # ----- Keras's forward math, per layer type ------------------------------

    def _dense_forward(self, x, params):
        layer = self.layer
        dtype = layer.compute_dtype
        if layer.quantization_mode == "nf4" or len(params) == 4:
            # NF4 and sub-channel int4: dequantize, then multiply
            return ops.matmul(x, quantized.dequantized_kernel(layer, params, dtype))
        codes, scale = params
        if layer.quantization_mode == "int4":
            codes = quantized.unpack_int4(codes, layer._orig_output_dim, axis=-1)
        output_scale = scale
        if layer.inputs_quantizer:
            x, x_scale = layer.inputs_quantizer(x, axis=-1)
            output_scale = ops.multiply(output_scale, x_scale)
        y = ops.cast(ops.matmul(x, codes), dtype)
        return ops.divide(y, output_scale)

    def _einsum_forward(self, x, params):
        layer = self.layer
        dtype, equation = layer.compute_dtype, layer.equation
        torch = keras.backend.backend() == "torch"
        if layer.quantization_mode == "nf4":
            return ops.einsum(
                equation, x, quantized.dequantized_kernel(layer, params, dtype)
            )
        if layer.quantization_mode == "int8":
            codes, scale = params
            if layer.inputs_quantizer:
                x, x_scale = layer.inputs_quantizer(x, axis=layer.quantization_axis)
                x_scale = layer._adjust_scale_for_quant(x_scale, "input")
                y = ops.cast(ops.einsum(equation, x, codes), dtype)
                return ops.divide(y, ops.multiply(x_scale, scale))
            if torch:  # Keras's: torch's einsum takes no int8 kernel
                kernel = ops.divide(
                    ops.cast(codes, dtype), layer._adjust_scale_for_dequant(scale)
                )
                return ops.einsum(equation, x, kernel)
            return ops.divide(ops.cast(ops.einsum(equation, x, codes), dtype), scale)
        kernel = quantized.dequantized_kernel(layer, params, dtype)
        if len(params) == 2 and layer.inputs_quantizer:
            x, x_scale = layer.inputs_quantizer(x, axis=layer.quantization_axis)
            x_scale = layer._adjust_scale_for_quant(x_scale, "input")
            if torch:
                y = ops.einsum(equation, ops.cast(x, dtype), kernel)
            else:
                y = ops.cast(ops.einsum(equation, x, kernel), dtype)
            return ops.divide(y, x_scale)
        return ops.einsum(equation, x, kernel)

    def _nf4_rows(self, params):
        """The float rows `(rows, output_dim)` of an NF4 table that `params`
        (codes and absmax, plain) hold: a chunk, or the whole table."""
        layer = self.layer
        width = layer.output_dim
        rows = min(layer.input_dim, int(params[0].shape[0]) * 2 // width)
        flat = quantized.dequantize_nf4(params, layer.nf4_block_size, rows * width)
        return ops.reshape(ops.cast(flat, layer.compute_dtype), (rows, width))

    def _reverse_forward(self, x, params):
        layer = self.layer
        dtype = layer.compute_dtype
        if layer.quantization_mode == "nf4":  # tied or untied: by rows
            return _matmul(x, ops.transpose(self._nf4_rows(params)))
        tied = layer.tie_weights
        codes, scale = params[:2]
        if layer.inputs_quantizer:
            x, x_scale = layer.inputs_quantizer(x)
        else:
            x_scale = ops.ones((1,), dtype=dtype)
        if layer.quantization_mode == "int8":
            if tied:
                codes, scale = ops.transpose(codes), ops.transpose(scale)
            y = ops.cast(ops.matmul(x, codes), dtype)
            return ops.divide(y, ops.multiply(x_scale, scale))
        if tied:
            codes = ops.transpose(codes)
        unpacked = quantized.unpack_int4(codes, layer.output_dim, axis=0)
        if len(params) == 2:  # per-channel: multiply, then scale
            if tied:
                scale = ops.transpose(scale)
            y = ops.cast(ops.matmul(x, unpacked), dtype)
            return ops.divide(y, ops.multiply(x_scale, scale))
        zero, g_idx = params[2:]
        if tied:
            scale, zero = ops.transpose(scale), ops.transpose(zero)
        kernel = quantized.dequantize_groups(
            ops.cast(unpacked, dtype), scale, zero, g_idx, axis=0
        )
        return ops.divide(ops.matmul(x, kernel), x_scale)


def _matmul(a, b):
    if keras.backend.backend() == "torch":
        import torch

        return torch.matmul(a, b)
    return ops.matmul(a, b)


# ----- the product with its backward, per backend ----------------------------


def _jax_product():
    import jax
    from jax import lax

    def tie(anchor, params):
        """`params`, computed by XLA only once `anchor` is."""
        size = math.prod(anchor.shape)
        if not size:
            return params
        bits = jax.numpy.dtype(anchor.dtype).itemsize * 8
        word = getattr(jax.numpy, f"uint{bits}")
        first = lax.bitcast_convert_type(anchor.reshape(-1)[0], word)
        # A logical shift by the word's width is 0 for every bit pattern
        # (NaN and inf too), and XLA's simplifier does not fold it.
        zero = lax.shift_right_logical(first, word(bits))
        return tuple(_plus(p, zero) for p in params)

    def _plus(param, zero):
        zero = zero.astype(param.dtype)
        if jax.numpy.issubdtype(param.dtype, jax.numpy.integer):
            return param | zero
        return param + zero

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def lean(plan, x, *params):
        return plan.forward(x, tie(x, params))

    def forward(plan, x, *params):
        # Residuals: the parameters (variables anyway) and x's dtype.
        return lean(plan, x, *params), (params, jax.numpy.zeros((), x.dtype))

    def backward(plan, residuals, dy):
        params, like = residuals
        dx = plan.backward(dy, tie(dy, params)).astype(like.dtype)
        return (dx,) + (None,) * len(params)

    lean.defvjp(forward, backward)
    global _TIE
    _TIE = tie

    def dispatch(plan, x, params):
        # Op by op (no trace), nothing is differentiated or scheduled.
        if isinstance(x, jax.core.Tracer) or any(
            isinstance(p, jax.core.Tracer) for p in params
        ):
            return lean(plan, x, *params)
        return plan.forward(x, params)

    return dispatch


def _tensorflow_product():
    import tensorflow as tf

    try:  # private TensorFlow modules: without them, control dependencies
        from tensorflow.python.framework.ops import get_default_graph
        from tensorflow.python.ops.control_flow_util import (
            GraphOrParentsInXlaContext,
        )

        def in_xla():
            return GraphOrParentsInXlaContext(get_default_graph())
    except ImportError:  # pragma: no cover

        def in_xla():
            return False

    try:  # private: whether a gradient tape could record this op
        from tensorflow.python.eager.record import could_possibly_record
    except ImportError:  # pragma: no cover

        def could_possibly_record():
            return True

    def tie(anchor, params):
        """`params`, computed only once `anchor` is."""
        if not in_xla():  # TensorFlow's executor keeps control dependencies
            with tf.control_dependencies([anchor]):
                return tuple(tf.identity(p) for p in params)
        if anchor.shape.num_elements() == 0:
            return params
        # As on JAX: XLA's logical shift by the word's width is 0 for every
        # bit pattern, and its simplifier does not fold it (XLA's CPU
        # compiler drops `optimization_barrier`'s ordering).
        bits = anchor.dtype.size * 8
        word = {16: tf.uint16, 32: tf.uint32, 64: tf.uint64}[bits]
        first = tf.bitcast(tf.reshape(anchor, [-1])[0], word)
        zero = tf.bitwise.right_shift(first, tf.constant(bits, word))
        return tuple(
            tf.bitwise.bitwise_or(p, tf.cast(zero, p.dtype))
            if p.dtype.is_integer
            else p + tf.cast(zero, p.dtype)
            for p in params
        )

    global _TIE
    _TIE = tie

    def dispatch(plan, x, params):
        if tf.executing_eagerly() and not could_possibly_record():
            return plan.forward(x, params)  # nothing to differentiate

        @tf.custom_gradient
        def lean(x, *params):
            y = plan.forward(x, tie(x, params))

            def grad(dy):
                dx = plan.backward(dy, tie(dy, params))
                return (tf.cast(dx, x.dtype),) + (None,) * len(params)

            return y, grad

        return lean(tf.convert_to_tensor(x), *params)

    return dispatch


def _torch_product():
    import torch

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, plan, x, *params):
            ctx.plan = plan
            ctx.save_for_backward(*params)  # the variables' own tensors
            return plan.forward(x, params)

        @staticmethod
        def backward(ctx, dy):
            params = ctx.saved_tensors
            dx = ctx.plan.backward(dy, params).to(dy.dtype)
            return (None, dx) + (None,) * len(params)

    def dispatch(plan, x, params):
        if torch.is_grad_enabled() and x.requires_grad:
            return Lean.apply(plan, x, *params)
        return plan.forward(x, params)

    return dispatch


def _untied(anchor, params):
    # torch runs op by op: nothing to order.
    return params


# `_TIE(anchor, params)`: `params`, computed only once `anchor` is; the
# backend's product sets it.
_TIE = _untied


def tie(anchor, params):
    """`params` (a tuple of tensors), computed only once `anchor` is: a data
    dependency the compiler can neither see through nor reorder (see the
    module docstring); on torch, which runs op by op, `params` as they are.
    """
    return _TIE(anchor, tuple(params))


def _plain_product(plan, x, params):
    return plan.forward(x, params)


_PRODUCT = {
    "jax": _jax_product,
    "tensorflow": _tensorflow_product,
    "torch": _torch_product,
}.get(keras.backend.backend(), lambda: _plain_product)()
