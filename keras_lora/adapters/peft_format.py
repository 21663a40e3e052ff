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
PEFT module path, and the default rule turns slashes into dots.
"""

import json
import re
from pathlib import Path

import keras
import numpy as np
import safetensors
import safetensors.numpy

from keras_lora.adapters.loading import (
    LayerAdapter,
    report,
    resolve_layer,
    savable_lora_layers,
)
from keras_lora.adapters.safetensors_io import read_safetensors
from keras_lora.atomic import atomic_output

CONFIG_NAME = "adapter_config.json"
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
CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

# Config fields that change nothing about the saved weights' meaning: kept
# for information, or used only while training or to pick target modules.
IGNORED_FIELDS = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
# Fields keras_lora honours.
HONOURED_FIELDS = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "init_lora_weights",
    "use_dora",
}
# Fields keras_lora cannot represent unless they have their neutral value.
NEUTRAL_FIELDS = {
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "replicated layers",
    "megatron_config": "Megatron parallel layers",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on bare parameters",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# `init_lora_weights` values that only choose a starting point for A and B.
# The others (pissa, olora, loftq, corda, lora_ga) also rewrite the base
# weights, so the adapter alone does not reproduce the fine-tuned model.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def save(model, directory, name_map, adapter=None):
    """Writes `model`'s adapters as a PEFT adapter directory, atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"save_adapter(format='peft') writes a directory, but '{directory}' "
            "is a file."
        )
    layers = savable_lora_layers(model, "save_adapter(format='peft')", adapter)
    for path, layer in layers:
        _check_keras_layer(layer.layer, path, "save_adapter(format='peft')")
    for path, layer in layers:
        if layer.init in ("pissa", "olora"):
            raise ValueError(
                f"save_adapter(format='peft'): layer '{path}' uses "
                f"init={layer.init!r}. PEFT recomputes that residual from its "
                "own decomposition of the base weights when it loads, which "
                "keras_lora cannot vouch for. Save in the 'keras_lora' format, "
                "or export the merged model (`merge_lora`)."
            )
        if layer.use_dora and not isinstance(layer.layer, keras.layers.Dense):
            raise ValueError(
                f"save_adapter(format='peft'): layer '{path}' is a DoRA "
                f"{type(layer.layer).__name__}; the PEFT format is written for "
                "DoRA on Dense (PEFT Linear) layers only. Use the 'keras_lora' "
                "format."
            )
    variants = {(layer.dropout, layer.init, layer.use_dora) for _, layer in layers}
    if len(variants) > 1:
        raise ValueError(
            "save_adapter(format='peft') needs one dropout, init and use_dora "
            "for all layers (PEFT's lora_dropout, init_lora_weights, "
            f"use_dora). Received: {sorted(variants)}"
        )
    dropout, init, use_dora = variants.pop()
    settings = {(layer.rank, layer.alpha, layer.use_rslora) for _, layer in layers}
    if len(settings) > 1:
        raise ValueError(
            "save_adapter(format='peft') needs one rank, alpha and scale rule "
            "for all layers (PEFT's r, lora_alpha, use_rslora). Received "
            f"(rank, alpha, use_rslora): {sorted(settings)}"
        )
    rank, alpha, use_rslora = settings.pop()
    tensors, modules = {}, []
    for path, layer in layers:
        module = _to_module(name_map, path, layer)
        if module in modules:
            raise ValueError(
                f"`name_map` maps two Keras layers to PEFT module {module!r}."
            )
        modules.append(module)
        a = keras.ops.convert_to_numpy(layer.lora_a.value)
        b = keras.ops.convert_to_numpy(layer.lora_b.value)
        kind = _keras_kind(layer.layer)
        names = _tensor_names(kind)
        for name, array in zip(names, _to_peft_layout(kind, a, b), strict=True):
            tensors[f"{PREFIX}{module}.{name}"] = array
        if use_dora:
            magnitude = keras.ops.convert_to_numpy(layer.lora_magnitude.value)
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.ascontiguousarray(
                magnitude
            )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": _number(alpha),
        "use_rslora": use_rslora,
        "target_modules": modules,
        "lora_dropout": dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "use_dora": use_dora,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_output(directory, directory=True) as tmp:
        tmp.mkdir()
        safetensors.numpy.save_file(
            tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def is_peft_directory(path):
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read(directory, name_map, model_layers, strict):
    """Returns the `LayerAdapter`s of the PEFT adapter in `directory`."""
    directory = Path(directory)
    config = read_config(directory)
    rank = config["r"]
    alpha = float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))
    tensors = _read_weights(directory)
    use_dora = bool(config.get("use_dora", False))
    options = {
        "dropout": float(config.get("lora_dropout") or 0.0),
        "init": "gaussian"
        if config.get("init_lora_weights") == "gaussian"
        else "default",
        "use_dora": use_dora,
    }
    pairs, unknown, magnitudes = {}, [], {}
    for key, array in tensors.items():
        dora = MAGNITUDE.match(key) if use_dora else None
        if dora is not None:
            magnitudes[dora["module"]] = array
            continue
        match = KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["name"]] = array
    report(
        [repr(k) for k in sorted(unknown)],
        strict,
        f"PEFT adapter '{directory}' has tensors that are no LoRA A/B weight "
        "(keras_lora reads `base_model.model.<module>.lora_A.weight`, "
        "`.lora_B.weight`, `.lora_embedding_A` and `.lora_embedding_B`)",
    )
    adapters, unmapped = [], []
    for module, pair in pairs.items():
        kind = (
            "Embedding"
            if "lora_embedding_A" in pair or ("lora_embedding_B" in pair)
            else None
        )
        names = _tensor_names(kind or "Linear")
        if sorted(pair) != sorted(names):
            raise ValueError(
                f"PEFT adapter '{directory}' is incomplete or mixed: module "
                f"{module!r} has {sorted(pair)}, expected {list(names)}."
            )
        a, b = pair[names[0]], pair[names[1]]
        kind = kind or _peft_kind(a)
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
                f"PEFT module {module!r}: adapter_config.json says r={rank}, but "
                f"lora_A has shape {a.shape} and lora_B {b.shape}."
            )
        path = _to_keras(name_map, module, model_layers)
        if path is None:
            unmapped.append(module)
            continue
        layer = dict(model_layers)[path]
        base = getattr(layer, "layer", layer)
        if _keras_kind(base) != kind:
            raise ValueError(
                f"PEFT module {module!r} is a {kind} adapter, but it maps to "
                f"layer '{path}' of type {type(layer).__name__}; a {kind} "
                f"adapter loads into a {_keras_type_name(kind)} layer."
            )
        _check_keras_layer(base, path, "load_adapter")
        a, b = _to_keras_layout(kind, a, b)
        magnitude = magnitudes.get(module)
        if use_dora and (kind != "Linear" or magnitude is None):
            raise ValueError(
                f"PEFT module {module!r}: keras_lora reads DoRA adapters of "
                "Linear modules, with their lora_magnitude_vector; this one is "
                f"a {kind} adapter"
                + ("." if magnitude is not None else " without a magnitude.")
            )
        adapters.append(
            LayerAdapter(
                f"{PREFIX}{module}",
                path,
                a,
                b,
                alpha,
                use_rslora,
                magnitude=None if magnitude is None else magnitude.reshape(-1),
                **options,
            )
        )
    if unmapped:
        report(
            [repr(m) for m in sorted(unmapped)],
            strict,
            f"PEFT modules that map to no Keras layer (PEFT modules: "
            f"{sorted(pairs)}; Keras layers: {[p for p, _ in model_layers]}; "
            "pass `name_map`)",
        )
    return adapters


def read_config(directory):
    """Reads and validates `adapter_config.json`; raises on what cannot load."""
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"'{path}' must hold a JSON object, not {type(config).__name__}."
        )
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"'{path}': keras_lora reads LoRA adapters (peft_type 'LORA'). "
            f"Received peft_type={config.get('peft_type')!r}."
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"'{path}': `r` must be a positive integer. Received: {rank!r}"
        )
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(
            f"'{path}': `lora_alpha` must be a positive number. Received: {alpha!r}"
        )
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(
            f"'{path}': `use_rslora` must be true or false. "
            f"Received: {config.get('use_rslora')!r}"
        )
    problems = []
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        problems.append(
            f"init_lora_weights={init!r} (an initialization that also changes "
            "the base weights, or one keras_lora does not know)"
        )
    for field, meaning in NEUTRAL_FIELDS.items():
        value = config.get(field)
        if field == "bias" and value in (None, "none"):
            continue
        if not _neutral(value):
            problems.append(f"{field}={value!r} ({meaning})")
    known = IGNORED_FIELDS | HONOURED_FIELDS | set(NEUTRAL_FIELDS)
    for field in sorted(set(config) - known):
        if not _neutral(config[field]):
            problems.append(
                f"{field}={config[field]!r} (a field keras_lora does not know)"
            )
    if problems:
        raise ValueError(
            f"'{path}' uses PEFT features keras_lora cannot represent:\n  "
            + "\n  ".join(problems)
        )
    return config


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


def _to_keras(name_map, module, model_layers):
    target = None
    if callable(name_map):
        target = name_map(module)
    elif name_map is not None:
        target = name_map.get(module)
    if target is not None:
        return resolve_layer(str(target), model_layers)
    paths = {p for p, _ in model_layers}
    for candidate in (module.replace(".", "/"), module):
        if candidate in paths:
            return candidate
    return None


def _to_module(name_map, path, layer):
    module = None
    if callable(name_map):
        module = name_map(path)
    elif name_map is not None:
        module = name_map.get(path, name_map.get(layer.name))
    if module is None:
        module = path.replace("/", ".")
    return str(module)


def _neutral(value):
    return value is None or value is False or value == {} or value == [] or value == ""


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def _keras_type_name(kind):
    if kind.startswith("Conv"):
        return kind[:-1] + "D"  # "Conv2d" -> "Conv2D"
    return {"Linear": "Dense", "Embedding": "Embedding"}[kind]


def _keras_kind(layer):
    """The PEFT module kind matching a Keras base layer, or `None`."""
    if isinstance(layer, keras.layers.Dense):
        return "Linear"
    if isinstance(layer, keras.layers.Embedding):
        return "Embedding"
    if isinstance(layer, CONV_TYPES):
        return f"Conv{len(layer.kernel_size)}d"
    return None


def _peft_kind(a):
    if a.ndim == 2:
        return "Linear"
    if a.ndim in (3, 4, 5):
        return f"Conv{a.ndim - 2}d"
    return None


def _check_keras_layer(layer, path, function):
    kind = _keras_kind(layer)
    if kind is None:
        raise ValueError(
            f"{function}: PEFT interop covers Dense, Embedding and "
            f"Conv1D/2D/3D layers; layer '{path}' is a {type(layer).__name__}."
        )
    if kind.startswith("Conv") and any(d != 1 for d in layer.dilation_rate):
        raise ValueError(
            f"{function}: layer '{path}' is a dilated convolution "
            f"(dilation_rate={layer.dilation_rate}). PEFT applies lora_A "
            "without dilation and keras_lora with it, so the outputs would "
            "differ; PEFT interop supports dilation 1 only."
        )


def _tensor_names(kind):
    if kind == "Embedding":
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A.weight", "lora_B.weight")


def _to_keras_layout(kind, a, b):
    """PEFT's A, B -> our `lora_a`, `lora_b`."""
    if kind.startswith("Conv"):
        a = np.transpose(a, (*range(2, a.ndim), 1, 0))  # [r, in, *k] -> (*k, in, r)
        b = b.reshape(b.shape[:2]).T  # [out, r, 1, ...] -> (r, out)
    else:
        a, b = a.T, b.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _to_peft_layout(kind, a, b):
    """Our `lora_a`, `lora_b` -> PEFT's A, B."""
    if kind.startswith("Conv"):
        spatial = a.ndim - 2
        a = np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(spatial)))
        b = b.T.reshape(b.shape[1], b.shape[0], *(1,) * spatial)
    else:
        a, b = a.T, b.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)
