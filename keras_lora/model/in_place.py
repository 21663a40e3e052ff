"""Putting LoRA layers into a model: the one swap, and the one record.

`swap` replaces a target layer by its wrapper wherever the model holds it:
in an attribute of its owner (or a list, tuple or dict attribute), in the
owner's tracked `_layers`, in torch's `_modules`, in TensorFlow's
dependency tracking, and, for a node of a Functional graph, in the graph's
operations and its nodes (the wrapper takes over that graph's nodes of the
base layer). Nothing is rebuilt from config, so blocks whose `get_config`
cannot recreate them are reached too, and the model keeps its class. Every
change is logged, and `Undo.rollback` puts everything back.
`apply_in_place` does it for a list of targets, all or nothing; every route
in (`apply_lora` in place or on a copy, `load_adapter`, `from_core_lora`,
a `.keras` load) ends there.

`layout` records where a model's LoRA layers are and which other weights
train; `apply_layout` puts them back by the same swap (a KerasHub task's
`.keras` file keeps its backbone's, `same_class.InPlaceLoRA`; a
`LoRAContainer`, a block with LoRA layers inside, its block's).
"""

import inspect
import re

import keras

from keras_lora.layers.base import LoRALayer
from keras_lora.model.extra_trainables import variable_name
from keras_lora.model.tracking import (
    PLAIN_GRAPHS,
    attributes,
    forget_torch_params,
    freeze_except,
    owners,
    refresh_compiled,
    restore_trainable_state,
    set_attribute,
    sublayer_attributes,
    trainable_state,
)
from keras_lora.model.walk import Reaches, children, graph_model, iter_layers

Layer = keras.layers.Layer
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
    elif isinstance(getattr(container, "_storage", None), list) and hasattr(
        container, "_update_snapshot"
    ):
        # TensorFlow's ListWrapper: its `__setitem__` would mark the list
        # unsaveable (SavedModel export of a served mixed model refuses it).
        container._storage[key] = value
        container._update_snapshot()
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
    """`(owner, references(owner, base))` of each owner holding `base`."""
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
    """In a plain Functional or Sequential graph, a layer with LoRA layers
    inside is held by a `LoRAContainer` (which a `.keras` file restores)."""
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


# ---------------------------------------------------------------------------
# The one record of where a model's LoRA layers are, and its reader.


def layout(model):
    """Where `model`'s LoRA layers are, and what else trains: a dict of
    `"lora_layers"` (walk index, path, class, config), `"trainable"` (walk
    indices of trainable leaf layers) and `"partly"` (`[index, names]` of
    those that train only some variables: a norm's beta, `bias="all"`)."""
    lora, trainable, partly = [], [], []
    for index, (path, layer) in enumerate(iter_layers(model)):
        if isinstance(layer, LoRALayer):
            config = layer.get_config()
            config.pop("layer")
            lora.append(
                {
                    "index": index,
                    "path": path,
                    "class_name": keras.saving.get_registered_name(type(layer)),
                    "config": config,
                }
            )
        elif layer.trainable and layer.weights and not children(layer):
            trainable.append(index)
            capable = list(layer._trainable_variables)
            trained = [variable_name(v) for v in capable if v.trainable]
            if len(trained) < len(capable):
                partly.append([index, trained])
    return {
        "lora_layers": lora,
        "trainable": trainable,
        "partly": partly,
        "inputs_quantizers": _inputs_quantizers(model),
    }


def _inputs_quantizers(model):
    """`[walk index, serialized inputs quantizer or None]` of each quantized
    layer: a backbone's config keeps no quantization config, and Keras 3.15
    rebuilds an int4 `ReversibleEmbedding` with another input quantizer."""
    found = []
    for index, (_, layer) in enumerate(iter_layers(model)):
        base = layer.layer if isinstance(layer, LoRALayer) else layer
        if getattr(base, "quantization_mode", None) and hasattr(
            base, "inputs_quantizer"
        ):
            quantizer = base.inputs_quantizer
            found.append(
                [index, quantizer and keras.saving.serialize_keras_object(quantizer)]
            )
    return found


def apply_layout(model, record):
    """Puts LoRA layers into `model` (built, plain) where `record` (from
    `layout`) says, in place; their weights are to be loaded next."""
    layers = list(iter_layers(model))
    targets, configs = [], {}
    for entry in record["lora_layers"]:
        index, path = entry["index"], entry["path"]
        cls = keras.saving.get_registered_object(entry["class_name"])
        found = layers[index] if index < len(layers) else (None, None)
        if cls is not None and isinstance(found[1], cls):
            continue  # a config that carries its inner layer brought it back
        if cls is None or not isinstance(found[1], cls.base_class):
            raise ValueError(
                f"Cannot put LoRA layer {entry['class_name']!r} back at '{path}': "
                f"the rebuilt model has {found[0]!r} "
                f"({type(found[1]).__name__}) there."
            )
        targets.append(found)
        configs[id(found[1])] = (cls, entry["config"])
    keep = {id(layers[i][1]) for i in record["trainable"] if i < len(layers)}
    for index, quantizer in record.get("inputs_quantizers", ()):
        layer = layers[index][1] if index < len(layers) else None
        if hasattr(layer, "inputs_quantizer"):
            layer.inputs_quantizer = (
                quantizer and keras.saving.deserialize_keras_object(quantizer)
            )

    def make_wrapper(base):
        cls, config = configs[id(base)]
        config = dict(config)
        upgrade = getattr(cls, "upgrade_config", None)
        if upgrade is not None:
            config = upgrade(config)
        return cls(base, _restoring=True, **config)

    apply_in_place(model, targets, keep, make_wrapper)
    for index, names in record.get("partly", ()):  # absent before format 4
        if index < len(layers):
            for variable in layers[index][1]._trainable_variables:
                variable.trainable = variable_name(variable) in names
    return model


def _get(owner, step):
    return (
        owner[step] if isinstance(owner, (list, tuple, dict)) else getattr(owner, step)
    )


def _resolve(container, specs):
    """`(spec, parent, holder, last, base)` for each spec; raises
    AttributeError, KeyError or IndexError if a path is not there (yet)."""
    resolved = []
    for spec in specs:
        if not spec["path"]:
            resolved.append((spec, None, None, None, container))
            continue
        *trail, last = spec["path"]
        parent = container
        holder = container
        for step in trail:
            parent = _get(parent, step)
            if isinstance(parent, Layer):
                holder = parent
        base = _get(parent, last)
        if not isinstance(base, Layer):
            raise AttributeError(f"{spec['path']} is not a layer")
        resolved.append((spec, parent, holder, last, base))
    return resolved


def _apply_path_specs(container, specs):
    """The reader of older `LoRAContainer` records (attribute paths), by
    the same swap; raises AttributeError, KeyError or IndexError while the
    paths are not there yet (the held layer not built)."""
    targets, configs, frozen = [], {}, set()
    for spec, _, _, _, base in _resolve(container, specs):
        if spec.get("frozen") == "layer":
            frozen |= {id(base)} | {id(lay) for _, lay in iter_layers(base)}
            continue
        if spec.get("frozen") or isinstance(base, LoRALayer):
            continue  # own weights: frozen below; a LoRA layer: there already
        cls = keras.saving.get_registered_object(spec["class_name"])
        if cls is None:
            raise ValueError(f"Unknown LoRA layer class {spec['class_name']!r}")
        targets.append(("/".join(map(str, spec["path"])), base))
        configs[id(base)] = (cls, spec["config"])
    # What the record did not freeze stays trainable, as it was saved.
    keep = {
        id(lay)
        for _, lay in iter_layers(container)
        if lay.weights
        and lay.trainable
        and not children(lay)
        and not isinstance(lay, LoRALayer)
        and id(lay) not in frozen | set(configs)
    }

    def make_wrapper(base):
        cls, config = configs[id(base)]
        # `from_layer_config` reads older configs as they were meant (an
        # EinsumDense adapter without `factoring` is Keras core's factoring).
        return cls.from_layer_config(base, config)

    return apply_in_place(container, targets, keep, make_wrapper)


def place_adapters(layer, record):
    """Puts LoRA layers into `layer` where `record` says, in place: a
    `layout` dict, or the attribute paths of an older `LoRAContainer`."""
    if isinstance(record, dict):
        return apply_layout(layer, record)
    return _apply_path_specs(layer, record)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAContainer(keras.layers.Wrapper):
    """Holds, in a model's graph, a layer with LoRA layers inside it.

    `apply_lora` puts one around a layer of a Functional or Sequential
    model (a `MultiHeadAttention`, a custom block) when it adapts sublayers
    inside it. It calls the held layer unchanged, is transparent to
    `iter_layers` paths, reads missing attributes from the held layer, and
    records where the adapters are for `.keras` files. `merge_lora`
    replaces it by the plain, merged layer.

    Args:
        layer: the (rebuilt) layer holding LoRA layers.
        adapters: where the adapters are (`layout`, or the attribute paths
            an older version wrote); `None` reads them from `layer`.
    """

    # `keras_lora.model.walk` treats it as its held layer.
    holds_layer_transparently = True

    def __init__(self, layer, adapters=None, **kwargs):
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        # Adapters from a config are placed at the first call (sublayers built).
        set_attribute(self, "_pending", adapters)
        set_attribute(self, "adapters", layout(layer) if adapters is None else adapters)
        self.supports_masking = layer.supports_masking
        if layer.built:
            self.built = True

    def __getattr__(self, name):
        # After normal lookup (and torch.nn.Module's) fails: public
        # attributes read through to the held layer (`container.num_heads`).
        parent = getattr(super(), "__getattr__", None)
        if parent is not None:
            try:
                return parent(name)
            except AttributeError:
                pass
        layer = attributes(self).get("layer")
        if name.startswith("_") or layer is None:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        return getattr(layer, name)

    def build(self, *args, **kwargs):
        self.built = True

    def build_from_config(self, config):
        self.built = True

    def call(self, *args, **kwargs):
        if self._pending:
            try:
                place_adapters(self.layer, self._pending)
            except (AttributeError, KeyError, IndexError, ValueError):
                self.layer(*args, **kwargs)  # builds the sublayers
                place_adapters(self.layer, self._pending)  # nothing half-placed
            set_attribute(self, "_pending", None)
        return self.layer(*args, **kwargs)

    def compute_mask(self, *args, **kwargs):
        return self.layer.compute_mask(*args, **kwargs)

    def get_config(self):
        config = super().get_config()
        # Read the adapters afresh: named adapters may have been added,
        # deleted or switched since this container was made.
        config["adapters"] = self.adapters if self._pending else layout(self.layer)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        return cls(layer, **config)
