"""What trains next to the adapters: whole layers and biases.

PEFT trains two more kinds of weights than `A` and `B`: the modules in
`modules_to_save` (a new classifier head, say), fully, and with
`bias="lora_only"` or `"all"` some biases. keras_lora's counterparts are
`apply_lora(..., trainable=[...])` (the layers are selected by
`keras_lora.model.targets.match_layers`, like `targets`) and
`apply_lora(..., bias=...)`:

- `"none"`: no bias trains (the default);
- `"lora_only"`: the bias of each adapted layer (its LoRA layer's
  `train_bias`, the one switch for a frozen base's bias);
- `"all"`: every bias of the model: the `bias` of every layer and the
  `beta` offset of every normalization layer (PEFT's `bias="all"` trains
  every parameter named `bias`, a `LayerNorm`'s included).

`extra_weights(model)` reads back, from the trainable flags alone, what
trains besides the adapters, so that `save_adapter` writes it whichever
way it came to train (`apply_lora`, `load_adapter`, a layer set trainable
by hand): a layer whose own weights all train is a whole module, a
trainable bias of an otherwise frozen layer a bias.
"""

import dataclasses

from keras_lora.layers import LoRALayer
from keras_lora.model.tracking import own_variables
from keras_lora.model.walk import iter_layers

BIAS_MODES = ("none", "lora_only", "all")
# The names of the variables `bias="all"` trains: a layer's bias, and a
# normalization's offset (torch's `LayerNorm.bias`).
BIAS_NAMES = ("bias", "beta")


def validate_bias(bias, argument="bias"):
    """Returns `bias`, one of `BIAS_MODES`; raises otherwise."""
    if not isinstance(bias, str):
        raise TypeError(
            f"`{argument}` must be one of {list(BIAS_MODES)}. "
            f"Received: {argument}={bias!r} of type {type(bias).__name__}"
        )
    if bias not in BIAS_MODES:
        raise ValueError(
            f"`{argument}` must be one of {list(BIAS_MODES)}. "
            f"Received: {argument}={bias!r}"
        )
    return bias


def variable_name(variable):
    """A variable's name within its layer (`"kernel"`, `"bias"`)."""
    return variable.path.rsplit("/", 1)[-1]


def bias_variables(layer):
    """`layer`'s own bias-like variables (`BIAS_NAMES`); for a LoRA layer,
    its base's bias."""
    if isinstance(layer, LoRALayer):
        bias = getattr(layer.layer, "bias", None)
        return [] if bias is None else [bias]
    return [v for v in own_variables(layer) if variable_name(v) in BIAS_NAMES]


def train_biases(model, bias):
    """Makes the biases `bias` selects train (`"none"`: nothing changes).
    A layer that trains whole already is left as it is."""
    if bias == "none":
        return
    for _, layer in iter_layers(model):
        if isinstance(layer, LoRALayer):
            layer.train_bias = True
        elif bias == "all":
            train_own_biases(layer)


def train_own_biases(layer):
    """Thaws `layer`'s own bias-like variables and nothing else of it."""
    biases = bias_variables(layer)
    capable = list(layer._trainable_variables)
    if not biases or all(v.trainable for v in capable):
        return
    object.__setattr__(layer, "_trainable", True)
    for variable in capable:
        variable.trainable = any(variable is b for b in biases)


@dataclasses.dataclass
class ExtraWeights:
    """Weights of one layer that train next to the adapters.

    Attributes:
        path: the layer's path (`iter_layers`).
        layer: the layer (a LoRA layer for the bias of an adapted layer).
        kind: `"module"` (all its own weights: PEFT's `modules_to_save`) or
            `"bias"`.
        variables: `{name: variable}` (`variable_name`), in the layer's order.
    """

    path: str
    layer: object
    kind: str
    variables: dict


def extra_weights(model, layers=None):
    """`(extras, unsaved)`: the `ExtraWeights` of `model`'s layers that
    train besides the adapters, and the paths of trainable variables that
    fit neither kind (part of a layer, not its bias)."""
    extras, unsaved = [], []
    if not model.trainable:
        return extras, unsaved
    for path, layer in layers if layers is not None else iter_layers(model):
        if isinstance(layer, LoRALayer):
            bias = bias_variables(layer)
            if bias and bias[0].trainable and layer.trainable:
                extras.append(ExtraWeights(path, layer, "bias", {"bias": bias[0]}))
            continue
        # Keras keeps a variable made trainable (a kernel, a scale) in
        # `_trainable_variables` whatever its flag; moving statistics are
        # never trainable, and a whole module carries them along.
        capable = list(layer._trainable_variables)
        trained = [v for v in capable if v.trainable]
        if not trained:
            continue
        if len(trained) == len(capable):
            kind, saved = "module", own_variables(layer)
        elif all(variable_name(v) in BIAS_NAMES for v in trained):
            kind, saved = "bias", trained
        else:
            unsaved.extend(v.path for v in trained)
            continue
        named = {variable_name(v): v for v in saved}
        if len(named) != len(saved):  # two variables of one name
            unsaved.extend(v.path for v in trained)
            continue
        extras.append(ExtraWeights(path, layer, kind, named))
    return extras, unsaved
