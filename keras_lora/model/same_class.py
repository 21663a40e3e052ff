"""Saving and merging a model converted in place, keeping its class.

A model converted with `apply_lora(..., in_place=True)` still has its own
class, whose `get_config` describes the plain model. Three cases:

- A plain Functional or Sequential model serializes its graph, LoRA layers
  included: nothing to do.
- A KerasHub `Task` serializes its backbone with `keras.layers.serialize`.
  The converted task gets its own `get_config`, whose `"backbone"` entry is
  an `InPlaceLoRA` record: the plain backbone's config plus where its LoRA
  layers are. Loading builds the real backbone class and puts the LoRA
  layers back in place before the weights are read, so
  `keras.saving.load_model` returns the task's class with its adapters.
- Any other Functional subclass (a bare KerasHub `Backbone`, a user's
  class) is rebuilt from constructor arguments that cannot say where the
  adapters are: its `get_config` raises a clear error instead of writing a
  file that would not load.

`merge_same_class` builds a new, plain model of the same class from its
plain config and moves every weight across, merged kernels for LoRA layers.
"""

import contextlib
import sys
import types

import keras

from keras_lora.layers.base import LoRALayer
from keras_lora.model.in_place import Undo, apply_layout, holders_of, layout, swap
from keras_lora.model.quantized_bases import apply_nf4_layout, make_lean, nf4_layout
from keras_lora.model.tracking import (
    assign_copy,
    forget_torch_params,
    functional_subclass,
    own_variables,
    owners,
)
from keras_lora.model.walk import iter_layers, lora_layers

_NAME = "keras_lora>InPlaceLoRA"


def is_task(model):
    """Whether `model` is a KerasHub `Task` (it has a `backbone` entry)."""
    try:
        from keras_hub.models import Task
    except ImportError:  # KerasHub is optional
        return False
    return isinstance(model, Task)


@keras.saving.register_keras_serializable(package="keras_lora")
class InPlaceLoRA:
    """The serialized form of a layer converted in place: its plain config
    (`"layer"`) and its LoRA layout (`"layout"`). `from_config` returns the
    layer itself, of its own class, with the LoRA layers put back."""

    def __init__(self, layer, layout):
        self.layer, self.layout = layer, layout

    def get_config(self):
        return {"layer": self.layer, "layout": self.layout}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        layer = keras.saving.deserialize_keras_object(
            config["layer"], custom_objects=custom_objects
        )
        apply_nf4_layout(layer, config["layout"].get("nf4", ()))
        apply_layout(layer, config["layout"])
        # As `apply_lora` left it: int8/int4 layers on the lean product (the
        # weights are checked by `lean_quantized`, once they are loaded).
        make_lean(layer)
        mark_converted(layer)
        _mark_task_on_load(layer)
        return layer


def mark_converted(model):
    """Gives `model`, converted in place, a `get_config` that keeps its
    adapters (a KerasHub task: see the module docstring) or that refuses to
    describe it as plain (any other Functional subclass)."""
    if is_task(model):
        _set_get_config(model, _task_get_config)
        if functional_subclass(model.backbone):
            _set_get_config(model.backbone, _refusing_get_config)
    elif functional_subclass(model):
        _set_get_config(model, _refusing_get_config)
        # `model.save` refuses before Keras opens the file (which would
        # leave an empty file behind).
        object.__setattr__(model, "save", types.MethodType(_refusing_get_config, model))


def _set_get_config(model, function):
    object.__setattr__(model, "get_config", types.MethodType(function, model))


def _task_get_config(self):
    cls = type(self)
    inside = {id(inner) for _, inner in iter_layers(self.backbone)}
    outside = [path for path, layer in lora_layers(self) if id(layer) not in inside]
    if outside:
        raise ValueError(
            f"Cannot save '{self.name}' ({cls.__name__}) with `.keras`: LoRA "
            f"layers {outside} are outside its backbone, and the task's config "
            "rebuilds those plain. Put adapters on the backbone only, or save "
            "them with `keras_lora.save_adapter`."
        )
    outside = [
        path
        for path, layer in iter_layers(self)
        if getattr(layer, "quantization_mode", None) == "nf4"
        and id(layer) not in inside
    ]
    if outside:
        raise ValueError(
            f"Cannot save '{self.name}' ({cls.__name__}) with `.keras`: NF4 "
            f"layers {outside} are outside its backbone, and the task's config "
            "rebuilds those as float layers. Save the weights "
            "(`save_weights`) or the adapters (`keras_lora.save_adapter`)."
        )
    with _class_get_config(self.backbone):
        config = cls.get_config(self)
        config["backbone"] = {
            "module": InPlaceLoRA.__module__,
            "class_name": "InPlaceLoRA",
            "config": {
                "layer": keras.layers.serialize(self.backbone),
                "layout": dict(layout(self.backbone), nf4=nf4_layout(self.backbone)),
            },
            "registered_name": _NAME,
        }
    return config


def _refusing_get_config(self, *args, **kwargs):
    cls = type(self)
    raise ValueError(
        f"'{self.name}' ({cls.__name__}) was converted to LoRA in place (or "
        f"to NF4 by `quantize_nf4`), and a {cls.__name__} is rebuilt from "
        "constructor arguments that cannot say where its LoRA or NF4 layers "
        "are, so it cannot be described (or saved with `.keras`) as it is "
        "now. Save the KerasHub task that holds it (as converted by "
        "`apply_lora` or `quantize_nf4`), save the adapters with "
        "`keras_lora.save_adapter`, or save `keras_lora.merge_lora(model)`."
    )


@contextlib.contextmanager
def _class_get_config(layer):
    """Within it, `layer.get_config` is its class's (plain) one, and
    `layer._flatten_layers` leaves LoRA layers out (their bases stay): a
    quantized KerasHub backbone's config maps each quantized layer's path to
    its policy, and a LoRA layer reports its base's mode under no path."""
    own = vars(layer).get("get_config")
    if own is not None:
        object.__delattr__(layer, "get_config")
    flatten = vars(layer).get("_flatten_layers")  # nested: already plain

    def plain_flatten(*args, **kwargs):
        return [
            lay
            for lay in type(layer)._flatten_layers(layer, *args, **kwargs)
            if not isinstance(lay, LoRALayer)
        ]

    object.__setattr__(layer, "_flatten_layers", flatten or plain_flatten)
    try:
        yield
    finally:
        if flatten is None:
            object.__delattr__(layer, "_flatten_layers")
        if own is not None:
            object.__setattr__(layer, "get_config", own)


def _mark_task_on_load(backbone):
    """A task loaded from `.keras` gets its backbone from `InPlaceLoRA`
    before the task exists; the task is marked when its weights load (the
    backbone's are loaded from within the task's)."""
    load = type(backbone).load_own_variables

    def load_own_variables(self, store):
        object.__delattr__(self, "load_own_variables")
        task = _task_holding(self)
        if task is not None:
            mark_converted(task)
            _build_optimizer(task)
        return load(self, store)

    object.__setattr__(
        backbone, "load_own_variables", types.MethodType(load_own_variables, backbone)
    )


def _build_optimizer(task):
    """A task's `compile` is its own, so Keras's `compile_from_config` skips
    it on load and the task's optimizer is unbuilt: build it on the task's
    trainable weights, as `compile_from_config` does, so that the saved
    optimizer state (loaded after the layers) resumes too."""
    optimizer = getattr(task, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(task.trainable_variables)


def _task_holding(backbone, depth=40):
    frame = sys._getframe(1)
    while frame is not None and depth:
        for value in list(frame.f_locals.values()):
            if is_task(value) and getattr(value, "backbone", None) is backbone:
                return value
        frame, depth = frame.f_back, depth - 1
    return None


def plain_config(model):
    """`model`'s config as its class gives it (LoRA layers left out)."""
    return type(model).get_config(model)


def merge_same_class(model, merged_layer):
    """A new model of `model`'s class holding `model`'s weights, each LoRA
    layer merged (`merged_layer(lora_layer)` returns the plain layer)."""
    with _class_get_config(model), _class_get_config(getattr(model, "backbone", model)):
        config = plain_config(model)
    if is_task(model):
        config["preprocessor"] = model.preprocessor  # shared: no weights
    plain = type(model).from_config(config)
    _unwrap_lora_layers(plain)
    old_layers = list(iter_layers(model))
    new_layers = list(iter_layers(plain))
    kinds = [_plain_type(layer) for _, layer in old_layers]
    if kinds != [type(layer) for _, layer in new_layers]:
        raise ValueError(
            f"merge_lora: '{model.name}' rebuilt from its config does not have "
            "the same layers, so its weights cannot be moved across. Layers: "
            f"{[p for p, _ in old_layers]} and {[p for p, _ in new_layers]}"
        )
    for (path, old), (_, new) in zip(old_layers, new_layers, strict=True):
        old = _held(old)
        if isinstance(old, LoRALayer):
            merged = merged_layer(old)
            new.set_weights(merged.get_weights())
            new.trainable = old.layer.trainable
            continue
        own_old, own_new = own_variables(old), own_variables(new)
        if [tuple(v.shape) for v in own_old] != [tuple(v.shape) for v in own_new]:
            raise ValueError(
                f"merge_lora: layer '{path}' of '{model.name}' has different "
                "weights when rebuilt from its config."
            )
        for o, n in zip(own_old, own_new, strict=True):
            assign_copy(n, o)
            n.trainable = o.trainable
        object.__setattr__(new, "_trainable", old._trainable)
    return plain


def _unwrap_lora_layers(model):
    """Puts back, in `model` (just built from a plain config), the base of
    any LoRA layer a sublayer's own config brought (BLIP-2's language model
    serializes its `language_projection` layer, a LoRA layer by then)."""
    found = lora_layers(model)
    if not found:
        return
    all_owners = owners(model)
    for _, layer in found:
        swap(holders_of(all_owners, layer), layer, layer.layer, Undo())
    forget_torch_params(owners(model))


def _held(layer):
    """The layer a `LoRAContainer` holds (a block with LoRA layers inside, in
    a plain graph nested in the model: SegFormer's, BLIP-2's), else `layer`."""
    while getattr(type(layer), "holds_layer_transparently", False):
        layer = layer.layer
    return layer


def _plain_type(layer):
    layer = _held(layer)
    return type(layer.layer) if isinstance(layer, LoRALayer) else type(layer)
