"""`quantize_nf4`: a model's kernels and embedding tables stored as NF4.

The layers become the NF4 classes of `layers.nf4`, in place. The model
is then marked as converted in place (`same_class.mark_converted`): a
KerasHub task's `.keras` file records where its NF4 layers are
(`quantized_bases.nf4_layout`), since KerasHub rebuilds a backbone from
its constructor arguments, which make float layers; a bare backbone (or
any Functional subclass) refuses to be saved with `.keras` rather than
write a file that would not load.
"""

import gc

import keras

from keras_lora.layers import nf4
from keras_lora.model.same_class import mark_converted
from keras_lora.model.walk import check_built, check_is_model, iter_layers, lora_layers


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
    nf4.check_flag(double_quant, "double_quant")
    nf4.check_flag(embeddings, "embeddings")
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
        nf4.convert(layer, block_size, double_quant, value, collect=False)
    if layers:
        gc.collect()  # once for all the deleted float kernels (`nf4.convert`)
        # A task's `.keras` file keeps the conversion (a bare backbone's
        # cannot).
        mark_converted(model)
        # As Keras's `Model.quantize`:
        model.train_function = model.test_function = None
        model.predict_function = None
        if keras.backend.backend() == "torch":  # drop the deleted kernels
            for layer in model._flatten_layers():
                layer._track_variables()
    return model
