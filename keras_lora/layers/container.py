"""Moved to `keras_lora.model.containers` (and `keras_lora.model.walk`)."""

from keras_lora.model.containers import (  # noqa: F401
    LoRAContainer,
    adapter_specs,
    attach_adapters,
    rebuild_container,
)
from keras_lora.model.walk import children, graph_model  # noqa: F401
