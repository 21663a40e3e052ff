"""Adapter files: save a model's LoRA weights alone, and load them back.

Formats, chosen by lookup in `formats.WRITERS` (by name) and
`formats.READERS` (the first that claims the path):

- `"keras_lora"`: one `.safetensors` file keyed by stable layer path, with
  JSON metadata in its header (see `keras_lora_format`).
- `"peft"`: a PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained`
  loads into the equivalent PyTorch model (see `peft_format`).
- KerasHub's `*.lora.h5` files from `backbone.save_lora_weights`, read
  only (see `kerashub_format`).

The flow is the same for all: saving collects one `LayerRecord` per LoRA
layer in one walk of the model (`records.collect`), the format checks them,
then writes atomically. Loading reads the file into validated records (no
pickle, `formats.read_records`), and `install.install` checks them against
the model before it assigns anything. What a format module provides is
described in `keras_lora.io.formats`.
"""

from keras_lora.config import validate_flag
from keras_lora.io.formats import (
    FORMATS,
    WRITERS,
    check_path,
    find_reader,
    read_records,
)
from keras_lora.io.install import install
from keras_lora.io.names import check_name_map
from keras_lora.io.records import collect
from keras_lora.model.walk import check_is_model, iter_layers


def save_adapter(
    model, path, format="keras_lora", name_map=None, adapter=None, hf_class=None
):
    """Saves the LoRA weights of `model`, and what trains with them, to `path`.

    `lora_a` and `lora_b` of every LoRA layer are written, with what is
    needed to apply them again (rank, alpha, scale rule, layer types), and
    the weights that train next to them: the layers that train whole
    (`apply_lora(trainable=...)`, PEFT's `modules_to_save`) and the trained
    biases (`apply_lora(bias=...)`). Frozen base weights are never written,
    so the file is small. The output is written
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
        hf_class: `"peft"` only, for a KerasHub model without `name_map`:
            the name of the `transformers` class the adapter is for, e.g.
            `"LlamaForCausalLM"` or `"LlamaModel"`. `None`: the task's
            counterpart, or for a bare backbone the causal LM class where
            KerasHub has a causal LM for it, else the base model class.

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
    check_path(path)
    writer = WRITERS.get(format) if isinstance(format, str) else None
    if writer is None:
        raise ValueError(
            f"`format` must be one of {FORMATS}. Received: format={format!r}"
        )
    check_is_model(model, "save_adapter")
    check_name_map(name_map)
    records = collect(model, f"save_adapter(format={format!r})", adapter)
    writer.check(model, records, path, name_map, hf_class)
    return writer.save(model, records, path, name_map, hf_class)


def load_adapter(
    model, path, name_map=None, strict=True, adapter_name=None, in_place=False
):
    """Loads an adapter file or PEFT directory into `model`; returns the model to use.

    On a plain model (no LoRA layers), LoRA is first applied with
    `apply_lora` to exactly the layers the adapter covers, with its rank,
    alpha, scale rule, variant and factoring; the new LoRA model is returned
    and `model` keeps computing what it did. With `in_place=True`, `model`
    itself is converted (as `apply_lora(..., in_place=True)` does) and
    returned: what a KerasHub backbone or task needs, in one call, like
    PEFT's `PeftModel.from_pretrained(base, path)`. (A Functional subclass,
    such as a KerasHub backbone or task, cannot be copied and keep its
    class, so without `in_place=True` it is refused, and the error says to
    pass it.) Base model plus adapter file thus gives back the fine-tuned
    model. On a
    model that has LoRA layers, the weights load into them and `model`
    itself is returned; their alpha and scale rule are set to the adapter's.
    Layers and biases the file holds besides the adapters (see
    `save_adapter`) are assigned and train again; trained biases load into a
    model without LoRA layers only with `in_place=True` (a copy shares them).

    Everything is checked before anything is assigned: a failed load leaves
    `model` as it was.

    Args:
        model: a `keras.Model`, plain or with LoRA layers.
        path: a `keras_lora` `.safetensors` file, a PEFT adapter directory
            (one with `adapter_config.json`), or a KerasHub `*.lora.h5` file
            from `backbone.save_lora_weights` (its layers are numbered as
            KerasHub numbers them, see `kerashub_format`).
        name_map: maps a name in the adapter to a Keras layer name or path,
            as a dict or a callable `str -> str or None`. For PEFT the names
            are module paths without `base_model.model.` (`"encoder.0"`) and
            the default rule turns dots into slashes; for `keras_lora` they
            are the stored layer paths, used as they are by default; for a
            KerasHub file they are its groups (`"lora/9"`), numbered by
            default.
        strict: if true, adapter entries that match no layer of `model`, and
            LoRA layers of `model` that the adapter lacks, raise `ValueError`
            listing them; if false they are skipped with a warning.
        adapter_name: load as the adapter of that name. On a model with LoRA
            layers it is added (inactive) to the layers that lack it, so
            several files load side by side; pick with `set_adapter`. On a
            plain model, the name of the adapter `apply_lora` creates.
            `None`: into the active adapter (plain model: `"default"`).
        in_place: on a model without LoRA layers, convert `model` itself
            (it keeps its class, preprocessor and `generate()`) instead of
            a copy. If anything fails (a bad file, a shape mismatch), the
            conversion is undone and `model` is exactly as it was. On a
            model with LoRA layers it changes nothing: the load is into
            `model` itself anyway.

    Returns:
        The model with the adapter loaded.

    Raises:
        FileNotFoundError: nothing at `path`.
        TypeError, ValueError: an option the file records has the wrong
            type or value (a string `use_rslora`, a NaN `alpha`, rank 0).
        ValueError: a truncated, corrupted or foreign file, a shape mismatch
            (naming the layer and both shapes), a factoring mismatch,
            unmatched keys under `strict`, or PEFT features keras_lora
            cannot represent.
    """
    check_path(path)
    check_is_model(model, "load_adapter")
    check_name_map(name_map)
    in_place = validate_flag(in_place, "in_place")
    reader = find_reader(path)
    layers = list(iter_layers(model))
    records, source = read_records(reader, path, name_map, model, layers, strict)
    return install(
        model,
        records,
        layers,
        strict=strict,
        source=source,
        adapter_name=adapter_name,
        in_place=in_place,
    )


__all__ = ["FORMATS", "load_adapter", "save_adapter"]
