"""`name_map`: the one resolver from a name on one side to the other side.

`save_adapter` and `load_adapter` take a `name_map` that is a dict or a
callable. Every format looks names up through `lookup` and finds the Keras
layer a name stands for with `resolve_layer`.
"""

from keras_lora.model.targets import match_layers


def check_name_map(name_map):
    """Raises `TypeError` unless `name_map` is None, a dict or a callable."""
    if name_map is not None and not (isinstance(name_map, dict) or callable(name_map)):
        raise TypeError(
            "`name_map` must be None, a dict or a callable. Received: "
            f"{name_map!r} of type {type(name_map).__name__}"
        )


def lookup(name_map, key, *aliases):
    """`name_map`'s target for `key` as a str, or `None` when it has none.

    A callable is called with `key`; a dict is looked up by `key`, then by
    each of `aliases` (say, a layer's name after its path).
    """
    if name_map is None:
        return None
    if callable(name_map):
        target = name_map(key)
    else:
        target = next((name_map[k] for k in (key, *aliases) if k in name_map), None)
    return None if target is None else str(target)


def resolve_layer(target, layers, argument="name_map"):
    """Returns the path of the one layer whose path, or else name, is `target`.

    Args:
        target: a layer path or name.
        layers: `(path, layer)` pairs from the model walk.
        argument: the argument's name, for error messages.

    Returns:
        The path, or `None` if no layer has that path or name.

    Raises:
        ValueError: `target` is no path but the name of several layers.
    """
    try:
        hits = match_layers([target], layers, argument)
    except ValueError:
        return None
    exact = [path for path, _ in hits if path == target]
    if exact:
        return exact[0]
    if len(hits) > 1:
        raise ValueError(
            f"`{argument}`: {target!r} is the name of several layers "
            f"{[p for p, _ in hits]}; give a full path instead."
        )
    return hits[0][0]
