"""The one walk of a model's layer tree.

`iter_layers` yields every layer reachable in a model once, with its path;
`children` says what a layer's direct sublayers are; `graph_model` says
whether a layer is a model whose config lists its layers (Functional or
Sequential). Everything that visits layers goes through these three.

A LoRA layer is a leaf: the layer it wraps is not walked into. A
`LoRAContainer` (see `keras_lora.model.containers`) is transparent: it has
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
