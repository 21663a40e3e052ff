"""`hotswap_adapter`: write an adapter file into a prepared model's variables.

The file is read by the same reader as `load_adapter`
(`keras_lora.io.formats.read_records`: keras_lora files, PEFT directories,
KerasHub-mapped PEFT directories) into validated `LayerRecord`s.
Everything is checked against the prepared adapters (the target set,
layer types and factoring, variant, rank against capacity, shapes) before
anything is assigned. Then the factors, zero-padded to the capacity, DoRA's
magnitude and the scale are assigned to the existing variables: no variable
is created, no shape or Python value in a compiled function changes, so
nothing is traced again.
"""

import warnings

import keras
import numpy as np

from keras_lora.config import DEFAULT_NAME, validate_adapter_name
from keras_lora.io.formats import check_path, find_reader, read_records
from keras_lora.io.install import check_layer
from keras_lora.io.names import check_name_map
from keras_lora.layers.checks import caller_stacklevel
from keras_lora.layers.variants import scale_for
from keras_lora.model.walk import check_is_model, iter_layers, require_lora_layers


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
    reader = find_reader(path)
    layers = list(iter_layers(model))
    targets = _prepared_adapters(model, layers, adapter_name)
    records, source = read_records(reader, path, name_map, model, layers, True)
    plan, scales = _plan(model, dict(layers), targets, records, source, adapter_name)
    assign_all(plan)
    for adapter, scale, use_rslora in scales:
        adapter.set_scale(scale, use_rslora, assign=False)
    return model


def assign_all(plan):
    """Assigns each `(variable, NumPy value)` of `plan`.

    On JAX the values go to their devices in one `jax.device_put` (placed
    as each variable's current value is, shardings included): one transfer
    instead of one per variable, about half the time for a dozen small
    arrays. Elsewhere each is assigned as it is.
    """
    if keras.backend.backend() == "jax":
        import jax

        variables = [variable for variable, _ in plan]
        places = [variable.value.sharding for variable in variables]
        values = jax.device_put([value for _, value in plan], places)
        plan = zip(variables, values, strict=True)
    for variable, value in plan:
        variable.assign(value)


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
    if dropouts:
        warnings.warn(
            "hotswap_adapter keeps the model's dropout (fixed when the train "
            "step was traced); the file records another:\n  " + "\n  ".join(dropouts),
            stacklevel=caller_stacklevel(),
        )
    return plan, scales


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
