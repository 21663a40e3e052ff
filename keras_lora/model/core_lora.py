"""From Keras core's LoRA (`layer.enable_lora(rank)`) to keras_lora.

Keras's `Dense`, `EinsumDense` and `Embedding` (and KerasHub's
`ReversibleEmbedding`, through `backbone.enable_lora`) can carry a LoRA of
their own: `kernel = W + (lora_alpha / lora_rank)·A·B`. `from_core_lora`
replaces each such layer by a keras_lora layer around a plain copy of its
base, holding the same `A` and `B` with the same scale, so the model
computes what it did. `EinsumDense` keeps core's factoring (`"keras"`).
"""

import keras

from keras_lora.config import validate_flag
from keras_lora.layers import lora_class_for
from keras_lora.model.surgery import put_adapters
from keras_lora.model.tracking import PLAIN_GRAPHS, assign_copy
from keras_lora.model.walk import check_is_model, iter_layers


def from_core_lora(model, in_place=False):
    """Turns a model that used Keras core's `enable_lora` into a keras_lora
    model with the same outputs.

    Every layer with `lora_enabled` becomes the keras_lora layer for its
    type (`LoRADense`, `LoRAEinsumDense` with `factoring="keras"`,
    `LoRAEmbedding`) at `rank = lora_rank`, `alpha = lora_alpha`, holding
    core's `A` and `B`; its base is a plain copy of the layer without LoRA
    (one copy of each converted kernel). As with `apply_lora`, every weight
    but the adapters is frozen.

    Args:
        model: a built `keras.Model` with at least one core-LoRA layer.
        in_place: if true, convert `model` itself and return it (it keeps
            its class: a KerasHub task or backbone). If false (the default),
            convert a copy (`keras.models.clone_model`), which needs a plain
            Functional or Sequential model.

    Returns:
        The keras_lora model: `model` itself, or a new model.

    Raises:
        TypeError: `model` is not a Keras model, or `in_place` not a bool.
        ValueError: `model` has no core-LoRA layer, or a copy was asked of a
            model that cannot be copied with its class; `model` unchanged.
    """
    check_is_model(model, "from_core_lora")
    in_place = validate_flag(in_place, "in_place")
    dora = [p for p, layer in iter_layers(model) if getattr(layer, "dora_enabled", 0)]
    if dora:
        # Keras core's DoRA (open PRs keras#23382-23385) is not released;
        # docs/api.md#keras-core-dora-the-plan has the variables it will read.
        raise ValueError(
            f"from_core_lora: layers {dora} use Keras core's DoRA "
            "(`dora_enabled`), which no released Keras has and keras_lora does "
            "not read yet; nothing was changed. Merge it into the kernels "
            "(or use `kl.apply_lora(..., use_dora=True)` on the base model)."
        )
    targets = [
        (path, layer)
        for path, layer in iter_layers(model)
        if getattr(layer, "lora_enabled", False)
    ]
    if not targets:
        raise ValueError(
            f"from_core_lora: model '{model.name}' has no layer with Keras core "
            "LoRA enabled (`layer.lora_enabled`). Use `keras_lora.apply_lora` to "
            "add adapters to a plain model."
        )
    unsupported = [p for p, layer in targets if lora_class_for(layer) is None]
    if unsupported:
        raise ValueError(
            f"from_core_lora: layers {unsupported} have core LoRA but no "
            "keras_lora layer type (Dense, EinsumDense, Embedding)."
        )
    if not in_place:
        if type(model) not in PLAIN_GRAPHS:
            raise ValueError(
                f"from_core_lora: a copy of '{model.name}' "
                f"({type(model).__name__}) would not keep its class. Pass "
                "`in_place=True` to convert the model itself."
            )
        copy = keras.models.clone_model(model)
        # A config records `lora_rank` for a top-level layer only: a
        # projection inside `MultiHeadAttention` comes back without LoRA, so
        # enable it on the copy first, for the weight lists to match. Keras
        # bug: a layer built from a config with `lora_rank` calls
        # `enable_lora(rank)` without `lora_alpha`, which resets the alpha.
        pairs = zip(iter_layers(model), iter_layers(copy), strict=True)
        for (_, old), (_, new) in pairs:
            if not getattr(old, "lora_enabled", False):
                continue
            if not getattr(new, "lora_enabled", False):
                new.enable_lora(int(old.lora_rank), lora_alpha=old.lora_alpha)
            new.lora_alpha = old.lora_alpha
        copy.set_weights(model.get_weights())
        return from_core_lora(copy, in_place=True)
    # apply_lora's one route, in place: each core-LoRA layer swapped for its
    # keras_lora layer inside the layers that hold it.
    return put_adapters(
        model, {id(layer) for _, layer in targets}, _keras_lora_layer, in_place=True
    )


def _keras_lora_layer(layer):
    """The keras_lora layer computing what core-LoRA `layer` computes."""
    lora_a, lora_b = lora_class_for(layer).core_factors(layer)
    config = layer.get_config()
    for key in ("lora_rank", "lora_alpha"):
        config.pop(key, None)
    base = type(layer).from_config(config)
    build_config = layer.get_build_config()
    if build_config:
        base.build_from_config(build_config)
    own = [w for w in layer.weights if w is not lora_a and w is not lora_b]
    if [tuple(w.shape) for w in own] != [tuple(w.shape) for w in base.weights]:
        raise ValueError(
            f"from_core_lora: layer '{layer.name}' ({type(layer).__name__}) "
            "rebuilt without LoRA has different weights; cannot convert it."
        )
    for old, new in zip(own, base.weights, strict=True):
        assign_copy(new, old)
    cls = lora_class_for(base)
    kwargs = {"rank": int(layer.lora_rank), "alpha": float(layer.lora_alpha)}
    if cls.core_factoring is not None:
        kwargs["factoring"] = cls.core_factoring
    wrapper = cls(base, **kwargs)
    wrapper.lora_a.assign(keras.ops.cast(lora_a, wrapper.lora_a.dtype))
    wrapper.lora_b.assign(keras.ops.cast(lora_b, wrapper.lora_b.dtype))
    return wrapper
