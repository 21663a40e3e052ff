"""`lean_quantized`: every int8/int4 layer of a model on the lean product;
`nf4_layout`/`apply_nf4_layout`: where a model's NF4 layers are, and
putting them back into a model rebuilt from constructor arguments.

Training adapters over a quantized model runs the backward pass through
every quantized layer, adapted or not: with `targets=["query", "value"]`
the `key`, attention output and feed-forward projections and the LM head
are plain Keras quantized layers, and the gradient reaching the earlier
adapters goes through all of them. Keras's own quantized calls keep a
kernel's worth of memory per layer for that (see
`layers.quantized_product`), so LoRA layers alone using the lean product
would save little. `lean_quantized` gives each plain quantized `Dense`,
`EinsumDense` and `ReversibleEmbedding` of a model an instance-level
`quantized_call` (Keras's `Layer.__call__` calls `self.quantized_call`)
that computes the same outputs with the lean product. The layer's class,
config, weights and `.keras` files are unchanged.
"""

import gc
import types

import keras
from keras import ops

from keras_lora.layers import nf4, quantized, quantized_product
from keras_lora.layers.base import LoRALayer
from keras_lora.model.walk import check_is_model, iter_layers

# The Keras classes whose quantized calls `quantized_product` reproduces.
_FAMILIES = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.ReversibleEmbedding,
)


def lean_quantized(model):
    """Makes every int8/int4 layer of `model` compute its backward pass
    without keeping or sharing a float kernel.

    Each plain Keras `Dense`, `EinsumDense` and `ReversibleEmbedding` of
    `model` (LoRA layers' bases have it already) gets an instance-level
    `quantized_call` that computes its int8/int4 output with
    `layers.quantized_product`: the same outputs as Keras's quantized call,
    bitwise, and for training `dx = dy·W_deqᵀ` dequantized from the packed
    codes only when the backward pass reaches the layer, freed after it.
    Float layers, float8 layers, layers with Keras's own `enable_lora` and
    subclasses that override Keras's quantized calls keep Keras's call (the
    override checks the layer's mode on every call, so a model quantized
    afterwards is covered too). Nothing else changes: classes, configs,
    weights, `.keras` files.

    `apply_lora` calls it on every model it returns, and a KerasHub task
    converted in place gets it again when loaded. Any other model loaded
    from a `.keras` file, or quantized after `apply_lora`, gets Keras's
    calls: call `lean_quantized(model)` on it before training. Calling it
    again is harmless. It first checks the int8/int4 weights against the
    layers' configs (`check_quantized_weights`), before changing anything.

    Args:
        model: a `keras.Model`.

    Returns:
        `model` itself.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: a layer's quantized weights do not match its config
            (see `check_quantized_weights`); nothing is changed.

    Example:

    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs))
    >>> model.quantize("int4")
    >>> lean_quantized(model) is model
    True
    """
    check_is_model(model, "lean_quantized")
    check_quantized_weights(model)
    return make_lean(model)


def make_lean(model):
    """`lean_quantized` without its checks, for a model whose weights are
    not loaded yet (a KerasHub task converted in place, while it loads)."""
    for _, layer in iter_layers(model):
        if _reproducible(layer) and "quantized_call" not in layer.__dict__:
            # Bound method: `copy.deepcopy` of the layer rebinds it to the copy.
            call = types.MethodType(_lean_quantized_call, layer)
            object.__setattr__(layer, "quantized_call", call)
    return model


def check_quantized_weights(model):
    """Raises a `ValueError` naming the layer if an int8/int4 layer of
    `model` holds weights its config cannot stand for.

    Keras itself refuses a `.keras` file whose codes, scales or zero points
    have other shapes than the layer's config builds (a `ValueError` from
    `load_model`), and casts other dtypes. What it loads silently is a
    sub-channel int4 layer's row groups (`g_idx`, stored as floats): Keras's
    quantizer makes `g_idx = arange(rows) // block_size`, and any other
    values pick other scales and zero points for the rows, a silently
    different kernel. Non-finite scales make a silently non-finite one.
    This checks both (a few small tensors per layer; the codes themselves
    are not read).

    Args:
        model: a `keras.Model` (or layer).
    """
    import numpy as np

    for path, layer in iter_layers(model):
        if isinstance(layer, LoRALayer):  # its base holds the weights
            layer = layer.layer
        mode = getattr(layer, "quantization_mode", None)
        if mode not in quantized_product.MODES:
            continue
        for name in (
            "kernel_scale",
            "embeddings_scale",
            "reverse_embeddings_scale",
            "nf4_absmax",
            "nf4_absmax_scale",
            "nf4_absmax_offset",
            "nf4_reverse_absmax",
            "nf4_reverse_absmax_scale",
            "nf4_reverse_absmax_offset",
        ):
            scale = getattr(layer, name, None)
            if scale is not None and not np.all(np.isfinite(_numpy(scale))):
                raise ValueError(
                    f"Layer '{path}' ({type(layer).__name__}, {mode}) has "
                    f"non-finite values in `{name}`: its quantized weights "
                    "are corrupt (a damaged or hand-edited file?)."
                )
        block = quantized.block_size(layer)
        g_idx = getattr(layer, "g_idx", None)
        if mode != "int4" or block == -1 or g_idx is None:
            continue
        got = _numpy(g_idx)
        want = np.arange(got.shape[0]) // block
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ValueError(
                f"Layer '{path}' ({type(layer).__name__}, int4 with "
                f"block_size={block}) has row groups `g_idx` that do not "
                f"match its config: expected arange({got.shape[0]}) // "
                f"{block} = {want[:8].tolist()}..., received "
                f"{got[:8].tolist()}... Its scales and zero points would be "
                "applied to the wrong rows. Quantize the float model again, "
                "or load a file written by Keras for this config."
            )


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def is_lean(layer):
    """Whether `lean_quantized` gave `layer` its lean `quantized_call`."""
    call = layer.__dict__.get("quantized_call")
    return getattr(call, "__func__", None) is _lean_quantized_call


def _reproducible(layer):
    """Whether `layer`'s quantized calls are Keras's own, for its family."""
    family = next((cls for cls in _FAMILIES if isinstance(layer, cls)), None)
    if family is None:
        return False
    cls = type(layer)
    return all(
        getattr(cls, name) is getattr(family, name)
        for name in ("quantized_call", "_int8_call", "_int4_call")
    )


def _lean_quantized_call(self, inputs, *args, **kwargs):
    """Keras's `quantized_call` of `self`, int8/int4 products lean."""
    keras_call = type(self).quantized_call
    if isinstance(self, keras.layers.Embedding):
        reverse = kwargs.get("reverse", args[0] if args else False)
        if not quantized_product.applies(self, reverse=reverse):
            return keras_call(self, inputs, *args, **kwargs)
        logits = quantized_product.product(self, inputs, reverse=True)
        cap = self.logit_soft_cap
        if cap is not None:  # as Keras's call: after the product
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits
    if not quantized_product.applies(self):
        return keras_call(self, inputs, *args, **kwargs)
    return quantized_product.dense_call(self, inputs)


def nf4_layout(model):
    """`[[walk index, block size, double quant], ...]` of `model`'s NF4
    layers (LoRA layers' bases included), for a KerasHub task's `.keras`
    record: its backbone is rebuilt from constructor arguments, which make
    float layers."""
    found = []
    for index, (_, layer) in enumerate(iter_layers(model)):
        base = layer.layer if isinstance(layer, LoRALayer) else layer
        if isinstance(base, nf4.NF4Storage):
            found.append([index, base.nf4_block_size, base.nf4_double_quant])
    return found


def apply_nf4_layout(model, record):
    """Makes the float layers of `model` that `record` (from `nf4_layout`)
    names NF4 layers, with zero codes: their weights are to be loaded next."""
    layers = list(iter_layers(model))
    for index, block_size, double_quant in record:
        path, layer = layers[index] if index < len(layers) else (None, None)
        if not (layer is not None and nf4.nf4_class(layer)):
            raise ValueError(
                f"Cannot store layer {path!r} ({type(layer).__name__}) as NF4 "
                f"again: the file's record names walk index {index}, and the "
                "rebuilt model has no float Dense, EinsumDense or embedding "
                "there."
            )
        nf4.convert(layer, block_size, double_quant, values={}, collect=False)
    gc.collect()  # once for all the deleted float kernels (`nf4.convert`)
