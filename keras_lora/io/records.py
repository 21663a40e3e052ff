"""One record per LoRA layer: what an adapter file holds for that layer.

`collect` makes the records of a model in one walk, after the checks every
format shares. Each format reads a file into records with `make_record`,
which validates every option through `keras_lora.config`, so that a record
that exists is a valid one: nothing is assigned, and no layer is created,
from a file whose metadata lies.
"""

import dataclasses
import hashlib
import warnings

import keras
import numpy as np

from keras_lora.config import (
    validate_alpha,
    validate_dropout,
    validate_factoring,
    validate_flag,
    validate_init,
    validate_rank,
)
from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.layers.checks import caller_stacklevel
from keras_lora.model.extra_trainables import extra_weights
from keras_lora.model.walk import require_lora_layers


@dataclasses.dataclass
class LayerRecord:
    """One layer's adapter, as a file holds it.

    Attributes:
        key: the layer's name in the file (for messages).
        path: the Keras layer path it belongs to.
        a: `lora_a`, numpy, in Keras layout (e.g. `(input_dim, rank)`).
        b: `lora_b`, numpy, in Keras layout (e.g. `(rank, units)`).
        alpha, use_rslora, dropout, init, use_dora: the adapter's options.
        magnitude: DoRA's magnitude vector, or `None`.
        base_type: the base layer's class name (e.g. `"Dense"`), or `None`
            when the source does not record it.
        base_sha256: for `init="pissa"`/`"olora"`/`"loftq"`, the digest of
            the base kernel the adapter is right on (`kernel_digest`), if
            known.
        factoring: for an `EinsumDense` base, how its kernel is split into
            `A·B` (`"standard"` or `"keras"`); `None` for other layer types.
        adapter_name: the adapter's name in the model it came from, if any.
        lora_type: the LoRA layer's class name (`"LoRADense"`), if known.
        layer: the LoRA layer a record collected from a model came from.
    """

    key: str
    path: str
    a: np.ndarray
    b: np.ndarray
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "default"
    use_dora: bool = False
    magnitude: np.ndarray | None = None
    base_type: str | None = None
    base_sha256: str | None = None
    factoring: str | None = None
    adapter_name: str | None = None
    lora_type: str | None = None
    layer: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rank(self):
        return int(self.a.shape[-1])

    @property
    def options(self):
        """The variant options as LoRA layer keyword arguments."""
        return {"dropout": self.dropout, "init": self.init, "use_dora": self.use_dora}


def make_record(source, key, path, a, b, rank=None, factoring=None, **options):
    """Returns a validated `LayerRecord` read from a file.

    Every option goes through `keras_lora.config`'s validators: a string
    flag, a NaN alpha or rank 0 is refused here, before anything is
    assigned.

    Args:
        source: what was read, for messages (`"adapter file 'x'"`).
        key, path, a, b: as `LayerRecord`.
        rank: the rank the file records, if it records one; it must be the
            rank of `a` and `b`.
        factoring: as `LayerRecord`.
        **options: the other `LayerRecord` fields.

    Raises:
        TypeError, ValueError: naming `source`, the layer and the option.
    """
    try:
        record = LayerRecord(
            key,
            path,
            _array(a, "lora_a"),
            _array(b, "lora_b"),
            alpha=validate_alpha(options.pop("alpha", None)),
            use_rslora=validate_flag(options.pop("use_rslora", False), "use_rslora"),
            dropout=validate_dropout(options.pop("dropout", 0.0)),
            init=validate_init(options.pop("init", "default")),
            use_dora=validate_flag(options.pop("use_dora", False), "use_dora"),
            factoring=validate_factoring(factoring),
            **options,
        )
        _check_record(record, rank)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{source}: layer {key!r} {e}") from None
    if record.alpha is None:
        record.alpha = float(record.rank)
    return record


def _array(value, name):
    if not isinstance(value, np.ndarray) or value.ndim < 2:
        shape = getattr(value, "shape", None)
        raise ValueError(f"{name}: expected an array of 2 or more axes, got {shape}.")
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(
            f"{name}: expected floating point values, got dtype {value.dtype}."
        )
    return value


def _check_record(record, rank):
    if rank is not None:
        validate_rank(rank)
        if rank != record.a.shape[-1]:
            raise ValueError(
                f"records rank {rank} but lora_a has shape {record.a.shape}."
            )
    validate_rank(record.rank, "rank (the last axis of lora_a)")
    if record.b.shape[0] != record.rank:
        raise ValueError(
            f"lora_a has shape {record.a.shape} and lora_b {record.b.shape}: "
            "the rank (last axis of lora_a, first of lora_b) differs."
        )
    if record.use_dora != (record.magnitude is not None):
        raise ValueError(
            "a DoRA adapter needs its lora_magnitude tensor and only a DoRA "
            f"adapter has one (use_dora={record.use_dora})."
        )
    if record.magnitude is not None:
        _array(record.magnitude.reshape(1, -1), "lora_magnitude")
    for field in ("base_type", "base_sha256", "adapter_name", "lora_type"):
        value = getattr(record, field)
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"`{field}` must be a string or absent. Received: {value!r}"
            )


def kernel_digest(layer):
    """SHA-256 of a base kernel as stored: what a PiSSA/OLoRA residual was
    computed from, or the quantized base a LoftQ adapter was fit to.

    `layer` is a LoRA layer (its base is digested) or a plain layer. A float
    kernel gives the digest of its bytes; a quantized base, the digest of
    its stored codes and scales (every weight but the bias, by name), so
    that the same quantized base digests the same on every backend.
    """
    base = layer.layer if isinstance(layer, LoRALayer) else layer
    if getattr(base, "quantization_mode", None) is None:
        if isinstance(layer, LoRALayer):
            kernel = layer.base_kernel
        else:
            kernel = getattr(layer, lora_class_for(layer).kernel_attr)
        return hashlib.sha256(_bytes(kernel)).hexdigest()
    bias = getattr(base, "bias", None)
    stored = sorted(
        (v.path.rsplit("/", 1)[-1], v) for v in base.weights if v is not bias
    )
    digest = hashlib.sha256()
    for name, variable in stored:
        digest.update(name.encode())
        digest.update(_bytes(variable))
    return digest.hexdigest()


def _bytes(tensor):
    return np.ascontiguousarray(keras.ops.convert_to_numpy(tensor)).tobytes()


def layer_factoring(layer):
    """What a file records of a LoRA layer's factoring: `None` for a type
    with one factoring (`LoRALayer.file_factoring`)."""
    return type(layer).file_factoring(layer.factoring)


def collect(model, function, adapter=None):
    """The records of `model`'s LoRA layers, in one walk, after the checks
    every format shares.

    A file holds one adapter per layer: `A`, `B` (and DoRA's magnitude), its
    options, and for PiSSA/OLoRA the base kernel's digest, since loading
    recomputes the residual from the base.

    Args:
        model: the `keras.Model` to save.
        function: the caller, for messages (`"save_adapter(format='peft')"`).
        adapter: the name of the adapter to save; only the layers that have
            it are written. `None`: each layer's active adapter; several
            active adapters on one layer are refused, and inactive ones are
            left out with a warning.

    Raises:
        ValueError: no LoRA layers (with `adapter`: none that has it),
            unbuilt ones, or several active adapters on one layer.
    """
    layers = require_lora_layers(
        model,
        function,
        ", so there is no adapter to save. Use `apply_lora` first.",
        built=True,
    )
    _warn_unsaved_trainables(model, layers)
    if adapter is not None:
        layers = [(p, lay) for p, lay in layers if adapter in lay.adapter_names]
        if not layers:
            raise ValueError(
                f"{function}: no LoRA layer of model '{model.name}' has an "
                f"adapter named {adapter!r}."
            )
        return [_record(path, layer, adapter) for path, layer in layers]
    problems, skipped, records = [], [], []
    for path, layer in layers:
        active, names = layer.active_adapters, layer.adapter_names
        if len(active) != 1:
            what = f"several active adapters {active}" if active else "none active"
            problems.append(f"'{path}' has {what}")
            continue
        if len(names) > 1:
            skipped.append(f"'{path}': {[n for n in names if n not in active]}")
        records.append(_record(path, layer, active[0]))
    if problems:
        raise ValueError(
            f"{function}: an adapter file holds one plain LoRA adapter per "
            "layer, which these layers do not fit:\n  " + "\n  ".join(problems)
        )
    if skipped:
        warnings.warn(
            f"{function} saves each layer's active adapter only; left out:\n  "
            + "\n  ".join(skipped),
            stacklevel=caller_stacklevel(),
        )
    return records


def _record(path, layer, name):
    spec = layer.get_adapter(name)

    def numpy(variable):
        return np.ascontiguousarray(keras.ops.convert_to_numpy(variable))

    return LayerRecord(
        key=path,
        path=path,
        a=numpy(spec.a),
        b=numpy(spec.b),
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        dropout=spec.dropout,
        init=spec.init,
        use_dora=spec.use_dora,
        magnitude=numpy(spec.magnitude) if spec.use_dora else None,
        # The Keras layer family (an NF4 base's float class, `Dense`), so
        # that the file loads into a float, int8, int4 or NF4 model alike.
        base_type=(
            getattr(type(layer.layer), "float_class", None) or type(layer.layer)
        ).__name__,
        base_sha256=kernel_digest(layer) if spec.pins_base else None,
        factoring=layer_factoring(layer),
        adapter_name=name,
        lora_type=type(layer).__name__,
        layer=layer,
    )


def _warn_unsaved_trainables(model, layers):
    """Warns about trainable weights no adapter file holds: besides the
    adapters, a file holds whole trainable layers and trainable biases
    (`extra_weights`), not a part of a layer."""
    _, unsaved = extra_weights(model)
    if unsaved:
        warnings.warn(
            "save_adapter saves LoRA weights, and the layers and biases that "
            "train whole besides them; these trainable weights are neither: "
            f"{sorted(unsaved)}. Save them separately (or the whole model "
            "with `model.save`).",
            stacklevel=caller_stacklevel(),
        )
