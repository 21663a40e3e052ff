"""PEFT's extra trained weights: `modules_to_save` and `bias`.

What `peft` 0.21 writes next to the LoRA factors
(`get_peft_model_state_dict`), keys after `base_model.model.`:

- a module in `modules_to_save`: each of its parameters under its own name,
  `<module>.weight`, `<module>.bias` (the `modules_to_save.<adapter>.`
  part of the trained copy's name left out);
- with `bias="lora_only"`, the bias of each LoRA module,
  `<module>.base_layer.bias`;
- with `bias="all"`, every parameter named `bias`: the LoRA modules' as
  above, every other module's `<module>.bias` (a `LayerNorm`'s included),
  and, for a module in `modules_to_save`, two more copies of its bias
  (`<module>.original_module.bias`, `<module>.modules_to_save.bias`), which
  keras_lora skips when reading and does not write.

keras_lora reads them into `ExtraRecord`s (`keras_lora.io.extra_records`)
and writes them from those. Which Keras weight is which parameter:

- for a KerasHub model without `name_map`, KerasHub's own converter says
  (`hub_mapping.HubCorrespondence.ports`): a parameter is read through the
  converter's hook, and written by inverting it (`hf_weight`). A Keras
  layer trains whole: where a module in `modules_to_save` is part of one
  (`lm_head`, an untied `ReversibleEmbedding`'s reverse embeddings), the
  whole layer trains after loading, and is saved as all the modules it
  fills (`embed_tokens` and `lm_head`);
- otherwise the module is named as the LoRA modules are (`name_map`, or
  slashes to dots) and the parameter by the Keras layer type's torch
  counterpart (`TORCH_NAMES`, `torch_layout`): a `Dense` kernel `(in, out)`
  is `weight` `(out, in)`, a `ConvND` kernel `(*k, in, out)` is `weight`
  `(out, in, *k)`, a normalization's `gamma`/`beta` are `weight`/`bias`.
"""

import keras
import numpy as np

from keras_lora.io.extra_records import make_extra
from keras_lora.layers import LoRALayer
from keras_lora.model.extra_trainables import variable_name
from keras_lora.model.tracking import own_variables

BASE_BIAS = ".base_layer.bias"
# PEFT's `bias="all"` copies of a `modules_to_save` module's bias.
WRAPPER_PARTS = ("original_module", "modules_to_save")
# Keras variable name -> torch parameter (or buffer) name.
TORCH_NAMES = {
    "kernel": "weight",
    "embeddings": "weight",
    "gamma": "weight",
    "beta": "bias",
    "bias": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
# torch buffers of a module to save that Keras layers have no weight for
# (`BatchNorm`'s step counter).
SKIPPED = ("num_batches_tracked",)
# Layer types whose weights `TORCH_NAMES` and `torch_layout` name and lay
# out as their torch counterparts do (`nn.Linear`, `nn.ConvNd`,
# `nn.Embedding`, `nn.LayerNorm`, `nn.BatchNormNd`).
BY_NAME_TYPES = (
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Embedding",
    "LayerNormalization",
    "BatchNormalization",
)


def torch_layout(name, array):
    """A Keras weight in its torch counterpart's layout."""
    if name != "kernel" or array.ndim < 2:
        return array
    n = array.ndim  # (*k, in, out) -> (out, in, *k)
    return np.ascontiguousarray(np.transpose(array, (n - 1, n - 2, *range(n - 2))))


def keras_layout(name, array):
    """`torch_layout` undone."""
    if name != "kernel" or array.ndim < 2:
        return array
    n = array.ndim  # (out, in, *k) -> (*k, in, out)
    return np.ascontiguousarray(np.transpose(array, (*range(2, n), 1, 0)))


def bias_mode(extras):
    """PEFT's `bias` for `extras`: `"all"` if a bias of a layer without an
    adapter trains, `"lora_only"` if only adapted layers' do, else `"none"`."""
    biases = [r for r in extras if r.kind == "bias"]
    if any(not isinstance(r.layer, LoRALayer) for r in biases):
        return "all"
    return "lora_only" if biases else "none"


def _owner(layer):
    return layer.layer if isinstance(layer, LoRALayer) else layer


def to_peft_by_name(extras, module_for, function):
    """`(tensors, modules_to_save)` of `extras`, named by `module_for(record)`
    (keys without `base_model.model.`)."""
    tensors, modules = {}, []
    for record in extras:
        module = module_for(record)
        if record.kind == "bias" and isinstance(record.layer, LoRALayer):
            tensors[f"{module}{BASE_BIAS}"] = record.arrays["bias"]
            continue
        owner = _owner(record.layer)
        if not any(c.__name__ in BY_NAME_TYPES for c in type(owner).__mro__):
            raise ValueError(
                f"{function}: layer '{record.path}' ({type(owner).__name__}) "
                f"trains besides the adapters, and keras_lora names the torch "
                f"parameters of {list(BY_NAME_TYPES)} only. Save in the "
                "'keras_lora' format."
            )
        for name, array in record.arrays.items():
            tensors[f"{module}.{TORCH_NAMES[name]}"] = torch_layout(name, array)
        if record.kind == "module":
            modules.append(module)
            if "moving_mean" in record.arrays:
                # PEFT loads every entry of a saved module's state dict; a
                # count of 0 is what a torch BatchNorm starts from, and is
                # unused unless its momentum is None.
                tensors[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
    return tensors, modules


def to_peft_by_hub(hub, extras, function):
    """`(tensors, modules_to_save)` of `extras`, named and laid out as
    KerasHub's converter reads them (see the module docstring)."""
    tensors, modules, problems = {}, [], []
    for record in extras:
        owner = _owner(record.layer)
        variables = {variable_name(v): v for v in own_variables(owner)}
        for name in record.arrays:
            variable = variables[name]
            ports = hub.ports(variable)
            if not ports:
                problems.append(
                    f"'{record.path}/{name}' (KerasHub's converter fills it "
                    "from no `transformers` weight)"
                )
                continue
            for _, key, _ in ports:
                param = hub.param_name(key)
                weight = hub.hf_weight(key)
                if param is None or weight is None:
                    problems.append(
                        f"'{record.path}/{name}' (weight {key!r} has no "
                        f"parameter in {hub.hf_class}, or KerasHub's hook "
                        "cannot be inverted)"
                    )
                    continue
                module, leaf = param.rsplit(".", 1)
                if record.kind == "bias" and isinstance(record.layer, LoRALayer):
                    tensors[f"{module}.base_layer.{leaf}"] = weight
                else:
                    tensors[param] = weight
                    if record.kind == "module":
                        modules.append(module)
    if problems:
        raise ValueError(
            f"{function}: these weights train besides the adapters but have "
            f"no counterpart in {hub.hf_class}:\n  "
            + "\n  ".join(problems)
            + "\nPass `name_map`, or save in the 'keras_lora' format."
        )
    return tensors, list(dict.fromkeys(modules))


def split_extra_keys(tensors, modules_to_save, bias):
    """`{key: (module, parameter, kind)}` of the extra weights among
    `tensors` (keys without `base_model.model.`), and the keys that are
    none (neither in a `modules_to_save` module nor a bias `bias` saves).
    A LoRA module's bias comes back as parameter `"base_layer.bias"`."""
    found, unknown = {}, []
    for key in tensors:
        module, param = key.rsplit(".", 1) if "." in key else ("", key)
        if param in SKIPPED and _saved_module(module, modules_to_save):
            continue
        if key.endswith(BASE_BIAS) and bias != "none":
            found[key] = (key[: -len(BASE_BIAS)], "base_layer.bias", "bias")
            continue
        saved = _saved_module(module, modules_to_save)
        if saved is not None:
            rest = module[len(saved) :].lstrip(".")
            if rest.split(".", 1)[0] in WRAPPER_PARTS:
                continue  # PEFT's extra copies of the bias (bias="all")
            if not rest:
                found[key] = (module, param, "module")
                continue
        if param == "bias" and bias == "all":
            found[key] = (module, param, "bias")
            continue
        unknown.append(key)
    return found, unknown


def _saved_module(module, modules_to_save):
    """The prefix of `module` that a `modules_to_save` entry names (PEFT
    matches an entry against the end of a module's name), or `None`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if any(prefix == m or prefix.endswith(f".{m}") for m in modules_to_save):
            return prefix
    return None


def from_peft_by_name(found, tensors, layer_for, by_path, source):
    """The `ExtraRecord`s of `found` (`split_extra_keys`), each module's
    layer given by `layer_for(module)` (a path of `by_path`, or `None`);
    `(records, unmapped modules)`."""
    groups, unmapped = {}, []
    for key, (module, param, kind) in found.items():
        path = layer_for(module)
        if path is None:
            unmapped.append(module)
            continue
        layer = by_path[path]
        if param == "base_layer.bias":
            name = "bias"
        else:
            owner = _owner(layer)
            names = {
                TORCH_NAMES.get(variable_name(v)): variable_name(v)
                for v in own_variables(owner)
            }
            name = names.get(param)
            if name is None:
                raise ValueError(
                    f"{source}: parameter {key!r} has no counterpart in layer "
                    f"'{path}' ({type(owner).__name__}, weights "
                    f"{[variable_name(v) for v in own_variables(owner)]})."
                )
        group = groups.setdefault((path, kind), {"key": module, "arrays": {}})
        group["arrays"][name] = keras_layout(name, tensors[key])
    records = [
        make_extra(source, group["key"], path, kind, group["arrays"])
        for (path, kind), group in groups.items()
    ]
    return records, sorted(set(unmapped))


def from_peft_by_hub(hub, found, tensors, layers, source):
    """The `ExtraRecord`s of `found` (`split_extra_keys`), each parameter put
    into the Keras variables KerasHub's converter fills from it;
    `(records, unmapped parameters)`."""
    where = {}  # id(variable) -> (path, name)
    for path, layer in layers:
        for variable in own_variables(_owner(layer)):
            where[id(variable)] = (path, variable_name(variable))
    groups, unmapped = {}, []
    for key, (module, param, kind) in found.items():
        name = f"{module}.{param.removeprefix('base_layer.')}"
        keys = hub.keys_for_param(name)
        if not keys:
            unmapped.append(key)
            continue
        for port_key in keys:
            for variable, _, hook in hub.ports(key=port_key):
                if id(variable) not in where:
                    unmapped.append(key)
                    continue
                path, var_name = where[id(variable)]
                value = tensors[key]
                value = np.asarray(
                    value if hook is None else hook(value, list(variable.shape))
                )
                if value.shape != tuple(variable.shape):
                    raise ValueError(
                        f"{source}: parameter {key!r} has shape "
                        f"{tensors[key].shape}, which KerasHub's converter "
                        f"cannot put into '{path}/{var_name}' of shape "
                        f"{tuple(variable.shape)}."
                    )
                group = groups.setdefault((path, kind), {"key": module, "arrays": {}})
                group["arrays"][var_name] = value
    by_path = dict(layers)
    for (path, kind), group in groups.items():
        if kind != "module":
            continue
        # A Keras layer trains whole: the weights of it that are no part of
        # the file's modules (an untied `ReversibleEmbedding`'s embeddings,
        # when only `lm_head` is in `modules_to_save`) keep their values.
        for variable in own_variables(_owner(by_path[path])):
            group["arrays"].setdefault(
                variable_name(variable),
                np.asarray(keras.ops.convert_to_numpy(variable)),
            )
    records = [
        make_extra(source, group["key"], path, kind, group["arrays"])
        for (path, kind), group in groups.items()
    ]
    return records, sorted(set(unmapped))
