"""The weights an adapter file holds besides the adapters: whole layers
(PEFT's `modules_to_save`) and biases (PEFT's `bias`).

What trains besides the adapters is read from the model's trainable flags
(`keras_lora.model.extra_trainables.extra_weights`). Saving turns each such
layer into an `ExtraRecord` (its weights as NumPy arrays, by variable
name); each format writes them its way, reads them back into
`ExtraRecord`s (which sit in the list of records next to the
`LayerRecord`s) and `install` checks them against the model with the
adapters, then assigns them and makes them train as they did.
"""

import dataclasses

import keras
import numpy as np

from keras_lora.layers import LoRALayer
from keras_lora.model.extra_trainables import (
    bias_variables,
    extra_weights,
    train_own_biases,
    variable_name,
)
from keras_lora.model.tracking import own_variables

KINDS = ("module", "bias")


@dataclasses.dataclass
class ExtraRecord:
    """One layer's weights that train besides the adapters, as a file holds them.

    Attributes:
        key: the layer's name in the file (for messages).
        path: the Keras layer path it belongs to.
        kind: `"module"` (every weight of the layer: PEFT's
            `modules_to_save`) or `"bias"` (its bias only).
        arrays: `{variable name: NumPy array}` in Keras layout (`"kernel"`,
            `"bias"`, `"gamma"`, ...).
        layer_type: the Keras class name of the layer (a LoRA layer's
            base's), or `None` when the source does not record it.
        layer: the layer a record collected from a model came from.
    """

    key: str
    path: str
    kind: str
    arrays: dict
    layer_type: str | None = None
    layer: object = dataclasses.field(default=None, repr=False, compare=False)


def make_extra(source, key, path, kind, arrays, layer_type=None):
    """A validated `ExtraRecord` read from a file."""
    if kind not in KINDS:
        raise ValueError(
            f"{source}: layer {key!r} has extra weights of kind {kind!r}; "
            f"expected one of {list(KINDS)}."
        )
    if not arrays or not all(isinstance(a, np.ndarray) for a in arrays.values()):
        raise ValueError(f"{source}: layer {key!r} has no extra weight arrays.")
    if kind == "bias" and set(arrays) - {"bias", "beta"}:
        raise ValueError(
            f"{source}: layer {key!r} holds a bias entry with weights "
            f"{sorted(arrays)}; a bias entry holds `bias` or `beta`."
        )
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{source}: layer {key!r} weight {name!r} has dtype "
                f"{array.dtype}; expected floating point values."
            )
    return ExtraRecord(key, path, kind, dict(arrays), layer_type)


def split(records):
    """`(layer_records, extra_records)` of a format's records."""
    extras = [r for r in records if isinstance(r, ExtraRecord)]
    return [r for r in records if not isinstance(r, ExtraRecord)], extras


def collect_extras(model):
    """The `ExtraRecord`s of what trains in `model` besides its adapters."""
    extras, _ = extra_weights(model)
    return [
        ExtraRecord(
            key=extra.path,
            path=extra.path,
            kind=extra.kind,
            arrays={
                name: np.ascontiguousarray(keras.ops.convert_to_numpy(v))
                for name, v in extra.variables.items()
            },
            layer_type=type(_owner(extra.layer)).__name__,
            layer=extra.layer,
        )
        for extra in extras
    ]


def _owner(layer):
    """The layer whose variables an extra record names: a LoRA layer's base."""
    return layer.layer if isinstance(layer, LoRALayer) else layer


def target_variables(layer, record):
    """`{name: variable}` of `layer` that `record` loads into; raises if the
    names differ (a module's are all of the layer's own weights)."""
    owner = _owner(layer)
    if record.kind == "bias":
        variables = {
            "bias" if isinstance(layer, LoRALayer) else variable_name(v): v
            for v in bias_variables(layer)
        }
    else:
        if isinstance(layer, LoRALayer):
            raise ValueError(
                f"layer '{record.path}' is a LoRA layer, so its weights cannot "
                "train whole as well (PEFT's modules_to_save and "
                "target_modules exclude each other)"
            )
        variables = {variable_name(v): v for v in own_variables(owner)}
    missing = sorted(set(record.arrays) - set(variables))
    lacking = set(variables) - set(record.arrays) if record.kind == "module" else ()
    if missing or lacking:
        raise ValueError(
            f"layer '{record.path}' ({type(owner).__name__}) has weights "
            f"{sorted(variables)}; the file's {record.kind} entry has "
            f"{sorted(record.arrays)}"
        )
    if record.layer_type and record.layer_type not in {
        c.__name__ for c in type(owner).__mro__
    }:
        raise ValueError(
            f"the file holds {record.layer_type} weights for '{record.path}', "
            f"which is a {type(owner).__name__}"
        )
    return variables


def plan_extras(by_path, extras, source):
    """`(variable, array)` pairs to assign; raises on anything that does not
    fit, before anything is assigned."""
    problems, plan = [], []
    for record in extras:
        layer = by_path.get(record.path)
        if layer is None:
            problems.append(f"no layer '{record.path}' (key {record.key!r})")
            continue
        try:
            variables = target_variables(layer, record)
        except ValueError as e:
            problems.append(str(e))
            continue
        for name, array in record.arrays.items():
            variable = variables[name]
            if tuple(array.shape) != tuple(variable.shape):
                problems.append(
                    f"layer '{record.path}' {name}: the model expects shape "
                    f"{tuple(variable.shape)}, {source} has {tuple(array.shape)}"
                )
                continue
            dtype = keras.backend.standardize_dtype(variable.dtype)
            plan.append((variable, np.asarray(array, dtype=dtype)))
    if problems:
        raise ValueError(
            f"{source}: its extra trained weights do not fit; nothing was "
            "loaded:\n  " + "\n  ".join(problems)
        )
    return plan


def install_extras(by_path, extras, plan):
    """Assigns `plan` (`plan_extras`) and makes the records' weights train."""
    for variable, array in plan:
        variable.assign(array)
    for record in extras:
        layer = by_path[record.path]
        if record.kind == "module":
            layer.trainable = True
        elif isinstance(layer, LoRALayer):
            layer.train_bias = True
        else:
            train_own_biases(layer)
