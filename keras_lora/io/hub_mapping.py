"""Which Hugging Face weight each kernel of a KerasHub model comes from.

KerasHub loads a `transformers` checkpoint with a converter,
`keras_hub/src/utils/transformers/convert_<arch>.py`, whose
`convert_weights(backbone, loader, transformers_config)` calls
`loader.port_weight(keras_variable, hf_weight_key, hook_fn)` once per
weight. `hub_correspondence` runs that converter against a loader that
records the calls instead of reading a file, so the layer correspondence
is KerasHub's own, never a second hand-written table. The recording loader
has no tensors, so nothing of the model is assigned; `get_tensor` raises
but for MoE experts, whose index tensors `keras_lora.io.peft_moe` serves. A
converter that needs tensor values to go on (XLM-RoBERTa's) cannot be
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

The converter reads checkpoint keys, which are not always the module names
of the installed `transformers` (version 5 loads ViT's
`vit.encoder.layer.0.attention.attention.query` into
`vit.layers.0.attention.q_proj`). A key becomes a module name the way
`transformers` renames it when it loads a checkpoint into the class
(`keras_lora.io.hf_classes`); which class is `hf_class`
(`hf_classes.default_hf_class`). The
`transformers` model type of a converter is read from KerasHub's own choice
of converter (`_model_types`). Which kernels a layer has, and how they
factor, the layer's LoRA type says (`LoRALayer.kernel_variable`,
`kernel_axes`, `peft_kind`).
"""

import ast
import dataclasses
import functools
import inspect
import math
import sys
import textwrap

import keras
import numpy as np

from keras_lora.io import hf_classes, peft_moe
from keras_lora.layers import lora_class_for
from keras_lora.model.walk import iter_layers


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
        hf_model_type: the `transformers` model type (`"llama"`).
        hf_class: the `transformers` class whose module names `save_adapter`
            writes (`"LlamaForCausalLM"`).
        base_prefix: that class's `base_model_prefix` (`"model"`).
    """

    def __init__(
        self,
        model_type,
        hf_model_type,
        hf_class,
        base_prefix,
        kernels,
        names,
        ports=(),
        params=None,
        ndims=None,
    ):
        self.model_type = model_type
        self.hf_model_type = hf_model_type
        self.hf_class = hf_class
        self.base_prefix = base_prefix
        self._kernels = kernels  # id(variable) -> (variable, KernelMap)
        self._names = names  # weight key -> {class name: module name or None}
        # Every `port_weight` call: (variable, weight key, hook).
        self._ports = list(ports)
        # {class name: rename(weight key) -> parameter name or None}
        self._params = params or {}
        # {class name: {parameter name: its number of axes}}
        self._ndims = ndims or {}
        self._by_param = None  # parameter name -> weight keys, when asked

    def kernel_map(self, layer):
        """The `KernelMap` of a LoRA layer's (or a plain layer's) kernel, or `None`."""
        variable = _kernel_variable(getattr(layer, "layer", layer))
        entry = self._kernels.get(id(variable))
        return None if entry is None or entry[0] is not variable else entry[1]

    def module_names(self, kernel_map):
        """The names of a map's module in each `transformers` class this
        correspondence knows (`hf_class` first), without repeats or `None`."""
        names = self._names.get(kernel_map.key, {}).values()
        return tuple(dict.fromkeys(n for n in names if n is not None))

    def module(self, kernel_map):
        """The PEFT module path that `save_adapter` writes for a map: its
        name in `hf_class`, or `None` where that class has no such module."""
        return self._names.get(kernel_map.key, {}).get(self.hf_class)

    def maps(self):
        """All `KernelMap`s, in the converter's order."""
        return [entry[1] for entry in self._kernels.values()]

    def ports(self, variable=None, key=None):
        """The converter's `(variable, weight key, hook)` calls, all or
        those of one Keras variable or one weight key."""
        return [
            port
            for port in self._ports
            if (variable is None or port[0] is variable)
            and (key is None or port[1] == key)
        ]

    def param_name(self, key, cls_name=None):
        """The parameter name of weight `key` in `cls_name` (default:
        `hf_class`), or `None` where that class has no such parameter."""
        rename = self._params.get(cls_name or self.hf_class)
        return None if rename is None else rename(key)

    def keys_for_param(self, param):
        """The weight keys that are parameter `param` in any class this
        correspondence knows (`hf_class` first)."""
        if self._by_param is None:
            self._by_param = {}
            for key in dict.fromkeys(port[1] for port in self._ports):
                for rename in self._params.values():
                    name = rename(key)
                    if name is not None:
                        keys = self._by_param.setdefault(name, [])
                        if key not in keys:
                            keys.append(key)
        return list(self._by_param.get(param, []))

    def hf_weight(self, key):
        """The Hugging Face weight `key` as a NumPy array, put together from
        the Keras variables the converter fills from it (their current
        values), by inverting the converter's hooks; `None` where a hook
        does more than move entries or the variables do not cover it."""
        ports = self.ports(key=key)
        values = [
            (np.asarray(keras.ops.convert_to_numpy(v)), hook) for v, _, hook in ports
        ]
        size = sum(value.size for value, _ in values)
        param = self.param_name(key)
        ndim = self._ndims.get(self.hf_class, {}).get(param)
        for shape in self._hf_shapes(ports, size, ndim):
            weight = np.zeros(size, values[0][0].dtype)
            filled = np.zeros(size, bool)
            for (value, hook), (variable, _, _) in zip(values, ports, strict=True):
                moved = _moved_index(hook, shape, tuple(variable.shape))
                if moved is None or filled[moved.reshape(-1)].any():
                    break
                weight[moved.reshape(-1)] = value.reshape(-1)
                filled[moved.reshape(-1)] = True
            else:
                if filled.all():
                    return weight.reshape(shape)
        return None

    def _hf_shapes(self, ports, size, ndim):
        """The shapes weight of `ports` may have in the checkpoint: the
        kernel map's, the variable's (or reversed), or flat; of `ndim` axes
        (the class's parameter's), where known."""
        shapes = []
        for variable, _, _ in ports:
            kernel = self._kernels.get(id(variable))
            if kernel is not None and kernel[0] is variable:
                m = kernel[1]
                shapes.append(
                    (m.in_features, m.out_features)
                    if m.fan_in_fan_out
                    else (m.out_features, m.in_features)
                )
        if len(ports) == 1:
            shape = tuple(ports[0][0].shape)
            shapes += [shape, shape[::-1]]
        shapes.append((size,))
        return list(
            dict.fromkeys(
                s
                for s in shapes
                if math.prod(s) == size and (ndim is None or len(s) == ndim)
            )
        )


def hub_correspondence(model, hf_class=None, also=()):
    """KerasHub's layer correspondence for `model`, or `None`.

    The module names are those of the installed `transformers`: each weight
    key KerasHub's converter reads is renamed as `transformers` renames a
    checkpoint's keys when it loads them into the class (its weight
    conversion mapping and `base_model_prefix`, on the model built on the
    meta device, so that no weights are made), and kept where that class
    has the module.

    Args:
        model: a KerasHub `Backbone`, a `Task` (`model.backbone`), or a model
            holding exactly one KerasHub backbone; its layers may be LoRA
            layers already (`apply_lora(..., in_place=True)`).
        hf_class: the name of the `transformers` class to name modules for,
            or `None` for the default (`default_hf_class`).
        also: names of further `transformers` classes whose module names
            `module_names` gives too (reading a file saved from another).

    Returns:
        A `HubCorrespondence`, or `None` when `model` holds no KerasHub
        backbone with a `transformers` converter.

    Raises:
        ValueError: KerasHub has a converter for the backbone, but running
            it to record the correspondence failed; `transformers` (or
            `torch`) is not installed; or `hf_class` is not a class of the
            architecture.
    """
    if "keras_hub" not in sys.modules:
        return None  # a KerasHub model has imported keras_hub already
    from keras_hub.src.models.backbone import Backbone

    backbone, task = _find_backbone(model, Backbone)
    if backbone is None:
        return None
    name, converter = _converter_for(backbone)
    if converter is None:
        return None
    hf_config = _transformers_config(backbone)
    hf_model_type = hf_config.get("model_type") or _model_types().get(name, [None])[0]
    classes = hf_classes.hf_classes(hf_model_type, name)
    default = hf_classes.default_hf_class(hf_model_type, backbone, task)
    if hf_class is None:
        hf_class = default
    elif hf_class not in classes:
        raise ValueError(
            f"`hf_class` must be a `transformers` class of the "
            f"'{hf_model_type}' architecture, one of {classes}. "
            f"Received: hf_class={hf_class!r}"
        )
    # MoE experts are read with `get_tensor`: served index tensors (peft_moe).
    recording = peft_moe.ExpertsRecording(backbone, converter, hf_model_type, hf_class)
    loader = _RecordingLoader(recording.tensor)
    try:
        with recording:
            converter.convert_weights(backbone, loader, hf_config)
    except Exception as e:
        raise ValueError(
            f"KerasHub's converter `{converter.__name__}` failed on "
            f"{type(backbone).__name__} '{backbone.name}' while keras_lora "
            f"recorded its layer correspondence: {type(e).__name__}: {e}. "
            "Pass `name_map` to name the modules yourself."
        ) from e
    if task is not None and hasattr(converter, "convert_head"):
        _record_head(converter, task, loader, hf_config)
    wanted = [hf_class, default, classes[0], *(c for c in also if c in classes)]
    kernels = _kernel_maps(backbone if task is None else task, loader.calls)
    keys = [m.key for m in (entry[1] for entry in kernels.values())]
    num_layers = getattr(backbone, "num_layers", None)
    names = {key: {} for key in keys}
    params, ndims = {}, {}
    for cls_name in dict.fromkeys(wanted):
        renamed = hf_classes.module_names(hf_model_type, cls_name, num_layers)
        for key in keys:
            names[key][cls_name] = renamed(key)
        params[cls_name] = hf_classes.param_names(hf_model_type, cls_name, num_layers)
        ndims[cls_name] = hf_classes.param_ndims(hf_model_type, cls_name, num_layers)
    base_prefix = hf_classes.hf_class(hf_class).base_model_prefix
    hub = HubCorrespondence(
        name,
        hf_model_type,
        hf_class,
        base_prefix,
        kernels,
        names,
        ports=loader.calls,
        params=params,
        ndims=ndims,
    )
    hub.experts = recording.maps  # id(variable) -> peft_moe.ExpertsMap
    return hub


def _record_head(converter, task, loader, hf_config):
    """Records the converter's task head (a classifier's) where it fits
    `task`; a head it cannot port is left without a counterpart."""
    recorded = len(loader.calls)
    try:
        converter.convert_head(task, loader, hf_config)
    except Exception:
        del loader.calls[recorded:]


@functools.cache
def _model_types():
    """`{converter name: [transformers model types]}`, read from KerasHub's
    own choice of converter (`TransformersPresetLoader.__init__`)."""
    from keras_hub.src.utils.transformers import preset_loader

    source = inspect.getsource(preset_loader.TransformersPresetLoader.__init__)
    found = {}
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            continue
        (op,), (operand,) = node.test.ops, node.test.comparators
        if isinstance(op, ast.Eq):
            operands = [operand]
        elif isinstance(op, ast.In) and isinstance(operand, (ast.Tuple, ast.List)):
            operands = operand.elts
        else:
            continue
        types = [o.value for o in operands if isinstance(o, ast.Constant)]
        for stmt in node.body:
            value = getattr(stmt, "value", None)
            if isinstance(value, ast.Name) and value.id.startswith("convert_"):
                found.setdefault(value.id.removeprefix("convert_"), []).extend(types)
    return found


def _find_backbone(model, backbone_class):
    """`(backbone, task)`: the KerasHub backbone, and the task holding it
    (`None` for a bare backbone or another model holding one)."""
    if isinstance(model, backbone_class):
        return model, None
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, backbone_class):
        return backbone, model
    found = [lay for _, lay in iter_layers(model) if isinstance(lay, backbone_class)]
    return (found[0], None) if len(found) == 1 else (None, None)


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

    def __init__(self, get_tensor):
        self.calls = []
        self.get_tensor = get_tensor

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        self.calls.append((keras_variable, hf_weight_key, hook_fn))


def _kernel_variable(layer):
    """A base layer's kernel variable, as its LoRA layer type says, or `None`."""
    cls = lora_class_for(layer)
    return None if cls is None else cls.kernel_variable(layer)


def _kernel_axes(layer):
    """`(in_axes, out_axes, kind)` of a base layer's kernel, as its LoRA
    layer type says, or `None` (no PEFT Linear/Embedding, or no matrix)."""
    cls = lora_class_for(layer)
    kind = None if cls is None else cls.peft_kind(layer)
    if kind not in ("Linear", "Embedding"):
        return None  # the converters port Linear and Embedding weights
    axes = cls.kernel_axes(layer)
    return None if axes is None else (*axes, kind)


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
