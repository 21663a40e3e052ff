"""Hot-swapping adapters into a compiled model without a retrace.

A compiled function (`jax.jit`, `tf.function`, `torch.compile`) is traced
for fixed variable shapes and fixed Python values. Swapping in an adapter of
another rank changes the shapes of `A` and `B`; another alpha changes the
scale, which an unprepared layer multiplies by as a Python float baked into
the trace. `prepare_hotswap` removes both: every adapter is padded with
zeros to one rank (its capacity, `LoRALayer.prepare_hotswap`) and its scale
becomes a variable.

`hotswap_adapter` then only assigns variables. The file is read by the same
reader as `load_adapter` (`keras_lora.io.formats.read_records`: keras_lora
files, PEFT directories, KerasHub-mapped PEFT directories) into validated
`LayerRecord`s. Everything is checked against the prepared adapters (the
target set, layer types and factoring, variant, rank against capacity,
shapes) before anything is assigned. Then the factors, zero-padded to the
capacity, DoRA's magnitude and the scale are assigned to the existing
variables: no variable is created, no shape or Python value in a compiled
function changes, so nothing is traced again.

Swapping back and forth between a few tenants' files re-reads the same
bytes. A keras_lora file that was read and checked against the model is
remembered on the model, keyed by the file's identity as `os.stat` gives it
(path, device, inode, size, `st_mtime_ns`, `st_ctime_ns`; the same before
and after the read, or nothing is remembered) and by the adapter's
variables: the next swap of the same unchanged file into the same adapter
assigns the checked values without reading, hashing and validating again.
Any write to the file changes its ctime (which no user call can set back),
so a changed file is read, its SHA-256 checksum verified and every check
run again, and a corrupt one refused. PEFT directories are always read.
"""

import collections
import os
import warnings

import keras
import numpy as np

from keras_lora.config import DEFAULT_NAME, validate_adapter_name, validate_rank
from keras_lora.io.extra_records import ExtraRecord
from keras_lora.io.formats import check_path, find_reader, read_records
from keras_lora.io.install import check_base_kernel, check_layer
from keras_lora.io.names import check_name_map
from keras_lora.layers import mixed
from keras_lora.layers.checks import caller_stacklevel
from keras_lora.layers.variants import scale_for
from keras_lora.model.tracking import drop_compiled
from keras_lora.model.walk import check_is_model, iter_layers, require_lora_layers


def prepare_hotswap(model, max_rank):
    """Pads every adapter of `model` to rank `max_rank` and makes scales variables.

    `A` gets zero columns and `B` zero rows up to `max_rank`, so each adapter
    computes what it did (to float rounding) and is, from then on, a rank-
    `max_rank` adapter whose extra components are zero: `layer.rank` is
    `max_rank` and `alpha` becomes `scale·max_rank` (`scale·sqrt(max_rank)`
    with rsLoRA), which keeps the scale. Each scale becomes a non-trainable
    float32 variable that the layer reads on every call. After this,
    `hotswap_adapter` writes any adapter of rank `<= max_rank` and any alpha
    into the same variables, and compiled functions keep running without a
    retrace.

    The padded factors are new variables, so call this before `compile`
    (the model's compiled functions are dropped; compile again to train).
    Everything else works on a prepared model: `merge_lora`, `save_adapter`
    (which writes the padded adapter at rank `max_rank`, loadable by any
    model), `.keras` files (which record each adapter's `hotswap` option),
    named adapters, DoRA. Calling it again with a larger `max_rank` pads
    further.

    Args:
        model: a `keras.Model` with built LoRA layers.
        max_rank: positive integer, the capacity: the largest rank a swapped
            adapter may have, and at least every current adapter's rank.

    Returns:
        `model`, prepared in place.

    Raises:
        TypeError: `model` is not a `keras.Model`, or `max_rank` is not an
            integer.
        ValueError: `max_rank` is below an adapter's rank, `model` has no
            LoRA layers, or they are not built; nothing was changed.

    Example:

    >>> lora_model = kl.apply_lora(model, rank=4)
    >>> kl.prepare_hotswap(lora_model, max_rank=16)
    >>> lora_model.compile(...)
    >>> kl.hotswap_adapter(lora_model, "tenant_a.safetensors")
    """
    check_is_model(model, "prepare_hotswap")
    max_rank = validate_rank(max_rank, "max_rank")
    layers = require_lora_layers(
        model,
        "prepare_hotswap",
        ". Use `apply_lora` (or `load_adapter`) first.",
        built=True,
    )
    above = [
        f"'{path}' adapter {name!r} rank {rank}"
        for path, layer in layers
        for name, rank in layer.ranks_above(max_rank).items()
    ]
    if above:
        raise ValueError(
            f"prepare_hotswap: `max_rank` must be at least the rank of every "
            f"adapter. Received: max_rank={max_rank}, but model "
            f"'{model.name}' has:\n  " + "\n  ".join(above) + "\nNothing was changed."
        )
    for _, layer in layers:
        layer.prepare_hotswap(max_rank)
    drop_compiled(model)
    return model


def hotswap_adapter(model, path, adapter_name=DEFAULT_NAME, name_map=None):
    """Writes the adapter at `path` into adapter `adapter_name` of a prepared model.

    `model` must have been prepared with `prepare_hotswap(model, max_rank)`.
    The adapter may have any rank up to `max_rank`, any alpha and either
    scale rule: its factors are zero-padded to `max_rank` and assigned, with
    its scale, to the variables the model already has. A compiled
    `predict`, `evaluate` or train step keeps running with no retrace, and
    the outputs are those of `load_adapter(base_model, path)`. Swap between
    calls (on JAX, `fit` holds the variables' values for its whole run).

    The file must hold adapter `adapter_name`'s layers, no more, no less,
    and the same variant (plain or DoRA). The adapter's `dropout` stays the
    model's (it is a training option fixed when the step was traced); a
    differing one in the file is reported with a warning. When training
    after a swap, the optimizer's moments still belong to the previous
    adapter.

    Args:
        model: a `keras.Model` prepared with `prepare_hotswap`.
        path: a `keras_lora` `.safetensors` file or a PEFT adapter directory,
            as `load_adapter` takes.
        adapter_name: the adapter to overwrite (`"default"`).
        name_map: as in `load_adapter`.

    Returns:
        `model`.

    Raises:
        FileNotFoundError: nothing at `path`.
        TypeError: `model` or `path` of the wrong type.
        ValueError: the model is not prepared, has no adapter `adapter_name`,
            or the file does not fit it (a rank above the capacity, another
            set of layers, layer type, factoring, variant or shape); nothing
            was changed.
    """
    check_path(path)
    check_is_model(model, "hotswap_adapter")
    adapter_name = validate_adapter_name(adapter_name)
    check_name_map(name_map)
    layers = list(iter_layers(model))
    targets = _prepared_adapters(model, layers, adapter_name)
    key = _cache_key(path, adapter_name, name_map, targets)
    cache = model.__dict__.setdefault("_keras_lora_hotswap", _Checked())
    checked = cache.get(key)
    if checked is None:
        reader = find_reader(path)
        records, source = read_records(reader, path, name_map, model, layers, True)
        checked = _plan(model, dict(layers), targets, records, source, adapter_name)
        if key is not None and key == _cache_key(path, adapter_name, name_map, targets):
            cache.put(key, checked)
    plan, scales, dropouts = checked
    if dropouts:
        warnings.warn(
            "hotswap_adapter keeps the model's dropout (fixed when the train "
            "step was traced); the file records another:\n  " + "\n  ".join(dropouts),
            stacklevel=caller_stacklevel(),
        )
    assign_all(plan)
    for adapter, scale, use_rslora in scales:
        adapter.set_scale(scale, use_rslora, assign=False)
    return model


def assign_all(plan):
    """Assigns each `(variable, NumPy value)` of `plan`.

    On JAX each value is placed as the variable's current value is:
    committed to its sharding if that one is, else uncommitted. jit keys its
    cache on the arguments' placements, so a value that turned committed
    would recompile every compiled step that reads it (without retracing
    it). The values go in two `jax.device_put` calls, not one per variable.
    Elsewhere each is assigned as it is.
    """
    if keras.backend.backend() == "jax":
        import jax

        committed = [getattr(v.value, "_committed", True) for v, _ in plan]
        pinned = [(v, a) for (v, a), c in zip(plan, committed, strict=True) if c]
        free = [(v, a) for (v, a), c in zip(plan, committed, strict=True) if not c]
        values = jax.device_put(
            [a for _, a in pinned], [v.value.sharding for v, _ in pinned]
        )
        plan = list(zip([v for v, _ in pinned], values, strict=True))
        values = jax.device_put([a for _, a in free])
        plan += list(zip([v for v, _ in free], values, strict=True))
    for variable, value in plan:
        variable.assign(value)
    mixed.note_adapter_writes()  # served models' cached stacks: stale now


def _prepared_adapters(model, layers, name):
    """`{path: Adapter}` of adapter `name`; raises unless all are prepared."""
    lora = require_lora_layers(
        model,
        "hotswap_adapter",
        ". Apply LoRA, then call `kl.prepare_hotswap(model, max_rank)`.",
        layers=layers,
    )
    targets = {
        p: layer.get_adapter(name) for p, layer in lora if name in layer.adapter_names
    }
    if not targets:
        known = sorted({n for _, layer in lora for n in layer.adapter_names})
        raise ValueError(
            f"hotswap_adapter: model '{model.name}' has no adapter named "
            f"{name!r} (adapters: {known}). Received: adapter_name={name!r}"
        )
    unprepared = sorted(p for p, a in targets.items() if a.scale_variable is None)
    if unprepared:
        raise ValueError(
            f"hotswap_adapter: adapter {name!r} of LoRA layers {unprepared} of "
            f"model '{model.name}' is not prepared for hot-swapping. Call "
            "`kl.prepare_hotswap(model, max_rank)` once (before compiling)."
        )
    merged = sorted(p for p, layer in lora if p in targets and layer.merged)
    if merged:
        raise ValueError(
            f"hotswap_adapter: LoRA layers {merged} of model '{model.name}' are "
            "merged in place, so a swapped adapter would not be used; call "
            "`kl.unmerge_lora(model)` first."
        )
    return targets


def _plan(model, by_path, targets, records, source, name):
    """`([(variable, value)], [(adapter, scale, use_rslora)])` for the swap;
    raises, having changed nothing, on anything that does not fit."""
    extras = sorted(r.path for r in records if isinstance(r, ExtraRecord))
    if extras:
        raise ValueError(
            f"hotswap_adapter: {source} also holds trained layers or biases "
            f"({extras}: `trainable`/`bias` in `apply_lora`), which a swap of "
            "the adapters' factors cannot carry. Load it with `load_adapter`. "
            "Nothing was changed."
        )
    paths = [r.path for r in records]
    missing = sorted(set(targets) - set(paths))
    extra = sorted(set(paths) - set(targets))
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if missing or extra or twice:
        raise ValueError(
            f"hotswap_adapter: {source} must cover exactly the layers of "
            f"adapter {name!r} of model '{model.name}'. Layers it lacks: "
            f"{missing}; layers it has that the adapter lacks: {extra}; layers "
            f"several entries map to: {twice}. Nothing was changed."
        )
    problems, plan, scales, dropouts = [], [], [], []
    for record in records:
        adapter = targets[record.path]
        check_layer(by_path[record.path], record, model, source)
        where = f"layer '{record.path}'"
        try:  # a LoftQ adapter fits one quantized base only
            check_base_kernel(by_path[record.path], record, source)
        except ValueError as e:
            problems.append(str(e))
            continue
        if record.init in ("pissa", "olora") or adapter.changes_base:
            init = record.init if record.init in ("pissa", "olora") else adapter.init
            problems.append(
                f"{where}: init={init!r} adapters have a residual kernel that a "
                "swap cannot change; hot-swapping takes plain and DoRA adapters"
            )
            continue
        if record.use_dora != adapter.use_dora:
            problems.append(
                f"{where}: the file's adapter is {_variant(record.use_dora)}, "
                f"the model's {_variant(adapter.use_dora)}"
            )
            continue
        if record.rank > adapter.rank:
            problems.append(
                f"{where}: rank {record.rank} is above the capacity "
                f"max_rank={adapter.rank} (prepare_hotswap)"
            )
            continue
        pairs = [(adapter.a, record.a, -1), (adapter.b, record.b, 0)]
        if record.use_dora:
            pairs.append((adapter.magnitude, record.magnitude, None))
        for variable, array, axis in pairs:
            value, problem = _padded(variable, array, axis)
            if problem:
                problems.append(f"{where} {variable.name}: {problem}")
            else:
                plan.append((variable, value))
        scale = scale_for(record.rank, record.alpha, record.use_rslora)
        plan.append((adapter.scale_variable, np.float32(scale)))
        scales.append((adapter, scale, record.use_rslora))
        if record.dropout != adapter.dropout:
            dropouts.append(
                f"'{record.path}': {adapter.dropout} (file: {record.dropout})"
            )
    if problems:
        raise ValueError(
            f"hotswap_adapter: {source} does not fit adapter {name!r} of model "
            f"'{model.name}'; nothing was changed:\n  " + "\n  ".join(problems)
        )
    return plan, scales, dropouts


class _Checked:
    """The last few swaps' checked `(plan, scales, dropouts)`, by
    `_cache_key`; the oldest is dropped past `SIZE`."""

    SIZE = 16

    def __init__(self):
        self.entries = collections.OrderedDict()

    def get(self, key):
        if key is None or key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key, checked):
        self.entries[key] = checked
        while len(self.entries) > self.SIZE:
            self.entries.popitem(last=False)


def _cache_key(path, name, name_map, targets):
    """What a checked swap depends on: the file as `os.stat` identifies it
    (a write changes its ctime), the name map and the target adapters'
    variables; `None` (never remembered) for directories and callables."""
    if callable(name_map):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    file_id = (
        os.path.abspath(os.fspath(path)),
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    )
    names = None if name_map is None else repr(sorted(name_map.items(), key=repr))
    adapters = tuple(
        (p, id(a), id(a.a), id(a.b), id(a.magnitude), id(a.scale_variable))
        + (tuple(a.a.shape), tuple(a.b.shape), a.use_dora, a.dropout)
        for p, a in sorted(targets.items())
    )
    return file_id, name, names, adapters


def _padded(variable, array, axis):
    """`(value, None)`: `array` zero-padded along `axis` to `variable`'s
    shape, in its dtype; or `(None, problem)`."""
    shape = tuple(variable.shape)
    got = tuple(array.shape)
    if axis is None:
        fits = got == shape
    else:
        rest = [i for i in range(len(shape)) if i != axis % len(shape)]
        fits = len(got) == len(shape) and all(got[i] == shape[i] for i in rest)
    if not fits:
        expected = "the shape" if axis is None else "all but the rank axis of the shape"
        return None, f"expected {expected} {shape}, the file has {got}"
    try:  # bfloat16 has no NumPy dtype without ml_dtypes: `assign` casts
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
    except TypeError:
        dtype = np.float32
    value = np.zeros(shape, dtype)
    value[tuple(slice(0, d) for d in got)] = array
    return value, None


def _variant(use_dora):
    return "a DoRA adapter" if use_dora else "a plain (non-DoRA) adapter"
