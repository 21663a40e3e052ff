"""Swapping a model's sublayers for LoRA wrappers, in the model itself.

`swap_in_place` replaces each target layer by its wrapper wherever the model
holds it: in an attribute of its owner (or a list, tuple or dict attribute),
in the owner's tracked `_layers`, in torch's `_modules`, in TensorFlow's
dependency tracking, and, for a node of a Functional graph, in the graph's
operations and its nodes (the wrapper takes over the base layer's inbound
nodes). Nothing is rebuilt from config, so blocks whose `get_config` cannot
recreate them are reached too, and the model keeps its class. Every change
is logged, and `Undo.rollback` puts everything back.
"""

import inspect
import re

import keras

from keras_lora.layers.base import LoRALayer
from keras_lora.model.containers import LoRAContainer
from keras_lora.model.tracking import (
    PLAIN_GRAPHS,
    forget_torch_params,
    owners,
    refresh_compiled,
    restore_trainable_state,
    sublayer_attributes,
    trainable_state,
)
from keras_lora.model.walk import Reaches, children, graph_model

KerasHistory = keras.src.ops.node.KerasHistory
_KERAS_TRACKED = (
    keras.src.utils.tracking.TrackedList,
    keras.src.utils.tracking.TrackedDict,
)


class Undo:
    """A log of changes, undone in reverse order by `rollback`."""

    def __init__(self):
        self.steps = []

    def set_attr(self, owner, attr, value):
        modules = vars(owner).get("_modules")
        if modules is not None and attr in modules:
            old = modules[attr]
            self.steps.append(lambda: modules.__setitem__(attr, old))
            modules[attr] = value
        else:
            missing = object()
            old = vars(owner).get(attr, missing)

            def undo():
                if old is missing:
                    object.__delattr__(owner, attr)
                else:
                    object.__setattr__(owner, attr, old)

            self.steps.append(undo)
            object.__setattr__(owner, attr, value)
        if hasattr(owner, "_track_trackable") and isinstance(value, keras.layers.Layer):
            # TensorFlow's dependency tracking (used by SavedModel export).
            _tf_track(owner, attr, value)
            if isinstance(old, keras.layers.Layer):
                self.steps.append(lambda: _tf_track(owner, attr, old))

    def set_item(self, container, key, value):
        old = container[key]
        self.steps.append(lambda: _set_item_untracked(container, key, old))
        _set_item_untracked(container, key, value)

    def call(self, do, undo):
        do()
        self.steps.append(undo)

    def rollback(self):
        while self.steps:
            self.steps.pop()()


def _set_item_untracked(container, key, value):
    """`container[key] = value` past Keras's tracking (a built layer's state
    is locked). Keras's own tracked list and dict are set as plain ones;
    TensorFlow's wrappers (which keep their items elsewhere) through their
    own `__setitem__`."""
    if type(container) in (list, dict) or isinstance(container, _KERAS_TRACKED):
        (list if isinstance(container, list) else dict).__setitem__(
            container, key, value
        )
    else:
        with keras.src.utils.tracking.DotNotTrackScope():
            container[key] = value


def _tf_track(owner, attr, value):
    # Past Keras's lock on a built layer's state: no new state is made.
    with keras.src.utils.tracking.DotNotTrackScope():
        owner._track_trackable(value, name=attr, overwrite=True)


def references(owner, base):
    """Where `owner` holds `base`: `("attr", name)`, `("item", name, key)`
    (in a list, tuple or dict attribute), `("layers",)` and `("graph",)`."""
    refs = []
    for attr, value in sublayer_attributes(owner).items():
        if value is base:
            refs.append(("attr", attr))
        elif isinstance(value, (list, tuple)):
            refs += [("item", attr, i) for i, v in enumerate(value) if v is base]
        elif isinstance(value, dict):
            refs += [("item", attr, k) for k, v in value.items() if v is base]
    if any(layer is base for layer in vars(owner).get("_layers", ())):
        refs.append(("layers",))
    if any(op is base for op in vars(owner).get("_operations", ())):
        refs.append(("graph",))
    return refs


def check_reachable(path, base, holders):
    """Raises `ValueError` if swapping `base` in `holders` (`(owner, refs)`
    pairs) would not change what the model computes: `base` is held
    nowhere the model's computation looks it up, or its owner's `call`
    reads `base`'s weights itself (`bypassing_owner`)."""
    reads = bypassing_owner(base, holders)
    if reads is not None:
        raise ValueError(
            f"Cannot put a LoRA layer on '{path}' ({type(base).__name__}): "
            f"{reads}, bypassing the layer's own call, so an adapter there "
            "would never be used (and merging it would change the model). "
            "Leave it out of `targets` (or pass it in `exclude`)."
        )
    if any(ref[0] in ("attr", "item", "graph") for _, refs in holders for ref in refs):
        return
    names = [f"'{owner.name}' ({type(owner).__name__})" for owner, _ in holders]
    where = ", ".join(names) or "no layer of the model"
    raise ValueError(
        f"Cannot reach sublayer '{path}' ({type(base).__name__}): it is tracked "
        f"by {where} but not held in an attribute (or a list, tuple or dict "
        "attribute) nor a node of a Functional graph, so putting a LoRA layer "
        "there would not change what the model computes. Hold the sublayer in "
        "an attribute of its layer, or leave it out of `targets`."
    )


# `self.<attr>.kernel`, read in an owner's `call`: the owner does the
# sublayer's math itself (KerasHub's Gemma4 feed-forward does
# `ops.matmul(x, self.gating_ffw.kernel)`).
_WEIGHT_NAMES = r"(kernel|bias|embeddings|_kernel|weights|variables)\b"


def bypassing_owner(base, holders):
    """Where an owner of `base` (`holders`: `(owner, refs)` pairs) reads
    `base`'s weights in its own `call` instead of calling `base`, as a
    sentence, or `None`."""
    for owner, refs in holders:
        try:
            source = inspect.getsource(type(owner).call)
        except (OSError, TypeError, AttributeError):
            continue  # no source to read (a C extension, a lambda)
        for ref in refs:
            if ref[0] != "attr":
                continue
            pattern = rf"self\.{re.escape(ref[1])}\.{_WEIGHT_NAMES}"
            found = re.search(pattern, source)
            if found:
                return f"{type(owner).__name__}.call reads `{found.group(0)}` itself"
    return None


def holders_of(all_owners, base):
    """The `(owner, refs)` pairs of the owners (`owners(model)`) that hold
    `base` (`references`)."""
    return [(o, refs) for o in all_owners if (refs := references(o, base))]


def swap(holders, base, wrapper, undo):
    """Puts `wrapper` wherever `holders` hold `base`, logging into `undo`."""
    graphs = []
    for owner, refs in holders:
        for ref in refs:
            if ref[0] == "attr":
                undo.set_attr(owner, ref[1], wrapper)
            elif ref[0] == "item":
                _set_item(owner, ref[1], ref[2], wrapper, undo)
            elif ref[0] == "layers":
                layers = vars(owner)["_layers"]
                for i, layer in enumerate(layers):
                    if layer is base:
                        undo.set_item(layers, i, wrapper)
                _track_id(owner, wrapper)
            else:
                _swap_operation(owner, base, wrapper, undo)
                graphs.append(owner)
    if graphs:
        _take_over_nodes(base, wrapper, graphs, undo)


def _set_item(owner, attr, key, value, undo):
    container = sublayer_attributes(owner)[attr]
    if isinstance(container, tuple):
        items = list(container)
        items[key] = value
        undo.set_attr(owner, attr, type(container)(items))
    else:
        undo.set_item(container, key, value)


def _track_id(owner, layer):
    tracker = vars(owner).get("_tracker")
    stored = getattr(tracker, "stored_ids", {}).get("layers")
    if stored is not None and id(layer) not in stored:
        stored.add(id(layer))


def _swap_operation(graph, base, wrapper, undo):
    for i, op in enumerate(graph._operations):
        if op is base:
            undo.set_item(graph._operations, i, wrapper)
    for ops in graph._operations_by_depth.values():
        for i, op in enumerate(ops):
            if op is base:
                undo.set_item(ops, i, wrapper)
    old_prefix, new_prefix = f"{id(base)}_ib-", f"{id(wrapper)}_ib-"
    nodes = graph._nodes
    renamed = {k for k in nodes if k.startswith(old_prefix)}
    new_keys = {new_prefix + k[len(old_prefix) :] for k in renamed}

    def do():
        nodes.difference_update(renamed)
        nodes.update(new_keys)

    def back():
        nodes.difference_update(new_keys)
        nodes.update(renamed)

    undo.call(do, back)
    mapping = vars(graph).get("_nnx_op_mapping")
    if mapping is not None and id(base) in mapping:
        undo.call(
            lambda: mapping.__setitem__(id(base), wrapper),
            lambda: mapping.__setitem__(id(base), base),
        )


def _take_over_nodes(base, wrapper, graphs, undo):
    """The wrapper becomes the operation of `base`'s nodes in `graphs` (their
    keys already renamed by `_swap_operation`). A node of another graph
    (`base` shared with the model `apply_lora` copied) keeps `base`: that
    model computes what it did. The wrapper's node list is `base`'s, so
    that node indices, and the graphs' node keys, stay as they were."""
    keys = set().union(*(graph._nodes for graph in graphs))
    taken = [
        node
        for i, node in enumerate(base._inbound_nodes)
        if f"{id(wrapper)}_ib-{i}" in keys
    ]
    old_in, old_out = wrapper._inbound_nodes, wrapper._outbound_nodes
    undo.call(
        lambda: (
            object.__setattr__(wrapper, "_inbound_nodes", list(base._inbound_nodes)),
            object.__setattr__(wrapper, "_outbound_nodes", list(base._outbound_nodes)),
        ),
        lambda: (
            object.__setattr__(wrapper, "_inbound_nodes", old_in),
            object.__setattr__(wrapper, "_outbound_nodes", old_out),
        ),
    )
    for node in taken:
        undo.call(
            lambda n=node: setattr(n, "operation", wrapper),
            lambda n=node: setattr(n, "operation", base),
        )
        for tensor in node.outputs:
            history = getattr(tensor, "_keras_history", None)
            if history is None or history.operation is not base:
                continue
            undo.call(
                lambda t=tensor, h=history: setattr(
                    t, "_keras_history", KerasHistory(wrapper, *h[1:])
                ),
                lambda t=tensor, h=history: setattr(t, "_keras_history", h),
            )


def hold_in_containers(model, undo):
    """In a plain Functional or Sequential graph (whose config lists its
    layers), a layer with LoRA layers inside (a `MultiHeadAttention`, a
    custom block) is held by a `LoRAContainer`, which records where the
    adapters are so that a `.keras` file brings them back."""
    graphs = [o for o in owners(model) if type(o) in PLAIN_GRAPHS]
    holds_lora = Reaches(lambda layer: isinstance(layer, LoRALayer))
    for graph in graphs:
        for op in list(graph.layers):
            if graph_model(op) or isinstance(op, (LoRALayer, LoRAContainer)):
                continue
            if not holds_lora(op):
                continue
            holders = [(g, refs) for g in graphs if (refs := references(g, op))]
            swap(holders, op, LoRAContainer(op), undo)


def freeze_except(model, keep):
    """Freezes `model`'s weights except the adapters of its LoRA layers and
    the layers in `keep` (ids), which are made trainable. Layers on the way
    to those stay `trainable` with their own weights frozen."""
    reaches = Reaches(lambda layer: isinstance(layer, LoRALayer) or id(layer) in keep)

    def visit(layer, top):
        if isinstance(layer, LoRALayer):
            layer.trainable = True
        elif id(layer) in keep:
            layer.trainable = True
        elif top or reaches(layer):
            object.__setattr__(layer, "_trainable", True)
            for variable in layer._trainable_variables:
                variable.trainable = False
            for child in children(layer):
                visit(child, False)
            held = getattr(layer, "layer", None)
            if getattr(type(layer), "holds_layer_transparently", False):
                object.__setattr__(held, "_trainable", True)
        else:
            layer.trainable = False

    visit(model, True)


def apply_in_place(model, targets, keep, make_wrapper, check=None):
    """Swaps each `(path, layer)` of `targets` for `make_wrapper(layer)`
    inside `model`, freezes every other weight except those of the layers
    in `keep` (ids), and returns `model`. On any failure every swap,
    `trainable` flag and variable flag is restored, and the error raised.
    `check(model)`, if given, runs once everything is swapped; if it
    raises, that is such a failure (`load_adapter` checks the file's
    shapes against the new LoRA layers there)."""
    saved = trainable_state(model)
    undo = Undo()
    all_owners = owners(model)
    try:
        plan = []
        for path, base in targets:
            holders = holders_of(all_owners, base)
            check_reachable(path, base, holders)
            plan.append((base, holders))
        wrappers = [make_wrapper(base) for base, _ in plan]
        for (base, holders), wrapper in zip(plan, wrappers, strict=True):
            swap(holders, base, wrapper, undo)
        hold_in_containers(model, undo)
        freeze_except(model, keep)
        if check is not None:
            check(model)
    except BaseException:
        undo.rollback()
        restore_trainable_state(saved)
        forget_torch_params(all_owners)
        raise
    forget_torch_params(owners(model))
    refresh_compiled(model)
    return model
