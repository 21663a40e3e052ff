"""Which layers a `targets`-like argument selects: the one matching rule.

`apply_lora`'s `targets`, `exclude` and `trainable`, and every other entry
point that selects layers, go through `match_layers`.
"""

import re
import sys

import keras

from keras_lora.model.walk import iter_layers


def describe(spec):
    if callable(spec) and not isinstance(spec, str):
        return getattr(spec, "__name__", repr(spec))
    return repr(spec)


def match_layers(spec, layers, argument="targets", supported=None):
    """Returns the `(path, layer)` pairs of `layers` that `spec` selects.

    Args:
        spec: a list (or tuple or set) of layer names or paths matched
            exactly, a regex string matched in full against each name and
            path, or a callable `layer -> bool`.
        layers: the `(path, layer)` pairs to choose from, from `iter_layers`.
        argument: the argument's name, for error messages.
        supported: optional predicate `layer -> bool`. A layer named
            explicitly that fails it is an error; a regex or a callable
            only ever selects layers that pass it.

    Raises:
        TypeError: `spec` has none of the forms above.
        ValueError: an entry matches no layer, or names an unsupported one.
    """
    keep = supported or (lambda layer: True)
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(
                f"`{argument}` is not a valid regex: {spec!r} ({e})"
            ) from None
        selected = [
            (path, layer)
            for path, layer in layers
            if keep(layer)
            and (pattern.fullmatch(layer.name) or pattern.fullmatch(path))
        ]
        _require_some(selected, spec, layers, argument, keep)
        return selected
    if isinstance(spec, (list, tuple, set, frozenset)):
        bad = [entry for entry in spec if not isinstance(entry, str)]
        if bad:
            raise TypeError(
                f"`{argument}` entries must be layer names or paths (str). "
                f"Received: {bad!r}"
            )
        selected = []
        for entry in spec:
            hits = [(p, lay) for p, lay in layers if entry in (lay.name, p)]
            _require_some(hits, entry, layers, argument, keep)
            for path, layer in hits:
                if not keep(layer):
                    raise ValueError(
                        f"`{argument}` entry {entry!r} names layer '{path}' of "
                        f"type {type(layer).__name__}, which cannot be "
                        f"selected here. Candidates: {_names(layers, keep)}"
                    )
            selected.extend(hits)
        return _in_tree_order(selected, layers)
    if callable(spec):
        selected = [(p, lay) for p, lay in layers if keep(lay) and spec(lay)]
        _require_some(selected, describe(spec), layers, argument, keep)
        return selected
    raise TypeError(
        f"`{argument}` must be None, a list of layer names or paths, a regex "
        f"string, or a callable `layer -> bool`. Received: {spec!r} of type "
        f"{type(spec).__name__}"
    )


def _names(layers, keep):
    return [path for path, layer in layers if keep(layer)]


def _require_some(selected, entry, layers, argument, keep):
    if not selected:
        raise ValueError(
            f"`{argument}` entry {entry!r} matches no layer. "
            f"Candidates: {_names(layers, keep)}"
        )


def _in_tree_order(selected, layers):
    ids = {id(layer) for _, layer in selected}
    return [(p, lay) for p, lay in layers if id(lay) in ids]


ALL_LINEAR = "all-linear"


def is_all_linear(spec):
    """Whether `spec` is PEFT's `"all-linear"` (any case)."""
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def kerashub_backbones(model, layers):
    """The KerasHub backbones in `model` (itself, a task's, or nested), or
    `[]` when `model` holds none (or `keras_hub` was never imported)."""
    if "keras_hub" not in sys.modules:
        return []  # a KerasHub model has imported keras_hub already
    from keras_hub.src.models.backbone import Backbone

    found = [model] if isinstance(model, Backbone) else []
    return found + [lay for _, lay in layers if isinstance(lay, Backbone)]


def kerashub_default(backbones, layers, supported):
    """The `(path, layer)` pairs KerasHub's `enable_lora` adapts by default:
    inside each backbone, the layers named in its own
    `default_lora_layer_names()` (`["query_dense", "value_dense", "query",
    "value"]`, plus the vision tower's `query_proj`/`value_proj` where a
    backbone adds them) that keras_lora can adapt."""
    chosen = set()
    for backbone in backbones:
        names = set(backbone.default_lora_layer_names())
        chosen |= {
            id(layer)
            for _, layer in iter_layers(backbone)
            if layer.name in names and supported(layer)
        }
    return [(p, lay) for p, lay in layers if id(lay) in chosen]


def linear_layers(layers, outputs, supported):
    """`"all-linear"`: every `Dense` and `EinsumDense` that keras_lora can
    adapt, except those in `outputs` (the ids of the layers that produce the
    model's outputs: its head)."""
    linear = (keras.layers.Dense, keras.layers.EinsumDense)
    return [
        (p, lay)
        for p, lay in layers
        if isinstance(lay, linear) and supported(lay) and id(lay) not in outputs
    ]
