"""LoRA factors between keras_lora's layout and PEFT's, through a `KernelMap`.

PEFT updates a weight `W` of `(out, in)` features by `scale·B@A`, with `A`
of shape `(r, in)` and `B` of `(out, r)`. keras_lora updates a kernel whose
contracted axes are `I` and output axes `O` by `scale·a@b`, with `a` of
shape `I + (r,)` and `b` of `(r,) + O` (the `"standard"` factoring; for
`Dense` and `Embedding` the only one). With `K[i, o] = W[out_index[o],
in_index[i]]` (see `keras_lora.io.hub_mapping`), flattening `a` to
`(In, r)` and `b` to `(r, Out)`:

    a = A.T[in_index]        b = B[out_index].T
    A[:, in_index] = a.T     B[out_index] = b.T

A PEFT module that feeds several Keras kernels (GPT2's `c_attn`: `query`,
`key`, `value`) is written with the kernels' `a` stacked (rank: the sum of
their ranks) and a block-diagonal `B` into which each kernel's scale is
folded, the module's own scale being 1 through `rank_pattern` and
`alpha_pattern`. Read back, every kernel gets the whole `A` and its slice of
`B`. Both ways the merged update is the same.
"""

import dataclasses
import math
import re

import numpy as np

from keras_lora.io.records import make_record
from keras_lora.io.report import report
from keras_lora.layers import lora_class_for
from keras_lora.layers.variants import scale_for


@dataclasses.dataclass
class PeftModule:
    """One PEFT module's adapter: `a` `(r, in)`, `b` `(out, r)`, PEFT layout."""

    name: str
    kind: str
    a: np.ndarray
    b: np.ndarray
    alpha: float

    @property
    def rank(self):
        return int(self.a.shape[0])


def to_peft(correspondence, records, function="save_adapter(format='peft')"):
    """The PEFT modules of `records` (one per LoRA layer), by KerasHub's map.

    Args:
        correspondence: a `HubCorrespondence` of the model.
        records: objects with `path`, `layer` (the LoRA layer), `a`, `b`
            (Keras layout), `alpha`, `use_rslora` and `use_dora`.
        function: the caller, for messages.

    Returns:
        `(modules, fan_in_fan_out)`: a list of `PeftModule`s, and whether
        every module's weight is stored `(in, out)` (GPT2's `Conv1D`).

    Raises:
        ValueError: a layer has no counterpart (the message lists them and
            suggests `name_map`), or an adapter PEFT cannot hold exactly.
    """
    groups, unmapped = {}, []
    for record in records:
        kernel_map = correspondence.kernel_map(record.layer)
        module = None if kernel_map is None else correspondence.module(kernel_map)
        if module is None:
            unmapped.append(record.path)
            continue
        _check_record(record, kernel_map, function)
        groups.setdefault(module, []).append((record, kernel_map))
    if unmapped:
        raise ValueError(
            f"{function}: these LoRA layers have no counterpart in KerasHub's "
            f"`transformers` converter for '{correspondence.model_type}': "
            f"{unmapped}. Pass `name_map` to name their PEFT modules."
        )
    if len({r.use_rslora for r in records}) > 1:
        raise ValueError(
            f"{function}: PEFT has one `use_rslora` for all modules, but these "
            "LoRA layers mix the two scale rules."
        )
    modules = [_module(name, group) for name, group in groups.items()]
    maps = [m for group in groups.values() for _, m in group]
    return modules, all(m.fan_in_fan_out for m in maps)


def _check_record(record, kernel_map, function):
    rank = int(record.a.shape[-1])
    expected = (kernel_map.in_shape + (rank,), (rank,) + kernel_map.out_shape)
    if (tuple(record.a.shape), tuple(record.b.shape)) != expected:
        raise ValueError(
            f"{function}: layer '{record.path}' has lora_a {record.a.shape} and "
            f"lora_b {record.b.shape}; PEFT's LoRA on this kernel needs "
            f"{expected[0]} and {expected[1]} (A over the contracted axes, B "
            "over the output axes). Apply LoRA with factoring='standard'."
        )
    if not kernel_map.covers_inputs:
        raise ValueError(
            f"{function}: layer '{record.path}' reads part of the inputs of "
            f"PEFT module weight {kernel_map.key!r}; PEFT's A spans them all."
        )
    if record.use_dora:
        raise ValueError(
            f"{function}: layer '{record.path}' uses DoRA, which keras_lora "
            "writes for PEFT by `name_map` only (the magnitude of a fused "
            "module is not the magnitudes of its parts)."
        )
    _check_untied(record.layer, record.path, function)


def _check_untied(layer, path, function):
    base = getattr(layer, "layer", layer)
    if getattr(base, "tie_weights", False):
        raise ValueError(
            f"{function}: layer '{path}' is an embedding tied to the output "
            "projection. keras_lora's adapter changes both; PEFT's adapter on "
            "the input embedding does not reach the tied `lm_head`, so the "
            "two models would differ. Leave the token embedding out of "
            "`targets`."
        )


def _module(name, group):
    kind = group[0][1].kind
    kernel_map = group[0][1]
    in_features, out_features = kernel_map.in_features, kernel_map.out_features
    ranks = [int(r.a.shape[-1]) for r, _ in group]
    a = np.zeros((sum(ranks), in_features), np.float32)
    b = np.zeros((out_features, sum(ranks)), np.float32)
    fold = len(group) > 1
    start = 0
    for (record, kernel_map), rank in zip(group, ranks, strict=True):
        block = slice(start, start + rank)
        factor = scale_for(rank, record.alpha, record.use_rslora) if fold else 1.0
        a[block][:, kernel_map.in_index] = record.a.reshape(-1, rank).T
        b[kernel_map.out_index, block] = record.b.reshape(rank, -1).T * factor
        start += rank
    rank = sum(ranks)
    if fold:  # the scales are in B: the module's own scale is 1
        use_rslora = group[0][0].use_rslora
        alpha = math.sqrt(rank) if use_rslora else float(rank)
    else:
        alpha = float(group[0][0].alpha)
    return PeftModule(name, kind, a, b, alpha)


def from_peft(correspondence, modules, layers, function="load_adapter"):
    """The Keras adapters of PEFT `modules`, by KerasHub's map.

    Args:
        correspondence: a `HubCorrespondence` of the model.
        modules: `PeftModule`s read from a PEFT adapter.
        layers: `(path, layer)` pairs of the model (LoRA or plain layers).
        function: the caller, for messages.

    Returns:
        `(adapters, unmapped)`: `(module name, path, a, b, alpha)` tuples in
        Keras layout (`"standard"` factoring), and the names of the modules
        with no Keras counterpart.

    Raises:
        ValueError: a module's shapes do not fit its Keras kernels, or it
            adapts a tied embedding.
    """
    by_name = {}
    for path, layer in layers:
        kernel_map = correspondence.kernel_map(layer)
        if kernel_map is None:
            continue
        for name in set(correspondence.module_names(kernel_map)) - {None}:
            by_name.setdefault(name, []).append((path, layer, kernel_map))
    adapters, unmapped = [], []
    for module in modules:
        targets = by_name.get(module.name)
        if not targets:
            unmapped.append(module.name)
            continue
        r = module.rank
        for path, layer, kernel_map in targets:
            want = ((r, kernel_map.in_features), (kernel_map.out_features, r))
            if (module.a.shape, module.b.shape) != want:
                raise ValueError(
                    f"{function}: PEFT module {module.name!r} has lora_A "
                    f"{module.a.shape} and lora_B {module.b.shape}, but its Keras "
                    f"layer '{path}' needs {want[0]} and {want[1]}."
                )
            if module.kind != kernel_map.kind:
                raise ValueError(
                    f"{function}: PEFT module {module.name!r} is a {module.kind} "
                    f"adapter, but layer '{path}' is a {kernel_map.kind}."
                )
            _check_untied(layer, path, function)
            a = module.a.T[kernel_map.in_index].reshape(kernel_map.in_shape + (r,))
            b = module.b[kernel_map.out_index].T.reshape((r,) + kernel_map.out_shape)
            adapters.append(
                (
                    module.name,
                    path,
                    np.ascontiguousarray(a, np.float32),
                    np.ascontiguousarray(b, np.float32),
                    module.alpha,
                )
            )
    return adapters, unmapped


def records_from_peft(correspondence, modules, layers, source, options, strict):
    """`from_peft`, as validated `LayerRecord`s; unmapped modules are
    reported (raised under `strict`, else warned about)."""
    adapters, unmapped = from_peft(correspondence, modules, layers)
    report(
        [repr(m) for m in sorted(unmapped)],
        strict,
        f"PEFT modules with no counterpart in KerasHub's `transformers` "
        f"converter for '{correspondence.model_type}' (pass `name_map` to map "
        "them)",
    )
    by_path = dict(layers)
    records = []
    for module, path, a, b, alpha in adapters:
        base = getattr(by_path[path], "layer", by_path[path])
        records.append(
            make_record(
                source,
                f"base_model.model.{module}",
                path,
                a,
                b,
                factoring=lora_class_for(base).file_factoring("standard"),
                **{**options, "alpha": alpha},
            )
        )
    return records


@dataclasses.dataclass(frozen=True)
class ModuleRank:
    """A module's name, rank and alpha, as `config_fields` reads them."""

    name: str
    rank: int
    alpha: float


def config_fields(modules):
    """`r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` for `modules`:
    the most common rank and alpha, and an exact pattern for each other."""
    counts = {}
    for m in modules:
        counts[(m.rank, m.alpha)] = counts.get((m.rank, m.alpha), 0) + 1
    rank, alpha = max(counts, key=counts.get)
    rank_pattern, alpha_pattern = {}, {}
    for m in modules:
        if m.rank != rank:
            rank_pattern[re.escape(m.name)] = m.rank
        if m.alpha != alpha:
            alpha_pattern[re.escape(m.name)] = _number(m.alpha)
    return {
        "r": rank,
        "lora_alpha": _number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def _number(value):
    return int(value) if float(value).is_integer() else float(value)
