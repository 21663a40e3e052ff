"""Keras's tracking plumbing, in one place.

What a model holds and how to change it past Keras's locks: a layer's
attributes (torch keeps sublayers in `_modules`), the layers of a model that
can hold a sublayer, torch's cached parameter list, whether a model is a
Functional subclass, the `trainable` flags to restore after a failure, and
the compiled functions to drop once the trainable weights changed.
"""

import keras

from keras_lora.layers.base import LoRALayer
from keras_lora.model.walk import Reaches, children, graph_model, iter_layers

# The graphs whose config lists their layers and that any copy keeps.
PLAIN_GRAPHS = (keras.src.models.Functional, keras.Sequential)
# Held by every layer or graph, and never a sublayer attribute of one.
_NOT_SUBLAYERS = (
    "_layers",
    "_modules",
    "_inbound_nodes",
    "_outbound_nodes",
    "_operations",
    "_operations_by_depth",
    "nnx_operations",
)


def attributes(owner):
    """`owner`'s attributes. On the torch backend a layer is a
    `torch.nn.Module`, which keeps its sublayers in `_modules`."""
    attrs = dict(vars(owner))
    attrs.update(attrs.get("_modules") or {})
    return attrs


def sublayer_attributes(owner):
    """`attributes(owner)` less Keras's and TensorFlow's own bookkeeping
    (trackers, `_self_*`, the layer and node lists): the attributes that
    can hold a sublayer the layer calls."""
    return {
        attr: value
        for attr, value in attributes(owner).items()
        if not attr.startswith(("_tracker", "_self_")) and attr not in _NOT_SUBLAYERS
    }


def set_attribute(owner, attr, value):
    """`owner.attr = value` past a built layer's locked tracker (torch: in
    `_modules` when the attribute is there)."""
    modules = vars(owner).get("_modules")
    if modules is not None and attr in modules:
        modules[attr] = value
    else:
        object.__setattr__(owner, attr, value)


def own_variables(layer):
    """`layer`'s own variables (not its sublayers'), trainable ones first."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def owners(model):
    """`model` and every layer in it that can hold a sublayer: the walked
    layers, the layer a transparent container holds, and the graph a
    `Sequential` keeps for its calls."""
    found = [model] + [layer for _, layer in iter_layers(model)]
    out, seen = [], set()
    for owner in found:
        for item in (
            owner,
            getattr(owner, "layer", None)
            if getattr(type(owner), "holds_layer_transparently", False)
            else None,
            sublayer_attributes(owner).get("_functional")
            if isinstance(owner, keras.Sequential)
            else None,
        ):
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                seen.add(id(item))
                out.append(item)
    return out


def forget_torch_params(layers):
    """torch: a built layer caches its parameters (all of them, nested ones
    included); let each recollect them on next use."""
    for layer in layers:
        modules = vars(layer).get("_modules")
        if modules is not None:
            modules.pop("_torch_params", None)


def functional_subclass(model):
    """Whether `model` is of a subclass of Keras's Functional (a KerasHub
    task or backbone), whose config is its constructor's arguments."""
    return isinstance(model, keras.src.models.Functional) and (
        type(model) not in PLAIN_GRAPHS
    )


def copy_loses_class(model):
    """Whether copying `model` (with `clone_model`) would lose its class."""
    return graph_model(model) and type(model) not in PLAIN_GRAPHS


def trainable_state(model):
    """Every layer's `trainable` flag and every weight's, to restore."""
    layers = owners(model)
    layers += [layer.layer for layer in layers if isinstance(layer, LoRALayer)]
    flags = [(layer, layer._trainable) for layer in layers]
    return flags, [(v, v.trainable) for v in model.weights]


def restore_trainable_state(saved):
    """Puts back what `trainable_state` saved."""
    layer_flags, variable_flags = saved
    for layer, flag in layer_flags:
        object.__setattr__(layer, "_trainable", flag)
    for variable, flag in variable_flags:
        variable.trainable = flag


def drop_compiled(model):
    """Drops the model's traced predict/test/train functions, and a
    KerasHub task's compiled `generate` loop: they baked in the previous
    choice of adapters."""
    for attr in (
        "predict_function",
        "test_function",
        "train_function",
        "generate_function",
    ):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def refresh_compiled(model):
    """Makes a compiled model train its new trainable weights: its compiled
    functions are dropped, and an optimizer already built for the old
    trainable weights is replaced by a fresh one of the same config."""
    drop_compiled(model)
    if not getattr(model, "compiled", False):
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        fresh = type(optimizer).from_config(optimizer.get_config())
        model.optimizer = fresh
        config = getattr(model, "_compile_config", None)
        if config is not None and "optimizer" in config.config:
            config.config["optimizer"] = fresh
    model._compiled_trainable_state = {
        layer: layer.trainable for layer in model._flatten_layers()
    }


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


def assign_copy(target, source):
    """`target.assign(source)` with a copy of `source`'s value. On JAX,
    `assign` keeps the very array it is given, and a jitted Keras step
    donates its variables' buffers: two models sharing one buffer would see
    one model's `predict` delete the other's weights."""
    target.assign(keras.ops.copy(source))
