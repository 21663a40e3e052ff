"""Which layers a `targets`-like argument selects: the one matching rule.

`apply_lora`'s `targets`, `exclude` and `trainable`, and every other entry
point that selects layers, go through `match_layers`.
"""

import re


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
