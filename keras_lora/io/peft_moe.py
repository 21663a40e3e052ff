"""PEFT's `target_parameters` LoRA (`ParamWrapper`) on KerasHub MoE experts.

`transformers` 5 keeps a block's experts as fused 3-D parameters of one
module (Mixtral's and Qwen3-MoE's `mlp.experts.gate_up_proj` `(E, 2·I, H)`
and `down_proj` `(E, H, I)`), and PEFT adapts such a parameter with one
`lora_A.weight` `(r·E, in)` and one `lora_B.weight` `(out, r·E)`: expert
`e`'s update is `scaling·B_e·A_e` with `A_e = lora_A[e·r:(e+1)·r]` and
`B_e = lora_B[:, e::E]` (`ParamWrapper.get_delta_weight`), `in` and `out`
being the parameter's last two axes, swapped unless the module says
`is_transposed` (GPT-OSS's `(E, in, out)`). Several parameters of one module
nest: the first one PEFT wraps (the module's registration order) is the
innermost, its tensors under `<module>.base_layer.` once per outer wrapper.

Which Keras expert kernel entry comes from which entry of which parameter
is KerasHub's converter's and `transformers`' to say, not a table here:
`ExpertsRecording` runs the converter (as `hub_mapping` does) against a
loader whose `get_tensor` returns index arrays: each fused parameter of the
`transformers` model (built on the meta device, at the config that
`convert_backbone_config` maps back to this backbone's) filled with its
entries' global indices and split into checkpoint tensors by `transformers`'
own `revert_weight_conversion`. The converter stacks and transposes them,
and what it assigns to an experts kernel (intercepted: nothing of the model
is written) says where every entry came from. The map is usable when the
expert, input and output positions of the kernel each fix their own axis of
the parameter (`ExpertsMap`).

A fused parameter fed by two Keras kernels (Mixtral's gate and up) is
written with the kernels' `A` stacked (rank: the sum of theirs) and a
block-diagonal `B` into which each kernel's scale is folded, as
`hub_peft` does for GPT2's `c_attn`; read back, each kernel gets the whole
`A` and its rows of `B`. Both ways the update is the same.
"""

import collections
import dataclasses
import math

import numpy as np

from keras_lora.layers.moe_experts import FAMILIES, MoeExperts, _family_name
from keras_lora.layers.variants import scale_for
from keras_lora.model.walk import iter_layers

WRAPPED = ".base_layer"
_SENTINEL = 987_654_321


@dataclasses.dataclass(frozen=True)
class ExpertsMap:
    """Where one Keras experts kernel `(E, in, out)` sits in a fused parameter.

    `K[e, i, o]` is expert `expert_index[e]`'s entry at input `in_index[i]`
    and output `out_index[o]` of `param` (PEFT's in/out features).
    """

    param: str
    order: tuple  # the module's parameter names, in registration order
    expert_index: np.ndarray = dataclasses.field(repr=False)
    in_index: np.ndarray = dataclasses.field(repr=False)
    out_index: np.ndarray = dataclasses.field(repr=False)
    num_experts: int
    in_features: int
    out_features: int

    @property
    def module(self):
        return self.param.rpartition(".")[0]


def experts_roles(layer):
    """`{role: variable}` of an experts layer (plain or LoRA), in the order
    of its factors: a LoRA layer's adapted weights, else all the family's."""
    base = getattr(layer, "layer", layer)
    attrs = FAMILIES[_family_name(type(base))][0]
    roles = getattr(layer, "expert_weights", None) or list(attrs)
    return {role: getattr(base, attrs[role]) for role in roles}


def is_experts(layer):
    return isinstance(getattr(layer, "layer", layer), MoeExperts)


class ExpertsRecording:
    """Runs around a converter: serves index tensors, records the experts'
    assignments as `ExpertsMap`s (`maps`: `{id(variable): map}`)."""

    def __init__(self, backbone, converter, hf_model_type, hf_class):
        self.backbone, self.converter = backbone, converter
        self.hf_model_type, self.hf_class = hf_model_type, hf_class
        self.maps, self._cache = {}, collections.OrderedDict()
        self._roles, self._model = {}, None
        for _, layer in iter_layers(backbone):
            if is_experts(layer):
                base = getattr(layer, "layer", layer)
                for variable in experts_roles(base).values():
                    self._roles[id(variable)] = variable

    def __enter__(self):
        self._patched = []
        if self._roles:  # nothing of the model is assigned while recording
            for variable in {id(v): v for v in self.backbone.weights}.values():
                object.__setattr__(variable, "assign", self._recorder(variable))
                self._patched.append(variable)
        return self

    def __exit__(self, *exc):
        for variable in self._patched:
            object.__delattr__(variable, "assign")
        self._patched = []
        self._cache.clear()

    def _recorder(self, variable):
        def assign(value):
            if id(variable) in self._roles:
                found = self._analyse(np.asarray(value), tuple(variable.shape))
                if found is not None:
                    self.maps[id(variable)] = found

        return assign

    # ----- the transformers side --------------------------------------------

    def _build(self):
        import torch
        import transformers
        from transformers.core_model_loading import revert_weight_conversion

        config = _hf_config(self.converter, self.backbone, self.hf_model_type)
        with torch.device("meta"):
            model = getattr(transformers, self.hf_class)._from_config(config)
        params, keys, start = {}, {}, 0
        for name, param in model.state_dict().items():
            if param.ndim != 3:
                continue
            params[name] = (start, tuple(param.shape))
            start += param.numel()
            try:
                for key in revert_weight_conversion(model, {name: param}):
                    keys[key] = name
            except Exception:
                continue
        self._model = (model, params, keys, revert_weight_conversion)

    def tensor(self, key):
        """The loader's `get_tensor`: checkpoint tensor `key` of the fused
        parameters, filled with the global indices of their entries."""
        if not getattr(self, "_patched", None):  # not while assignments write
            raise KeyError(f"keras_lora records the correspondence: {key}")
        if self._model is None:
            self._build()
        model, params, keys, revert = self._model
        name = keys.get(key)
        if name is None:
            raise KeyError(
                f"{key}: no fused 3-D parameter of `transformers`' "
                f"{self.hf_class} is saved under this key"
            )
        if name not in self._cache:
            import torch

            start, shape = params[name]
            index = torch.arange(start, start + math.prod(shape), dtype=torch.int64)
            split = revert(model, {name: index.reshape(shape)})
            self._cache[name] = {k: v.numpy() for k, v in split.items()}
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[name][key]

    def _analyse(self, moved, shape):
        """The `ExpertsMap` of a kernel of `shape` assigned `moved`, or `None`.

        Read off the first row along each axis, then checked entry by entry,
        one expert at a time (the arrays are a block's expert weights)."""
        if self._model is None or moved.shape != shape or len(shape) != 3:
            return None
        if not np.issubdtype(moved.dtype, np.integer):
            return None  # the converter computed, not moved (dequantized)
        model, params, _, _ = self._model
        name = next(
            (
                n
                for n, (s, p) in params.items()
                if s <= moved[0, 0, 0] < s + math.prod(p)
            ),
            None,
        )
        if name is None:
            return None
        start, param_shape = params[name]
        module = model.get_submodule(name.rpartition(".")[0])
        # PEFT's rule (`ParamWrapper.update_layer`): `(E, out, in)` unless
        # the module says `is_transposed`.
        transposed = bool(getattr(module, "is_transposed", False))
        in_axis, out_axis = (1, 2) if transposed else (2, 1)
        strides = (param_shape[1] * param_shape[2], param_shape[2], 1)
        lines = (moved[:, 0, 0], moved[0, :, 0], moved[0, 0, :])
        size = math.prod(param_shape)
        if any(((line < start) | (line >= start + size)).any() for line in lines):
            return None
        coords = [np.unravel_index(line - start, param_shape) for line in lines]
        # Along each kernel axis only its own axis of the parameter may move.
        for axis, coord in zip((0, in_axis, out_axis), coords, strict=True):
            if any((c != c[0]).any() for k, c in enumerate(coord) if k != axis):
                return None
        expert_index = coords[0][0]
        in_index, out_index = coords[1][in_axis], coords[2][out_axis]
        sizes = (param_shape[in_axis], param_shape[out_axis])
        in_stride, out_stride = strides[in_axis], strides[out_axis]
        grid = in_index[:, None] * in_stride + out_index[None, :] * out_stride
        for e in range(shape[0]):  # every entry where the three indices say
            if not np.array_equal(
                moved[e], start + expert_index[e] * strides[0] + grid
            ):
                return None
        return ExpertsMap(
            param=name,
            order=tuple(n for n, _ in module.named_parameters(recurse=False)),
            expert_index=expert_index,
            in_index=in_index,
            out_index=out_index,
            num_experts=param_shape[0],
            in_features=sizes[0],
            out_features=sizes[1],
        )


def _hf_config(converter, backbone, hf_model_type):
    """The `transformers` config of `backbone`: each integer field that
    KerasHub's `convert_backbone_config` copies into a backbone argument
    (found by changing one field at a time) set to the backbone's value.
    A field the converter reads but the default config lacks (Qwen3-MoE's
    `head_dim`, `num_experts`, an alias) is added first."""
    import transformers

    config = transformers.AutoConfig.for_model(hf_model_type)
    fields = config.to_dict()
    for alias, real in getattr(config, "attribute_map", {}).items():
        if real in fields:
            fields.setdefault(alias, fields[real])
    ours = type(backbone).get_config(backbone)  # the class's: LoRA in place
    for _ in range(64):  # fields the converter needs but the default lacks
        try:
            converter.convert_backbone_config(dict(fields))
            break
        except KeyError as e:
            if not e.args or e.args[0] in fields:
                break
            fields[e.args[0]] = 1
    overrides = {}
    for key, value in fields.items():
        if type(value) is not int:
            continue
        try:
            converted = converter.convert_backbone_config({**fields, key: _SENTINEL})
        except Exception:
            continue
        for arg, got in converted.items():
            if got == _SENTINEL and type(ours.get(arg)) is int:
                overrides[key] = ours[arg]
    return transformers.AutoConfig.for_model(hf_model_type, **overrides)


# ----- keras_lora -> PEFT ---------------------------------------------------


def to_peft(hub, records, function):
    """`(tensors, params)` of the experts `records`: PEFT's tensors by key
    (without `base_model.model.`), and `ModuleRank`-like `(name, rank,
    alpha)` triples of the parameters written."""
    groups, unmapped = {}, []
    for record in records:
        if record.dropout:
            raise ValueError(
                f"{function}: layer '{record.path}' has dropout "
                f"{record.dropout}; PEFT's LoRA on expert parameters "
                "(`ParamWrapper`) refuses lora_dropout != 0. Save it in the "
                "'keras_lora' format."
            )
        layer, a, b = record.layer, record.a, record.b
        rows = cols = 0
        for role, variable in experts_roles(layer).items():
            size_in, size_out = variable.shape[1], variable.shape[2]
            part = (a[:, rows : rows + size_in], b[:, :, cols : cols + size_out])
            rows, cols = rows + size_in, cols + size_out
            found = hub.experts.get(id(variable))
            if found is None:
                unmapped.append(f"{record.path} ({role})")
                continue
            if not np.array_equal(
                np.sort(found.in_index), np.arange(found.in_features)
            ):
                raise ValueError(
                    f"{function}: layer '{record.path}' weight {role!r} reads "
                    f"part of the inputs of parameter {found.param!r}; PEFT's "
                    "A spans them all."
                )
            groups.setdefault(found.param, []).append((record, found, *part))
    if unmapped:
        raise ValueError(
            f"{function}: these expert weights have no counterpart in KerasHub's "
            f"`transformers` converter for '{hub.model_type}': {unmapped}."
        )
    tensors, params = {}, []
    for name, group in groups.items():
        lora_a, lora_b, rank, alpha = _param(group)
        params.append((name, rank, alpha))
        tensors[name] = (lora_a, lora_b)
    return _nested(tensors, groups), params


def _param(group):
    experts = group[0][1].num_experts
    ranks = [record.rank for record, *_ in group]
    rank, fold = sum(ranks), len(group) > 1
    a = np.zeros((experts, rank, group[0][1].in_features), np.float32)
    b = np.zeros((experts, group[0][1].out_features, rank), np.float32)
    start = 0
    for (record, found, part_a, part_b), r in zip(group, ranks, strict=True):
        block = np.arange(start, start + r)
        factor = scale_for(r, record.alpha, record.use_rslora) if fold else 1.0
        e = found.expert_index[:, None, None]
        a[e, block[None, :, None], found.in_index[None, None, :]] = np.transpose(
            part_a, (0, 2, 1)
        )
        b[e, found.out_index[None, :, None], block[None, None, :]] = (
            np.transpose(part_b, (1, 2, 0)) * factor
        )
        start += r
    if fold:  # the scales are in B: the parameter's own scale is 1
        alpha = math.sqrt(rank) if group[0][0].use_rslora else float(rank)
    else:
        alpha = float(group[0][0].alpha)
    lora_a = a.reshape(experts * rank, -1)  # row e·r + k
    lora_b = np.transpose(b, (1, 2, 0)).reshape(b.shape[1], -1)  # column k·E + e
    return lora_a, lora_b, rank, alpha


def _nested(tensors, groups):
    """`{key: array}`: each parameter's tensors under its module, one
    `base_layer.` per parameter PEFT wraps after it (PEFT's nesting)."""
    out = {}
    for name, (lora_a, lora_b) in tensors.items():
        found = groups[name][0][1]
        module, _, own = name.rpartition(".")
        wrapped = [p for p in found.order if f"{module}.{p}" in tensors]
        prefix = module + WRAPPED * (len(wrapped) - 1 - wrapped.index(own))
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return out


# ----- PEFT -> keras_lora ---------------------------------------------------


def _targeted(name, target_parameters):
    """PEFT's match of a parameter path against `target_parameters`."""
    return any(name == t or name.endswith(f".{t}") for t in target_parameters)


def split_pairs(hub, pairs, target_parameters):
    """`(params, rest, unknown)`: `{parameter path: {tensor name: array}}`
    of the `ParamWrapper` tensors in `pairs` (`{module: {tensor name:
    array}}`, parameter paths in `hub.hf_class`'s names), the other pairs,
    and the nested (`.base_layer`) modules that match no experts layer."""
    if not target_parameters:
        return {}, pairs, []
    # A file saved from the base model class names modules without its
    # `base_model_prefix` ("layers.0.mlp.experts").
    orders = {}
    for m in hub.experts.values():
        orders[m.module] = (m.module, m.order)
        orders.setdefault(
            m.module.removeprefix(f"{hub.base_prefix}."), orders[m.module]
        )
    params, rest, unknown = {}, {}, []
    for module, pair in pairs.items():
        owner, depth = module, 0
        while owner.endswith(WRAPPED):
            owner, depth = owner[: -len(WRAPPED)], depth + 1
        name, order = orders.get(owner, (None, ()))
        wrapped = [p for p in order if _targeted(f"{owner}.{p}", target_parameters)]
        if depth < len(wrapped):
            params[f"{name}.{wrapped[len(wrapped) - 1 - depth]}"] = pair
        elif depth:  # a ParamWrapper's tensors, on no experts layer here
            unknown.append(module)
        else:
            rest[module] = pair
    return params, rest, unknown


def from_peft(hub, params, layers, use_rslora, function="load_adapter"):
    """`(adapters, unmapped)`: `(key, path, a, b, alpha)` of each Keras
    experts layer the parameters in `params` (`{path: (lora_A, lora_B,
    rank, alpha)}`) adapt, in its packed layout, and the parameters with
    no Keras counterpart."""
    used, adapters = set(), []
    for path, layer in layers:
        if not is_experts(layer):
            continue
        roles = experts_roles(layer)
        parts, covered, key = {}, {}, None
        for role, variable in roles.items():
            found = hub.experts.get(id(variable))
            if found is None or found.param not in params:
                continue
            used.add(found.param)
            key = key or found.module
            parts[role] = _unpack(found, *params[found.param], function)
            covered.setdefault(found.param, [found.out_features]).append(
                found.out_index
            )
        if not parts:
            continue
        for name, (size, *indices) in covered.items():
            left = np.setdiff1d(np.arange(size), np.concatenate(indices))
            if np.any(params[name][1][left]):  # a non-zero update would be lost
                raise ValueError(
                    f"{function}: parameter {name!r} updates outputs that layer "
                    f"'{path}' has no adapted weight for (its expert_weights: "
                    f"{list(roles)}); apply LoRA to all its weights."
                )
        a, b, alpha = _pack(roles, parts, use_rslora)
        adapters.append((key, path, a, b, alpha))
    unmapped = sorted(set(params) - used)
    return adapters, unmapped


def _unpack(found, lora_a, lora_b, rank, alpha, function):
    experts = found.num_experts
    want = ((rank * experts, found.in_features), (found.out_features, rank * experts))
    if (lora_a.shape, lora_b.shape) != want:
        raise ValueError(
            f"{function}: PEFT parameter {found.param!r} has lora_A "
            f"{lora_a.shape} and lora_B {lora_b.shape}; its Keras kernel at "
            f"rank {rank} needs {want[0]} and {want[1]}."
        )
    a = lora_a.reshape(experts, rank, -1)[found.expert_index]  # (E, r, in)
    b = np.transpose(lora_b.reshape(lora_b.shape[0], rank, experts), (2, 0, 1))
    b = b[found.expert_index]  # (E, out, r)
    a = np.transpose(a[:, :, found.in_index], (0, 2, 1))  # (E, in, r)
    b = np.transpose(b[:, found.out_index, :], (2, 0, 1))  # (r, E, out)
    return a, b, rank, alpha


def _pack(roles, parts, use_rslora):
    """`(lora_a, lora_b, alpha)` of a layer: its roles' factors side by side
    (zeros for a role the file leaves out), at the largest rank; scales
    folded into `B` where the roles' differ."""
    settings = {(r, alpha) for _, _, r, alpha in parts.values()}
    rank = max(r for r, _ in settings)
    fold = len(settings) > 1
    experts = next(iter(roles.values())).shape[0]
    size_in = sum(v.shape[1] for v in roles.values())
    size_out = sum(v.shape[2] for v in roles.values())
    a = np.zeros((experts, size_in, rank), np.float32)
    b = np.zeros((rank, experts, size_out), np.float32)
    rows = cols = 0
    for role, variable in roles.items():
        if role in parts:
            part_a, part_b, r, alpha = parts[role]
            factor = scale_for(r, alpha, use_rslora) if fold else 1.0
            a[:, rows : rows + variable.shape[1], :r] = part_a
            b[:r, :, cols : cols + variable.shape[2]] = part_b * factor
        rows, cols = rows + variable.shape[1], cols + variable.shape[2]
    if fold:
        alpha = math.sqrt(rank) if use_rslora else float(rank)
    else:
        ((_, alpha),) = settings
    return a, b, alpha
