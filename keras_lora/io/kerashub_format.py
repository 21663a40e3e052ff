"""KerasHub's LoRA file (`*.lora.h5`), read only.

`backbone.enable_lora(rank)` turns on Keras core LoRA in a KerasHub
backbone's attention projections, and `backbone.save_lora_weights(path)`
writes their factors with Keras's `H5IOStore`:

```
lora/vars/rank                   the rank, one integer for every layer
lora/<i>/vars/lora_kernel_a      A of layer i, Keras core's factoring
lora/<i>/vars/lora_kernel_b      B of layer i
```

`i` numbers the backbone's layers that have weights, in the order of
Keras's `_flatten_layers` (KerasHub's rule: layer names repeat, so it
numbers them instead). The file records no alpha: Keras core's LoRA then
uses `alpha = rank`, a scale of 1, and so does the record.

To number a keras_lora model's layers the same way, a LoRA layer counts as
the layer it wraps, so a backbone converted in place (`apply_lora(backbone,
..., in_place=True)`) numbers as the backbone it was. EinsumDense adapters
from this file are Keras core's factoring (`"keras"`); a LoRA layer with
another factoring refuses them. `name_map` maps a stored group (`"lora/9"`)
to a Keras layer path or name, in place of the numbering.

The file is read with `h5py`, the library `H5IOStore` writes with; only
numeric datasets are read, nothing is unpickled.
"""

import collections
import sys
from pathlib import Path

import h5py

from keras_lora.config import validate_rank
from keras_lora.io.names import lookup, resolve_layer
from keras_lora.io.records import make_record
from keras_lora.io.report import report
from keras_lora.layers import LoRALayer, lora_class_for

NAME = "kerashub"
DESCRIPTION = "KerasHub LoRA file"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def claims(path):
    """Whether `path` is an HDF5 file (KerasHub writes `*.lora.h5`)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE


def read(path, name_map, model, layers, strict):
    """Returns the validated `LayerRecord`s of the KerasHub LoRA file `path`."""
    source = f"{DESCRIPTION} '{path}'"
    rank, factors = _read_h5(path)
    numbered = numbered_layers(model)
    path_of = {}
    for layer_path, layer in layers:
        path_of[id(layer)] = layer_path
        if isinstance(layer, LoRALayer):
            path_of[id(layer.layer)] = layer_path
    records, unknown = [], []
    for index, (a, b) in sorted(factors.items()):
        key = f"lora/{index}"
        target = lookup(name_map, key)
        if target is not None:
            layer_path = resolve_layer(target, layers)
        elif index < len(numbered):
            layer_path = path_of.get(id(numbered[index]))
        else:
            layer_path = None
        if layer_path is None:
            unknown.append(f"{key!r} (target {target!r})" if target else repr(key))
            continue
        layer = dict(layers)[layer_path]
        base = layer.layer if isinstance(layer, LoRALayer) else layer
        cls = lora_class_for(base)
        records.append(
            make_record(
                source,
                key,
                layer_path,
                a,
                b,
                rank=rank,
                alpha=rank,
                factoring=None if cls is None else cls.file_factoring("keras"),
            )
        )
    report(
        unknown,
        strict,
        f"{source} has layers that match no layer of model '{model.name}' "
        f"({len(numbered)} layers with weights; pass `name_map`)",
    )
    return records


def numbered_layers(model):
    """`model`'s layers with weights, numbered as KerasHub numbers them.

    The order of Keras's `Layer._flatten_layers(include_self=False)` on the
    backbone (`model` itself, or a KerasHub task's `backbone`), with a LoRA
    layer (or a container holding a layer transparently) counted as the
    layer it holds.
    """
    out, seen = [], set()
    queue = collections.deque(_backbone(model)._layers)
    while queue:
        layer = _held(queue.popleft())
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        queue.extendleft(layer._layers)
    return [layer for layer in out if layer.weights]


def _backbone(model):
    """The KerasHub backbone the file's numbers refer to: a task's own
    `backbone`; any other model numbers from itself."""
    hub_models = sys.modules.get("keras_hub.models")
    if hub_models is None or isinstance(model, hub_models.Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, hub_models.Backbone) else model


def _held(layer):
    while isinstance(layer, LoRALayer) or getattr(
        type(layer), "holds_layer_transparently", False
    ):
        layer = layer.layer
    return layer


def _read_h5(path):
    """`(rank, {index: (a, b)})` of the file; raises `ValueError` on any
    other content."""
    try:
        with h5py.File(path, "r") as f:
            lora = f.get("lora")
            if not isinstance(lora, h5py.Group):
                raise ValueError(
                    f"'{path}' is an HDF5 file but no KerasHub LoRA file: it "
                    "has no 'lora' group (see `Backbone.save_lora_weights`)."
                )
            rank = _value(lora, "vars/rank", path)
            try:
                rank = validate_rank(rank.item() if rank.ndim == 0 else rank, "rank")
            except (TypeError, ValueError) as e:
                raise type(e)(f"'{path}': {e}") from None
            factors = {}
            for name in lora:
                if name == "vars":
                    continue
                if not name.isdigit():
                    raise ValueError(
                        f"'{path}': 'lora/{name}' is no layer number; a "
                        "KerasHub LoRA file holds 'lora/<number>' groups."
                    )
                factors[int(name)] = tuple(
                    _value(lora, f"{name}/vars/{v}", path)
                    for v in ("lora_kernel_a", "lora_kernel_b")
                )
    except OSError as e:
        raise ValueError(f"'{path}' is not a readable HDF5 file: {e}") from None
    if not factors:
        raise ValueError(f"'{path}' holds no LoRA layers.")
    return rank, factors


def _value(group, name, path):
    dataset = group.get(name)
    if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "iuf":
        raise ValueError(
            f"'{path}': 'lora/{name}' is missing or not numeric; a KerasHub "
            "LoRA file holds numeric datasets only."
        )
    return dataset[()]
