"""Adapter files: save a model's LoRA weights alone, and load them back.

Two formats:

- `"keras_lora"`: one `.safetensors` file keyed by stable layer path, with
  JSON metadata in its header (see `keras_lora_format`).
- `"peft"`: a PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained`
  loads into the equivalent PyTorch model (see `peft_format`).

Both are written atomically and read without pickle.
"""

import os
import warnings

import keras

from keras_lora.adapters import keras_lora_format, peft_format
from keras_lora.adapters.loading import install, user_stacklevel
from keras_lora.surgery import lora_layers
from keras_lora.targets import iter_layers

FORMATS = ("keras_lora", "peft")


def save_adapter(model, path, format="keras_lora", name_map=None, adapter=None):
    """Saves the LoRA weights of `model`, and nothing else, to `path`.

    Only `lora_a` and `lora_b` of every LoRA layer are written, with what is
    needed to apply them again (rank, alpha, scale rule, layer types). Base
    weights are never written, so the file is small. The output is written
    beside `path` and renamed into place when complete: an interrupted save
    leaves any earlier file intact.

    Args:
        model: a `keras.Model` with LoRA layers (e.g. from `apply_lora`).
        path: for `"keras_lora"`, the file to write (by convention
            `*.safetensors`); for `"peft"`, the directory to write. An
            existing directory is replaced as a whole.
        format: `"keras_lora"` (default) or `"peft"`.
        name_map: `"peft"` only: maps a Keras layer path (or name) to the
            PEFT module path to write, as a dict or a callable
            `path -> str or None`. Unmapped layers use the default rule,
            slashes to dots (`"encoder/0"` -> `"encoder.0"`).
        adapter: the name of the adapter to save (see `add_adapter`), active
            or not; only the layers that have it are written. `None` saves
            each layer's active adapter.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        ValueError: `model` has no LoRA layers, an unknown `format`, or
            something the format cannot hold (see each format).

    Example:

    >>> lora_model = kl.apply_lora(model, rank=8)
    >>> # ... lora_model.fit(...)
    >>> kl.save_adapter(lora_model, "task.safetensors")
    >>> kl.save_adapter(lora_model, "task_peft", format="peft",
    ...                 name_map={"dense": "0", "dense_1": "2"})
    """
    _check_path(path)
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {FORMATS}. Received: format={format!r}"
        )
    _check_model(model, "save_adapter")
    _check_name_map(name_map)
    if not lora_layers(model):
        raise ValueError(
            f"save_adapter: model '{model.name}' has no LoRA layers, so there is "
            "no adapter to save. Use `apply_lora` first."
        )
    unbuilt = [path for path, layer in lora_layers(model) if not layer.built]
    if unbuilt:
        raise ValueError(
            f"save_adapter: LoRA layers {unbuilt} of model '{model.name}' are "
            "not built, so they have no adapter weights yet. Build the model "
            "(call it on data or a `keras.Input`) first."
        )
    if format == "keras_lora" and name_map is not None:
        raise ValueError(
            "`name_map` applies to format='peft' only; the keras_lora format "
            "always keys by Keras layer path."
        )
    _warn_unsaved_trainables(model)
    from keras_lora.adapter_management import only_adapter

    with only_adapter(model, adapter):
        if format == "peft":
            return peft_format.save(model, path, name_map, adapter=adapter)
        return keras_lora_format.save(model, path, adapter=adapter)


def load_adapter(model, path, name_map=None, strict=True, adapter_name=None):
    """Loads an adapter file or PEFT directory into `model`; returns the model to use.

    On a plain model (no LoRA layers), LoRA is first applied with
    `apply_lora` to exactly the layers the adapter covers, with its rank,
    alpha and scale rule; the new LoRA model is returned and `model` keeps
    computing what it did. Base model plus adapter file thus gives back the
    fine-tuned model. On a model that has LoRA layers, the weights load into
    them and `model` itself is returned; their alpha and scale rule are set
    to the adapter's.

    Everything is checked before anything is assigned: a failed load leaves
    `model` as it was.

    Args:
        model: a `keras.Model`, plain or with LoRA layers.
        path: a `keras_lora` `.safetensors` file, or a PEFT adapter directory
            (one with `adapter_config.json`).
        name_map: maps a name in the adapter to a Keras layer name or path,
            as a dict or a callable `str -> str or None`. For PEFT the names
            are module paths without `base_model.model.` (`"encoder.0"`) and
            the default rule turns dots into slashes; for `keras_lora` they
            are the stored layer paths, used as they are by default.
        strict: if true, adapter entries that match no layer of `model`, and
            LoRA layers of `model` that the adapter lacks, raise `ValueError`
            listing them; if false they are skipped with a warning.
        adapter_name: load as the adapter of that name. On a model with LoRA
            layers it is added (inactive) to the layers that lack it, so
            several files load side by side; pick with `set_adapter`. On a
            plain model, the name of the adapter `apply_lora` creates.
            `None`: into the active adapter (plain model: `"default"`).

    Returns:
        The model with the adapter loaded.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: a truncated, corrupted or foreign file, a shape mismatch
            (naming the layer and both shapes), unmatched keys under
            `strict`, or PEFT features keras_lora cannot represent.
    """
    _check_path(path)
    _check_model(model, "load_adapter")
    _check_name_map(name_map)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No adapter file or PEFT directory at '{path}'.")
    layers = list(iter_layers(model))
    if peft_format.is_peft_directory(path):
        adapters = peft_format.read(path, name_map, layers, strict)
        source = f"PEFT adapter '{path}'"
    else:
        adapters = keras_lora_format.read(path, name_map, layers, strict)
        source = f"adapter file '{path}'"
    return install(
        model, adapters, strict=strict, source=source, adapter_name=adapter_name
    )


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike. Received: {path!r} "
            f"of type {type(path).__name__}"
        )


def _check_model(model, function):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{function}: `model` must be a keras.Model. Received: {model!r} "
            f"of type {type(model).__name__}"
        )


def _check_name_map(name_map):
    if name_map is not None and not (isinstance(name_map, dict) or callable(name_map)):
        raise TypeError(
            "`name_map` must be None, a dict or a callable. Received: "
            f"{name_map!r} of type {type(name_map).__name__}"
        )


def _warn_unsaved_trainables(model):
    lora_ids = {
        id(v) for _, layer in lora_layers(model) for v in layer.trainable_weights
    }
    extra = sorted({v.path for v in model.trainable_weights if id(v) not in lora_ids})
    if extra:
        warnings.warn(
            "save_adapter saves LoRA weights only; these trainable weights "
            f"are not in the adapter: {extra}. Save them separately (or the "
            "whole model with `model.save`).",
            stacklevel=user_stacklevel(),
        )


__all__ = ["FORMATS", "load_adapter", "save_adapter"]
