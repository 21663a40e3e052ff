"""Several named adapters on one model: adding, switching, combining and
deleting them (merging them is `keras_lora.model.merge`).

Every LoRA layer holds one or more named adapters on its frozen base (see
`LoRALayer`). `apply_lora(model, ..., adapter_name="default")` creates the
first; `add_adapter` adds more on the same frozen base without cloning the
model. The active adapters are the only trainable ones and their updates
add up; the others are kept but neither trained nor applied.

Switching is a Python-level choice made when a call is traced, so these
functions clear the model's compiled `predict`/`evaluate`/`train`
functions: `model(x)`, `predict` and `evaluate` see the new adapter at
once. Training after a switch needs `model.compile(...)` again: the set of
trainable variables changed, and Keras builds its optimizer (and JAX/TF its
compiled train step) for one fixed set.
"""

import math
import numbers
import warnings

import keras
import numpy as np

from keras_lora.config import validate_adapter_name
from keras_lora.layers import LoRALayer
from keras_lora.model import combine
from keras_lora.model.merge import refuse_if_merged
from keras_lora.model.targets import match_layers
from keras_lora.model.tracking import drop_compiled
from keras_lora.model.walk import (
    iter_layers,
    require_lora_layers,
)


def list_adapters(model):
    """Returns `{adapter name: [layer paths]}`, in creation order."""
    names = {}
    for path, layer in require_lora_layers(model, "list_adapters"):
        for name in layer.adapter_names:
            names.setdefault(name, []).append(path)
    return names


def active_adapters(model):
    """The names of the adapters active in at least one layer."""
    names = []
    for _, layer in require_lora_layers(model, "active_adapters"):
        names += [n for n in layer.active_adapters if n not in names]
    return names


def add_adapter(model, name, rank=8, alpha=None, targets=None, **options):
    """Adds a new, inactive adapter `name` to LoRA layers of `model`.

    It sits on the same frozen base as the existing adapters; the model is
    not cloned. Make it active (and trainable) with `set_adapter`.

    Args:
        model: a model with LoRA layers (from `apply_lora`).
        name: the new adapter's name.
        rank, alpha: as for `apply_lora`.
        targets: which LoRA layers get it: `None` for all, else the forms of
            `apply_lora`'s `targets` (names, paths, regex, callable),
            matched by `match_layers` among the LoRA layers.
        **options: variant options: `use_rslora`, `dropout`, `init`,
            `use_dora`. A layer holds at most one PiSSA/OLoRA adapter.

    Returns:
        `model`.

    Raises:
        ValueError: no LoRA layers, a target that matches none, a layer that
            already has `name`, or bad options; nothing is added then.
    """
    validate_adapter_name(name)
    if options.get("init") == "loftq":
        raise ValueError(
            "add_adapter: init='loftq' fits an adapter to the quantization "
            "error of a float kernel, which only `apply_lora(float_model, "
            "init='loftq', loftq_mode=...)` has; an added adapter shares the "
            "existing base. Received: init='loftq'"
        )
    layers = require_lora_layers(model, "add_adapter")
    refuse_if_merged(layers, "add_adapter")
    if targets is not None:
        all_layers = list(iter_layers(model))
        layers = match_layers(
            targets, all_layers, "targets", lambda lay: isinstance(lay, LoRALayer)
        )
    taken = [p for p, layer in layers if name in layer.adapter_names]
    if taken:
        raise ValueError(f"add_adapter: layers {taken} already have adapter {name!r}.")
    _add_to_all(
        [layer for _, layer in layers],
        name,
        lambda layer: layer.add_adapter(name, rank=rank, alpha=alpha, **options),
    )
    drop_compiled(model)
    return model


def set_adapter(model, names):
    """Makes adapter `names` (a name or a list) the active ones.

    Active adapters are the only trainable ones; several active adapters
    add their updates. A layer without any of them computes its base
    output. Recompile before training again (see the module docstring).

    Raises:
        ValueError: a name no layer has.
    """
    if not isinstance(names, (str, list, tuple)) or not all(
        isinstance(n, str) for n in ([names] if isinstance(names, str) else names)
    ):
        raise TypeError(
            "set_adapter: `names` must be an adapter name or a list of names. "
            f"Received: {names!r} of type {type(names).__name__}"
        )
    names = [names] if isinstance(names, str) else list(names)
    layers = require_lora_layers(model, "set_adapter")
    refuse_if_merged(layers, "set_adapter")
    known = {n for _, layer in layers for n in layer.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"set_adapter: unknown adapter(s) {unknown or names}; model "
            f"'{model.name}' has adapters {sorted(known)}."
        )
    for _, layer in layers:
        layer.set_active_adapters(names)
    drop_compiled(model)
    return model


def disable_adapters(model):
    """Disables every adapter of `model` at once; also a context manager.

    While disabled, every LoRA layer calls its base layer's own `call`, so
    outputs are bitwise those of the model `apply_lora` was given
    (PiSSA/OLoRA residuals and in-place merges are bypassed too).

    Called on its own, it disables the adapters until
    `enable_adapters(model)`. Used as `with disable_adapters(model): ...`,
    it also puts back, on leaving the block (by an exception too), each
    layer's disabled flag as it was before the call.

    Args:
        model: a model with LoRA layers.

    Returns:
        A context manager whose `__enter__` returns `model`.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: `model` has no LoRA layers.
    """
    layers = require_lora_layers(model, "disable_adapters")
    previous = [(layer, layer.adapters_disabled) for _, layer in layers]
    for layer, _ in previous:
        layer.adapters_disabled = True
    drop_compiled(model)
    return _Disabled(model, previous)


def enable_adapters(model):
    """Undoes `disable_adapters(model)`: every LoRA layer applies its active
    adapters again. A model whose adapters are not disabled is unchanged.

    Args:
        model: a model with LoRA layers.

    Returns:
        `model`.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: `model` has no LoRA layers.
    """
    for _, layer in require_lora_layers(model, "enable_adapters"):
        layer.adapters_disabled = False
    drop_compiled(model)
    return model


class _Disabled:
    """What `disable_adapters` returns: leaving it as a context manager puts
    back each layer's disabled flag from before the call."""

    def __init__(self, model, previous):
        self.model = model
        self.previous = previous

    def __enter__(self):
        return self.model

    def __exit__(self, *exc_info):
        for layer, flag in self.previous:
            layer.adapters_disabled = flag
        drop_compiled(self.model)
        return False


def delete_adapter(model, name):
    """Deletes adapter `name` and its variables from every layer.

    Deleting an active adapter falls back: the other active adapters stay
    active; a layer left with none activates its first remaining adapter
    (a warning says so). A layer whose only adapter is `name` cannot lose
    it: that raises `ValueError` and nothing is deleted.
    """
    layers = require_lora_layers(model, "delete_adapter")
    refuse_if_merged(layers, "delete_adapter")
    having = [(p, layer) for p, layer in layers if name in layer.adapter_names]
    if not having:
        raise ValueError(f"delete_adapter: no LoRA layer has adapter {name!r}.")
    alone = [p for p, layer in having if len(layer.adapter_names) == 1]
    if alone:
        raise ValueError(
            f"delete_adapter: {name!r} is the only adapter of layers {alone}; "
            "a LoRA layer needs one. Use `merge_lora` to drop LoRA instead."
        )
    fallback = {}
    for path, layer in having:
        was_active = name in layer.active_adapters
        layer.delete_adapter(name)
        if was_active and len(layer.active_adapters) == 1:
            fallback.setdefault(layer.active_adapters[0], []).append(path)
    if fallback:
        warnings.warn(
            f"delete_adapter: {name!r} was active; now active: {fallback}.",
            stacklevel=2,
        )
    drop_compiled(model)
    return model


def combine_adapters(
    model,
    weights,
    name="mix",
    method="cat",
    density=None,
    seed=None,
    svd_rank=None,
    svd_clamp=None,
    majority_sign_method="total",
):
    """Adds adapter `name`, a weighted combination of existing adapters.

    The methods are PEFT's `add_weighted_adapter(combination_type=...)`,
    computed as PEFT 0.21 does (see `keras_lora.model.combine`). In each
    layer, with adapters `i` of factors `A_i`, `B_i` and scale `s_i`:

    - `"cat"` (the default) is exact: `A = [A_1, ..., A_n]` (along the rank
      axis), `B = [w_1·s_1·B_1; ...; w_n·s_n·B_n]`, rank `Σ r_i`, so the
      update is `Σ w_i·s_i·A_i·B_i`; `{"a": 1.0}` equals adapter `a`.
    - `"linear"`, `"ties"`, `"dare_linear"`, `"dare_ties"`,
      `"magnitude_prune"` merge the `A_i` and, apart, the `B_i` with that
      rule, `A_i` weighted by `sign(w_i·s_i)·sqrt(|w_i·s_i|)` and `B_i` by
      `sqrt(|w_i·s_i|)`; the adapters need one rank, the result has it.
      `"linear"` gives `(Σ ±√|w_i s_i|·A_i)(Σ √|w_i s_i|·B_i)`, not the sum of
      the updates.
    - `"svd"`, `"ties_svd"`, `"dare_linear_svd"`, `"dare_ties_svd"`,
      `"magnitude_prune_svd"` merge the updates `w_i·s_i·A_i·B_i` by that rule
      and keep their best rank-`svd_rank` part (`B` gets `U·S`, `A` gets
      `Vᵀ`).

    As in PEFT, a single adapter is merged with `"linear"` whatever the
    method (`"cat"` excepted). The new adapter has `alpha = rank` (scale 1)
    and is inactive. Layers with none of the adapters get none. DoRA and
    PiSSA/OLoRA adapters are not linear in `A·B` and cannot be combined.

    Args:
        model: a model with LoRA layers.
        weights: `{adapter name: weight}`, weights finite numbers.
        name: the new adapter's name.
        method: one of the methods above.
        density: the fraction of values kept, in `(0, 1]`, for the methods
            that prune (all but `"cat"`, `"linear"`, `"svd"`), which need it.
        seed: a non-negative int seeding DARE's random masks, or `None`.
            The same seed gives the same adapter; the masks are not torch's.
        svd_rank: the SVD methods' rank; `None`: the adapters' largest.
        svd_clamp: a quantile in `[0, 1]`: the SVD methods clamp the new
            factors' values to `±` that quantile of them; `None`: no clamp.
        majority_sign_method: the ties methods' sign election, `"total"`
            (sign of the sum) or `"frequency"` (sign of the count).

    Returns:
        `model`.

    Raises:
        ValueError: a bad argument, an unknown adapter, a layer that already
            has `name`, unequal ranks for a factor method, or a DoRA/PiSSA
            adapter; nothing is added then.
    """
    validate_adapter_name(name)
    density = combine.validate_options(
        method, density, seed, svd_rank, svd_clamp, majority_sign_method
    )
    layers = require_lora_layers(model, "combine_adapters")
    refuse_if_merged(layers, "combine_adapters")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            "combine_adapters: `weights` must be a non-empty dict "
            f"{{adapter name: weight}}. Received: {weights!r}"
        )
    for key, weight in weights.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
        ):
            raise ValueError(
                f"combine_adapters: the weight of {key!r} must be a finite "
                f"number. Received: {weight!r}"
            )
    known = {n for _, layer in layers for n in layer.adapter_names}
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ValueError(
            f"combine_adapters: unknown adapter(s) {unknown}; model "
            f"'{model.name}' has adapters {sorted(known)}."
        )
    method = combine.effective_method(method, len(weights))
    ranks = {}
    for _, layer in layers:
        for n in weights:
            if n in layer.adapter_names:
                ranks[n] = max(ranks.get(n, 0), layer.get_adapter(n).rank)
    largest = combine.check_ranks(method, ranks)
    rng = np.random.default_rng(seed)
    plan = []
    for path, layer in layers:
        if name in layer.adapter_names:
            raise ValueError(f"combine_adapters: layer '{path}' already has {name!r}.")
        parts = [
            (layer.get_adapter(n), w)
            for n, w in weights.items()
            if n in layer.adapter_names
        ]
        if not parts:
            continue
        for adapter, _ in parts:
            if adapter.use_dora or adapter.changes_base:
                raise ValueError(
                    f"combine_adapters: adapter {adapter.name!r} of layer "
                    f"'{path}' uses DoRA or init={adapter.init!r}, which a "
                    "weighted sum of A·B cannot represent."
                )
        a, b = combine.combined_factors(
            parts,
            method,
            density,
            rng,
            svd_rank or largest,
            svd_clamp,
            majority_sign_method,
        )
        plan.append((layer, a, b))
    factors = {id(layer): (a, b) for layer, a, b in plan}

    def add_combined(layer):
        a, b = factors[id(layer)]
        rank = b.shape[0]
        adapter = layer.add_adapter(name, rank=rank, alpha=rank)
        for variable, value in ((adapter.a, a), (adapter.b, b)):
            dtype = keras.backend.standardize_dtype(variable.dtype)
            variable.assign(value.reshape(tuple(variable.shape)).astype(dtype))

    _add_to_all([layer for layer, _, _ in plan], name, add_combined)
    drop_compiled(model)
    return model


def _add_to_all(layers, name, add):
    """Calls `add(layer)` for each layer. If one fails, adapter `name` is
    removed again from every layer that got it: nothing is half-added."""
    done = []
    try:
        for layer in layers:
            done.append(layer)
            add(layer)
    except Exception:
        for layer in done:
            if name in layer.adapter_names:
                layer.delete_adapter(name)
        raise
