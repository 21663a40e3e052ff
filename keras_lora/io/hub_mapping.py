"""Which Hugging Face weight each kernel of a KerasHub model comes from.

KerasHub loads a `transformers` checkpoint with a converter,
`keras_hub/src/utils/transformers/convert_<arch>.py`, whose
`convert_weights(backbone, loader, transformers_config)` calls
`loader.port_weight(keras_variable, hf_weight_key, hook_fn)` once per
weight. `hub_correspondence` runs that converter against a loader that
records the calls instead of reading a file, so the layer correspondence
is KerasHub's own, never a second hand-written table. The recording loader
has no tensors (`get_tensor` raises), so nothing of the model is assigned;
a converter that needs tensor values to go on (XLM-RoBERTa's) cannot be
recorded, and `hub_correspondence` says so.

A `hook_fn` only transposes, reshapes and slices, so it moves entries
without changing them. Pushing an array of flat indices through it tells
exactly which entry of the Hugging Face weight `W` lands where in the Keras
kernel `K`. Group `K`'s axes into the contracted (input) axes and the
output axes and flatten it to a matrix `(In, Out)`; the map is usable for
LoRA when the row of `W` depends on the output position only and its
column on the input position only (`W` is `(out, in)`, torch's `Linear`),
or the other way round (`W` is `(in, out)`: GPT2's `Conv1D`, and
embeddings). Then `K[i, o] = W[out_index[o], in_index[i]]`, and a LoRA
update of `W` carries over with `in_index` and `out_index` alone (see
`keras_lora.io.hub_peft`). A slice (GPT2's fused `c_attn` feeding
`query`, `key` and `value`) gives each Keras kernel part of `out_index`.
"""

import dataclasses
import math
import sys

import keras
import numpy as np

from keras_lora.model.walk import iter_layers

# Hugging Face's `base_model_prefix`: the attribute of a `...ForCausalLM`
# (or other head model) that holds the base model. Checked against
# `transformers` in the tests; "model" for every other architecture.
BASE_MODEL_PREFIX = {
    "gpt2": "transformer",
    "bert": "bert",
    "distilbert": "distilbert",
    "roberta": "roberta",
    "xlm_roberta": "roberta",
    "albert": "albert",
}


@dataclasses.dataclass(frozen=True)
class KernelMap:
    """Where one Keras kernel sits in one Hugging Face weight.

    Attributes:
        key: the Hugging Face weight key the converter reads, e.g.
            `"model.layers.0.self_attn.q_proj.weight"`.
        kind: `"Linear"` or `"Embedding"`, the PEFT module type.
        in_shape: the Keras kernel's contracted (input) axes, kernel order.
        out_shape: the Keras kernel's output axes, kernel order.
        in_index: for each flattened input position, the Hugging Face input
            feature (column of `W` in torch's `(out, in)` layout).
        out_index: for each flattened output position, the Hugging Face
            output feature.
        in_features, out_features: the Hugging Face module's sizes.
        fan_in_fan_out: whether `W` is stored `(in, out)` (GPT2's `Conv1D`).
    """

    key: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    in_index: np.ndarray = dataclasses.field(repr=False)
    out_index: np.ndarray = dataclasses.field(repr=False)
    in_features: int
    out_features: int
    fan_in_fan_out: bool

    @property
    def covers_inputs(self):
        """Whether every Hugging Face input feature is one Keras input."""
        return len(self.in_index) == self.in_features and np.array_equal(
            np.sort(self.in_index), np.arange(self.in_features)
        )


class HubCorrespondence:
    """KerasHub's layer correspondence for one model (see the module doc).

    Attributes:
        model_type: the converter's architecture name (`"llama3"`, `"gpt2"`).
        base_prefix: Hugging Face's `base_model_prefix` for it.
        for_task: whether module names are those of the head model
            (`LlamaForCausalLM`: `"model.layers.0..."`) rather than of the
            base model (`LlamaModel`: `"layers.0..."`). True for a KerasHub
            `Task`, false for a `Backbone`.
    """

    def __init__(self, model_type, base_prefix, for_task, kernels, full_keys):
        self.model_type = model_type
        self.base_prefix = base_prefix
        self.for_task = for_task
        self._kernels = kernels  # id(variable) -> (variable, KernelMap)
        self._full_keys = full_keys

    def kernel_map(self, layer):
        """The `KernelMap` of a LoRA layer's (or a plain layer's) kernel, or `None`."""
        variable = _kernel_variable(getattr(layer, "layer", layer))
        entry = self._kernels.get(id(variable))
        return None if entry is None or entry[0] is not variable else entry[1]

    def module_names(self, kernel_map):
        """`(head model name, base model name)` of a map's module; the base
        model name is `None` for a weight outside the base model (`lm_head`)."""
        name = kernel_map.key.removesuffix(".weight")
        prefix = self.base_prefix + "."
        if not self._full_keys:
            return prefix + name, name
        return name, name[len(prefix) :] if name.startswith(prefix) else None

    def module(self, kernel_map):
        """The PEFT module path that `save_adapter` writes for a map."""
        head, base = self.module_names(kernel_map)
        return head if self.for_task else base

    def maps(self):
        """All `KernelMap`s, in the converter's order."""
        return [entry[1] for entry in self._kernels.values()]


def hub_correspondence(model):
    """KerasHub's layer correspondence for `model`, or `None`.

    Args:
        model: a KerasHub `Backbone`, a `Task` (`model.backbone`), or a model
            holding exactly one KerasHub backbone; its layers may be LoRA
            layers already (`apply_lora(..., in_place=True)`).

    Returns:
        A `HubCorrespondence`, or `None` when `model` holds no KerasHub
        backbone with a `transformers` converter.

    Raises:
        ValueError: KerasHub has a converter for the backbone, but running
            it to record the correspondence failed.
    """
    if "keras_hub" not in sys.modules:
        return None  # a KerasHub model has imported keras_hub already
    from keras_hub.src.models.backbone import Backbone

    backbone, for_task = _find_backbone(model, Backbone)
    if backbone is None:
        return None
    name, converter = _converter_for(backbone)
    if converter is None:
        return None
    loader = _RecordingLoader()
    try:
        converter.convert_weights(backbone, loader, _transformers_config(backbone))
    except Exception as e:
        raise ValueError(
            f"KerasHub's converter `{converter.__name__}` failed on "
            f"{type(backbone).__name__} '{backbone.name}' while keras_lora "
            f"recorded its layer correspondence: {type(e).__name__}: {e}. "
            "Pass `name_map` to name the modules yourself."
        ) from e
    base_prefix = BASE_MODEL_PREFIX.get(name, "model")
    full_keys = any(k.startswith(base_prefix + ".") for _, k, _ in loader.calls)
    kernels = _kernel_maps(backbone, loader.calls)
    return HubCorrespondence(name, base_prefix, for_task, kernels, full_keys)


def _find_backbone(model, backbone_class):
    if isinstance(model, backbone_class):
        return model, False
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, backbone_class):
        return backbone, True
    found = [lay for _, lay in iter_layers(model) if isinstance(lay, backbone_class)]
    return (found[0], False) if len(found) == 1 else (None, False)


def _converter_for(backbone):
    """`(name, module)` of KerasHub's `transformers` converter for `backbone`."""
    from keras_hub.src.utils.transformers import preset_loader

    converters = [
        (name.removeprefix("convert_"), module)
        for name, module in vars(preset_loader).items()
        if name.startswith("convert_") and hasattr(module, "convert_weights")
    ]
    cls = type(backbone)
    for test in (
        lambda c: c is cls,  # the converter's own class
        lambda c: issubclass(cls, c),  # a subclass of it
        lambda c: issubclass(c, cls),  # a base class (LlamaBackbone, Llama 2)
    ):
        hits = [(n, m) for n, m in converters if test(getattr(m, "backbone_cls", None))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None, None  # ambiguous
    return None, None


def _transformers_config(backbone):
    """The `transformers` config dict the converter reads a few fields of.

    KerasHub's own exporter writes it where it has one for the class
    (`export.hf_exporter.MODEL_CONFIGS`); other converters read none.
    """
    try:
        from keras_hub.src.utils.transformers.export.hf_exporter import MODEL_CONFIGS
    except ImportError:
        MODEL_CONFIGS = {}
    make = MODEL_CONFIGS.get(type(backbone).__name__)
    return dict(make(backbone)) if make is not None else {}


class _RecordingLoader:
    """Stands in for KerasHub's `SafetensorLoader`: records, reads nothing."""

    preset = None
    prefix = None

    def __init__(self):
        self.calls = []

    def get_tensor(self, hf_weight_key):
        raise KeyError(f"keras_lora records the correspondence: {hf_weight_key}")

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        self.calls.append((keras_variable, hf_weight_key, hook_fn))


def _kernel_variable(layer):
    if isinstance(layer, keras.layers.Embedding):
        return getattr(layer, "_embeddings", None)
    if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return getattr(layer, "_kernel", None)
    return None


def _kernel_axes(layer):
    """`(in_axes, out_axes, kind)` of a base layer's kernel, or `None`."""
    if isinstance(layer, keras.layers.Embedding):
        return (0,), (1,), "Embedding"
    if isinstance(layer, keras.layers.Dense):
        return (0,), (1,), "Linear"
    if isinstance(layer, keras.layers.EinsumDense):
        lhs, output = layer.equation.replace(" ", "").split("->")
        x_spec, k_spec = lhs.split(",")
        if any(c in x_spec and c in output for c in k_spec):
            return None  # a batch-like axis: not one matrix
        in_axes = tuple(i for i, c in enumerate(k_spec) if c not in output)
        out_axes = tuple(i for i, c in enumerate(k_spec) if c in output)
        return in_axes, out_axes, "Linear"
    return None


def _kernel_maps(backbone, calls):
    """`{id(variable): (variable, KernelMap)}` for every mappable kernel."""
    sizes = {}
    for variable, key, _ in calls:
        sizes[key] = sizes.get(key, 0) + math.prod(variable.shape)
    kernels, cache = {}, {}
    for _, layer in iter_layers(backbone):
        base = getattr(layer, "layer", layer)
        variable = _kernel_variable(base)
        axes = _kernel_axes(base)
        if variable is None or axes is None:
            continue
        for recorded, key, hook in calls:
            if recorded is not variable:
                continue
            shape = tuple(variable.shape)
            # Converters make the same hook for every block: analyse it once.
            hook_key = _hook_key(hook)
            cache_key = (hook_key, sizes[key], shape, axes)
            if hook_key is None or cache_key not in cache:
                found = _analyse(key, hook, sizes[key], shape, *axes)
                if hook_key is not None:
                    cache[cache_key] = found
            else:
                found = cache[cache_key]
            if found is not None:
                kernels[id(variable)] = (variable, dataclasses.replace(found, key=key))
            break
    return kernels


def _hook_key(hook):
    """What a hook computes, as a dict key: its code, closure and defaults
    (`None` when they are not hashable: then it is analysed each time)."""
    if hook is None:
        return ()
    code = getattr(hook, "__code__", None)
    cells = tuple(c.cell_contents for c in getattr(hook, "__closure__", None) or ())
    key = (code, cells, getattr(hook, "__defaults__", None))
    try:
        hash(key)
    except TypeError:
        return None
    return key if code is not None else None


def _analyse(key, hook, size, shape, in_axes, out_axes, kind):
    """The `KernelMap` of a kernel of `shape` read from `key`, or `None`."""
    n_in = math.prod(shape[a] for a in in_axes)
    if size % n_in:
        return None
    # `(out, in)` first, then `(in, out)`: with the wrong one a hook fails,
    # or mixes input and output positions, so at most one is separable.
    for hf_shape in dict.fromkeys([(size // n_in, n_in), (n_in, size // n_in)]):
        found = _push(key, hook, hf_shape, shape, in_axes, out_axes, kind)
        if found is not None:
            return found
    return None


def _push(key, hook, hf_shape, shape, in_axes, out_axes, kind):
    moved = _moved_index(hook, hf_shape, shape)
    if moved is None:
        return None
    n_in = math.prod(shape[a] for a in in_axes)
    matrix = np.transpose(moved, in_axes + out_axes).reshape(n_in, -1)
    along_in, along_out = matrix[:, 0], matrix[0, :]
    # Separable: the flat index is (a part from the input) + (one from the
    # output); then the first column and row say which part is which.
    if not np.array_equal(matrix, along_in[:, None] + (along_out - along_out[0])):
        return None
    rows_in, cols_in = np.unravel_index(along_in, hf_shape)
    rows_out, cols_out = np.unravel_index(along_out, hf_shape)
    for fan_in_fan_out, in_index, out_index, fixed in (
        (False, cols_in, rows_out, (rows_in, cols_out)),
        (True, rows_in, cols_out, (cols_in, rows_out)),
    ):
        if any((f != f[0]).any() for f in fixed):
            continue
        if any(len(np.unique(x)) != len(x) for x in (in_index, out_index)):
            continue
        in_features, out_features = hf_shape if fan_in_fan_out else hf_shape[::-1]
        return KernelMap(
            key=key,
            kind=kind,
            in_shape=tuple(shape[a] for a in in_axes),
            out_shape=tuple(shape[a] for a in out_axes),
            in_index=in_index,
            out_index=out_index,
            in_features=in_features,
            out_features=out_features,
            fan_in_fan_out=fan_in_fan_out,
        )
    return None


def _moved_index(hook, hf_shape, shape):
    """For each entry of the kernel, the flat index of the entry of `W` that
    `hook` puts there; `None` unless `hook` only moves entries.

    A random probe pushed through the same way must land where the index
    says, so a hook that computes rather than moves is caught.
    """
    hook = hook or (lambda tensor, _: tensor)
    size = math.prod(hf_shape)
    index = np.arange(size, dtype=np.int64).reshape(hf_shape)
    probe = np.random.default_rng(0).random(hf_shape, dtype=np.float32)
    try:
        moved = np.asarray(hook(index, list(shape)))
        if not np.issubdtype(moved.dtype, np.integer):  # the hook casts
            moved = _moved_by_digits(hook, index, shape)
        values = np.asarray(hook(probe, list(shape)))
    except Exception:
        return None  # the hook does not fit this shape
    if moved is None or moved.shape != shape or values.shape != shape:
        return None
    if (moved < 0).any() or (moved >= size).any():
        return None
    expected = probe.reshape(-1)[moved].astype(values.dtype)
    return moved if np.array_equal(values, expected) else None


def _moved_by_digits(hook, index, shape):
    """`hook`'s move of `index`, pushed through in base-256 digits, each
    exact in any float type."""
    moved = np.zeros(shape, np.int64)
    for k in range(max(1, math.ceil(math.log(index.size, 256)))):
        digit = np.asarray(
            hook(((index >> (8 * k)) & 255).astype(np.uint8), list(shape))
        )
        if digit.shape != tuple(shape):
            return None
        moved += np.rint(digit).astype(np.int64) << (8 * k)
    return moved
