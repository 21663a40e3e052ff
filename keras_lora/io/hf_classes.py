"""The `transformers` side of a KerasHub model's correspondence: which
class an adapter is for, and how that class names its modules and
parameters.

`keras_lora.io.hub_mapping` records which checkpoint key each Keras weight
comes from (KerasHub's converter); the names PEFT files use are the
installed `transformers`' names for those keys, in the class the adapter
is saved for (`default_hf_class`, or the user's `hf_class`). `transformers`
renames checkpoint keys when it loads them (version 5 loads ViT's
`vit.encoder.layer.0.attention.attention.query` into
`vit.layers.0.attention.q_proj`): `module_names` and `param_names` apply
its own renaming, on a model built on the meta device.
"""

import functools


def hf_classes(hf_model_type, name="this"):
    """The `transformers` classes of `hf_model_type`, base model first."""
    transformers = require_transformers(name)
    from transformers.models.auto import modeling_auto

    found = []
    mappings = [modeling_auto.MODEL_MAPPING_NAMES] + [
        mapping
        for attr, mapping in sorted(vars(modeling_auto).items())
        if attr.startswith("MODEL_FOR_") and attr.endswith("_MAPPING_NAMES")
    ]
    for mapping in mappings:
        value = mapping.get(hf_model_type) if isinstance(mapping, dict) else None
        for cls_name in value if isinstance(value, (list, tuple)) else [value]:
            if cls_name and hasattr(transformers, cls_name):
                found.append(cls_name)
    if not found:
        raise ValueError(
            f"The installed `transformers` has no model class for KerasHub's "
            f"'{name}' converter (model type {hf_model_type!r}). Pass "
            "`name_map` to name the PEFT modules yourself."
        )
    return list(dict.fromkeys(found))


# KerasHub task kind -> the `transformers` auto mapping of its counterpart.
_TASK_MAPPINGS = (
    ("CausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("CausalLM", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),  # PaliGemma
    ("ImageClassifier", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("TextClassifier", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("MaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
)


def default_hf_class(hf_model_type, backbone, task=None):
    """The `transformers` class a KerasHub model's adapter is saved for.

    A task's counterpart (`LlamaForCausalLM` for a `Llama3CausalLM`,
    `ViTForImageClassification` for a `ViTImageClassifier`; a causal LM
    `transformers` files as image-text-to-text only, e.g. PaliGemma's, is
    `PaliGemmaForConditionalGeneration`); for a bare
    backbone, the causal LM class when KerasHub has a causal LM for it (the
    model one generates with), else the base model class (`ViTModel`).
    """
    import keras_hub
    from transformers.models.auto import modeling_auto

    if task is not None:
        kinds = [k for k, _ in _TASK_MAPPINGS if _is_task(type(task), k)]
    else:
        kinds = [
            "CausalLM"
            for cls in vars(keras_hub.models).values()
            if _is_task(cls, "CausalLM")
            and issubclass(type(backbone), getattr(cls, "backbone_cls", None) or ())
        ][:1]
    for kind, mapping in _TASK_MAPPINGS:
        if kind in kinds:
            cls_name = getattr(modeling_auto, mapping).get(hf_model_type)
            if cls_name:
                return cls_name
    return modeling_auto.MODEL_MAPPING_NAMES[hf_model_type]


def _is_task(cls, kind):
    return isinstance(cls, type) and any(c.__name__ == kind for c in cls.__mro__)


def require_transformers(name):
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise ValueError(
            "Saving or loading a PEFT adapter of a KerasHub model without "
            "`name_map` names the modules as the installed `transformers` "
            f"does for KerasHub's '{name}' converter; install `transformers` "
            "and `torch`, or pass `name_map`."
        ) from None
    return transformers


def hf_class(cls_name):
    """The `transformers` class named `cls_name`."""
    import transformers

    return getattr(transformers, cls_name)


def hf_class_module(cls_name):
    """The module of `transformers` class `cls_name` (PEFT's
    `auto_mapping.parent_library`)."""
    return hf_class(cls_name).__module__


def module_names(hf_model_type, cls_name, num_layers):
    """`rename(key) -> module name or None`: the module whose `weight`
    checkpoint weight key is, in `cls_name` (`_names`)."""
    rename_param, modules, _ = _names(hf_model_type, cls_name, num_layers)

    def rename(key):
        name = rename_param(key)
        module = None if name is None else name.removesuffix(".weight")
        return module if module in modules else None

    return rename


def param_names(hf_model_type, cls_name, num_layers):
    """`rename(key) -> parameter name or None`: the parameter (or buffer)
    checkpoint weight `key` is in `cls_name` (`_names`)."""
    return _names(hf_model_type, cls_name, num_layers)[0]


@functools.lru_cache(maxsize=16)
def _names(hf_model_type, cls_name, num_layers):
    """`(rename, modules, ndims)`: `rename(key) -> parameter name or None`,
    how `transformers` renames a checkpoint weight key for `cls_name` (built
    on the meta device, at the default config but for its number of
    layers), the names of that class's modules, and `{parameter name: its
    number of axes}` (the sizes are the default config's, the axes are
    not)."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    config = transformers.AutoConfig.for_model(hf_model_type)
    if num_layers:
        config.num_hidden_layers = int(num_layers)
    with torch.device("meta"):
        model = hf_class(cls_name)._from_config(config)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = {name: tensor.ndim for name, tensor in model.state_dict().items()}
    modules = {name for name, _ in model.named_modules()}

    def rename(key):
        name, converted = rename_source_key(
            key, renamings, converters, model.base_model_prefix, state
        )
        if converted is not None or name not in state:
            return None  # split or fused by `transformers`, or not in this class
        return name

    return rename, modules, state


def param_ndims(hf_model_type, cls_name, num_layers):
    """`{parameter name: its number of axes}` in `cls_name` (`_names`)."""
    return _names(hf_model_type, cls_name, num_layers)[2]
