"""The stacked adapters of `"gather"` and `"grouped"` (`layers.mixed`),
and the concatenated ones a served model keeps for `"concat"`.

Per LoRA layer, every routed adapter's `A` (its scale folded in) and `B`,
ranks zero-padded to the largest, stacked along a slot axis with one
all-zero slot after the last (and for every slot the layer lacks): an
index outside the held slots reads that zero slot, never another tenant's.
Built from the adapters' own variables on every call, or read from the
copies a served model keeps (`mixed_adapter_model(..., cache=True)`,
`keras_lora.model.stack_cache`), in one of three layouts:

- `"stack"`: `A` as `(slots, *in, r)`, `B` as `(slots, r, *out)`;
- `"stack_t"`: `A` as `(slots, r, fan_in)` (the inputs flattened), which
  TensorFlow's and torch's grouped kernels read without transposing the
  whole stack on every call;
- `"concat"` (cached copies only): the held adapters' `A`s (scale folded
  in) joined along the rank axis, `(*in, Σ r)`, and their `B`s, `(Σ r,
  *out)`, in slot order: what `"concat"` would join on every call.
"""

import math

import numpy as np
from keras import ops

from keras_lora.layers import hot_path


def is_number(x):
    return isinstance(x, (int, float, np.floating, np.integer))


def _padded(x, rank, width, axis):
    if rank == width:
        return x
    pad = [(0, 0)] * len(x.shape)
    pad[axis % len(pad)] = (0, width - rank)
    return ops.pad(x, pad)


def stack_shapes(members, layout="stack"):
    """`(a_shape, b_shape)` of `stack_factors(members, ..., layout)`."""
    if layout == "concat":
        total = sum(a.rank for _, a in members)
        a0, b0 = members[0][1].a, members[0][1].b
        a_in = tuple(int(d) for d in a0.shape[:-1])
        return a_in + (total,), (total,) + tuple(int(d) for d in b0.shape[1:])
    slots = max(k for k, _ in members) + 2  # one zero slot after the last
    width = max(a.rank for _, a in members)
    a_in = tuple(int(d) for d in members[0][1].a.shape[:-1])
    b_shape = (slots, width) + tuple(int(d) for d in members[0][1].b.shape[1:])
    if layout == "stack_t":
        return (slots, width, int(np.prod(a_in))), b_shape
    return (slots,) + a_in + (width,), b_shape


def stack_factors(members, dtype, layout="stack"):
    """`(a_stack, b_stack)` of `members` (`[(slot, adapter)]`) in
    `layout`, read in `dtype`."""
    if layout == "concat":
        a_list = [_scaled_a(adapter, dtype) for _, adapter in members]
        b_list = [hot_path.read(adapter.b, dtype) for _, adapter in members]
        return ops.concatenate(a_list, axis=-1), ops.concatenate(b_list, axis=0)
    a_shape, b_shape = stack_shapes(members)
    width = a_shape[-1]
    by_slot = dict(members)
    a_list, b_list = [], []
    for k in range(a_shape[0]):
        adapter = by_slot.get(k)
        if adapter is None:
            a_list.append(ops.zeros(a_shape[1:], dtype))
            b_list.append(ops.zeros(b_shape[1:], dtype))
            continue
        a_list.append(_padded(_scaled_a(adapter, dtype), adapter.rank, width, -1))
        b_list.append(_padded(hot_path.read(adapter.b, dtype), adapter.rank, width, 0))
    a_stack, b_stack = ops.stack(a_list), ops.stack(b_list)
    if layout == "stack_t":
        a_stack = ops.transpose(
            ops.reshape(a_stack, (a_shape[0], -1, width)), (0, 2, 1)
        )
    return a_stack, b_stack


def _scaled_a(adapter, dtype):
    """`adapter`'s `A` times its scale, in `dtype`."""
    scale = adapter.scale
    a = hot_path.read(adapter.a, dtype)
    return a * (scale if is_number(scale) else ops.cast(scale, dtype))


def cached_stacks(layer, route, members, training, concat=False):
    """The served model's cached `(a_stack, b_stack, layout)` for `layer`,
    or `None`: none held, training (gradients must reach the adapters' own
    variables), a layout the caller cannot read (`concat`: whether it
    reads `"concat"`, else a stack), or shapes that no longer match
    `members`."""
    cached = None if training else route.stacks.get(id(layer))
    if cached is None:
        return None
    a_var, b_var, layout = cached
    if (layout == "concat") != concat:
        return None
    shapes = (tuple(int(d) for d in a_var.shape), tuple(int(d) for d in b_var.shape))
    return cached if shapes == stack_shapes(members, layout) else None


def stacks(members, index, dtype, cached=None, transposed_ok=False):
    """`(a_stack, b_stack, safe, transposed)`: `stack_factors` (or the
    `cached` copies), `A` in layout `"stack_t"` only where `transposed_ok`
    and the copy is kept so (`transposed`); `safe` is `index` with every
    value outside the held slots sent to the all-zero last slot."""
    transposed = False
    if cached is None:
        a_stack, b_stack = stack_factors(members, dtype)
    else:
        a_var, b_var, layout = cached
        a_stack, b_stack = hot_path.read(a_var, dtype), hot_path.read(b_var, dtype)
        if layout == "stack_t" and transposed_ok:
            transposed = True
        elif layout == "stack_t":
            natural, _ = stack_shapes(members)
            a_stack = ops.reshape(ops.transpose(a_stack, (0, 2, 1)), natural)
    zero_slot = int(a_stack.shape[0]) - 1
    valid = ops.logical_and(ops.greater_equal(index, 0), ops.less(index, zero_slot))
    safe = ops.where(valid, index, ops.full_like(index, zero_slot))
    return a_stack, b_stack, safe, transposed


def built_positions(layer):
    """Positions per row of the inputs `layer`'s base was built for, or
    `None` where unknown."""
    base = getattr(layer, "layer", layer)
    shapes = getattr(base, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)):
        return None
    feature_axes = getattr(layer, "_routed_feature_axes", 1)
    dims = shape[1 : len(shape) - feature_axes]
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype="int64"))


def positions_per_row(layer, inputs):
    """Positions (tokens, pixels) per row of `inputs`, or `None` if unknown."""
    feature_axes = getattr(layer, "_routed_feature_axes", 1)
    dims = inputs.shape[1 : len(inputs.shape) - feature_axes]
    if any(d is None for d in dims):
        return None
    return math.prod(int(d) for d in dims)  # per call: NumPy's costs 10 µs
