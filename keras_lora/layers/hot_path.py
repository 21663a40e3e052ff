"""The few tensor ops of a LoRA layer's forward pass, with less work per call.

Inside `call` the inputs are backend tensors already, and the adapters are
read in the call's dtype, so no op needs Keras's per-call argument
conversion and type promotion. On eager torch that conversion costs about
ten times a batch-1 product itself (`keras.ops.matmul` ~50 µs against
`torch.matmul` ~5 µs), which is what made a LoRA model slower than its
base at batch 1; `benchmarks/eager_forward.py` measures it. The results
are the same products and sums.
"""

import keras
from keras import ops


def _matmul():
    if keras.backend.backend() == "torch":
        import torch

        return torch.matmul
    # TensorFlow's own matmul does not broadcast a 2-D right operand over
    # batch axes; Keras's does.
    return ops.matmul


matmul = _matmul()


def reshape(x, shape):
    """`x` reshaped; on torch through `torch.reshape` (a view where it can)."""
    return _RESHAPE(x, shape)


def concatenate(xs, axis):
    """`xs` joined along `axis`; on torch through `torch.cat`."""
    return _CONCATENATE(xs, axis)


def leading_shape(x, n):
    """`x`'s shape without its last `n` axes, as a list (on TensorFlow a
    dimension unknown at trace time is a scalar tensor)."""
    if keras.backend.backend() == "tensorflow":
        return list(ops.shape(x))[: len(x.shape) - n]
    return list(x.shape[: len(x.shape) - n])


def value(x):
    """The backend tensor of a Keras variable (autocast as Keras reads it),
    or `x` itself."""
    return x.value if isinstance(x, keras.Variable) else x


def read(variable, dtype):
    """`variable`'s value in `dtype` (a standardized dtype name)."""
    x = value(variable)
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)


def scalar(scale, dtype):
    """An adapter's scale for `low_rank`: a Python float as is, a scale
    variable (`prepare_hotswap`) read in `dtype`."""
    return read(scale, dtype) if isinstance(scale, keras.Variable) else scale


def low_rank(x, a, b, scale):
    """`scale·(x·A)·B` for `x` `(..., in)`, `A` `(in, rank)`, `B` `(rank, out)`.

    The forward pass is `matmul(matmul(x, A) * scale, B)`. The backward pass
    is written out once per backend (`_jax_low_rank`, `_tensorflow_low_rank`,
    `_torch_low_rank`), with the same products autodiff would take except
    `dA`, which comes out as `(dUᵀ·x)ᵀ` rather than `xᵀ·dU`: both contract
    the batch axis, but the second form writes an `(in, rank)` result, which
    XLA's CPU backend (and oneDNN/MKL behind torch) runs several times
    slower than the `(rank, in)` one (0.85 ms against 0.07 ms for a
    `(256, 1024)` input at rank 8 on JAX; see docs/performance.md).
    `scale` is a Python float or a scalar tensor, never differentiated.
    """
    return _LOW_RANK(x, a, b, scale)


def writable(out):
    """Whether `add_low_rank_into`, `add_into` and `add_bias` may write into `out`, a
    tensor this call made: on torch with autograd off (Keras's `predict`,
    `torch.no_grad()`) and `out` contiguous.

    On eager torch a fresh output-sized tensor costs more than the rank-8
    products (page faults on each new buffer): at batch 256, width 1024,
    one layer's LoRA forward took 0.94 ms out of place against 0.26 ms
    added in place by one `addmm_`. Under autograd, and on TensorFlow and
    JAX (whose compilers fuse the add), the sum stays out of place.
    """
    return _WRITABLE(out)


def add_low_rank_into(out, x, a, b, scale):
    """Adds `scale·(x·A)·B` into `out` and returns it (`writable(out)` must
    hold): `x` `(..., in)`, `A` `(in, rank)`, `B` `(rank, n)`, `out` any
    shape with `n` as its trailing size and `x`'s rows in order."""
    import torch

    u = torch.matmul(x, a)
    if not _is_one(scale):
        u.mul_(scale)
    return add_product_into(out, u, b)


def add_product_into(out, h, b):
    """Adds `h·B` into `out` by one `addmm_` and returns it (`writable(out)`
    must hold): `h` `(..., k)`, `B` `(k, n)`, `out` with `n` as its
    trailing size and `h`'s rows in order."""
    out.view(-1, b.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b)
    return out


def add_into(out, update):
    """`out + update` for a tensor `out` this call made: in place where
    `writable(out)` and `update` has `out`'s shape and dtype."""
    if writable(out) and update.shape == out.shape and update.dtype == out.dtype:
        return out.add_(update)
    return out + update


def add_bias(x, bias):
    """`x + bias` for a tensor `x` this call made: in place where
    `writable(x)` and the sum has `x`'s dtype and shape."""
    bias = value(bias)
    if writable(x) and bias.dtype == x.dtype and _broadcasts_into(bias, x):
        return x.add_(bias)
    return x + bias


def _broadcasts_into(t, x):
    """Whether `x + t` has `x`'s shape."""
    import torch

    return torch.broadcast_shapes(t.shape, x.shape) == x.shape


def _is_one(scale):
    return isinstance(scale, float | int) and scale == 1


def _plain_low_rank(x, a, b, scale):
    u = matmul(x, a)
    if not _is_one(scale):
        u = u * scale
    return matmul(u, b)


def _jax_low_rank():
    import jax

    @jax.custom_vjp
    def low_rank(x, a, b, scale):
        return _plain_low_rank(x, a, b, scale)

    def forward(x, a, b, scale):
        u = matmul(x, a) * scale
        return matmul(u, b), (x, a, b, u, scale)

    def backward(residuals, dy):
        x, a, b, u, scale = residuals
        rank, out = b.shape
        dy = dy.reshape(-1, out)
        db = u.reshape(-1, rank).T @ dy
        du = (dy @ b.T) * scale
        # The barrier keeps XLA from folding the transpose into the product.
        da = jax.lax.optimization_barrier(du.T @ x.reshape(-1, x.shape[-1])).T
        dx = (du @ a.T).reshape(x.shape)
        return dx, da, db, jax.numpy.zeros_like(scale)

    low_rank.defvjp(forward, backward)

    def dispatch(x, a, b, scale):
        # Op by op (no trace), nothing can be differentiated: skip the
        # custom_vjp machinery, which costs more than the products at batch 1.
        if isinstance(a, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
            return low_rank(x, a, b, scale)
        return _plain_low_rank(x, a, b, scale)

    return dispatch


def _tensorflow_low_rank():
    import tensorflow as tf

    try:  # private TensorFlow modules: without them, no barrier
        from tensorflow.compiler.tf2xla.python.xla import optimization_barrier
        from tensorflow.python.framework.ops import get_default_graph
        from tensorflow.python.ops.control_flow_util import (
            GraphOrParentsInXlaContext,
        )

        def barrier(t):
            # Only inside an XLA cluster (`jit_compile=True`), where XLA would
            # otherwise fold the transpose back into the product.
            if GraphOrParentsInXlaContext(get_default_graph()):
                return optimization_barrier(t)[0]
            return t
    except ImportError:  # pragma: no cover

        def barrier(t):
            return t

    try:  # private: whether a gradient tape could record this op
        from tensorflow.python.eager.record import could_possibly_record
    except ImportError:  # pragma: no cover

        def could_possibly_record():
            return True

    def low_rank(x, a, b, scale):
        if tf.executing_eagerly() and not could_possibly_record():
            # Eager, no tape: nothing to differentiate, and custom_gradient
            # costs more than the products at batch 1.
            return _plain_low_rank(x, a, b, scale)
        if not isinstance(scale, float | int):
            scale = tf.convert_to_tensor(scale)

        @tf.custom_gradient
        def product(x, a, b):
            u = matmul(x, a) * scale

            def grad(dy):
                rank, out = b.shape
                dy2 = tf.reshape(dy, (-1, out))
                db = tf.matmul(tf.reshape(u, (-1, rank)), dy2, transpose_a=True)
                du = tf.matmul(dy2, b, transpose_b=True) * scale
                x2 = tf.reshape(x, (-1, x.shape[-1]))
                da = tf.transpose(barrier(tf.matmul(du, x2, transpose_a=True)))
                dx = tf.reshape(tf.matmul(du, a, transpose_b=True), tf.shape(x))
                return dx, da, db

            return matmul(u, b), grad

        return product(
            tf.convert_to_tensor(x), tf.convert_to_tensor(a), tf.convert_to_tensor(b)
        )

    return low_rank


def _torch_low_rank():
    import torch

    class LowRank(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, b, scale):
            u = torch.matmul(x, a) * scale
            ctx.save_for_backward(x, a, b, u)
            ctx.scale = scale
            return torch.matmul(u, b)

        @staticmethod
        def backward(ctx, dy):
            x, a, b, u = ctx.saved_tensors
            needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
            dy = dy.reshape(-1, b.shape[1])
            db = u.reshape(-1, b.shape[0]).T @ dy if needs_b else None
            dx = da = None
            if needs_x or needs_a:
                du = (dy @ b.T) * ctx.scale
                if needs_a:
                    da = (du.T @ x.reshape(-1, x.shape[-1])).T
                if needs_x:
                    dx = (du @ a.T).reshape(x.shape)
            return dx, da, db, None

    def low_rank(x, a, b, scale):
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return LowRank.apply(x, a, b, scale)
        return _plain_low_rank(x, a, b, scale)  # no autograd node to set up

    return low_rank


def _never(out):
    return False


def _torch_writable(out):
    import torch

    return not torch.is_grad_enabled() and out.is_contiguous()


if keras.backend.backend() == "torch":
    import torch

    _RESHAPE = torch.reshape
    _CONCATENATE = torch.cat
    _WRITABLE = _torch_writable
else:
    _RESHAPE = ops.reshape
    _CONCATENATE = ops.concatenate
    _WRITABLE = _never

_LOW_RANK = {
    "jax": _jax_low_rank,
    "tensorflow": _tensorflow_low_rank,
    "torch": _torch_low_rank,
}.get(keras.backend.backend(), lambda: _plain_low_rank)()
