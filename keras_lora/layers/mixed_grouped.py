"""The `"grouped"` strategy of per-row routing (`layers.mixed`), per backend.

The positions of a batch are grouped by the adapter (slot) they route to,
so that each adapter's `A` and `B` serve all of its rows without a
per-row copy, then added to the base product:

- JAX: `jax.lax.ragged_dot` over the positions sorted by slot; on CPU,
  where XLA expands `ragged_dot` into one masked product per group, the
  sorted positions in fixed-size blocks of one slot each
  (`_blocked_jax`), shapes static under `jit`.
- eager torch: group sizes are data, so each group is padded to the
  largest and two `bmm`s run over the slots (`_grouped_torch_eager`);
  inside `torch.compile`, per-position `bmm`s on the gathered stacks.
- TensorFlow: XLA cannot compile group sizes that depend on the data, so
  each row's two products read its own `A` and `B` inside one fused
  multiply-reduce (`_grouped_tensorflow`).

The stacks come from `layers.mixed_stacks` (or the served model's cache);
measurements behind each kernel are in docs/serving.md.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lora.layers import hot_path
from keras_lora.layers.mixed_stacks import is_number, positions_per_row, stacks


def flat_inputs(layer):
    """How many trailing input axes `layer`'s update flattens into one
    matrix product `x·A·B` (`"grouped"`), or `None` (no such form: the
    layer type has no `_routed_flat_inputs`, or returns `None`)."""
    flat = getattr(layer, "_routed_flat_inputs", None)
    return None if flat is None else flat()


def grouped_update(layer, inputs, base, members, route, dtype, cached):
    """`base` plus the grouped update."""
    index = ops.cast(route.index, "int32")
    n_in = flat_inputs(layer)
    a0, b0 = members[0][1].a, members[0][1].b
    fan_in = math.prod(int(d) for d in a0.shape[:-1])
    out_dims = [int(d) for d in b0.shape[1:]]
    lead = hot_path.leading_shape(inputs, n_in)
    x = hot_path.reshape(inputs, (-1, fan_in))
    backend = keras.backend.backend()
    if backend == "torch" and _torch_eager(x):
        return _grouped_torch_eager(x, base, members, route, dtype, fan_in, cached)
    a_stack, b_stack, safe, a_t = stacks(
        members, index, dtype, cached, backend in ("tensorflow", "torch")
    )
    slots = int(a_stack.shape[0])
    width = int(a_stack.shape[1] if a_t else a_stack.shape[-1])
    a = a_stack if a_t else hot_path.reshape(a_stack, (slots, fan_in, width))
    b = hot_path.reshape(b_stack, (slots, width, math.prod(out_dims)))
    positions = positions_per_row(layer, inputs)
    if backend == "jax":
        y = _grouped_jax(x, a, b, safe, positions)
    else:
        y = _GROUPED[backend](x, a, b, safe, positions, a_transposed=a_t)
    return ops.add(base, hot_path.reshape(y, lead + out_dims))


def _position_slots(x, index):
    """Each position's slot: `index` repeated over a row's positions."""
    positions = ops.shape(x)[0] // ops.shape(index)[0]
    return ops.reshape(
        ops.broadcast_to(ops.expand_dims(index, -1), (ops.shape(index)[0], positions)),
        (-1,),
    )


def _grouped_jax(x, a, b, index, positions, ragged=None):
    import jax
    import jax.numpy as jnp

    if ragged is None:
        ragged = jax.default_backend() != "cpu"
    rows = _position_slots(x, index)
    if not ragged and isinstance(x.shape[0], int):
        # XLA CPU expands `ragged_dot` into one masked product per group
        # (11× one adapter at 64 adapters, docs/serving.md).
        return _blocked_jax(x, a, b, rows)
    if not ragged:
        # A symbolic count of positions (`jax.export` with a polymorphic
        # batch) cannot size the blocks: each position's products read its
        # own A and B instead, indices known in bounds.
        a_rows = a.at[rows].get(mode="promise_in_bounds")
        b_rows = b.at[rows].get(mode="promise_in_bounds")
        h = jnp.einsum("ni,nir->nr", x, a_rows)
        return jnp.einsum("nr,nro->no", h, b_rows)
    slots = a.shape[0]
    order = jnp.argsort(rows, stable=True)
    sizes = jnp.bincount(rows, length=slots).astype("int32")
    h = jax.lax.ragged_dot(x[order], a, sizes)
    y = jax.lax.ragged_dot(h, b, sizes)
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def block_rows(positions, rank, slots):
    """Rows per block of `_blocked_jax`: the power of two nearest above
    `sqrt(positions·rank/slots)`, which balances the per-block reads of
    `A` and `B` (fewer, larger blocks) against the padding rows (more,
    smaller blocks); at most 64."""
    best = (positions * rank / max(slots, 1)) ** 0.5
    return int(min(64, 2 ** max(0, int(np.ceil(np.log2(max(best, 1.0)))))))


def _blocked_jax(x, a, b, rows):
    """Each position's `x·A·B` with its own slot's factors, in blocks: the
    positions sorted by slot, each slot's run padded to a multiple of `t`
    rows (`block_rows`), then one batched product per block of `t` rows
    with that block's slot's `A` and `B`. Shapes are static (at most
    `ceil(n/t) + slots` blocks), so group sizes may be data under `jit`;
    each block reads its factors once, where a per-row product reads them
    once per row (16 MB per 1024-wide layer at batch 256; the MLP serving
    row, 64 adapters: 1.31× one adapter's layer against 1.68× per row and
    1.86× concat, docs/serving.md)."""
    import jax.numpy as jnp

    n, slots = x.shape[0], a.shape[0]
    t = block_rows(n, a.shape[-1], slots)
    blocks = -(-n // t) + slots
    order = jnp.argsort(rows, stable=True)
    sorted_slots = rows[order]
    counts = jnp.bincount(rows, length=slots)
    padded = (counts + t - 1) // t * t
    ends = jnp.cumsum(padded)
    within = jnp.arange(n) - (jnp.cumsum(counts) - counts)[sorted_slots]
    place = (ends - padded)[sorted_slots] + within  # each sorted position's row
    # Padding rows read position 0; their products are never read back.
    source = jnp.zeros((blocks * t,), "int32").at[place].set(order, unique_indices=True)
    starts = jnp.arange(blocks) * t
    block_slot = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), slots - 1)
    xs = jnp.reshape(x[source], (blocks, t, x.shape[-1]))
    h = jnp.einsum("bti,bir->btr", xs, a[block_slot])
    y = jnp.reshape(jnp.einsum("btr,bro->bto", h, b[block_slot]), (blocks * t, -1))
    row_of = jnp.zeros((n,), "int32").at[order].set(place, unique_indices=True)
    return y[row_of]


def _torch_eager(x):
    """Whether torch runs `x` eagerly, where group sizes may be data."""
    import torch

    return not torch.compiler.is_compiling() and x.device.type != "meta"


def _grouped_torch(x, a, b, index, positions, a_transposed=False):
    # Inside `torch.compile` or a symbolic trace group sizes cannot be
    # data: per-position batched products on the stacks instead.
    import torch

    rows = _position_slots(x, index).long()
    a_rows = a[rows].transpose(1, 2) if a_transposed else a[rows]
    h = torch.bmm(x[:, None, :], a_rows)
    return torch.bmm(h, b[rows])[:, 0]


def _torch_groups(x, index, slots):
    """`(order, place, size, source)`: the positions holding a slot in
    `[0, slots)` (`order`), where each goes in the padded groups (`place`:
    group times `size` plus its rank within the group), the largest group's
    size, and for each padded row the position it holds (`source`; padding
    rows: position 0); `None` if no position has such a slot."""
    import torch

    valid = (index >= 0) & (index < slots)
    safe = torch.where(valid, index, torch.full_like(index, slots))
    rows = _position_slots(x, safe).long()
    counts = torch.bincount(rows, minlength=slots + 1)
    size = int(counts[:slots].max())
    if size == 0:
        return None
    order = torch.argsort(rows, stable=True)
    grouped = rows[order]
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(len(order), device=x.device) - starts[grouped]
    place = grouped * size + within
    keep = grouped < slots
    order, place = order[keep], place[keep]
    source = torch.zeros(slots * size, dtype=order.dtype, device=x.device)
    source[place] = order
    return order, place, size, source


def _grouped_torch_eager(x, base, members, route, dtype, fan_in, cached=None):
    """`base` plus the update of the positions grouped by adapter, each
    group padded to the largest group's size, then two batched products
    over the adapters: `(groups, size, in)·(groups, in, r)` and `·(groups,
    r, out)`. Group sizes are data, known in eager torch; each adapter's
    `A` and `B` are read once. The grouping is computed once per call for
    all layers of the same batch and slot count (`route.memo`)."""
    import torch

    slots = max(k for k, _ in members) + 1  # rows of any other index: no update
    key = ("torch_groups", int(x.shape[0]), slots)
    if key not in route.memo:
        route.memo[key] = _torch_groups(x, route.index, slots)
    groups = route.memo[key]
    if groups is None:
        return base
    order, place, size, source = groups
    # One gather; padding rows repeat position 0 and are never read back
    # (each product row is its own).
    padded = x[source]
    if cached is None:
        a_t, b, scales = _torch_stacks(members, slots, dtype, fan_in, x)
    else:  # the served model's stacks: scales folded in, a zero slot last
        a, b = (hot_path.read(v, dtype)[:slots] for v in cached[:2])
        if cached[2] == "stack_t":
            a_t = a
        else:
            a_t = a.reshape(slots, fan_in, -1).transpose(1, 2)
        b, scales = b.reshape(slots, b.shape[1], -1), None
    # `A` kept as `(slots, r, in)`, read transposed: torch's batched product
    # takes that operand in 0.28 ms against 0.47 ms for `(slots, in, r)`
    # (64 groups of 11 rows, in 1024, r 8; docs/serving.md).
    h = torch.bmm(padded.view(slots, size, fan_in), a_t.transpose(1, 2))
    if scales is not None:
        h = h * scales
    y = torch.bmm(h, b).view(slots * size, -1)[place]
    flat = base.reshape(-1, y.shape[-1])
    if hot_path.writable(base):  # added into the base product's own output
        return flat.index_add_(0, order, y).view(base.shape)
    return flat.index_add(0, order, y).view(base.shape)


def _torch_stacks(members, slots, dtype, fan_in, like):
    """`(Aᵀ (slots, r, in), B (slots, r, out), scales (slots, 1, 1))`,
    ranks zero-padded to the largest, zeros for slots this layer lacks."""
    import torch

    width = max(a.rank for _, a in members)
    a_list, b_list, scales = [], [], []
    by_slot = dict(members)
    fan_out = math.prod(int(d) for d in members[0][1].b.shape[1:])
    for k in range(slots):
        adapter = by_slot.get(k)
        if adapter is None:
            a_list.append(like.new_zeros((width, fan_in)))
            b_list.append(like.new_zeros((width, fan_out)))
            scales.append(0.0)
            continue
        a = torch.reshape(hot_path.read(adapter.a, dtype), (fan_in, adapter.rank))
        b = torch.reshape(hot_path.read(adapter.b, dtype), (adapter.rank, fan_out))
        if adapter.rank < width:
            a = torch.nn.functional.pad(a, (0, width - adapter.rank))
            b = torch.nn.functional.pad(b, (0, 0, 0, width - adapter.rank))
        a_list.append(a.T)
        b_list.append(b)
        scales.append(hot_path.scalar(adapter.scale, dtype))
    if all(is_number(s) for s in scales):
        scales = torch.tensor(scales, dtype=like.dtype, device=like.device)
    else:
        scales = torch.stack(
            [torch.as_tensor(s, dtype=like.dtype, device=like.device) for s in scales]
        )
    return torch.stack(a_list), torch.stack(b_list), scales.view(slots, 1, 1)


def _grouped_tensorflow(x, a, b, index, positions, a_transposed=False):
    import tensorflow as tf

    if not a_transposed:  # a cached stack is kept as (slots, r, in) already
        a = tf.transpose(a, (0, 2, 1))
    a_rows = tf.gather(a, index)  # (batch, r, in)
    b_rows = tf.gather(b, index)  # (batch, r, out)
    if positions == 1:
        # Each row's products read its own A and B inside one fused
        # multiply-reduce (under XLA, no `(batch, in, r)` copy).
        h = tf.reduce_sum(x[:, None, :] * a_rows, -1)
        return tf.reduce_sum(h[:, :, None] * b_rows, 1)
    rows = tf.reshape(x, (tf.shape(index)[0], -1, x.shape[-1]))
    h = tf.einsum("bpi,bri->bpr", rows, a_rows)
    return tf.reshape(tf.einsum("bpr,bro->bpo", h, b_rows), (-1, b.shape[-1]))


_GROUPED = {
    "jax": _grouped_jax,
    "torch": _grouped_torch,
    "tensorflow": _grouped_tensorflow,
}
