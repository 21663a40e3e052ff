"""Putting adapter weights read from a file into a model, all or nothing.

Both file formats read into a list of `LayerAdapter`s keyed by Keras layer
path, then hand them to `install`. `install` validates everything (targets,
shapes, dtypes, unknown and missing keys) before it assigns anything, so a
failed load never leaves a half-loaded model.
"""

import dataclasses
import hashlib
import sys
import warnings

import keras
import numpy as np

from keras_lora.layers import LoRALayer, lora_class_for
from keras_lora.surgery import (
    _restore_trainable_flags,
    _trainable_flags,
    apply_lora,
    lora_layers,
)
from keras_lora.targets import iter_layers, match_layers


@dataclasses.dataclass
class LayerAdapter:
    """One layer's adapter as read from a file.

    Attributes:
        key: the layer's name in the file (for messages).
        path: the Keras layer path it goes to in the model.
        a: `lora_a`, numpy, in Keras layout (e.g. `(input_dim, rank)`).
        b: `lora_b`, numpy, in Keras layout (e.g. `(rank, units)`).
        alpha: the recorded alpha.
        use_rslora: the recorded scale rule.
        base_type: the recorded base layer class name (e.g. `"Dense"`), or
            `None` when the source does not record it.
        magnitude: DoRA's magnitude vector, or `None`.
        dropout, init, use_dora: the recorded variant options.
        base_sha256: for `init="pissa"`/`"olora"`, the digest of the base
            kernel the residual was computed from (`kernel_digest`), if known.
    """

    key: str
    path: str
    a: np.ndarray
    b: np.ndarray
    alpha: float
    use_rslora: bool = False
    base_type: str | None = None
    magnitude: np.ndarray | None = None
    dropout: float = 0.0
    init: str = "default"
    use_dora: bool = False
    base_sha256: str | None = None

    @property
    def options(self):
        """The variant options as LoRA layer keyword arguments."""
        return {"dropout": self.dropout, "init": self.init, "use_dora": self.use_dora}

    @property
    def rank(self):
        return int(self.a.shape[-1])


def resolve_layer(target, layers, argument="name_map"):
    """Returns the path of the one layer whose path, or else name, is `target`.

    Returns `None` if no layer has that path or name. Raises `ValueError` if
    `target` is no path and the name of several layers.
    """
    try:
        hits = match_layers([target], layers, argument)
    except ValueError:
        return None
    exact = [path for path, _ in hits if path == target]
    if exact:
        return exact[0]
    if len(hits) > 1:
        raise ValueError(
            f"`{argument}`: {target!r} is the name of several layers "
            f"{[p for p, _ in hits]}; give a full path instead."
        )
    return hits[0][0]


def kernel_digest(layer):
    """SHA-256 of a LoRA layer's base kernel bytes: what a PiSSA/OLoRA
    adapter's residual was computed from."""
    kernel = np.ascontiguousarray(keras.ops.convert_to_numpy(layer.base_kernel))
    return hashlib.sha256(kernel.tobytes()).hexdigest()


def savable_lora_layers(model, function, adapter=None):
    """`lora_layers(model)`, after checking an adapter file can hold them.

    A file holds one adapter per layer: `A`, `B` (and DoRA's magnitude), its
    options, and for PiSSA/OLoRA the base kernel's digest, since loading
    recomputes the residual from the base. Refused: several active adapters
    on one layer. Inactive extra adapters are left out with a warning. With
    `adapter`, only the layers that have that adapter are returned (the
    caller makes it the active one, see `adapter_management.only_adapter`).
    """
    layers = lora_layers(model)
    if adapter is not None:
        layers = [(p, lay) for p, lay in layers if adapter in lay.adapter_names]
        if not layers:
            raise ValueError(
                f"{function}: no LoRA layer of model '{model.name}' has an "
                f"adapter named {adapter!r}."
            )
    problems, skipped = [], []
    for path, layer in layers:
        active = list(getattr(layer, "active_adapters", [None]))
        names = list(getattr(layer, "adapter_names", [None]))
        if len(active) > 1:
            problems.append(f"'{path}' has several active adapters {active}")
        elif len(names) > 1 and adapter is None:
            skipped.append(f"'{path}': {[n for n in names if n not in active]}")
    if problems:
        raise ValueError(
            f"{function}: an adapter file holds one plain LoRA adapter per "
            "layer, which these layers do not fit:\n  " + "\n  ".join(problems)
        )
    if skipped:
        warnings.warn(
            f"{function} saves each layer's active adapter only; left out:\n  "
            + "\n  ".join(skipped),
            stacklevel=user_stacklevel(),
        )
    return layers


def user_stacklevel():
    """The `stacklevel` that makes a warning point at the caller of keras_lora."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        "keras_lora"
    ):
        frame, level = frame.f_back, level + 1
    return level


def report(problems, strict, what):
    """Raises (strict) or warns about `problems`, a list of message lines."""
    if not problems:
        return
    message = f"{what}:\n  " + "\n  ".join(problems)
    if strict:
        raise ValueError(message + "\nPass strict=False to skip them with a warning.")
    warnings.warn(
        message + "\nSkipped them (strict=False).", stacklevel=user_stacklevel()
    )


def install(model, adapters, strict=True, source="adapter", adapter_name=None):
    """Loads `adapters` into `model` and returns the model to use.

    On a model without LoRA layers, LoRA is first applied (with
    `apply_lora`) to exactly the adapters' layers, with their rank, alpha and
    scale rule; the new model is returned and `model` itself computes what it
    did. On a model with LoRA layers, the adapters load into them and `model`
    is returned.

    Args:
        model: a `keras.Model`.
        adapters: `LayerAdapter`s whose `path` is checked against `model`.
        strict: whether adapters for layers `model` lacks, and LoRA layers of
            `model` the file has no adapter for, are errors (else warnings).
        source: what was read, for messages.
        adapter_name: load into the adapter of that name, added (inactive)
            to the layers that lack it; on a plain model, the name of the
            adapter `apply_lora` creates. `None`: the active adapter (on a
            plain model, `"default"`).

    Raises:
        ValueError: on anything that does not fit; nothing was assigned.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"load_adapter: `model` must be a keras.Model. Received: {model!r} "
            f"of type {type(model).__name__}"
        )
    layers = dict(iter_layers(model))
    has_lora = bool(lora_layers(model))
    paths = [a.path for a in adapters]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(
            f"{source}: several entries map to the same layer of model "
            f"'{model.name}': {twice}. Check `name_map`."
        )
    known, unknown = [], []
    for adapter in adapters:
        layer = layers.get(adapter.path)
        if layer is None:
            unknown.append(adapter)
        elif has_lora and not isinstance(layer, LoRALayer):
            unknown.append(adapter)
        else:
            known.append(adapter)
    if unknown:
        candidates = [
            p
            for p, layer in layers.items()
            if (isinstance(layer, LoRALayer) if has_lora else lora_class_for(layer))
        ]
        report(
            [f"{a.key!r} -> layer '{a.path}'" for a in unknown],
            strict,
            f"{source} has keys that match no "
            f"{'LoRA ' if has_lora else ''}layer of model '{model.name}' "
            f"(candidates: {candidates})",
        )
    if not known:
        raise ValueError(
            f"{source} has no adapter for any layer of model '{model.name}'; "
            "nothing was loaded."
        )
    if has_lora:
        if adapter_name is not None:
            _into_named_adapter(model, known, source, adapter_name)
            return model
        covered = {a.path for a in known}
        missing = [p for p, _ in lora_layers(model) if p not in covered]
        report(
            [repr(p) for p in missing],
            strict,
            f"Model '{model.name}' has LoRA layers that {source} has no adapter for",
        )
        _check_and_assign(model, known, source)
        return model
    return _apply_then_assign(model, known, source, adapter_name or "default")


def _into_named_adapter(model, adapters, source, name):
    """Loads `adapters` into adapter `name`, adding it where missing; on
    failure the added adapters go again. Active adapters do not change."""
    layers = dict(iter_layers(model))
    added, previous = [], {}
    try:
        for adapter in adapters:
            layer = layers[adapter.path]
            previous[adapter.path] = list(layer._active)
            if name not in layer.adapter_names:
                layer.add_adapter(
                    name,
                    rank=adapter.rank,
                    alpha=adapter.alpha,
                    use_rslora=adapter.use_rslora,
                    **adapter.options,
                )
                added.append(layer)
            layer.set_active_adapters([name])
        _check_and_assign(model, adapters, source, warn_scale=not added)
    except Exception:
        for layer in added:
            layer.delete_adapter(name)
        raise
    finally:
        for path, active in previous.items():
            layers[path].set_active_adapters(active)


def _apply_then_assign(model, adapters, source, adapter_name="default"):
    for adapter in adapters:
        layer = dict(iter_layers(model))[adapter.path]
        if lora_class_for(layer) is None:
            raise ValueError(
                f"{source}: layer '{adapter.path}' of model '{model.name}' is a "
                f"{type(layer).__name__}, which keras_lora cannot adapt."
            )
    ranks = sorted({a.rank for a in adapters})
    rules = sorted({a.use_rslora for a in adapters})
    options = {tuple(sorted(a.options.items())) for a in adapters}
    if len(ranks) > 1 or len(rules) > 1 or len(options) > 1:
        raise ValueError(
            f"{source} mixes ranks {ranks} (or scale rules or variants) across "
            "layers; load_adapter can only apply one rank to a plain model. "
            "Apply LoRA yourself (layer by layer) and load into that model."
        )
    ids = {id(dict(iter_layers(model))[a.path]) for a in adapters}

    def adapter_targets(layer):
        return id(layer) in ids

    saved_flags = _trainable_flags(model)
    try:
        lora_model = apply_lora(
            model,
            targets=adapter_targets,
            rank=ranks[0],
            alpha=adapters[0].alpha,
            use_rslora=rules[0],
            adapter_name=adapter_name,
            **adapters[0].options,
        )
        _check_and_assign(lora_model, adapters, source, warn_scale=False)
    except Exception:
        _restore_trainable_flags(saved_flags)
        raise
    return lora_model


def _check_and_assign(model, adapters, source, warn_scale=True):
    layers = dict(iter_layers(model))
    mismatches = []
    plan = []
    for adapter in adapters:
        layer = layers[adapter.path]
        _check_variant(layer, adapter, model, source)
        base = getattr(layer, "layer", layer)
        if adapter.base_type and adapter.base_type not in {
            cls.__name__ for cls in type(base).__mro__
        }:
            raise ValueError(
                f"{source} has an adapter for a {adapter.base_type} at "
                f"'{adapter.path}', but that layer of model '{model.name}' is "
                f"a {type(base).__name__}; nothing was loaded."
            )
        pairs = [("lora_a", adapter.a), ("lora_b", adapter.b)]
        if adapter.use_dora:
            pairs.append(("lora_magnitude", adapter.magnitude))
        for name, array in pairs:
            variable = getattr(layer, name)
            expected = tuple(variable.shape)
            if tuple(array.shape) != expected:
                mismatches.append(
                    f"layer '{adapter.path}' {name}: the model expects shape "
                    f"{expected}, {source} has {tuple(array.shape)} "
                    f"(key {adapter.key!r})"
                )
            elif not np.issubdtype(array.dtype, np.floating):
                mismatches.append(
                    f"layer '{adapter.path}' {name}: expected floating point "
                    f"values, {source} has dtype {array.dtype}"
                )
            else:
                plan.append((variable, array))
    if mismatches:
        raise ValueError(
            "Shape mismatch loading "
            f"{source} into model '{model.name}'; nothing was loaded:\n  "
            + "\n  ".join(mismatches)
        )
    changed = [
        f"'{a.path}': alpha {layers[a.path].alpha} -> {a.alpha}, "
        f"use_rslora {layers[a.path].use_rslora} -> {a.use_rslora}"
        for a in adapters
        if layers[a.path].alpha != a.alpha or layers[a.path].use_rslora != a.use_rslora
    ]
    if changed and warn_scale:
        warnings.warn(
            f"{source} records another scale than these LoRA layers had; "
            "they now use the recorded one:\n  " + "\n  ".join(changed),
            stacklevel=user_stacklevel(),
        )
    for variable, array in plan:
        variable.assign(
            np.asarray(array, dtype=keras.backend.standardize_dtype(variable.dtype))
        )
    for adapter in adapters:
        layers[adapter.path].alpha = float(adapter.alpha)
        layers[adapter.path].use_rslora = bool(adapter.use_rslora)


def _primary_adapter(layer):
    return layer.get_adapter(layer.active_adapters[0])


def _check_variant(layer, adapter, model, source):
    """Raises unless `layer`'s (active) adapter is the variant `adapter` is."""
    own = _primary_adapter(layer)
    if own.use_dora != adapter.use_dora or own.init != adapter.init:
        if own.use_dora == adapter.use_dora and not (
            own.changes_base or adapter.init in ("pissa", "olora")
        ):
            return  # default vs gaussian: only the starting point differs
        raise ValueError(
            f"{source} holds a {_variant(adapter.init, adapter.use_dora)} "
            f"adapter for '{adapter.path}', but that layer of model "
            f"'{model.name}' is a {_variant(own.init, own.use_dora)} LoRA "
            "layer; nothing was loaded. Load into the base model, or into a "
            "LoRA layer of the same variant."
        )
    if own.changes_base and adapter.base_sha256 is not None:
        if kernel_digest(layer) != adapter.base_sha256:
            raise ValueError(
                f"{source}: layer '{adapter.path}' uses init={adapter.init!r}, "
                "whose residual kernel comes from the base kernel, but this "
                "model's base kernel differs from the one the adapter was "
                "trained on; nothing was loaded."
            )


def _variant(init, use_dora):
    name = {"pissa": "PiSSA", "olora": "OLoRA"}.get(init, "plain")
    return f"{name}{'+DoRA' if use_dora else ''}"
