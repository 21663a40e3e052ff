"""Moved to `keras_lora.model.targets` and `keras_lora.model.walk`."""

from keras_lora.model.targets import describe, match_layers  # noqa: F401
from keras_lora.model.walk import iter_layers  # noqa: F401
