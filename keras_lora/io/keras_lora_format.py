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

Extra trained weights (format version 4; written only when the model has
them): the layers that train whole besides the adapters
(`apply_lora(..., trainable=...)`, PEFT's `modules_to_save`) and the
trained biases (`apply_lora(..., bias=...)`), see
`keras_lora.io.extra_records`. Each weight is the tensor
`"<layer path>/<variable name>"` (`"head/kernel"`, `"head/bias"`,
`"encoder/dense_1/bias"`, `"ln/beta"`) in Keras layout, and the top level
records `"extra": {"<layer path>": {"kind": "module" | "bias", "type":
"Dense", "weights": ["kernel", "bias"]}}`.

EinsumDense factoring (format version 3; written only when a layer uses
the standard factoring): each EinsumDense layer entry records
`"factoring"`, `"standard"` or `"keras"`. An EinsumDense entry without it
holds Keras core's factoring, which is what every older file holds.
"""

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np
import safetensors.numpy

from keras_lora.atomic import atomic_output
from keras_lora.config import LEGACY_FACTORING
from keras_lora.io.extra_records import collect_extras, make_extra
from keras_lora.io.names import lookup, resolve_layer
from keras_lora.io.records import make_record
from keras_lora.io.report import report
from keras_lora.io.safetensors_io import read_safetensors
from keras_lora.layers import LORA_LAYER_TYPES
from keras_lora.version import __version__

NAME = "keras_lora"
DESCRIPTION = "adapter file"
METADATA_KEY = "keras_lora"
FORMAT_VERSION = 4
SUFFIXES = ("/lora_a", "/lora_b", "/lora_magnitude")
LORA_TYPES_BY_NAME = {t.__name__: t for t in LORA_LAYER_TYPES.values()}


def check(model, records, path, name_map, hf_class=None):
    """Raises if the records cannot be written to `path` in this format."""
    if hf_class is not None:
        raise ValueError(
            "`hf_class` applies to format='peft' only: it names the "
            "`transformers` class whose module names a PEFT adapter uses. "
            f"Received: hf_class={hf_class!r}"
        )
    if name_map is not None:
        raise ValueError(
            "`name_map` applies to format='peft' only; the keras_lora format "
            "always keys by Keras layer path."
        )
    if Path(path).is_dir():
        raise ValueError(
            f"save_adapter(format='keras_lora') writes one file, but '{path}' "
            "is a directory. Pass a file path such as 'adapter.safetensors'."
        )


def save(model, records, path, name_map=None, hf_class=None):
    """Writes `records` to the `.safetensors` file `path`, atomically."""
    tensors, layers = {}, {}
    for record in records:
        tensors[f"{record.path}/lora_a"] = record.a
        tensors[f"{record.path}/lora_b"] = record.b
        entry = {
            "type": record.lora_type,
            "base_type": record.base_type,
            "rank": record.rank,
            "alpha": record.alpha,
            "use_rslora": record.use_rslora,
            "dtype": str(record.a.dtype),
        }
        if record.dropout or record.init != "default" or record.use_dora:
            entry.update(
                dropout=record.dropout, init=record.init, use_dora=record.use_dora
            )
        if record.use_dora:
            tensors[f"{record.path}/lora_magnitude"] = record.magnitude
        if record.base_sha256 is not None:
            entry["base_sha256"] = record.base_sha256
        if record.factoring is not None:
            entry["factoring"] = record.factoring
        layers[record.path] = entry
    extra = {}
    for record in collect_extras(model):
        for name, array in record.arrays.items():
            key = f"{record.path}/{name}"
            if key in tensors:
                raise ValueError(
                    f"save_adapter(format='keras_lora'): the weight '{key}' of "
                    "a trained layer has the name of an adapter tensor."
                )
            tensors[key] = array
        extra[record.path] = {
            "kind": record.kind,
            "type": record.layer_type,
            "weights": list(record.arrays),
        }
    names = {record.adapter_name for record in records}
    info = {
        "format_version": 4 if extra else _version(layers),
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
    if extra:
        info["extra"] = extra
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    with atomic_output(path) as tmp:
        safetensors.numpy.save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def claims(path):
    """Every path no other format claims is read as this format, whose
    reader says clearly what is wrong with a file that is none."""
    return True


def read(path, name_map, model, layers, strict):
    """Returns the validated `LayerRecord`s in the file at `path`.

    `name_map` maps a path in the file to a layer name or path of the model
    (a dict or a callable); without an entry the path is used as it is.
    """
    path = Path(path)
    source = f"adapter file '{path}'"
    tensors, info = _read_file(path)
    layer_info = info["layers"]
    extra_info = info.get("extra") or {}
    if not isinstance(extra_info, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("weights"), list)
        for e in extra_info.values()
    ):
        raise ValueError(f"'{path}': corrupt metadata for its extra weights.")
    extra_keys = {
        f"{stored}/{name}" for stored, e in extra_info.items() for name in e["weights"]
    }
    unknown = [
        key
        for key in tensors
        if key not in extra_keys
        and (not key.endswith(SUFFIXES) or key.rsplit("/", 1)[0] not in layer_info)
    ]
    report(
        [repr(k) for k in unknown],
        strict,
        f"'{path}' has keys that match no layer recorded in its metadata",
    )
    records = []
    for stored, entry in layer_info.items():
        a = tensors.get(f"{stored}/lora_a")
        b = tensors.get(f"{stored}/lora_b")
        if a is None or b is None:
            raise ValueError(
                f"'{path}' is corrupt: layer '{stored}' lacks its "
                f"{'lora_a' if a is None else 'lora_b'} tensor."
            )
        if not isinstance(entry, dict) or "alpha" not in entry:
            raise ValueError(f"'{path}': corrupt metadata for layer '{stored}'.")
        factoring = entry.get("factoring")
        lora_type = LORA_TYPES_BY_NAME.get(entry.get("type"))
        if factoring is None and lora_type is not None:
            # A missing entry means what older files meant; a present one
            # is validated with the rest of the record (`make_record`).
            factoring = lora_type.file_factoring(None)
        target = lookup(name_map, stored) or stored
        use_dora = entry.get("use_dora", False)
        records.append(
            make_record(
                source,
                stored,
                resolve_layer(target, layers) or target,
                a,
                b,
                rank=entry.get("rank"),
                factoring=factoring,
                alpha=entry["alpha"],
                use_rslora=entry.get("use_rslora", False),
                dropout=entry.get("dropout", 0.0),
                init=entry.get("init", "default"),
                use_dora=use_dora,
                magnitude=tensors.get(f"{stored}/lora_magnitude")
                if use_dora is True
                else None,
                base_type=entry.get("base_type"),
                base_sha256=entry.get("base_sha256"),
            )
        )
    for stored, entry in extra_info.items():
        missing = [n for n in entry["weights"] if f"{stored}/{n}" not in tensors]
        if missing:
            raise ValueError(
                f"'{path}' is corrupt: layer '{stored}' lacks its {missing} tensors."
            )
        target = lookup(name_map, stored) or stored
        records.append(
            make_extra(
                source,
                stored,
                resolve_layer(target, layers) or target,
                entry.get("kind"),
                {n: tensors[f"{stored}/{n}"] for n in entry["weights"]},
                entry.get("type"),
            )
        )
    return records


def _read_file(path):
    """The file's tensors and its checked metadata."""
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
        version = info["format_version"]
        if not isinstance(info["layers"], dict):
            raise TypeError("'layers' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"'{path}': the keras_lora metadata is corrupt ({e})."
        ) from None
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not (1 <= version <= FORMAT_VERSION)
    ):
        raise ValueError(
            f"'{path}' has keras_lora format version {version!r}; this "
            f"keras_lora reads versions 1 to {FORMAT_VERSION}. Upgrade keras_lora."
        )
    if "sha256" in info and info["sha256"] != _digest(tensors):
        raise ValueError(
            f"'{path}' is corrupt: its tensors do not match the checksum in its header."
        )
    return tensors, info


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


def _common(layers, field):
    values = {json.dumps(v[field]) for v in layers.values()}
    return json.loads(values.pop()) if len(values) == 1 else None


def _version(layers):
    """The oldest format version that holds `layers`: older readers refuse
    newer files instead of misreading them."""
    factorings = {v.get("factoring", LEGACY_FACTORING) for v in layers.values()}
    if factorings - {LEGACY_FACTORING}:
        return 3
    return 2 if any("init" in v for v in layers.values()) else 1


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
