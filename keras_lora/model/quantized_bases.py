"""`lean_quantized`: every int8/int4 layer of a model on the lean product;
`quantize_nf4`: a model's `Dense`/`EinsumDense` kernels stored as NF4.

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

import types

import keras
from keras import ops

from keras_lora.layers import nf4, quantized, quantized_product
from keras_lora.layers.base import LoRALayer
from keras_lora.model.walk import check_built, check_is_model, iter_layers, lora_layers

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


def quantize_nf4(model, block_size=64, double_quant=False, embeddings=True):
    """Stores the kernels of `model`'s `Dense` and `EinsumDense` layers, and
    its embedding tables, as NF4, QLoRA's 4-bit NormalFloat (Dettmers et
    al. 2023), in place.

    Each kernel, flattened in its own order, is cut into blocks of
    `block_size` values; a block keeps its absmax (float32) and each value
    the index of the nearest of 16 levels (the quantiles of a normal
    distribution, scaled to [-1, 1]) of `value / absmax`, two indices per
    byte. `W = level[code]·absmax`. With `double_quant`, the absmax values
    are quantized again, to int8 in blocks of 256 (4.5 bits per weight
    become about 4.13). No float kernel is kept. The layers become
    `NF4Dense`, `NF4EinsumDense`, `NF4Embedding` or
    `NF4ReversibleEmbedding` (subclasses of their Keras classes, saved in
    `.keras` files as such), whose calls run the lean product of
    `layers.quantized_product`; a lookup dequantizes only the rows it reads.

    `kl.apply_lora` accepts the result as it accepts Keras's int4 bases:
    the base stays frozen, `merge_lora` gives float layers
    (`requantize=True`: NF4 layers again), adapter files are the same.

    Converted: every built float `Dense`, `EinsumDense`, `Embedding` and
    `ReversibleEmbedding` (tied or not; the exact Keras classes, or a
    subclass that changes none of their calls, as KerasHub's), at any
    depth. Left as they are: other subclasses, layers quantized by Keras,
    layers with Keras's `enable_lora`, unbuilt layers.

    Args:
        model: a built `keras.Model` without LoRA layers (quantize first,
            then `apply_lora`).
        block_size: positive even int, the values per absmax (QLoRA's 64).
        double_quant: bool, whether to quantize the absmax values too.
        embeddings: bool, whether embedding tables (a language model's
            token embedding and LM head, tied or not) are converted too. They
            are most of a small model's weights; bitsandbytes' QLoRA keeps
            them in float (`embeddings=False` does the same).

    Returns:
        `model` itself.

    Raises:
        TypeError: `model` is not a `keras.Model`, or `double_quant` or
            `embeddings` not a bool.
        ValueError: `block_size` is not a positive even int, the model is
            not built, or it has LoRA layers. Nothing is changed.

    Example:

    >>> inputs = keras.Input((64,))
    >>> model = keras.Model(inputs, keras.layers.Dense(32, name="d")(inputs))
    >>> quantize_nf4(model).get_layer("d").quantization_mode
    'nf4'
    """
    check_is_model(model, "quantize_nf4")
    nf4.check_block_size(block_size)
    nf4.check_double_quant(double_quant)
    nf4.check_double_quant(embeddings, argument="embeddings")
    check_built(model, "quantize_nf4")
    if lora_layers(model):
        raise ValueError(
            "quantize_nf4: `model` has LoRA layers. Quantize the float model "
            "first, then call `apply_lora` on the NF4 model."
        )
    # Every value first, then the swaps: nothing changes if one fails.
    layers = [
        layer
        for _, layer in iter_layers(model)
        if nf4.nf4_class(layer, embeddings=embeddings)
    ]
    values = [nf4.quantize_layer(layer, block_size, double_quant) for layer in layers]
    for layer, value in zip(layers, values, strict=True):
        nf4.convert(layer, block_size, double_quant, value)
    if layers:  # as Keras's `Model.quantize`
        model.train_function = model.test_function = None
        model.predict_function = None
        if keras.backend.backend() == "torch":  # drop the deleted kernels
            for layer in model._flatten_layers():
                layer._track_variables()
    return model
