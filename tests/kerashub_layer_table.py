"""The table of docs/kerashub.md: KerasHub layer names next to the Hugging
Face module names, as keras_lora's own hub mapping (`hub_correspondence`)
pairs them on tiny models built from config.

`python tests/kerashub_layer_table.py` prints the table;
tests/model/test_default_targets.py checks that the page holds it.
"""

import keras_hub  # noqa: F401  (hub_correspondence needs it imported)
import tiny_kerashub

from keras_lora.io.hub_mapping import hub_correspondence
from keras_lora.model.targets import kerashub_default, linear_layers
from keras_lora.model.walk import iter_layers

# tiny_kerashub name -> the name the table shows
ARCHITECTURES = {
    "llama3": "Llama3",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "qwen": "Qwen (2)",
    "qwen3": "Qwen3",
    "gpt2": "GPT2",
    "bert": "BERT",
    "distil_bert": "DistilBERT",
}
START = "<!-- layer-table:start (tests/kerashub_layer_table.py) -->"
END = "<!-- layer-table:end -->"


def module_suffix(module, base_prefix):
    """`model.layers.0.self_attn.q_proj` -> `self_attn.q_proj`: the part
    after the block number, or after the base model's prefix."""
    parts = module.split(".")
    numbers = [i for i, part in enumerate(parts) if part.isdigit()]
    if numbers:
        return ".".join(parts[numbers[0] + 1 :])
    if parts[0] == base_prefix:
        parts = parts[1:]
    return ".".join(parts)


def rows(arch):
    """`(KerasHub layer, Hugging Face module, default?, all-linear?)` rows
    for one architecture, in the backbone's layer order, once each."""
    backbone = tiny_kerashub.backbone(arch)
    mapping = hub_correspondence(backbone)
    layers = list(iter_layers(backbone))
    default = {id(lay) for _, lay in kerashub_default([backbone], layers, bool)}
    linear = {id(lay) for _, lay in linear_layers(layers, set(), bool)}
    seen = {}
    for _, layer in layers:
        kernel_map = mapping.kernel_map(layer)
        module = kernel_map and mapping.module(kernel_map)
        if not module:
            continue
        key = (layer.name, module_suffix(module, mapping.base_prefix))
        seen.setdefault(key, (id(layer) in default, id(layer) in linear))
    return mapping.hf_class, [(*key, *flags) for key, flags in seen.items()]


def table():
    lines = [
        START,
        "| architecture (`transformers` class) | KerasHub layer | Hugging Face "
        'module | `targets=None` | `"all-linear"` |',
        "|---|---|---|---|---|",
    ]
    for arch, title in ARCHITECTURES.items():
        hf_class, found = rows(arch)
        for name, module, default, linear in found:
            lines.append(
                f"| {title} (`{hf_class}`) | `{name}` | `{module}` | "
                f"{'yes' if default else ''} | {'yes' if linear else ''} |"
            )
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
