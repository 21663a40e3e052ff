"""What a LoRA layer checks before it wraps a layer, and its dtype rules."""

import sys
import warnings

import keras
import numpy as np

from keras_lora.config import QUANTIZED_BASE_INITS
from keras_lora.layers import quantized


def check_base_layer(cls, layer):
    """Raises if `cls` (a LoRA layer type) cannot wrap `layer` (which is
    no LoRA layer: the caller checks that)."""
    if cls.base_class is None:
        names = ", ".join(
            t.__name__ for t in cls.__subclasses__() if t.base_class is not None
        )
        raise TypeError(
            f"{cls.__name__} is the abstract base class of the LoRA layers; "
            f"use the one for your layer type ({names})."
        )
    if not isinstance(layer, cls.base_class):
        raise TypeError(
            f"{cls.__name__} wraps a `keras.layers.{cls.base_class.__name__}`. "
            f"Received: layer={layer!r} of type {type(layer).__name__}"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has Keras core LoRA enabled "
            "(`enable_lora`). Use a layer without it."
        )
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None and mode not in cls.quantization_modes:
        supported = (
            f"{cls.__name__} supports quantized bases in modes "
            f"{list(cls.quantization_modes)} only."
            if cls.quantization_modes
            else f"{cls.__name__} does not support quantized bases."
        )
        reason = quantized.REFUSED.get(mode, "")
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({mode!r}). {supported} {reason}"
        )


# Quantization modes whose Dense/EinsumDense bases take DoRA (QDoRA).
QDORA_MODES = ("int8", "int4", "nf4")


def check_variant(layer, spec, specs):
    """Raises if adapter `spec`'s variant options cannot apply to `layer`
    next to the adapters `specs`."""
    mode = getattr(layer, "quantization_mode", None)
    if mode is None and spec.init in QUANTIZED_BASE_INITS:
        raise ValueError(
            f"Layer '{layer.name}' is a float layer: adapter '{spec.name}' "
            f"cannot use init={spec.init!r}, whose factors fit a quantized "
            "base. Make LoftQ adapters with `apply_lora(float_model, "
            "init='loftq', loftq_mode=...)`, which quantizes the targets."
        )
    if mode is not None and spec.changes_base:
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({mode!r}): adapter "
            f"'{spec.name}' cannot use init={spec.init!r} there (PiSSA/OLoRA "
            "rewrite the frozen kernel, which a quantized base cannot hold "
            "in float). Use them on a float base; DoRA (use_dora=True) "
            "works on int8, int4 and NF4 Dense and EinsumDense bases."
        )
    dora_bases = (keras.layers.Dense, keras.layers.EinsumDense)
    qdora = isinstance(layer, dora_bases) and mode in QDORA_MODES
    if mode is not None and spec.use_dora and not qdora:
        raise ValueError(
            f"Layer '{layer.name}' is a quantized ({mode!r}) "
            f"{type(layer).__name__}: adapter '{spec.name}' cannot use "
            "use_dora=True there. DoRA over a quantized base (QDoRA) is "
            f"supported on Dense and EinsumDense layers in modes "
            f"{list(QDORA_MODES)}; use DoRA on a float base otherwise."
        )
    changing = [s.name for s in specs if s.changes_base]
    if len(changing) > 1:
        raise ValueError(
            f"Layer '{layer.name}': only one adapter per layer can use "
            f"init='pissa' or 'olora' (they rewrite the frozen kernel); "
            f"received {changing}."
        )


def warn_rank_above_kernel_rank(layer_name, adapter, a_shape, b_shape):
    """A rank above `min(in, out)` is allowed (PEFT allows it too), but the
    extra ranks add parameters and no expressiveness: warn."""
    limit = min(int(np.prod(a_shape[:-1])), int(np.prod(b_shape[1:])))
    if adapter.rank > limit:
        warnings.warn(
            f"LoRA layer '{layer_name}': rank {adapter.rank} is above "
            f"min(in, out) = {limit} of its kernel, so `A·B` has rank at most "
            f"{limit}; the extra ranks add parameters but nothing else.",
            stacklevel=caller_stacklevel(),
        )


def caller_stacklevel():
    """The `stacklevel` of the first frame outside keras_lora and Keras."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("keras_lora", "keras")
    ):
        frame, level = frame.f_back, level + 1
    return level


def float_policy(layer):
    """`layer`'s dtype policy; for a quantized layer, its float source."""
    policy = layer.dtype_policy
    source = getattr(policy, "_source_name", None)
    if policy.quantization_mode is not None and source:
        return keras.DTypePolicy(source)
    return policy


def adapter_dtype(variable_dtype):
    """Adapters never train in 16-bit: Adam's updates underflow there."""
    if variable_dtype in ("float16", "bfloat16"):
        return "float32"
    return variable_dtype
