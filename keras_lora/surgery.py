"""Model surgery: select layers, wrap them, clone the model; and merge back.

`apply_lora` clones a Functional or Sequential model with
`keras.models.clone_model`. Selected layers come back wrapped in their LoRA
type around the *same* base layer object, so base weights are shared, not
copied. Layers named in `trainable` are copied, so training them leaves the
original model alone. Every other layer is shared and frozen.
"""

import keras

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.base import validate_alpha, validate_rank
from keras_lora.targets import iter_layers, match_layers


def apply_lora(
    model,
    targets=None,
    rank=8,
    alpha=None,
    exclude=None,
    trainable=None,
    **layer_kwargs,
):
    """Returns a copy of `model` with LoRA layers on the selected layers.

    Args:
        model: a built Functional or Sequential `keras.Model`.
        targets: which layers get adapters. `None` selects every `Dense`
            that does not produce a model output. Otherwise a list of layer
            names or paths, a regex string (full match on name or path), or
            a callable `layer -> bool`.
        rank: positive integer, the rank of every adapter.
        alpha: positive number or `None` (`alpha = rank`).
        exclude: layers never to adapt, in the same forms as `targets`.
        trainable: layers to keep fully trainable next to the adapters (a
            new head, say), in the same forms. They are copied.
        **layer_kwargs: passed on to each LoRA layer's constructor.

    Returns:
        A new, uncompiled `keras.Model`. The base layers it shares with
        `model` are frozen in both (they are the same objects); `model`
        still computes exactly what it did.

    Raises:
        TypeError, ValueError: on bad arguments, with `model` unchanged.
    """
    _check_model(model, "apply_lora")
    rank = validate_rank(rank)
    alpha = validate_alpha(alpha)
    layers = list(iter_layers(model))
    existing = [path for path, layer in layers if isinstance(layer, LoRALayer)]
    if existing:
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers: {existing}. "
            "Apply LoRA to the base model, or merge first with `merge_lora`."
        )
    to_wrap = _select_targets(model, layers, targets, exclude)
    to_copy = _expand(
        match_layers(trainable, layers, "trainable") if trainable is not None else []
    )
    overlap = [p for p, layer in to_copy if id(layer) in to_wrap]
    if overlap:
        raise ValueError(
            f"Layers {overlap} are both LoRA targets and in `trainable`; "
            "exclude them from one of the two."
        )
    to_copy = {id(layer) for _, layer in to_copy}

    saved_flags = _trainable_flags(model)
    copies = []

    def clone(layer):
        if id(layer) in to_wrap:
            return lora_class_for(layer)(layer, rank=rank, alpha=alpha, **layer_kwargs)
        if id(layer) in to_copy:
            new = layer.__class__.from_config(layer.get_config())
            copies.append((layer, new))
            return new
        layer.trainable = False
        return layer

    try:
        lora_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
        for old, new in copies:
            new.set_weights(old.get_weights())
            new.trainable = True
    except Exception:
        _restore_trainable_flags(saved_flags)
        raise
    return lora_model


def merge_lora(model, check_finite=True):
    """Returns a plain model with every LoRA layer merged into its base type.

    Each LoRA layer becomes its base layer class (same config and name)
    holding `W + scale·A·B`; every other layer is copied with its weights.
    The result contains no keras_lora class, and `model` is not modified.

    Args:
        model: a Functional or Sequential `keras.Model` with LoRA layers.
        check_finite: if true (the default), a merged kernel with NaN or Inf
            raises `ValueError` naming the layer, and nothing is built.

    Returns:
        A new, uncompiled `keras.Model`. Layers keep their `trainable` flags,
        so base layers stay frozen; set `merged.trainable = True` to train
        it fully.

    Raises:
        ValueError: `model` has no LoRA layers (there is nothing to merge),
            or a merged kernel is not finite.
    """
    _check_model(model, "merge_lora")
    lora_layers = [layer for _, layer in iter_layers(model) if isinstance(layer, LoRALayer)]
    if not lora_layers:
        raise ValueError(
            f"merge_lora: model '{model.name}' has no LoRA layers, so there is "
            "nothing to merge. Use `keras.models.clone_model` to copy a plain model."
        )
    merged = {id(layer): layer.merged_layer(check_finite) for layer in lora_layers}
    copies = []

    def clone(layer):
        if id(layer) in merged:
            return merged[id(layer)]
        new = layer.__class__.from_config(layer.get_config())
        copies.append((layer, new))
        return new

    plain = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return plain


def lora_layers(model):
    """Returns `(path, layer)` for every LoRA layer in `model`."""
    return [(p, layer) for p, layer in iter_layers(model) if isinstance(layer, LoRALayer)]


def _check_model(model, function):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{function}: `model` must be a keras.Model. Received: {model!r} "
            f"of type {type(model).__name__}"
        )
    if not isinstance(model, (keras.Sequential, keras.src.models.Functional)):
        raise TypeError(
            f"{function}: `model` must be a Functional or Sequential model; "
            f"'{model.name}' is a subclassed {type(model).__name__}, which "
            "keras.models.clone_model cannot rebuild."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"{function}: model '{model.name}' is not built. Give it an Input "
            "(or call `model.build(input_shape)`) first."
        )


def _select_targets(model, layers, targets, exclude):
    supported = lambda layer: lora_class_for(layer) is not None  # noqa: E731
    if targets is None:
        outputs = _output_layer_ids(model)
        selected = [
            (p, layer)
            for p, layer in layers
            if isinstance(layer, keras.layers.Dense) and id(layer) not in outputs
        ]
        if not selected:
            raise ValueError(
                f"Model '{model.name}' has no Dense layer outside its output "
                "layers, so `targets=None` selects nothing. Pass `targets`. "
                f"Layers: {[p for p, _ in layers]}"
            )
    else:
        selected = match_layers(targets, layers, "targets", supported)
    if exclude is not None:
        excluded = {id(layer) for _, layer in match_layers(exclude, layers, "exclude")}
        selected = [(p, layer) for p, layer in selected if id(layer) not in excluded]
        if not selected:
            raise ValueError("`exclude` removes every layer `targets` selected.")
    return {id(layer) for _, layer in selected}


def _output_layer_ids(model):
    """The layers whose outputs are `model`'s outputs, nested models opened."""
    ids = set()
    for tensor in keras.tree.flatten(model.outputs):
        layer = tensor._keras_history.operation
        ids.add(id(layer))
        if isinstance(layer, keras.Model):
            ids |= _output_layer_ids(layer)
    return ids


def _expand(selected):
    """A selected nested model stands for all the layers inside it."""
    out = []
    for path, layer in selected:
        if isinstance(layer, keras.Model):
            out.extend(iter_layers(layer, prefix=f"{path}/"))
        else:
            out.append((path, layer))
    return out


def _trainable_flags(model):
    flags = [(layer, layer._trainable) for _, layer in iter_layers(model)]
    return flags, [(v, v.trainable) for v in model.weights]


def _restore_trainable_flags(saved):
    layer_flags, variable_flags = saved
    for layer, flag in layer_flags:
        layer._trainable = flag
    for variable, flag in variable_flags:
        variable.trainable = flag
