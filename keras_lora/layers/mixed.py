"""Per-row adapter routing: each row of a batch with its own adapter.

While a `routing(index, names)` context is open (the served model of
`keras_lora.mixed_adapter_model` opens it around its call), every LoRA
layer computes row `i` of its batch with adapter `names[index[i]]`, or its
base alone where the index is `-1`, outside `[0, len(names))`, or names an
adapter the layer lacks. The layer's active adapters play no part then.

Three strategies compute the same sum `base + s_k·(x·A_k)·B_k` per row:

- `"concat"`: one product of `x` with the concatenated `A`s
  (`[A_1, …, A_n]`, rank `Σ r_k`), times a per-row mask that holds each
  row's scale on its own adapter's columns and zero elsewhere, then one
  product with the concatenated `B`s.
- `"gather"`: every row gathers its own `A` and `B` (ranks zero-padded to
  the largest, the scale folded into `A`) from a stack with one extra
  all-zero slot, then two batched products.
- `"grouped"`: the rows grouped by adapter, so that each adapter's `A`
  and `B` serve its rows without a per-row copy: on JAX, the positions
  sorted by adapter and two `jax.lax.ragged_dot`s, then the inverse
  permutation (on CPU, where XLA expands `ragged_dot` into a masked
  product per group, the sorted positions in fixed-size blocks of one
  adapter each and two batched products over the blocks); on eager torch,
  the positions sorted, each group padded to the largest, and two `bmm`s
  over the adapters (inside `torch.compile` or a symbolic trace,
  per-position `bmm`s); on TensorFlow, whose XLA cannot compile group
  sizes that depend on the data, each row's products read its own `A`
  and `B` inside one fused multiply-reduce, without a `(batch, in, r)`
  product (the kernels: `layers.mixed_grouped`). It applies to
  `LoRADense` and to `LoRAEinsumDense` with the standard factoring (a
  matrix product on flattened axes); other layer types use `"gather"`.

An index outside `[0, n)` (`-1` included) selects nothing: its mask row is
all zeros (`"concat"`), and `"gather"` and `"grouped"` read the all-zero
slot for it, never another slot. Such a row gets the base output: no
tenant ever reads another's adapter through a bad index.

`"auto"` (the default) picks per layer, from static shapes, the adapters'
total rank and the backend, as measured in `benchmarks/serving.py` (see
`_auto`). Layer types
without `_routed_gather` (convolutions), and training with dropout, use
`"concat"`.

DoRA rows are scaled by their own `m/‖W + s·A·B‖` (`1` for the other rows).
Each layer type supplies the products through three hooks: `_routed_first`
(`x·A`), `_routed_second` (`h·B`) and `_routed_gather` (both, per row);
`_routed_rank_axis` says where the rank axis of `x·A` is, and
`_routed_flat_inputs` how many input axes `"grouped"` flattens.
"""

import contextlib
import threading

import keras
import numpy as np
from keras import ops

from keras_lora.layers import hot_path
from keras_lora.layers.mixed_grouped import flat_inputs, grouped_update
from keras_lora.layers.mixed_stacks import (
    built_positions,
    cached_stacks,
    is_number,
    positions_per_row,
    stacks,
)

STRATEGIES = ("auto", "concat", "gather", "grouped")

_STATE = threading.local()
_WRITES = [0]


def note_adapter_writes():
    """Counts a write into adapters' variables by keras_lora itself
    (`hotswap_adapter`): served models that cache their adapters' stacks
    (`keras_lora.model.stack_cache`) rebuild them on their next call, even
    on TensorFlow, where a variable written in place shows no change."""
    _WRITES[0] += 1


def adapter_writes():
    """How many times `note_adapter_writes` was called."""
    return _WRITES[0]


class Routing:
    """What a routed call needs: the int32 `index` (batch,), the adapter
    `names` it indexes, and the `strategy`."""

    def __init__(self, index, names, strategy="auto", stacks=None):
        self.index = index
        self.names = tuple(names)
        self.strategy = strategy
        self.stacks = stacks or {}
        self.memo = {}  # per call: what layers of the same batch share


def current():
    """The innermost open `Routing`, or `None`."""
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def routing(index, names, strategy="auto", stacks=None):
    """Routes the LoRA layers called inside to `names[index[i]]` per row.

    `stacks`: `{id(layer): (a_stack, b_stack)}`, variables holding what
    `stack_factors` gives for that layer (the served model's cache); a
    layer found there reads them instead of stacking its adapters, except
    in training."""
    stack = _STATE.__dict__.setdefault("stack", [])
    stack.append(Routing(index, names, strategy, stacks))
    try:
        yield
    finally:
        stack.pop()


def supports(layer):
    """Whether `layer`'s type has the routing hooks."""
    return all(
        callable(getattr(layer, hook, None))
        for hook in ("_routed_first", "_routed_second", "_routed_rank_axis")
    )


def check_layer(layer, names, path=None):
    """Raises `ValueError`/`TypeError` where `layer` cannot route `names`."""
    adapter_names = set(layer.adapter_names)
    held = [n for n in names if n in adapter_names]
    if not held:
        return
    where = f"LoRA layer '{path or layer.name}'"
    if not supports(layer):
        raise TypeError(
            f"{where} is a {type(layer).__name__}, which has no per-row "
            "adapter routing (supported: LoRADense, LoRAEinsumDense, "
            "LoRAEmbedding, LoRAConv)."
        )
    if layer.merged:
        raise ValueError(f"{where} is merged in place; call `unmerge_lora` first.")
    for name in held:
        adapter = layer.get_adapter(name)
        if adapter.residual is not None or adapter.changes_base:
            raise ValueError(
                f"{where}: adapter {name!r} uses init={adapter.init!r}, which "
                "changes the frozen kernel, so its rows cannot share one base "
                "product with the others. Mixed batches need adapters on the "
                "unchanged base kernel."
            )


def plan(layer):
    """The call plan of a routed call (see `LoRALayer._call_plan`)."""
    if layer._disabled:
        return True, (), "base"
    check_layer(layer, current().names)
    return False, (), None if layer.quantization_mode else "base"


def _members(layer, route):
    """`[(slot, adapter)]`: the routed adapters this layer holds."""
    return members(layer, route.names)


def members(layer, names):
    """`[(slot, adapter)]`: the adapters of `names` that `layer` holds."""
    held = layer._adapters
    return [(k, held[n]) for k, n in enumerate(names) if n in held]


def _rows_like(mask, h, axis):
    """`mask` `(batch, R)` reshaped to broadcast against `h` with its rank
    axis at `axis` and its batch axis first."""
    if len(h.shape) == 2:
        return mask
    shape = [1] * len(h.shape)
    shape[0] = -1
    shape[axis % len(shape)] = int(mask.shape[-1])
    return hot_path.reshape(mask, shape)


def _selection(index, slots, dtype):
    """`(batch, len(slots))`: 1 where a row's index is that slot."""
    slots = np.asarray(slots, "int32")[None, :]
    return ops.cast(ops.equal(ops.expand_dims(index, -1), slots), dtype)


def _column_scales(adapters, dtype):
    """Each adapter's scale, repeated over its rank columns: `(Σ r,)`."""
    scales = [a.scale for a in adapters]
    if all(is_number(s) for s in scales):
        # Cast as a tensor: NumPy's bfloat16 (ml_dtypes) does not multiply
        # a torch tensor.
        columns = [
            np.full((a.rank,), float(s), "float32")
            for a, s in zip(adapters, scales, strict=True)
        ]
        return ops.cast(np.concatenate(columns), dtype)
    return ops.concatenate(
        [
            ops.ones((a.rank,), dtype) * ops.cast(s, dtype)
            for a, s in zip(adapters, scales, strict=True)
        ]
    )


def routed_updates(layer, inputs, base, training, route):
    """`base` plus each row's own adapter update (and DoRA factor)."""
    members = _members(layer, route)
    if not members:
        return base
    dtype = keras.backend.standardize_dtype(base.dtype)
    index = ops.cast(route.index, "int32")
    dropping = training and any(a.dropout for _, a in members)
    gather = callable(getattr(layer, "_routed_gather", None))
    strategy = route.strategy
    if strategy == "auto":
        strategy = _auto(layer, inputs, members)
    if dropping or not gather:
        strategy = "concat"
    if strategy == "grouped" and flat_inputs(layer) is None:
        strategy = "gather"
    concat = strategy not in ("grouped", "gather")
    cached = cached_stacks(layer, route, members, training, concat)
    if strategy == "grouped":
        out = grouped_update(layer, inputs, base, members, route, dtype, cached)
    elif strategy == "gather":
        update = _gather_update(layer, inputs, members, index, dtype, cached)
        out = hot_path.add_into(base, update)
    else:
        out = _concat_update(
            layer, inputs, base, members, index, dtype, training, route, cached
        )
    doras = [(k, a) for k, a in members if a.magnitude is not None]
    if doras:
        out = _dora_rows(layer, out, doras, index, dtype)
    return out


def _dropped(layer, x, rate, training, on_inputs):
    if rate and training and layer.drops_inputs == on_inputs:
        return keras.random.dropout(x, rate, seed=layer.seed_generator)
    return x


def _concat_update(layer, inputs, base, members, index, dtype, training, route, cached):
    """`base` plus the update of `"concat"`: every adapter's `x·A` joined,
    masked per row, times the joined `B`s."""
    # Adapters with one dropout rate share one `x·A` (in training; at
    # inference all share one); columns are in `ordered` order throughout.
    # Backend ops (`hot_path`), not Keras's: on eager torch each Keras op's
    # argument handling cost more than the product it wraps (docs/serving.md).
    axis = layer._routed_rank_axis()
    if cached is not None:  # the served model's copy: joined, scales folded in
        h = layer._routed_first(inputs, hot_path.read(cached[0], dtype))
        mask = _concat_mask(route, index, members, dtype, scaled=False)
        h = h * _rows_like(mask, h, axis)
        return _add_second(layer, base, h, hot_path.read(cached[1], dtype))
    rates = sorted({a.dropout if training else 0.0 for _, a in members})
    parts, ordered = [], []
    for rate in rates:
        group = [(k, a) for k, a in members if (a.dropout if training else 0.0) == rate]
        a_cat = hot_path.concatenate([hot_path.read(a.a, dtype) for _, a in group], -1)
        x = _dropped(layer, inputs, rate, training, on_inputs=True)
        h = layer._routed_first(x, a_cat)
        parts.append(_dropped(layer, h, rate, training, on_inputs=False))
        ordered += group
    h = parts[0] if len(parts) == 1 else hot_path.concatenate(parts, axis)
    adapters = [a for _, a in ordered]
    h = h * _rows_like(_concat_mask(route, index, ordered, dtype), h, axis)
    b_cat = hot_path.concatenate([hot_path.read(a.b, dtype) for a in adapters], 0)
    return _add_second(layer, base, h, b_cat)


def _add_second(layer, base, h, b):
    """`base + layer._routed_second(h, b)`; added into `base` by one
    `addmm_` where the layer's second product is `h·B` over the last axis
    (`_routed_second_is_matmul`) and `hot_path.writable(base)`."""
    is_matmul = getattr(layer, "_routed_second_is_matmul", None)
    if is_matmul is not None and is_matmul() and hot_path.writable(base):
        return hot_path.add_product_into(base, h, b)
    return hot_path.add_into(base, layer._routed_second(h, b))


def _concat_mask(route, index, ordered, dtype, scaled=True):
    """`(batch, Σ r)`: a column's adapter scale (`scaled`; else 1) where the
    row's index is that column's adapter's slot, else 0. Computed once per
    call for the layers whose `ordered` adapters have the same slots, ranks
    and scales (`route.memo`)."""
    adapters = [a for _, a in ordered]
    scales = None
    if scaled:
        scales = tuple(a.scale if is_number(a.scale) else id(a.scale) for a in adapters)
    key = ("concat_mask", tuple((k, a.rank) for k, a in ordered), scales, dtype)
    if key not in route.memo:
        owners = np.repeat([k for k, _ in ordered], [a.rank for a in adapters])
        mask = _selection(index, owners, dtype)
        if scaled:
            mask = mask * _column_scales(adapters, dtype)
        route.memo[key] = mask
    return route.memo[key]


def _gather_update(layer, inputs, members, index, dtype, cached):
    a_stack, b_stack, safe, _ = stacks(members, index, dtype, cached)
    return layer._routed_gather(inputs, a_stack, b_stack, safe)


# `"auto"` (docs/serving.md, Cost: the rows of `benchmarks/serving.py`):
# rows that are sequences take `"gather"` on every backend; rows of one
# position take `"concat"` while the adapters' ranks add up to at most
# `CONCAT_MAX_RANK` (8 adapters of rank 8: concat was fastest everywhere),
# above it `AUTO_MANY[backend]` (64 of rank 8: grouped on every backend).
CONCAT_MAX_RANK = 128
AUTO_MANY = {"jax": "grouped", "tensorflow": "grouped", "torch": "grouped"}


def _auto(layer, inputs, members):
    """The strategy `"auto"` takes for `layer`."""
    if positions_per_row(layer, inputs) != 1:
        return "gather"
    if sum(a.rank for _, a in members) <= CONCAT_MAX_RANK:
        return "concat"
    return AUTO_MANY.get(keras.backend.backend(), "concat")


def cache_layout(layer, members, strategy):
    """How a served model's cache keeps `layer`'s adapters
    (`layers.mixed_stacks`): `"concat"` where the layer takes `"concat"`
    (its type has no `_routed_gather`, or the strategy says so),
    `"stack_t"` where it takes TensorFlow's or torch's grouped kernel, else
    `"stack"`. `"auto"` is resolved as `_auto` does, from the input shape
    the layer was built for (unknown: `"stack"`, which the stacking
    strategies can read; a layer that then takes `"concat"` joins its
    adapters per call)."""
    if not callable(getattr(layer, "_routed_gather", None)) or strategy == "concat":
        return "concat"
    if strategy == "auto":
        positions = built_positions(layer)
        if positions is None:
            return "stack"
        if positions != 1:
            strategy = "gather"
        elif sum(a.rank for _, a in members) <= CONCAT_MAX_RANK:
            return "concat"
        else:
            strategy = AUTO_MANY.get(keras.backend.backend(), "concat")
    if strategy == "concat":
        return "concat"
    grouped = strategy == "grouped" and flat_inputs(layer) is not None
    if grouped and keras.backend.backend() in ("tensorflow", "torch"):
        return "stack_t"
    return "stack"


def _dora_rows(layer, out, doras, index, dtype):
    """`out` times each DoRA row's `m/‖W + s·A·B‖` (other rows: 1)."""
    factors = [ops.cast(layer._dora_factor(a), dtype) for _, a in doras]
    c_shape = tuple(factors[0].shape)
    excess = ops.reshape(ops.stack(factors) - 1.0, (len(factors), -1))
    rows = ops.matmul(_selection(index, [k for k, _ in doras], dtype), excess)
    rows = ops.reshape(rows + 1.0, (-1,) + c_shape)
    return layer._routed_scale_rows(out, rows)


def scale_rows(y, rows):
    """`y` times per-row factors `rows` `(batch, *c)`, `c` the trailing axes."""
    lead = len(y.shape) - len(rows.shape)
    shape = (-1,) + (1,) * lead + tuple(rows.shape[1:])
    return ops.multiply(y, ops.reshape(rows, shape))


def routed_reverse(layer, inputs, logits, dtype, route):
    """Tied-embedding logits plus each row's own `x·(s·A·B)ᵀ`."""
    members = _members(layer, route)
    if not members:
        return logits
    dora = [a.name for _, a in members if a.magnitude is not None]
    if dora:
        raise ValueError(
            f"LoRAEmbedding '{layer.name}': the tied reverse projection of "
            f"DoRA adapters {dora} is not supported in mixed batches."
        )
    adapters = [a for _, a in members]
    index = ops.cast(route.index, "int32")
    a_cat = ops.concatenate([hot_path.read(a.a, dtype) for a in adapters], axis=-1)
    b_cat = ops.concatenate([hot_path.read(a.b, dtype) for a in adapters], axis=0)
    h = ops.matmul(inputs, ops.transpose(b_cat))
    owners = np.repeat([k for k, _ in members], [a.rank for a in adapters])
    mask = _selection(index, owners, dtype) * _column_scales(adapters, dtype)
    h = ops.multiply(h, _rows_like(mask, h, -1))
    return ops.add(logits, ops.matmul(h, ops.transpose(a_cat)))
