"""Quantized bases (QLoRA-style): a frozen int8 kernel under float adapters.

The base's own quantized op (Keras's `quantized_call`) computes `x·W`; the
adapters' update goes in before the bias and the activation. Keras's
quantized calls end with the bias and the activation, so they run on a
read-only view of the base whose `bias` and `activation` are `None`: the
shared base layer itself is never modified (two threads, or two models
sharing the base, can call it at once).
"""

import types

from keras import ops


class _WithoutEpilogue:
    """A read-only view of `layer` without bias and activation.

    The layer class's methods run bound to the view, so that the `self` of
    Keras's quantized call reads `bias` and `activation` from here; every
    other attribute (variables, quantizers, properties) is the layer's.
    """

    bias = None
    activation = None

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        method = getattr(type(self._layer), name, None)
        if isinstance(method, types.FunctionType):
            return types.MethodType(method, self)
        return getattr(self._layer, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"read-only view of layer '{self._layer.name}'")


def without_epilogue(layer):
    """A view of `layer` for `quantized_product`; make it once and keep it."""
    return _WithoutEpilogue(layer)


def quantized_product(view, inputs, training=None):
    """`x·W` by the quantized base's own op, before bias and activation."""
    layer = view._layer
    return type(layer).quantized_call(view, inputs, training=training)


def dequantized_kernel(layer):
    """The float32 kernel an int8 `layer` stands for."""
    mode = layer.quantization_mode
    if mode != "int8":
        raise NotImplementedError(f"Dequantizing mode {mode!r}")
    scale = ops.convert_to_tensor(layer.kernel_scale)
    adjust = getattr(layer, "_adjust_scale_for_dequant", None)
    if adjust is not None:
        scale = adjust(scale)
    kernel = ops.cast(layer._kernel, "float32")
    return ops.divide(kernel, ops.cast(scale, "float32"))
