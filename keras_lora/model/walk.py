"""The one walk of a model's layer tree.

`iter_layers` yields every layer reachable in a model once, with its path;
`children` says what a layer's direct sublayers are; `graph_model` says
whether a layer is a model whose config lists its layers (Functional or
Sequential). Everything that visits layers goes through these three.
`Reaches` says whether a layer holds, at any depth, a layer of interest.
`lora_layers` finds a model's LoRA layers and `require_lora_layers` refuses
a model without (built) ones; `check_built` refuses an unbuilt model.

A LoRA layer is a leaf: the layer it wraps is not walked into. A
`LoRAContainer` (see `keras_lora.model.in_place`) is transparent: it has
the name of the layer it holds, and its children are that layer's. It is
recognised by its class attribute `holds_layer_transparently`, so that this
module does not import the container module.
"""

import keras

from keras_lora.layers.base import LoRALayer


def check_is_model(model, function):
    """Raises `TypeError` naming `function` unless `model` is a `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{function}: `model` must be a keras.Model. Received: {model!r} "
            f"of type {type(model).__name__}"
        )


def check_built(model, function):
    """Raises unless `model` is a built `keras.Model` (`function` names the
    caller in messages)."""
    check_is_model(model, function)
    if graph_model(model):
        built = model.built and getattr(model, "inputs", None)
    else:
        built = model.built
    if not built:
        raise ValueError(
            f"{function}: model '{model.name}' is not built. Give it an Input "
            "(or call it on data, or `model.build(input_shape)`) first."
        )


def graph_model(layer):
    """Whether `layer` is a model whose config lists its layers."""
    return isinstance(layer, (keras.Sequential, keras.src.models.Functional))


def children(layer):
    """The direct sublayers of `layer`, in tracking order.

    A LoRA layer, a bare operation of a graph (`ops.not_equal`, ...) and an
    `InputLayer` have none; a transparent container has its held layer's.
    """
    if isinstance(layer, LoRALayer) or not isinstance(layer, keras.layers.Layer):
        return []
    if getattr(type(layer), "holds_layer_transparently", False):
        return children(layer.layer)
    if isinstance(layer, keras.Model):
        layers = layer.layers
    else:
        layers = layer._flatten_layers(include_self=False, recursive=False)
    return [lay for lay in layers if not isinstance(lay, keras.layers.InputLayer)]


def iter_layers(model, prefix=""):
    """Yields `(path, layer)` for every layer reachable in `model`, in order.

    A path is the layer names from the top model down, joined by `/`, e.g.
    `"encoder/dense_1"` or `"block_0/mha/query"`. Nested models and layers
    nested inside other layers (the projections of a `MultiHeadAttention`,
    the `Dense` layers of a custom block, the layers of a subclassed model)
    are walked into, depth first, each layer once.

    Args:
        model: a Keras model or layer.
        prefix: a string put before every path (`"outer/"`, say).
    """
    yield from _walk(model, prefix, set())


def _walk(layer, prefix, seen):
    for child in children(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        path = f"{prefix}{child.name}"
        yield path, child
        yield from _walk(child, f"{path}/", seen)


class Reaches:
    """`reaches(layer)`: whether `layer` holds, at any depth (through
    `children`), a layer for which `wanted(layer)` is true. Memoized: make
    one per question, while the layers it asks about do not change."""

    def __init__(self, wanted):
        self.wanted = wanted
        self.memo = {}

    def __call__(self, layer):
        key = id(layer)
        if key not in self.memo:
            self.memo[key] = False  # guards against cycles
            self.memo[key] = any(
                self.wanted(child) or self(child) for child in children(layer)
            )
        return self.memo[key]


def lora_layers(model, layers=None):
    """Returns `(path, layer)` for every LoRA layer in `model`.

    Args:
        model: a Keras model or layer.
        layers: `model`'s `(path, layer)` pairs from `iter_layers`, when the
            caller has walked it already.
    """
    if layers is None:
        layers = iter_layers(model)
    return [(p, layer) for p, layer in layers if isinstance(layer, LoRALayer)]


def require_lora_layers(
    model, function, hint=". Use `apply_lora` first.", built=False, layers=None
):
    """Returns `model`'s LoRA layers (`lora_layers`), refusing none.

    Args:
        model: a Keras model.
        function: the caller, prefixing messages.
        hint: ends the message for a model without LoRA layers
            (`". Use `apply_lora` first."`).
        built: also refuse LoRA layers that are not built (they have no
            adapter weights yet).
        layers: as `lora_layers`.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: no LoRA layers, or (`built`) unbuilt ones.
    """
    check_is_model(model, function)
    found = lora_layers(model, layers)
    if not found:
        raise ValueError(f"{function}: model '{model.name}' has no LoRA layers{hint}")
    unbuilt = [path for path, layer in found if not layer.built] if built else []
    if unbuilt:
        raise ValueError(
            f"{function}: LoRA layers {unbuilt} of model '{model.name}' are "
            "not built, so they have no adapter weights yet. Build the model "
            "(call it on data or a `keras.Input`) first."
        )
    return found
