"""`name_map`: the one resolver from a name on one side to the other side.

`save_adapter` and `load_adapter` take a `name_map` that is a dict or a
callable. Every format looks names up through `lookup` and finds the Keras
layer a name stands for with `resolve_layer`.
"""

import dataclasses
import re

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


_COUNTER = re.compile(r"_\d+$")


def follow_renumbered_layers(records, layers):
    """`records` whose paths Keras's name counters changed, moved to their
    twins in `layers`.

    Keras names an unnamed layer with a per-process counter, so a model
    built a second time in one process differs in those numbers. A renamed
    top-level layer is followed first (`follow_renamed_root`). Then, deeper
    down, records are grouped by their path with every counter taken off
    (`encoder/mha_2/query` and `encoder/mha_3/query` are both
    `encoder/mha/query`): a group that holds a path the model lacks is
    matched, in counter order, to the model's layers of the same group,
    when both groups have the same size. The same code builds both models,
    so each base name's counter keeps its order. Anything less certain
    (groups of other sizes, two records on one layer) leaves every record
    as it was, for the caller to report.
    """
    records = follow_renamed_root(records, layers)
    present = {path for path, _ in layers}
    if all(r.path in present for r in records):
        return records
    groups, twins = {}, {}
    for r in records:
        groups.setdefault(_uncounted(r.path), []).append(r)
    for path in present:
        twins.setdefault(_uncounted(path), []).append(path)
    moved = {}
    for key, group in groups.items():
        if all(r.path in present for r in group):
            continue
        paths = sorted(twins.get(key, []), key=_counters)
        if len(paths) != len(group):
            return records
        ordered = sorted(group, key=lambda r: _counters(r.path))
        moved.update({id(r): p for r, p in zip(ordered, paths, strict=True)})
    result = [
        dataclasses.replace(r, path=moved[id(r)]) if id(r) in moved else r
        for r in records
    ]
    if len({r.path for r in result}) != len(result):
        return records
    return result


def _uncounted(path):
    return "/".join(_COUNTER.sub("", part) for part in path.split("/"))


def _counters(path):
    """The counter of each part of `path` (0 where it has none)."""
    return tuple(
        int(m.group()[1:]) if (m := _COUNTER.search(part)) else 0
        for part in path.split("/")
    )


def follow_renamed_root(records, layers):
    """`records` with paths under a renamed top-level layer moved to its twin.

    Keras names layers with a per-process counter: a second `GPT2CausalLM`
    built in one process holds `gpt2_backbone_1` where the first held
    `gpt2_backbone`, so a file saved from the first names paths the second
    lacks. When every such path starts with one top-level name the model
    lacks, and exactly one top-level layer of the model with the same name
    up to that counter holds every one of those paths, the records follow
    it. Anything less certain is left for the caller to report.
    """
    present = {path for path, _ in layers}
    missing = [r for r in records if r.path not in present]
    if not missing or any("/" not in r.path for r in missing):
        return records
    roots = {r.path.split("/", 1)[0] for r in missing}
    if len(roots) != 1:
        return records
    old = roots.pop()
    if old in present:
        return records
    rests = [r.path.split("/", 1)[1] for r in missing]
    stem = _COUNTER.sub("", old)
    twins = [
        path
        for path in present
        if "/" not in path
        and _COUNTER.sub("", path) == stem
        and all(f"{path}/{rest}" in present for rest in rests)
    ]
    if len(twins) != 1:
        return records
    moved = {
        id(r): f"{twins[0]}/{rest}" for r, rest in zip(missing, rests, strict=True)
    }
    return [
        dataclasses.replace(r, path=moved[id(r)]) if id(r) in moved else r
        for r in records
    ]
