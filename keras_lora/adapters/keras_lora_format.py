"""The `keras_lora` adapter file: one `.safetensors` file keyed by layer path.

Tensors are named `"<layer path>/lora_a"` and `"<layer path>/lora_b"`, where
the path comes from `iter_layers` (e.g. `"encoder/dense_1/lora_a"`), never
from a layer's position. The safetensors header's metadata holds one entry,
`"keras_lora"`, a JSON object:

```
{"format_version": 1, "package_version": "0.1.0",
 "rank": 8, "alpha": 16.0, "use_rslora": false, "scale_rule": "alpha/rank",
 "target_layer_types": ["Dense"], "dtype": "float32",
 "sha256": "<digest of every tensor's bytes, in key order>",
 "layers": {"encoder/dense_1": {"type": "LoRADense", "base_type": "Dense",
                                "rank": 8, "alpha": 16.0, "use_rslora": false,
                                "dtype": "float32"}, ...}}
```

`rank`, `alpha` and `use_rslora` at the top are `null` when layers differ.
The file holds only adapter weights, never base weights, and no pickle.

Variants (format version 2; a file without them is still written as
version 1): each layer entry also records `"dropout"`, `"init"` and
`"use_dora"`; a DoRA layer adds the tensor `"<layer path>/lora_magnitude"`;
a PiSSA/OLoRA layer records `"base_sha256"`, the digest of the base kernel
its residual came from: loading recomputes the residual from the base
model's kernel and refuses a different kernel. The top level records
`"adapter_name"`, the name of the adapter the file holds.
"""

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np
import safetensors
import safetensors.numpy

from keras_lora.adapters.loading import (
    LayerAdapter,
    kernel_digest,
    report,
    resolve_layer,
    savable_lora_layers,
)
from keras_lora.adapters.safetensors_io import read_safetensors
from keras_lora.atomic import atomic_output
from keras_lora.config import validate_dropout, validate_init

METADATA_KEY = "keras_lora"
FORMAT_VERSION = 2
SUFFIXES = ("/lora_a", "/lora_b", "/lora_magnitude")


def save(model, path, adapter=None):
    """Writes `model`'s adapters to the `.safetensors` file `path`, atomically."""
    from keras_lora import __version__

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"save_adapter(format='keras_lora') writes one file, but '{path}' "
            "is a directory. Pass a file path such as 'adapter.safetensors'."
        )
    tensors, layers = {}, {}
    names = set()
    for layer_path, layer in savable_lora_layers(model, "save_adapter", adapter):
        a = keras.ops.convert_to_numpy(layer.lora_a.value)
        b = keras.ops.convert_to_numpy(layer.lora_b.value)
        tensors[f"{layer_path}/lora_a"] = np.ascontiguousarray(a)
        tensors[f"{layer_path}/lora_b"] = np.ascontiguousarray(b)
        layers[layer_path] = {
            "type": type(layer).__name__,
            "base_type": type(layer.layer).__name__,
            "rank": layer.rank,
            "alpha": layer.alpha,
            "use_rslora": layer.use_rslora,
            "dtype": str(a.dtype),
        }
        names.add(layer.active_adapters[0] if layer.active_adapters else None)
        if layer.dropout or layer.init != "default" or layer.use_dora:
            layers[layer_path].update(
                dropout=layer.dropout, init=layer.init, use_dora=layer.use_dora
            )
        if layer.use_dora:
            magnitude = keras.ops.convert_to_numpy(layer.lora_magnitude.value)
            tensors[f"{layer_path}/lora_magnitude"] = np.ascontiguousarray(magnitude)
        if layer.init in ("pissa", "olora"):
            layers[layer_path]["base_sha256"] = kernel_digest(layer)
    variants = any("init" in v for v in layers.values())
    info = {
        "format_version": FORMAT_VERSION if variants else 1,
        "adapter_name": names.pop() if len(names) == 1 else None,
        "package_version": __version__,
        "keras_version": keras.__version__,
        "rank": _common(layers, "rank"),
        "alpha": _common(layers, "alpha"),
        "use_rslora": _common(layers, "use_rslora"),
        "scale_rule": _scale_rule(layers),
        "target_layer_types": sorted({v["base_type"] for v in layers.values()}),
        "dtype": _common(layers, "dtype"),
        "sha256": _digest(tensors),
        "layers": layers,
    }
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    with atomic_output(path) as tmp:
        safetensors.numpy.save_file(tensors, str(tmp), metadata=metadata)
    return path


def read(path, name_map, model_layers, strict):
    """Returns the `LayerAdapter`s in the file at `path`, validated.

    `name_map` maps a path in the file to a layer name or path of the model
    (a dict or a callable); without an entry the path is used as it is.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if not metadata or METADATA_KEY not in metadata:
        hint = ""
        if metadata and metadata.get("format") == "pt":
            hint = (
                " It looks like a PEFT adapter_model.safetensors: pass the "
                "PEFT adapter directory (with adapter_config.json) instead."
            )
        raise ValueError(
            f"'{path}' is a safetensors file but not a keras_lora adapter: its "
            f"header has no '{METADATA_KEY}' metadata.{hint}"
        )
    try:
        info = json.loads(metadata[METADATA_KEY])
        layer_info = info["layers"]
        version = info["format_version"]
        if not isinstance(layer_info, dict):
            raise TypeError("'layers' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"'{path}': the keras_lora metadata is corrupt ({e})."
        ) from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"'{path}' has keras_lora format version {version!r}; this "
            f"keras_lora reads versions up to {FORMAT_VERSION}. Upgrade keras_lora."
        )
    if "sha256" in info and info["sha256"] != _digest(tensors):
        raise ValueError(
            f"'{path}' is corrupt: its tensors do not match the checksum in its header."
        )
    unknown = [
        key
        for key in tensors
        if not key.endswith(SUFFIXES) or key.rsplit("/", 1)[0] not in layer_info
    ]
    report(
        [repr(k) for k in unknown],
        strict,
        f"'{path}' has keys that match no layer recorded in its metadata",
    )
    adapters = []
    for stored, entry in layer_info.items():
        a = tensors.get(f"{stored}/lora_a")
        b = tensors.get(f"{stored}/lora_b")
        if a is None or b is None:
            raise ValueError(
                f"'{path}' is corrupt: layer '{stored}' lacks its "
                f"{'lora_a' if a is None else 'lora_b'} tensor."
            )
        if not isinstance(entry, dict):
            raise ValueError(f"'{path}': corrupt metadata for layer '{stored}'.")
        try:
            alpha = float(entry["alpha"])
            use_rslora = bool(entry.get("use_rslora", False))
            options = {
                "dropout": validate_dropout(entry.get("dropout", 0.0)),
                "init": validate_init(entry.get("init", "default")),
                "use_dora": bool(entry.get("use_dora", False)),
                "base_sha256": entry.get("base_sha256"),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"'{path}': corrupt metadata for layer '{stored}' ({e!r})."
            ) from None
        if int(entry.get("rank", a.shape[-1])) != a.shape[-1]:
            raise ValueError(
                f"'{path}' is corrupt: layer '{stored}' records rank "
                f"{entry.get('rank')} but lora_a has shape {a.shape}."
            )
        magnitude = tensors.get(f"{stored}/lora_magnitude")
        if options["use_dora"] and magnitude is None:
            raise ValueError(
                f"'{path}' is corrupt: DoRA layer '{stored}' lacks its "
                "lora_magnitude tensor."
            )
        target = _map(name_map, stored)
        resolved = resolve_layer(target, model_layers) or target
        adapters.append(
            LayerAdapter(
                stored,
                resolved,
                a,
                b,
                alpha,
                use_rslora,
                entry.get("base_type"),
                magnitude=magnitude if options["use_dora"] else None,
                **options,
            )
        )
    return adapters


def is_keras_lora_file(path):
    """Whether `path` is a safetensors file with keras_lora metadata."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:
        return False


def _read_safetensors(path):
    if not path.exists():
        raise FileNotFoundError(f"No adapter file at '{path}'.")
    if path.is_dir():
        raise ValueError(
            f"'{path}' is a directory, not an adapter file, and has no "
            "adapter_config.json, so it is no PEFT adapter either."
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is empty (0 bytes); it is not an adapter file.")
    return read_safetensors(path)


def _map(name_map, stored):
    if name_map is None:
        return stored
    if callable(name_map):
        mapped = name_map(stored)
        return stored if mapped is None else str(mapped)
    return str(name_map.get(stored, stored))


def _common(layers, field):
    values = {json.dumps(v[field]) for v in layers.values()}
    return json.loads(values.pop()) if len(values) == 1 else None


def _scale_rule(layers):
    rules = {
        "alpha/sqrt(rank)" if v["use_rslora"] else "alpha/rank" for v in layers.values()
    }
    return rules.pop() if len(rules) == 1 else "per layer"


def _digest(tensors):
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(key.encode())
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
