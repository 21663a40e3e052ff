"""PEFT's LoRA adapter directory: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained` and `save_pretrained` read and write,
without importing `peft` or `torch`:

- for a Linear (our `Dense`), tensors `base_model.model.<module path>.lora_A.weight`
  of shape `[r, in]` and `...lora_B.weight` of shape `[out, r]`: the
  transposes of our `lora_a` `(in, r)` and `lora_b` `(r, out)`;
- for an Embedding, `...lora_embedding_A` `[r, vocab]` and
  `...lora_embedding_B` `[dim, r]`, again the transposes of ours;
- for a Conv1d/2d/3d, `...lora_A.weight` `[r, in, *kernel_size]` (our
  `(*kernel_size, in, r)`) and `...lora_B.weight` `[out, r, 1, ...]` (our
  `(r, out)`), torch's conv layout against Keras's;
- PEFT computes `x·Aᵀ·Bᵀ·scaling` with `scaling = lora_alpha / r`, or
  `lora_alpha / sqrt(r)` with `use_rslora`: the same as our `scale`.

Names: a PEFT module path is the dotted torch path without the
`base_model.model.` prefix, e.g. `"encoder.0"`. `name_map` maps it to a Keras
layer name or path (a dict, or a callable returning a str or `None`). Without
an entry the default rule applies: dots become slashes and the result must be
a Keras layer path (`"encoder.0"` -> `"encoder/0"`; `"fc1"` -> `"fc1"`).
When saving, `name_map` maps the other way: Keras layer path (or name) ->
PEFT module path, and the default rule turns slashes into dots. Both
default rules sit in `module_for_layer` and `layer_for_module`, the only
places that handle `name_map=None`.

`adapter_config.json` is read and written by `keras_lora.io.peft_config`.
"""

import json
import re
import warnings
from pathlib import Path

import safetensors.numpy

from keras_lora.atomic import atomic_output
from keras_lora.config import QUANTIZED_BASE_INITS, pattern_value
from keras_lora.io import (
    hf_classes,
    hub_peft,
    peft_extras,
    peft_layout,
    peft_moe,
)
from keras_lora.io.extra_records import collect_extras
from keras_lora.io.hub_mapping import hub_correspondence
from keras_lora.io.names import lookup, resolve_layer
from keras_lora.io.peft_config import CONFIG_NAME, make_config, read_config
from keras_lora.io.records import make_record
from keras_lora.io.report import report
from keras_lora.io.safetensors_io import read_safetensors
from keras_lora.layers import lora_class_for
from keras_lora.layers.checks import caller_stacklevel

NAME = "peft"
DESCRIPTION = "PEFT adapter"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<name>lora_[AB]\.weight|lora_embedding_[AB])$"
)
# DoRA's magnitude (PEFT saves it without the `.weight` of its module).
MAGNITUDE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(\.weight)?$"
)
FUNCTION = "save_adapter(format='peft')"


def check(model, records, directory, name_map, hf_class=None):
    """Raises if the records cannot be written as one PEFT adapter."""
    if hf_class is not None and not isinstance(hf_class, str):
        raise TypeError(
            "`hf_class` must be the name of a `transformers` class, such as "
            f"'LlamaForCausalLM'. Received: hf_class={hf_class!r}"
        )
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"{FUNCTION} writes a directory, but '{directory}' is a file.")
    for record in records:
        if record.init in ("pissa", "olora"):
            raise ValueError(
                f"{FUNCTION}: layer '{record.path}' uses init={record.init!r}. "
                "PEFT recomputes that residual from its own decomposition of "
                "the base weights when it loads, which keras_lora cannot vouch "
                "for. Save in the 'keras_lora' format, or export the merged "
                "model (`merge_lora`)."
            )
    loftq = sorted(r.path for r in records if r.init in QUANTIZED_BASE_INITS)
    if loftq:
        warnings.warn(
            f"{FUNCTION}: layers {loftq} use init='loftq': their adapters fit "
            "this model's quantized base Q, not the float weights. A PEFT file "
            "does not record that base; as PEFT's own LoftQ workflow does, ship "
            "the base Q with it (the float weights are not the base it needs).",
            stacklevel=caller_stacklevel(),
        )
    variants = {(r.dropout, r.init, r.use_dora) for r in records}
    if len(variants) > 1:
        raise ValueError(
            f"{FUNCTION} needs one dropout, init and use_dora for all layers "
            "(PEFT's lora_dropout, init_lora_weights, use_dora). "
            f"Received: {sorted(variants)}"
        )


def _check_by_name(records, name_map):
    """The checks of a save that names modules by `name_map` or the default
    rule (a KerasHub model without `name_map` is mapped by `hub_mapping`)."""
    for record in records:
        peft_layout.check_keras_layer(record.layer.layer, record.path, FUNCTION)
        if record.layer.factoring != "standard":
            raise ValueError(
                f"{FUNCTION}: layer '{record.path}' is factored "
                f"{record.layer.factoring!r}; PEFT's LoRA of a Linear is the "
                "standard factoring of the flattened kernel. Apply LoRA with "
                "factoring='standard'."
            )
        linear = peft_layout.keras_kind(record.layer.layer) == "Linear"
        if record.use_dora and not (linear and record.a.ndim == record.b.ndim == 2):
            raise ValueError(
                f"{FUNCTION}: layer '{record.path}' is a DoRA "
                f"{type(record.layer.layer).__name__}; the PEFT format is "
                "written for DoRA on Dense (2-D Linear kernels) only. Use the "
                "'keras_lora' format."
            )
    rules = {r.use_rslora for r in records}
    if len(rules) > 1:
        raise ValueError(
            f"{FUNCTION} needs one scale rule for all layers (PEFT's "
            "use_rslora); ranks and alphas may differ (rank_pattern, "
            f"alpha_pattern). Received use_rslora: {sorted(rules)}"
        )
    modules = [module_for_layer(name_map, r) for r in records]
    twice = sorted({m for m in modules if modules.count(m) > 1})
    if twice:
        raise ValueError(f"`name_map` maps two Keras layers to PEFT modules {twice}.")


def save(model, records, directory, name_map=None, hf_class=None):
    """Writes `records` as a PEFT adapter directory, atomically.

    Without `name_map`, a KerasHub model's modules are named, and its
    factors laid out, as in its `transformers` twin of class `hf_class`
    (default: `hf_classes.default_hf_class`), which `adapter_config.json`
    records as PEFT does (`auto_mapping.base_model_class`).
    """
    hub = hub_correspondence(model, hf_class) if name_map is None else None
    extras = collect_extras(model)
    if hub is not None:
        return _save_by_hub(hub, records, directory, extras)
    if hf_class is not None:
        raise ValueError(
            f"{FUNCTION}: `hf_class` names the `transformers` class of a "
            "KerasHub model's twin; "
            + (
                "with `name_map` the module names are yours. Drop one of them."
                if name_map is not None
                else f"model '{model.name}' holds no KerasHub backbone with a "
                "`transformers` converter."
            )
            + f" Received: hf_class={hf_class!r}"
        )
    _check_by_name(records, name_map)
    extra_tensors, modules_to_save = peft_extras.to_peft_by_name(
        extras, lambda record: module_for_layer(name_map, record), FUNCTION
    )
    tensors, modules = {}, []
    for record in records:
        module = module_for_layer(name_map, record)
        modules.append(module)
        kind = peft_layout.keras_kind(record.layer.layer)
        peft_a, peft_b = peft_layout.to_peft_layout(kind, record.a, record.b)
        names = peft_layout.tensor_names(kind)
        tensors[f"{PREFIX}{module}.{names[0]}"] = peft_a
        tensors[f"{PREFIX}{module}.{names[1]}"] = peft_b
        if record.use_dora:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = record.magnitude
    first = records[0]
    config = make_config(
        first.rank,
        first.alpha,
        first.use_rslora,
        first.dropout,
        first.init,
        first.use_dora,
        modules,
        modules_to_save,
        peft_extras.bias_mode(extras),
    )
    tensors.update({f"{PREFIX}{key}": array for key, array in extra_tensors.items()})
    # Per-layer ranks and alphas: the most common pair as r/lora_alpha and
    # an exact pattern for each other module, as for a KerasHub model.
    config.update(
        hub_peft.config_fields(
            [
                hub_peft.ModuleRank(m, r.rank, r.alpha)
                for m, r in zip(modules, records, strict=True)
            ]
        )
    )
    return _write(directory, tensors, config)


def _save_by_hub(hub, records, directory, extras=()):
    experts = [r for r in records if peft_moe.is_experts(r.layer)]
    others = [r for r in records if not peft_moe.is_experts(r.layer)]
    modules, fan_in_fan_out = (
        hub_peft.to_peft(hub, others, FUNCTION) if others else ([], False)
    )
    tensors = {}
    for module in modules:
        names = peft_layout.tensor_names(module.kind)
        tensors[f"{PREFIX}{module.name}.{names[0]}"] = module.a
        tensors[f"{PREFIX}{module.name}.{names[1]}"] = module.b
    # MoE experts: PEFT's `target_parameters` (`ParamWrapper`) layout.
    wrapped, params = peft_moe.to_peft(hub, experts, FUNCTION) if experts else ({}, [])
    tensors.update({f"{PREFIX}{key}": array for key, array in wrapped.items()})
    ranks = [hub_peft.ModuleRank(*p) for p in params]
    extra_tensors, modules_to_save = peft_extras.to_peft_by_hub(hub, extras, FUNCTION)
    tensors.update({f"{PREFIX}{key}": array for key, array in extra_tensors.items()})
    first = records[0]
    config = make_config(
        1,
        1,
        first.use_rslora,
        first.dropout,
        first.init,
        False,
        [m.name for m in modules],
        modules_to_save,
        peft_extras.bias_mode(extras),
    )
    config.update(
        hub_peft.config_fields(modules + ranks), fan_in_fan_out=fan_in_fan_out
    )
    config["target_parameters"] = sorted(p[0] for p in params) or None
    config["auto_mapping"] = {
        "base_model_class": hub.hf_class,
        "parent_library": hf_classes.hf_class_module(hub.hf_class),
    }
    return _write(directory, tensors, config)


def _write(directory, tensors, config):
    with atomic_output(directory, directory=True) as tmp:
        tmp.mkdir()
        safetensors.numpy.save_file(
            tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def claims(path):
    """Whether `path` is a PEFT adapter directory."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read(directory, name_map, model, layers, strict):
    """Returns the validated `LayerRecord`s of the PEFT adapter in `directory`."""
    directory = Path(directory)
    source = f"PEFT adapter '{directory}'"
    options = read_config(directory)
    if options.pop("loftq"):
        warnings.warn(
            f"'{directory}' was initialised with LoftQ (init_lora_weights="
            "'loftq'): its A and B are plain LoRA weights, but they fit the "
            "LoftQ base PEFT saved next to them (the quantized weights Q), not "
            "the original float model. Load it into a model built from that "
            "base.",
            stacklevel=caller_stacklevel(),
        )
    rank = options.pop("rank")
    patterns = options.pop("rank_pattern"), options.pop("alpha_pattern")
    extra_tensors = {}
    pairs, magnitudes = _group_tensors(
        directory, options["use_dora"], strict, extra_tensors
    )
    found, unknown = peft_extras.split_extra_keys(
        extra_tensors, options.pop("modules_to_save"), options.pop("bias")
    )
    _report_unknown(directory, [f"{PREFIX}{key}" for key in unknown], strict)
    saved_for = options.pop("base_model_class")
    target_parameters = options.pop("target_parameters")
    hub = None
    if name_map is None:
        hub = hub_correspondence(model, also=(saved_for,) if saved_for else ())
    if hub is not None:
        params, pairs, unknown = peft_moe.split_pairs(hub, pairs, target_parameters)
        records = _read_by_hub(
            hub, directory, pairs, rank, patterns, options, layers, strict
        )
        extras, unmapped = peft_extras.from_peft_by_hub(
            hub, found, extra_tensors, layers, source
        )
        report(
            [repr(f"{PREFIX}{key}") for key in unmapped],
            strict,
            f"PEFT adapter '{directory}' has trained modules or biases with no "
            f"counterpart in KerasHub's `transformers` converter for "
            f"'{hub.model_type}'",
        )
        records += extras
        report(
            [repr(m) for m in unknown],
            strict,
            f"PEFT adapter '{directory}' has `target_parameters` tensors of "
            "modules with no KerasHub experts layer",
        )
        return records + _read_params(
            hub, directory, params, rank, patterns, options, layers, strict
        )
    if target_parameters:
        raise ValueError(
            f"{source} adapts parameters (`target_parameters`, PEFT's LoRA "
            "on MoE experts); keras_lora reads them into a KerasHub model "
            "with a `transformers` converter, without `name_map`."
        )
    records, unmapped = [], []
    by_path = dict(layers)
    for module, pair in pairs.items():
        kind, a, b = _peft_pair(module, pair, rank, patterns[0], directory)
        path = layer_for_module(name_map, module, layers)
        if path is None:
            unmapped.append(module)
            continue
        layer = by_path[path]
        base = getattr(layer, "layer", layer)
        own = peft_layout.keras_kind(base)
        if own != kind:
            what = "no PEFT counterpart" if own is None else f"PEFT kind {own}"
            raise ValueError(
                f"PEFT module {module!r} is a {kind} adapter, but it maps to "
                f"layer '{path}' of type {type(layer).__name__}, which has "
                f"{what}; a {kind} adapter loads into a layer of that kind "
                f"(e.g. a {peft_layout.keras_type_name(kind)})."
            )
        peft_layout.check_keras_layer(base, path, "load_adapter")
        magnitude = magnitudes.get(module)
        shapes = peft_layout.keras_shapes(base, a.shape[0])
        flat = len(shapes[0]) == len(shapes[1]) == 2
        if options["use_dora"] and (kind != "Linear" or not flat or magnitude is None):
            raise ValueError(
                f"PEFT module {module!r}: keras_lora reads DoRA adapters of "
                "Linear modules, with their lora_magnitude_vector; this one is "
                f"a {kind} adapter"
                + ("." if magnitude is not None else " without a magnitude.")
            )
        a, b = peft_layout.to_keras_layout(kind, a, b, shapes)
        records.append(
            make_record(
                source,
                f"{PREFIX}{module}",
                path,
                a,
                b,
                factoring=lora_class_for(base).file_factoring("standard"),
                magnitude=None if magnitude is None else magnitude.reshape(-1),
                **_module_options(options, patterns, module),
            )
        )
    extras, unmapped_extras = peft_extras.from_peft_by_name(
        found,
        extra_tensors,
        lambda module: layer_for_module(name_map, module, layers),
        by_path,
        source,
    )
    unmapped += unmapped_extras
    if unmapped:
        report(
            [repr(m) for m in sorted(unmapped)],
            strict,
            f"PEFT modules that map to no Keras layer (PEFT modules: "
            f"{sorted(set(pairs) | {m for m, _, _ in found.values()})}; Keras "
            f"layers: {[p for p, _ in layers]}; pass `name_map`)",
        )
    return records + extras


def _read_by_hub(hub, directory, pairs, rank, patterns, options, layers, strict):
    """`read` for a KerasHub model without `name_map` (see `hub_mapping`)."""
    source = f"PEFT adapter '{directory}'"
    if options["use_dora"]:
        raise ValueError(
            f"{source} is a DoRA adapter; keras_lora reads DoRA adapters into "
            "a KerasHub model by `name_map` only."
        )
    modules = []
    for module, pair in pairs.items():
        kind, a, b = _peft_pair(module, pair, rank, patterns[0], directory)
        alpha = _module_options(options, patterns, module)["alpha"]
        modules.append(hub_peft.PeftModule(module, kind, a, b, alpha))
    return hub_peft.records_from_peft(hub, modules, layers, source, options, strict)


def _read_params(hub, directory, params, rank, patterns, options, layers, strict):
    """The records of the experts layers that `params` (`ParamWrapper`
    tensors by parameter path) adapt (see `peft_moe`)."""
    source = f"PEFT adapter '{directory}'"
    factors = {}
    for name, pair in params.items():
        names = peft_layout.tensor_names("Linear")
        if sorted(pair) != sorted(names):
            raise ValueError(
                f"{source} is incomplete: parameter {name!r} has {sorted(pair)}, "
                f"expected {list(names)}."
            )
        param_rank = pattern_value(patterns[0], name, rank)
        alpha = _module_options(options, patterns, name)["alpha"]
        factors[name] = (pair[names[0]], pair[names[1]], param_rank, alpha)
    adapters, unmapped = peft_moe.from_peft(hub, factors, layers, options["use_rslora"])
    report(
        [repr(m) for m in unmapped],
        strict,
        f"PEFT parameters with no counterpart in KerasHub's `transformers` "
        f"converter for '{hub.model_type}'",
    )
    return [
        make_record(source, f"{PREFIX}{key}", path, a, b, **{**options, "alpha": alpha})
        for key, path, a, b, alpha in adapters
    ]


def _module_options(options, patterns, module):
    """`options` with the module's alpha from `alpha_pattern`, PEFT's rule."""
    alpha = pattern_value(patterns[1], module, options["alpha"])
    return {**options, "alpha": alpha}


def module_for_layer(name_map, record):
    """The PEFT module path a record is saved under: `name_map`'s entry for
    its layer path (or, in a dict, its layer name), else slashes to dots."""
    module = lookup(name_map, record.path, record.path.rsplit("/", 1)[-1])
    return module if module is not None else record.path.replace("/", ".")


def layer_for_module(name_map, module, layers):
    """The Keras layer path a PEFT module loads into, or `None`: `name_map`'s
    entry, else the module path with dots as slashes, else as it is."""
    target = lookup(name_map, module)
    if target is not None:
        return resolve_layer(target, layers)
    paths = {p for p, _ in layers}
    for candidate in (module.replace(".", "/"), module):
        if candidate in paths:
            return candidate
    return None


def _group_tensors(directory, use_dora, strict, extras=None):
    """`({module: {tensor name: array}}, {module: magnitude})` of the file.
    With `extras` (a dict), the other tensors under `base_model.model.` go
    there, keyed without it, for `peft_extras` to sort out."""
    pairs, unknown, magnitudes = {}, [], {}
    for key, array in _read_weights(directory).items():
        dora = MAGNITUDE.match(key) if use_dora else None
        if dora is not None:
            magnitudes[dora["module"]] = array
            continue
        match = KEY.match(key)
        if match is None and extras is not None and key.startswith(PREFIX):
            extras[key[len(PREFIX) :]] = array
        elif match is None:
            unknown.append(key)
        else:
            pairs.setdefault(match["module"], {})[match["name"]] = array
    _report_unknown(directory, unknown, strict)
    return pairs, magnitudes


def _report_unknown(directory, keys, strict):
    report(
        [repr(k) for k in sorted(keys)],
        strict,
        f"PEFT adapter '{directory}' has tensors that are no LoRA A/B weight "
        "(keras_lora reads `base_model.model.<module>.lora_A.weight`, "
        "`.lora_B.weight`, `.lora_embedding_A` and `.lora_embedding_B`), nor "
        "a module in its `modules_to_save`, nor a bias its `bias` saves",
    )


def _peft_pair(module, pair, rank, rank_pattern, directory):
    """`(kind, A, B)` of one module's tensors, checked against its rank:
    `rank_pattern`'s (PEFT's rule, `config.pattern_value`), else `r`."""
    module_rank = pattern_value(rank_pattern, module, None)
    how = "" if module_rank is None else " by rank_pattern"
    rank = rank if module_rank is None else module_rank
    embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
    names = peft_layout.tensor_names("Embedding" if embedding else "Linear")
    if sorted(pair) != sorted(names):
        raise ValueError(
            f"PEFT adapter '{directory}' is incomplete or mixed: module "
            f"{module!r} has {sorted(pair)}, expected {list(names)}."
        )
    a, b = pair[names[0]], pair[names[1]]
    kind = "Embedding" if embedding else peft_layout.peft_kind(a)
    if (
        kind is None
        or a.ndim != b.ndim
        or (b.ndim > 2 and any(d != 1 for d in b.shape[2:]))
    ):
        raise ValueError(
            f"PEFT module {module!r}: keras_lora reads Linear, Embedding and "
            f"Conv1d/2d/3d adapters. Received lora_A shape {a.shape} and "
            f"lora_B shape {b.shape}."
        )
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
            f"PEFT module {module!r}: adapter_config.json says r={rank}{how}, but "
            f"lora_A has shape {a.shape} and lora_B {b.shape}."
        )
    return kind, a, b


def _read_weights(directory):
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = directory / "adapter_model.bin"
        extra = (
            f" It has {pickled.name}, a pickle file, which keras_lora never "
            "loads (pickle can run code). Re-save with "
            "`save_pretrained(..., safe_serialization=True)`."
            if pickled.exists()
            else ""
        )
        raise ValueError(f"PEFT adapter '{directory}' has no {WEIGHTS_NAME}.{extra}")
    return read_safetensors(path)[0]
