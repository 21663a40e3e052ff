"""Putting the records read from a file into a model: check all, then assign.

Every format reads a file into validated `LayerRecord`s keyed by Keras
layer path, then hands them to `install`. `install` checks everything that
depends on the model (targets, layer types, variants, factoring, shapes)
before it assigns anything or creates any layer, so a failed load never
leaves a half-loaded model.
"""

import warnings

import keras
import numpy as np

from keras_lora.config import BASE_CHANGING_INITS, QUANTIZED_BASE_INITS
from keras_lora.io.extra_records import install_extras, plan_extras, split
from keras_lora.io.records import kernel_digest, layer_factoring
from keras_lora.io.report import report
from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.checks import caller_stacklevel
from keras_lora.model.surgery import put_adapters, shared_biases_message
from keras_lora.model.tracking import functional_subclass
from keras_lora.model.walk import check_built, iter_layers, lora_layers


def install(
    model,
    records,
    layers,
    strict=True,
    source="adapter",
    adapter_name=None,
    in_place=False,
):
    """Loads `records` into `model` and returns the model to use.

    On a model without LoRA layers, LoRA is first applied (with
    `apply_lora`) to exactly the records' layers, with their rank, alpha,
    scale rule, variant and factoring; the new model is returned and `model`
    itself computes what it did. On a model with LoRA layers, the records
    load into them and `model` is returned.

    Args:
        model: a `keras.Model`.
        records: validated `LayerRecord`s whose `path` is checked against
            `model`.
        layers: `model`'s `(path, layer)` pairs, from the one walk.
        strict: whether records for layers `model` lacks, and LoRA layers of
            `model` the file has no adapter for, are errors (else warnings).
        source: what was read, for messages.
        adapter_name: load into the adapter of that name, added (inactive)
            to the layers that lack it; on a plain model, the name of the
            adapter `apply_lora` creates. `None`: the active adapter (on a
            plain model, `"default"`).
        in_place: on a model without LoRA layers, convert `model` itself
            (`apply_lora(..., in_place=True)` on the records' layers) and
            load into it; a failure undoes the conversion.

    A file's extra trained weights (`extra_records`: whole layers, biases)
    load with the adapters and train again as they did; on a plain model
    the whole layers are copied with the rest (`put_adapters`).

    Raises:
        ValueError: on anything that does not fit; nothing was changed.
    """
    records, extras = split(records)
    by_path = dict(layers)
    lora = [p for p, _ in lora_layers(model, layers)]
    paths = [r.path for r in records]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(
            f"{source}: several entries map to the same layer of model "
            f"'{model.name}': {twice}. Check `name_map`."
        )
    fits = LoRALayer if lora else keras.layers.Layer
    known = [r for r in records if isinstance(by_path.get(r.path), fits)]
    unknown = [r for r in records if r not in known]
    if unknown:
        candidates = [
            p
            for p, layer in layers
            if (isinstance(layer, LoRALayer) if lora else lora_class_for(layer))
        ]
        report(
            [f"{r.key!r} -> layer '{r.path}'" for r in unknown],
            strict,
            f"{source} has keys that match no {'LoRA ' if lora else ''}layer "
            f"of model '{model.name}' (candidates: {candidates})",
        )
    if not known:
        raise ValueError(
            f"{source} has no adapter for any layer of model '{model.name}'; "
            "nothing was loaded."
        )
    extras = _known_extras(model, by_path, extras, strict, source)
    for record in known:
        check_layer(by_path[record.path], record, model, source)
    if not lora:
        for record in known:
            check_base_kernel(by_path[record.path], record, source)
        return _apply_then_assign(
            model,
            layers,
            by_path,
            known,
            source,
            adapter_name or "default",
            in_place,
            extras,
        )
    if adapter_name is not None:
        if extras:
            raise ValueError(
                f"{source} holds trained layers or biases besides its adapters "
                f"({sorted(r.path for r in extras)}), which are the model's "
                "own weights, not one named adapter's; load it without "
                "`adapter_name`. Nothing was loaded."
            )
        _into_named_adapter(model, by_path, known, source, adapter_name)
        return model
    covered = {r.path for r in known}
    report(
        [repr(p) for p in lora if p not in covered],
        strict,
        f"Model '{model.name}' has LoRA layers that {source} has no adapter for",
    )
    for record in known:
        _check_variant(by_path[record.path], record, model, source)
    plan = _plan(model, by_path, known, source)
    extra_plan = plan_extras(by_path, extras, source)
    _assign(plan, by_path, known, source)
    install_extras(by_path, extras, extra_plan)
    return model


def _known_extras(model, by_path, extras, strict, source):
    """The extra records whose layer `model` has; the others are reported."""
    known = [r for r in extras if r.path in by_path]
    report(
        [f"{r.key!r} -> layer '{r.path}'" for r in extras if r.path not in by_path],
        strict,
        f"{source} has trained layers or biases for layers model '{model.name}' lacks",
    )
    return known


def check_layer(layer, record, model, source):
    """Raises unless `record` can go into `layer` (a LoRA layer or its base)."""
    base = layer.layer if isinstance(layer, LoRALayer) else layer
    if lora_class_for(base) is None:
        raise ValueError(
            f"{source}: layer '{record.path}' of model '{model.name}' is a "
            f"{type(base).__name__}, which keras_lora cannot adapt."
        )
    if record.base_type and record.base_type not in {
        cls.__name__ for cls in type(base).__mro__
    }:
        raise ValueError(
            f"{source} has an adapter for a {record.base_type} at "
            f"'{record.path}', but that layer of model '{model.name}' is "
            f"a {type(base).__name__}; nothing was loaded."
        )
    if isinstance(layer, LoRALayer):
        wanted = type(layer).file_factoring(record.factoring)
        own = layer_factoring(layer)
        if wanted != own:
            raise ValueError(
                f"{source} holds a {type(base).__name__} adapter for '{record.path}' "
                f"factored {wanted!r}, but that LoRA layer of model "
                f"'{model.name}' is factored {own!r}; the two factorings give "
                "different A and B, so nothing was loaded. Load into the base "
                f"model, or apply LoRA with factoring={wanted!r}."
            )


def _check_variant(layer, record, model, source):
    """Raises unless `layer`'s active adapter is the variant `record` is,
    on the base kernel the record's adapter is right on."""
    own = layer.get_adapter(layer.active_adapters[0])
    if own.use_dora != record.use_dora or own.init != record.init:
        if own.use_dora == record.use_dora and not (
            own.changes_base or record.init in BASE_CHANGING_INITS
        ):
            # default, gaussian or LoftQ: only the starting point differs
            # (a LoftQ record's base is checked below).
            return check_base_kernel(layer, record, source)
        raise ValueError(
            f"{source} holds a {_variant(record.init, record.use_dora)} "
            f"adapter for '{record.path}', but that layer of model "
            f"'{model.name}' is a {_variant(own.init, own.use_dora)} LoRA "
            "layer; nothing was loaded. Load into the base model, or into a "
            "LoRA layer of the same variant."
        )
    check_base_kernel(layer, record, source)


def check_base_kernel(layer, record, source):
    """Raises if `record` records the digest of a base kernel (PiSSA/OLoRA:
    its residual is recomputed from the base; LoftQ: it was fit to one
    quantized base) and `layer`'s base kernel differs."""
    if record.base_sha256 is None or kernel_digest(layer) == record.base_sha256:
        return
    if record.init in QUANTIZED_BASE_INITS:
        why = (
            "was fit to the quantization error of one quantized base kernel "
            "(Q + s·A·B ≈ W), but this model's base kernel is not that Q (a "
            "float model, or one quantized again); load it into the model "
            "`apply_lora(..., init='loftq')` made, saved with `model.save`, "
            "or into its quantized base"
        )
    else:
        why = (
            "whose residual kernel comes from the base kernel, but this "
            "model's base kernel differs from the one the adapter was "
            "trained on"
        )
    raise ValueError(
        f"{source}: layer '{record.path}' uses init={record.init!r}, {why}; "
        "nothing was loaded."
    )


def _variant(init, use_dora):
    name = {"pissa": "PiSSA", "olora": "OLoRA", "loftq": "LoftQ"}.get(init, "plain")
    return f"{name}{'+DoRA' if use_dora else ''}"


def _plan(model, by_path, records, source):
    """`(variable, array)` pairs to assign; raises on any shape or dtype
    mismatch, before anything is assigned."""
    mismatches, plan = [], []
    for record in records:
        layer = by_path[record.path]
        pairs = [("lora_a", record.a), ("lora_b", record.b)]
        if record.use_dora:
            pairs.append(("lora_magnitude", record.magnitude))
        for name, array in pairs:
            variable = getattr(layer, name)
            problem = _mismatch(record, name, array, variable.shape, source)
            if problem:
                mismatches.append(problem)
            else:
                dtype = keras.backend.standardize_dtype(variable.dtype)
                plan.append((variable, np.asarray(array, dtype=dtype)))
    _refuse(mismatches, model, source)
    return plan


def _mismatch(record, name, array, expected, source):
    if tuple(array.shape) == tuple(expected):
        return None
    return (
        f"layer '{record.path}' {name}: the model expects shape "
        f"{tuple(expected)}, {source} has {tuple(array.shape)} "
        f"(key {record.key!r})"
    )


def _refuse(mismatches, model, source):
    if mismatches:
        raise ValueError(
            f"Shape mismatch loading {source} into model '{model.name}'; "
            "nothing was loaded:\n  " + "\n  ".join(mismatches)
        )


def _check_new_adapter_shapes(model, by_path, records, source, name):
    """Raises before adapter `name` is added anywhere if a record's factors
    cannot fit: a new adapter has the shapes of the layer's first one, at
    the record's rank."""
    mismatches = []
    for record in records:
        layer = by_path[record.path]
        if name in layer.adapter_names:
            continue
        first = layer.get_adapter(layer.adapter_names[0])
        rank = record.rank
        for factor, array, expected in (
            ("lora_a", record.a, tuple(first.a.shape[:-1]) + (rank,)),
            ("lora_b", record.b, (rank,) + tuple(first.b.shape[1:])),
        ):
            problem = _mismatch(record, factor, array, expected, source)
            if problem:
                mismatches.append(problem)
    _refuse(mismatches, model, source)


def _assign(plan, by_path, records, source, warn_scale=True):
    changed = [
        f"'{r.path}': alpha {by_path[r.path].alpha} -> {r.alpha}, "
        f"use_rslora {by_path[r.path].use_rslora} -> {r.use_rslora}"
        for r in records
        if (by_path[r.path].alpha, by_path[r.path].use_rslora)
        != (r.alpha, r.use_rslora)
    ]
    if changed and warn_scale:
        warnings.warn(
            f"{source} records another scale than these LoRA layers had; "
            "they now use the recorded one:\n  " + "\n  ".join(changed),
            stacklevel=caller_stacklevel(),
        )
    for variable, array in plan:
        variable.assign(array)
    for record in records:
        by_path[record.path].alpha = record.alpha
        by_path[record.path].use_rslora = record.use_rslora


def _into_named_adapter(model, by_path, records, source, name):
    """Loads `records` into adapter `name`, adding it where missing; on
    failure the added adapters go again. Active adapters do not change."""
    _check_new_adapter_shapes(model, by_path, records, source, name)
    added, previous = [], {}
    try:
        for record in records:
            layer = by_path[record.path]
            previous[record.path] = layer.active_adapters
            if name not in layer.adapter_names:
                layer.add_adapter(
                    name,
                    rank=record.rank,
                    alpha=record.alpha,
                    use_rslora=record.use_rslora,
                    **record.options,
                )
                added.append(layer)
            layer.set_active_adapters([name])
        for record in records:
            _check_variant(by_path[record.path], record, model, source)
        plan = _plan(model, by_path, records, source)
        _assign(plan, by_path, records, source, warn_scale=not added)
    except Exception:
        for layer in added:
            layer.delete_adapter(name)
        raise
    finally:
        for path, active in previous.items():
            by_path[path].set_active_adapters(active)


def _apply_then_assign(
    model, layers, by_path, records, source, name, in_place, extras=()
):
    """`load_adapter` on a model without LoRA layers: puts a LoRA layer on
    exactly the records' layers, each with its own record's rank, alpha,
    scale rule, variant and factoring (`put_adapters`: in `model` itself if
    `in_place`, else in a copy), and loads the records. The shapes are
    checked against the new layers before the swap is kept: on any failure
    `model` is as it was. The layers of `extras` that train whole are
    copied in a copy (the biases are the shared base layers' own: they need
    `in_place`)."""
    check_built(model, "load_adapter")
    biases = sorted(r.path for r in extras if r.kind == "bias")
    if biases and not in_place:
        raise ValueError(shared_biases_message("load_adapter", biases, source))
    options = {
        id(by_path[r.path]): _common_options(by_path, [r], source) for r in records
    }
    if not in_place and functional_subclass(model):
        raise ValueError(_copy_loses_class(model, by_path, records, source))
    planned = []

    def check(converted):
        converted_layers = dict(iter_layers(converted))
        plan = _plan(converted, converted_layers, records, source)
        extra_plan = plan_extras(converted_layers, extras, source)
        planned.append((converted_layers, plan, extra_plan))

    wrapped = {id(by_path[r.path]) for r in extras if r.kind == "module"} & set(options)
    if wrapped:
        raise ValueError(
            f"{source} adapts layers it also trains whole: "
            f"{sorted(r.path for r in extras if id(by_path[r.path]) in wrapped)}."
        )
    lora_model = put_adapters(
        model,
        set(options),
        lambda layer: lora_class_for(layer)(
            layer, adapter_name=name, **options[id(layer)]
        ),
        trainable={id(by_path[r.path]) for r in extras if r.kind == "module"},
        in_place=in_place,
        check=check,
    )
    ((converted_layers, plan, extra_plan),) = planned
    _assign(plan, converted_layers, records, source, warn_scale=False)
    install_extras(converted_layers, extras, extra_plan)
    return lora_model


def _copy_loses_class(model, by_path, records, source):
    """The refusal of a copy of a Functional subclass, with the calls that
    work instead."""
    convert = ""
    try:
        kwargs = _common_options(by_path, records, source)
    except ValueError:  # per-layer ranks or variants: only in_place=True
        pass
    else:
        options = "".join(
            f", {k}={v!r}"
            for k, v in kwargs.items()
            if k != "rank" and v not in (False, "default")
        )
        convert = (
            ", or convert it first and load into it: `kl.apply_lora(model, "
            f"targets={sorted(r.path for r in records)}, rank={kwargs['rank']}"
            f"{options}, in_place=True)`"
        )
    return (
        f"load_adapter: model '{model.name}' is a {type(model).__name__}, "
        "a Functional subclass. Loading into a model without LoRA layers "
        "applies LoRA to a copy by default, which would lose its class (a "
        "KerasHub task its preprocessor and `generate()`). Pass "
        "`in_place=True` to convert the model itself and load in one "
        f"call (`kl.load_adapter(model, path, in_place=True)`){convert}."
    )


def _common_options(by_path, records, source):
    """The LoRA layer arguments that give every record's layer its
    adapter's options; raises if the records differ in them."""
    settings = {
        (r.rank, r.use_rslora, tuple(sorted(r.options.items()))) for r in records
    }
    if len(settings) > 1:
        raise ValueError(
            f"{source} mixes ranks {sorted({r.rank for r in records})} (or "
            "scale rules or variants) across layers; load_adapter can only "
            "apply one rank to a plain model. Apply LoRA yourself (layer by "
            "layer) and load into that model."
        )
    first = records[0]
    kwargs = {
        "rank": first.rank,
        "alpha": first.alpha,
        "use_rslora": first.use_rslora,
        **first.options,
    }
    factorings = {
        lora_class_for(by_path[r.path]).file_factoring(r.factoring) for r in records
    } - {None}
    if len(factorings) > 1:
        raise ValueError(
            f"{source} mixes factorings {sorted(factorings)}; "
            "load_adapter applies one to a plain model. Apply LoRA yourself "
            "and load into that model."
        )
    if factorings:
        # Every LoRA layer type takes `factoring`; `None`: the type has one.
        (kwargs["factoring"],) = factorings
    return kwargs
