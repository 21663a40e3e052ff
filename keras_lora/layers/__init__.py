"""LoRA layer types. Each wraps one Keras layer type."""

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.conv import LoRAConv
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.depthwise_conv import LoRADepthwiseConv
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.moe_experts import LoRAMoeExperts

# Keras layer type -> LoRA layer type, most specific first.
LORA_LAYER_TYPES = {
    LoRADense.base_class: LoRADense,
    LoRAEinsumDense.base_class: LoRAEinsumDense,
    LoRAEmbedding.base_class: LoRAEmbedding,
    LoRAConv.base_class: LoRAConv,
    LoRADepthwiseConv.base_class: LoRADepthwiseConv,
    LoRAMoeExperts.base_class: LoRAMoeExperts,
}


def lora_class_for(layer):
    """Returns the LoRA class that can wrap `layer`, or `None`."""
    for base_class, lora_class in LORA_LAYER_TYPES.items():
        if isinstance(layer, base_class):
            return lora_class
    return None


__all__ = [
    "LoRALayer",
    "LoRAConv",
    "LoRADense",
    "LoRADepthwiseConv",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRAMoeExperts",
    "LORA_LAYER_TYPES",
    "lora_class_for",
]
