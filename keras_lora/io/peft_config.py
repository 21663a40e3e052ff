"""PEFT's `adapter_config.json`: which fields keras_lora honours, ignores
or refuses, and its validation through `keras_lora.config`.
"""

import json

from keras_lora.config import (
    validate_alpha,
    validate_dropout,
    validate_flag,
    validate_pattern,
    validate_rank,
)
from keras_lora.model.extra_trainables import validate_bias

CONFIG_NAME = "adapter_config.json"
# PEFT's default `lora_alpha`, for a config that leaves it out.
DEFAULT_ALPHA = 8

# Config fields that change nothing about the saved weights' meaning: kept
# for information, or used only while training or to pick target modules.
IGNORED_FIELDS = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
# Fields keras_lora honours.
HONOURED_FIELDS = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "init_lora_weights",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "modules_to_save",
    "bias",
}
# Fields keras_lora cannot represent unless they have their neutral value.
NEUTRAL_FIELDS = {
    "lora_bias": "a bias on lora_B",
    "layer_replication": "replicated layers",
    "megatron_config": "Megatron parallel layers",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# `init_lora_weights` values whose files hold plain A and B: a starting
# point, or LoftQ's (read with a warning: the base must be PEFT's LoftQ
# base). The others (pissa, olora, corda, lora_ga) also rewrite the base
# weights, so the adapter alone does not reproduce the fine-tuned model.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "loftq")


def read_config(directory):
    """Reads `adapter_config.json` and returns its options, validated.

    Returns:
        A dict with `rank`, `alpha`, `use_rslora`, `dropout`, `init`,
        `loftq` (whether PEFT initialised it with LoftQ),
        `use_dora`, `rank_pattern` and `alpha_pattern` (per-module ranks and
        alphas, `{regex: value}`), each checked by `keras_lora.config`, and
        `base_model_class`, the `transformers` class the adapter was saved
        from (`auto_mapping`), or `None`.

    Raises:
        TypeError, ValueError: an option of the wrong type or value, a PEFT
            feature keras_lora cannot represent, or no JSON object.
    """
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"'{path}' must hold a JSON object, not {type(config).__name__}."
        )
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"'{path}': keras_lora reads LoRA adapters (peft_type 'LORA'). "
            f"Received peft_type={config.get('peft_type')!r}."
        )
    try:
        options = {
            "rank": validate_rank(config.get("r"), "r"),
            "alpha": validate_alpha(
                config.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha"
            ),
            "use_rslora": validate_flag(config.get("use_rslora", False), "use_rslora"),
            "dropout": validate_dropout(
                config.get("lora_dropout") or 0.0, "lora_dropout"
            ),
            "use_dora": validate_flag(config.get("use_dora", False), "use_dora"),
            "rank_pattern": _pattern(config, "rank_pattern", validate_rank),
            "alpha_pattern": _pattern(config, "alpha_pattern", validate_alpha),
        }
    except (TypeError, ValueError) as e:
        raise type(e)(f"'{path}': {e}") from None
    if options["alpha"] is None:
        options["alpha"] = float(DEFAULT_ALPHA)
    # Extra trained weights (keras_lora.io.peft_extras): the modules that
    # train whole, and which biases train.
    options["modules_to_save"] = _modules_to_save(config, path)
    options["bias"] = _bias(config, path)
    _refuse_what_cannot_load(config, path)
    init = config.get("init_lora_weights", True)
    options["init"] = "gaussian" if init == "gaussian" else "default"
    # LoftQ's A and B are plain weights that fit PEFT's LoftQ base only.
    options["loftq"] = init == "loftq"
    mapping = config.get("auto_mapping")
    saved_for = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    options["base_model_class"] = saved_for if isinstance(saved_for, str) else None
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise TypeError(
            f"'{path}': `target_parameters` must be a list of parameter names. "
            f"Received: target_parameters={targets!r}"
        )
    options["target_parameters"] = targets  # MoE experts: keras_lora.io.peft_moe
    return options


def _modules_to_save(config, path):
    modules = config.get("modules_to_save") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TypeError(
            f"'{path}': `modules_to_save` must be a list of module names. "
            f"Received: modules_to_save={modules!r}"
        )
    return modules


def _bias(config, path):
    bias = config.get("bias")
    if bias is None:
        return "none"
    try:
        return validate_bias(bias)
    except (TypeError, ValueError) as e:
        raise type(e)(f"'{path}': {e}") from None


def _pattern(config, field, validate):
    """`{regex: value}` of a `rank_pattern`/`alpha_pattern` field, validated."""
    return validate_pattern(config.get(field) or {}, field, validate)


def _refuse_what_cannot_load(config, path):
    problems = []
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        problems.append(
            f"init_lora_weights={init!r} (an initialization that also changes "
            "the base weights, or one keras_lora does not know)"
        )
    for field, meaning in NEUTRAL_FIELDS.items():
        value = config.get(field)
        if not _neutral(value):
            problems.append(f"{field}={value!r} ({meaning})")
    known = IGNORED_FIELDS | HONOURED_FIELDS | set(NEUTRAL_FIELDS)
    for field in sorted(set(config) - known):
        if not _neutral(config[field]):
            problems.append(
                f"{field}={config[field]!r} (a field keras_lora does not know)"
            )
    if problems:
        raise ValueError(
            f"'{path}' uses PEFT features keras_lora cannot represent:\n  "
            + "\n  ".join(problems)
        )


def make_config(
    rank,
    alpha,
    use_rslora,
    dropout,
    init,
    use_dora,
    modules,
    modules_to_save=None,
    bias="none",
):
    """The `adapter_config.json` contents for one plain LoRA adapter, with
    the modules that train whole (`modules_to_save`) and PEFT's `bias`."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "use_rslora": use_rslora,
        "target_modules": modules,
        "lora_dropout": dropout,
        "fan_in_fan_out": False,
        "bias": bias,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "use_dora": use_dora,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _neutral(value):
    return value is None or value is False or value == {} or value == [] or value == ""
