"""Rematerialization of a LoRA model's transformer blocks.

`enable_remat(model)` gives each transformer block Keras's own full
rematerialization mode, the one a layer made inside
`keras.RematScope(mode="full")` records: when the block is called, Keras
wraps its `call` in `keras.remat` (`jax.checkpoint` on JAX,
`tf.recompute_grad` on TensorFlow, `torch.utils.checkpoint` on torch), so
the backward pass recomputes the block's activations instead of keeping
them. Memory for activations then grows with one block plus the block
boundaries instead of every intermediate of every block, at the cost of a
second forward pass through each block.

One gap in Keras 3.15 is bridged: `keras.remat` passes every argument of
the call through the backend's checkpoint, and `jax.checkpoint` traces
them all, so a block called with `training=True` fails on JAX
("Attempted boolean conversion of traced array") where its dropout asks
`if training`. Each block's `rematerialized_call` therefore hands
`keras.remat` only the call's tensors; its other arguments (flags,
`None`, Python numbers) are bound as they are, as `jax.checkpoint`'s
`static_argnums` would.
"""

import functools

import keras
from keras.src.backend.common.remat import get_current_remat_mode

from keras_lora.layers import quantized_product
from keras_lora.model.tracking import drop_compiled
from keras_lora.model.walk import (
    check_is_model,
    children,
    iter_layers,
    lora_layers,
)

_FUNCTION = "enable_remat"


def enable_remat(model):
    """Recomputes each transformer block's activations in the backward pass.

    The blocks are KerasHub's: every layer of a backbone's
    `transformer_layers` list (`GPT2Backbone`, `LlamaBackbone`, ... and the
    task models holding them). In any other model, each direct child layer
    that holds LoRA layers is a block. Each block gets Keras's full
    rematerialization mode (`keras.RematScope(mode="full")`, set on the
    existing layer): outputs and gradients are those of the model without
    it, up to float rounding, and only the adapters train as before.

    Call it on a built LoRA model (after `apply_lora`), before or after
    `compile`; a cached training function is dropped so that the next step
    is traced with the blocks rematerialized. The setting is not part of a
    layer's config: a model loaded from a `.keras` file has no remat, so
    call `enable_remat` on it again.

    Args:
        model: a built `keras.Model` with LoRA layers.

    Returns:
        `model`, changed in place.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: `model` has no LoRA layers, is not built, or has no
            transformer blocks (nothing is changed).

    Example:

    ```python
    lora_model = kl.apply_lora(causal_lm, targets=["query", "value"], rank=8)
    kl.enable_remat(lora_model)
    lora_model.fit(...)  # each block's activations recomputed on backward
    ```
    """
    check_is_model(model, _FUNCTION)
    layers = list(iter_layers(model))
    found = lora_layers(model, layers)
    if not found:
        raise ValueError(
            f"{_FUNCTION}: `model` '{model.name}' has no LoRA layers. "
            "Rematerialization is for a LoRA model: use `apply_lora` first."
        )
    unbuilt = [path for path, layer in found if not layer.built]
    if not model.built or unbuilt:
        raise ValueError(
            f"{_FUNCTION}: `model` '{model.name}' is not built"
            + (f" (LoRA layers {unbuilt})" if unbuilt else "")
            + ". Build it (call it on data or a `keras.Input`) first."
        )
    blocks = transformer_blocks(model, layers)
    if not blocks:
        raise ValueError(_no_blocks_message(_FUNCTION, model))
    mode = _full_remat_mode()
    for block in blocks:
        block._remat_mode = mode
        # An instance attribute: Keras's own `__call__` looks it up there.
        object.__setattr__(
            block,
            "rematerialized_call",
            functools.partial(_rematerialized_call, block),
        )
    drop_compiled(model)  # the traced steps hold the old calls
    return model


def transformer_blocks(model, layers=None):
    """The layers `enable_remat` rematerializes, in order (see there).

    Args:
        model: a Keras model.
        layers: `model`'s `(path, layer)` pairs from `iter_layers`, when the
            caller has walked it already.
    """
    if layers is None:
        layers = list(iter_layers(model))
    blocks, seen = [], set()
    for layer in [model] + [layer for _, layer in layers]:
        for block in getattr(layer, "transformer_layers", None) or ():
            if isinstance(block, keras.layers.Layer) and id(block) not in seen:
                seen.add(id(block))
                blocks.append(block)
    if blocks:
        return blocks
    for child in children(model):  # a LoRA layer has no LoRA layers inside
        if lora_layers(child):
            # A LoRAContainer calls the layer it holds: remat goes there.
            transparent = getattr(type(child), "holds_layer_transparently", False)
            blocks.append(child.layer if transparent else child)
    return blocks


def check_blocks_for_targets(model, layers, target_ids, function):
    """Raises `enable_remat`'s error unless `model` would have transformer
    blocks once the layers with ids `target_ids` get LoRA layers.

    `apply_lora(remat=True)` calls it before changing anything.

    Args:
        model: the model `apply_lora` converts.
        layers: `model`'s `(path, layer)` pairs from `iter_layers`.
        target_ids: the `id`s of the layers that will get LoRA layers.
        function: the caller's name, for the message.
    """
    for layer in [model] + [layer for _, layer in layers]:
        if any(
            isinstance(block, keras.layers.Layer)
            for block in getattr(layer, "transformer_layers", None) or ()
        ):
            return
    for child in children(model):
        # As `transformer_blocks`: a direct child holding a target (not the
        # target itself) becomes a block.
        if any(id(layer) in target_ids for _, layer in iter_layers(child)):
            return
    raise ValueError(_no_blocks_message(function, model) + " Nothing was changed.")


def _no_blocks_message(function, model):
    return (
        f"{function}: found no transformer blocks in `model` "
        f"'{model.name}': expected a KerasHub backbone's "
        "`transformer_layers`, or direct child layers of the model that "
        "hold LoRA layers. Received a model whose LoRA layers are its "
        "own direct children, with no block around them."
    )


def _full_remat_mode():
    """The mode an operation made inside `keras.RematScope("full")` records."""
    with keras.RematScope(mode="full"):
        return get_current_remat_mode()


def _rematerialized_call(block, layer_call, *args, **kwargs):
    """`block`'s `rematerialized_call` (Keras's hook, for full remat):
    `layer_call` under `keras.remat`, given only the call's tensors."""
    if block._remat_mode is None:  # remat turned off since
        return layer_call

    def call(*call_args, **call_kwargs):
        flat = keras.tree.flatten((call_args, call_kwargs))
        where = [i for i, x in enumerate(flat) if keras.ops.is_tensor(x)]

        def on_tensors(*tensors):
            values = list(flat)
            for i, tensor in zip(where, tensors, strict=True):
                values[i] = tensor
            a, k = keras.tree.pack_sequence_as((call_args, call_kwargs), values)
            return layer_call(*a, **k)

        return _remat(on_tensors)(*[flat[i] for i in where])

    return call


def _remat(function):
    """`keras.remat(function)`, except on JAX: `_jax_remat`."""
    if keras.backend.backend() == "jax":
        return _jax_remat(function)
    return keras.remat(function)


def _jax_remat(function):
    """`jax.checkpoint` that also holds on XLA's CPU compiler.

    `jax.checkpoint` keeps the recomputation in the backward pass with
    optimization barriers, whose ordering XLA's CPU compiler does not keep:
    it schedules the recomputation with the forward pass, and nothing is
    saved (a Llama3 block stack at sequence 2,048: 1,900 MiB of temporaries
    without remat, 1,875 with). Here the backward pass recomputes
    `function` from its inputs tied to the incoming gradient
    (`quantized_product.tie`, the lean quantized product's data
    dependency), so the recomputation cannot start before the gradient
    reaches the block. The values closed over (the block's weights) become
    explicit inputs (`jax.closure_convert`), so their gradients flow as
    through `jax.checkpoint`; gradients are the same.
    """
    import jax

    def call(*tensors):
        converted, consts = jax.closure_convert(function, *tensors)
        count = len(tensors)

        @jax.custom_vjp
        def block(*args):
            return converted(*args)

        def forward(*args):
            return converted(*args), args  # only the inputs are kept

        def backward(args, gradient):
            anchor = next(
                (
                    leaf
                    for leaf in jax.tree.leaves(gradient)
                    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact) and leaf.size
                ),
                None,
            )
            inputs = args[:count]
            if anchor is not None:
                inputs = quantized_product.tie(anchor, inputs)
            _, pullback = jax.vjp(converted, *inputs, *args[count:])
            return pullback(gradient)

        block.defvjp(forward, backward)
        return block(*tensors, *consts)

    return call
