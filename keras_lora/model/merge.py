"""Merging adapters into their base layers, and unmerging.

`merge_lora(model)` returns a new, plain model: each LoRA layer becomes its
base layer class holding `W + scale·A·B`, on the same delta the layer
computes with (`LoRALayer.merged_layer`). `merge_lora(model,
reversible=True)` makes `model` itself compute with merged kernels and keeps
the base kernels beside them, so `unmerge_lora` restores it exactly, with no
subtraction.
"""

import contextlib
import warnings

from keras import ops

from keras_lora.config import validate_flag
from keras_lora.layers.host_merge import all_finite
from keras_lora.model import same_class
from keras_lora.model.containers import copy_layer, copy_model
from keras_lora.model.tracking import copy_loses_class, drop_compiled
from keras_lora.model.walk import (
    Reaches,
    check_built,
    lora_layers,
    require_lora_layers,
)


def merge_lora(
    model,
    check_finite=True,
    requantize=False,
    adapter=None,
    in_place=None,
    reversible=False,
):
    """Returns a plain model with every LoRA layer merged into its base type.

    Each LoRA layer becomes its base layer class (same config and name)
    holding `W + scale·A·B`; every other layer is copied with its weights.
    Containers holding LoRA layers (`LoRAContainer`, a rebuilt
    `MultiHeadAttention` or custom block) become plain copies of their
    class. A Functional subclass (a KerasHub task or backbone converted
    with `in_place=True`) comes back as a new object of its own class, built
    from its plain config, with every weight moved across (a task shares
    its preprocessor, which holds no weights). The result contains no
    keras_lora class, and `model` is not modified.

    A quantized (`"int8"`) base is dequantized and merged in float, so the
    merged layer is a float layer. With `requantize=True` every such layer
    is quantized again in its base's mode after merging, which rounds the
    merged kernel (see the README for the error this adds).

    Args:
        model: a `keras.Model` with LoRA layers, as `apply_lora` returns.
        check_finite: if true (the default), a merged kernel with NaN or Inf
            raises `ValueError` naming the layer, and nothing is built.
        requantize: re-quantize layers whose base was quantized.
        adapter: merge only the adapter of that name (in the layers that
            have it; the others merge to their base). `None`: each layer's
            active adapters.
        in_place: deprecated name of `reversible` (it warns). Not
            `apply_lora`'s `in_place`, which swaps layers inside a model.
        reversible: instead of building a new model, make `model` itself
            compute with merged kernels and no adapter math, and return it.
            The base kernels (shared with the original model) are not
            written: each LoRA layer keeps the merged kernel beside them (one
            more kernel of memory), and `unmerge_lora(model)` restores the
            unmerged model exactly.

    Returns:
        A new, uncompiled `keras.Model`. Layers keep their `trainable` flags,
        so base layers stay frozen; set `merged.trainable = True` to train
        it fully. With `reversible=True`, `model` itself.

    Raises:
        TypeError: `reversible` is not a bool.
        ValueError: `model` has no LoRA layers (there is nothing to merge),
            or a merged kernel is not finite.
    """
    check_built(model, "merge_lora")
    if in_place is not None:
        warnings.warn(
            "merge_lora: `in_place` is deprecated; pass `reversible` (the "
            "same merge: `model` itself runs merged kernels, and "
            "`unmerge_lora` undoes it).",
            DeprecationWarning,
            stacklevel=2,
        )
        reversible = reversible or bool(in_place)
    if validate_flag(reversible, "reversible"):
        return _merge_reversibly(model, check_finite, adapter)
    if adapter is not None:
        with only_adapter(model, adapter):
            return merge_lora(model, check_finite, requantize)
    found = require_lora_layers(
        model,
        "merge_lora",
        ", so there is nothing to merge. Use `keras.models.clone_model` to "
        "copy a plain model.",
    )
    if copy_loses_class(model):
        return same_class.merge_same_class(
            model, lambda layer: layer.merged_layer(check_finite, requantize=requantize)
        )
    merged = {
        id(layer): layer.merged_layer(check_finite, requantize=requantize)
        for _, layer in found
    }
    reaches = Reaches(lambda layer: id(layer) in merged)

    def leaf(layer, deferred):
        if id(layer) in merged:
            return merged[id(layer)]
        return None if reaches(layer) else copy_layer(layer, deferred)

    plain, _ = copy_model(model, leaf, share_variables=False)
    return plain


def _merge_reversibly(model, check_finite=True, adapter=None):
    """`merge_lora(model, reversible=True)`: see there."""
    layers = require_lora_layers(model, "merge_lora")
    refuse_if_merged(layers, "merge_lora(reversible=True)")
    merged = []
    with only_adapter(model, adapter):
        for path, layer in layers:
            kernel = ops.convert_to_numpy(layer.merged_kernel())
            if check_finite and not all_finite(kernel):
                raise ValueError(
                    f"Merging LoRA layer '{path}' (adapters "
                    f"{layer.active_adapters}) gives NaN or Inf in its kernel; "
                    "nothing was merged. Check the adapters, or pass "
                    "check_finite=False to merge anyway."
                )
            merged.append((layer, kernel))
    for layer, kernel in merged:
        layer.merge(kernel)
    drop_compiled(model)
    return model


def unmerge_lora(model):
    """Undoes `merge_lora(model, reversible=True)`, exactly.

    An in-place merge never writes the base kernel (which `apply_lora`
    shares with the original model): each LoRA layer holds the merged
    kernel beside it and calls with it alone. Unmerging drops the merged
    kernel, so every weight is bitwise what it was, with no subtraction
    (PEFT's subtracting unmerge drifts in low precision, peft#1388).

    Raises:
        ValueError: nothing in `model` is merged in place.
    """
    layers = require_lora_layers(model, "unmerge_lora")
    merged = [layer for _, layer in layers if layer.merged]
    if not merged:
        raise ValueError(
            f"unmerge_lora: model '{model.name}' is not merged in place "
            "(`merge_lora(model, reversible=True)`)."
        )
    for layer in merged:
        layer.unmerge()
    drop_compiled(model)
    return model


def is_merged(model):
    """Whether `model`'s LoRA layers are merged in place."""
    return any(layer.merged for _, layer in require_lora_layers(model, "is_merged"))


@contextlib.contextmanager
def only_adapter(model, name):
    """Context manager: adapter `name` alone is active in the layers that
    have it, and no adapter in the others. `None` changes nothing."""
    if name is None:
        yield model
        return
    layers = lora_layers(model)
    if not any(name in layer.adapter_names for _, layer in layers):
        raise ValueError(
            f"No LoRA layer of model '{model.name}' has an adapter named {name!r}."
        )
    previous = [(layer, layer.active_adapters) for _, layer in layers]
    try:
        for _, layer in layers:
            layer.set_active_adapters([name] if name in layer.adapter_names else [])
        yield model
    finally:
        for layer, active in previous:
            layer.set_active_adapters(active)


def refuse_if_merged(layers, function):
    """Raises `ValueError` (prefixed `function`) if any of `layers` (`(path,
    LoRA layer)` pairs) is merged in place: its adapters are not in use."""
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"{function}: layers {merged} are merged in place; call "
            "`unmerge_lora(model)` first."
        )
