"""Moved to `keras_lora.model.surgery`."""

from keras_lora.model.surgery import (  # noqa: F401
    _restore_trainable_flags,
    _trainable_flags,
    apply_lora,
    lora_layers,
    merge_lora,
)
