"""keras_lora: LoRA adapters for Keras 3 on TensorFlow, JAX and PyTorch."""

from keras_lora.distribution import lora_layout_map
from keras_lora.exporting import export
from keras_lora.io import load_adapter, save_adapter
from keras_lora.io.hotswap import hotswap_adapter, prepare_hotswap
from keras_lora.layers import (
    LoRAConv,
    LoRADense,
    LoRADepthwiseConv,
    LoRAEinsumDense,
    LoRAEmbedding,
    LoRALayer,
    LoRAMoeExperts,
)
from keras_lora.model.core_lora import from_core_lora
from keras_lora.model.loraplus import loraplus_optimizer
from keras_lora.model.merge import merge_lora, unmerge_lora
from keras_lora.model.mixed import mixed_adapter_model
from keras_lora.model.named_adapters import (
    active_adapters,
    add_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    list_adapters,
    set_adapter,
)
from keras_lora.model.nf4_conversion import quantize_nf4
from keras_lora.model.quantized_bases import lean_quantized
from keras_lora.model.remat import enable_remat
from keras_lora.model.surgery import apply_lora
from keras_lora.summary import TrainableSummary, trainable_summary
from keras_lora.version import __version__ as __version__

__all__ = [
    "active_adapters",
    "add_adapter",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "enable_remat",
    "list_adapters",
    "set_adapter",
    "unmerge_lora",
    "LoRAConv",
    "LoRADense",
    "LoRADepthwiseConv",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRAMoeExperts",
    "TrainableSummary",
    "apply_lora",
    "export",
    "from_core_lora",
    "hotswap_adapter",
    "lean_quantized",
    "load_adapter",
    "lora_layout_map",
    "loraplus_optimizer",
    "merge_lora",
    "mixed_adapter_model",
    "prepare_hotswap",
    "quantize_nf4",
    "save_adapter",
    "trainable_summary",
]
