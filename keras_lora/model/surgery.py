"""Model surgery: select layers, then put LoRA layers on them.

There is one way adapters go into a model (`put_adapters`, used by
`apply_lora`, `load_adapter` and `from_core_lora`): each target is swapped
for its LoRA layer inside the layers that hold it, every change logged so
that a failure undoes them all (`keras_lora.model.in_place`). With
`in_place=True` the swap happens in the model itself: nothing is rebuilt,
and the model keeps its class (a KerasHub task, any Functional subclass).
Otherwise the swap happens in a copy (`copy_for_lora`): a Functional or
Sequential model is cloned with `keras.models.clone_model`, and a layer
that holds a target at any depth (a `MultiHeadAttention`, a custom block,
a subclassed model, which `clone_model` sees as one opaque layer) is
rebuilt from its config around the same sublayers (see
`keras_lora.model.containers`). The targets themselves, and every layer
that holds none, are shared, so the LoRA layers wrap the *same* base layer
objects: base weights are shared, not copied, and the original model still
computes what it did. Layers named in `trainable` are copied, so training
them leaves the original model alone. Inside a Functional or Sequential
graph, a layer with LoRA layers inside is held by a `LoRAContainer`, which
records where its adapters are so that `.keras` files keep them. A
subclassed top-level model's own config cannot carry adapters (see
`LoRALayer.save_own_variables`).
"""

import warnings

import keras

from keras_lora.config import (
    pattern_value,
    validate_alpha,
    validate_flag,
    validate_pattern,
    validate_rank,
)
from keras_lora.layers import lora_class_for
from keras_lora.layers.checks import caller_stacklevel
from keras_lora.model import loftq, same_class
from keras_lora.model.containers import copy_layer, copy_model
from keras_lora.model.extra_trainables import train_biases, validate_bias
from keras_lora.model.in_place import apply_in_place, bypassing_owner, holders_of
from keras_lora.model.quantized_bases import check_quantized_weights, lean_quantized
from keras_lora.model.remat import check_blocks_for_targets, enable_remat
from keras_lora.model.targets import (
    is_all_linear,
    kerashub_backbones,
    kerashub_default,
    linear_layers,
    match_layers,
)
from keras_lora.model.tracking import (
    copy_loses_class,
    owners,
    refresh_compiled,
    restore_trainable_state,
    trainable_state,
)
from keras_lora.model.walk import (
    Reaches,
    check_built,
    graph_model,
    iter_layers,
    lora_layers,
)


def apply_lora(
    model,
    targets=None,
    rank=8,
    alpha=None,
    exclude=None,
    trainable=None,
    in_place=False,
    remat=False,
    rank_pattern=None,
    alpha_pattern=None,
    loftq_mode=None,
    loftq_iter=None,
    bias="none",
    train=None,
    **layer_kwargs,
):
    """Returns a copy of `model` with LoRA layers on the selected layers.

    Args:
        model: a built `keras.Model`: Functional (a Functional subclass
            comes back as a plain Functional, as `keras.models.clone_model`
            does), Sequential, or subclassed (see the module docstring).
        targets: which layers get adapters: `Dense`, `EinsumDense`,
            `Embedding`, `Conv1D/2D/3D`, at any depth (inside
            `MultiHeadAttention`, custom layers, nested models). `None`
            selects, on a KerasHub model (a backbone, a task, or a model
            holding one), what KerasHub's `enable_lora` selects: the layers
            named in the backbone's `default_lora_layer_names()` (the
            attention query and value projections); on any other model,
            every `Dense` that does not produce a model output (Functional
            and Sequential models only). `"all-linear"` (PEFT's) selects
            every `Dense` and `EinsumDense` that does not produce a model
            output (Functional and Sequential models). Otherwise a list of
            layer names or paths (`"query"`, `"block_0/mha/query"`), a regex
            string (full match on name or path), or a callable
            `layer -> bool`.
        rank: positive integer, the rank of every adapter.
        alpha: positive number or `None` (`alpha = rank`).
        exclude: layers never to adapt, in the same forms as `targets`.
        trainable: layers to keep fully trainable next to the adapters (a
            new head, say; PEFT's `modules_to_save`), in the same forms.
            They are copied (in place: left in the model, trainable), and
            `save_adapter` saves their weights with the adapters.
        train: another spelling of `trainable` (pass one of the two).
        in_place: if true, change `model` itself and return it: each target
            is swapped for its LoRA layer inside the layer that holds it, no
            layer is rebuilt or copied, and the model keeps its class, its
            preprocessor, `generate()` and its compile settings (a KerasHub
            `Task` or `Backbone`, any Functional subclass). If false (the
            default), `model` is left as it is and a new model is returned;
            that needs a plain Functional or Sequential model or a
            subclassed one (a Functional subclass cannot be copied with its
            class: pass `in_place=True`).
        remat: if true, recompute each transformer block's activations in
            the backward pass (`enable_remat` on the returned model): less
            activation memory for long sequences, a second forward pass
            through each block, the same outputs and gradients. The model
            must have transformer blocks (a KerasHub backbone's
            `transformer_layers`, or direct child layers holding targets);
            otherwise `apply_lora` raises before changing anything.
        rank_pattern: `{pattern: rank}`, PEFT's `LoraConfig.rank_pattern`:
            a target gets the rank of the first key that, as a regular
            expression, matches the end of its path after a `/`
            (`"value"`, `"block_1/.*"`, `"transformer_layer_(0|1)/query"`),
            else `rank`. Every key must match a target.
        alpha_pattern: `{pattern: alpha}`, the same for `alpha`. A target
            whose rank a pattern sets and whose alpha none does gets
            `alpha` (`None`: its own rank).
        loftq_mode: with `init="loftq"` (LoftQ, Li et al. 2023), the
            quantization of the base: `"int8"`, `"int4"` (Keras's) or
            `"nf4"` (`quantize_nf4`'s, blocks of 64). Each target (a float
            `Dense` or `EinsumDense`) gets a copy of its base quantized in
            that mode and `A`, `B` with `Q + s·A·B ≈ W` (see
            `keras_lora.model.loftq`); `model` keeps its float layers.
        loftq_iter: with `init="loftq"`, the alternations of quantization
            and SVD, an int >= 1 (default 1).
        bias: which biases train with the adapters, PEFT's `bias`:
            `"none"` (default), `"lora_only"` (the bias of each adapted
            layer; its kernel stays frozen) or `"all"` (every layer's `bias`
            and every normalization's `beta`). `save_adapter` saves them.
            The biases are the base layers' own, which a copy shares with
            `model`: anything but `"none"` needs `in_place=True`.
        **layer_kwargs: passed on to each LoRA layer's constructor.

    Returns:
        A new, uncompiled `keras.Model`. The base layers it shares with
        `model` are frozen in both (they are the same objects); `model`
        still computes exactly what it did. With `in_place=True`, `model`
        itself, still compiled if it was (its train function is reset and a
        built optimizer replaced by a fresh one of the same config).

    Raises:
        TypeError, ValueError: on bad arguments, with `model` unchanged.
    """
    check_built(model, "apply_lora")
    if train is not None:
        if trainable is not None:
            raise ValueError(
                "apply_lora: `train` and `trainable` are two spellings of the "
                "layers that train whole (PEFT's modules_to_save); pass one. "
                f"Received: train={train!r}, trainable={trainable!r}"
            )
        trainable = train
    init = layer_kwargs.get("init")
    loftq_mode, loftq_iter = loftq.validate_loftq(init, loftq_mode, loftq_iter)
    if loftq_mode is not None:
        layer_kwargs = {k: v for k, v in layer_kwargs.items() if k != "init"}
    rank = validate_rank(rank)
    alpha = validate_alpha(alpha)
    rank_pattern = validate_pattern(rank_pattern, "rank_pattern", validate_rank)
    alpha_pattern = validate_pattern(alpha_pattern, "alpha_pattern", validate_alpha)
    in_place = validate_flag(in_place, "in_place")
    remat = validate_flag(remat, "remat")
    bias = validate_bias(bias)
    if bias != "none" and not in_place:
        raise ValueError(shared_biases_message("apply_lora", bias))
    if not in_place and copy_loses_class(model):
        raise ValueError(
            f"apply_lora: '{model.name}' is a {type(model).__name__}, a "
            "Functional subclass; a copy of it would be a plain Functional "
            "without its methods (a KerasHub task would lose its preprocessor "
            "and `generate()`). Pass `in_place=True` to convert the model "
            "itself, keeping its class."
        )
    layers = list(iter_layers(model))
    existing = [path for path, _ in lora_layers(model, layers)]
    if existing:
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers: {existing}. "
            "Apply LoRA to the base model, or merge first with `merge_lora`."
        )
    to_wrap = _select_targets(model, layers, targets, exclude)
    to_copy = _expand(
        match_layers(trainable, layers, "trainable") if trainable is not None else []
    )
    overlap = [p for p, layer in to_copy if id(layer) in to_wrap]
    if overlap:
        raise ValueError(
            f"Layers {overlap} are both LoRA targets and in `trainable`; "
            "exclude them from one of the two."
        )
    to_copy = {id(layer) for _, layer in to_copy}
    check_quantized_weights(model)  # lean_quantized's refusal, up front
    if remat:  # enable_remat's refusal, before anything changes
        check_blocks_for_targets(model, layers, to_wrap, "apply_lora")
    options = _per_layer_options(
        [(p, layer) for p, layer in layers if id(layer) in to_wrap],
        rank,
        alpha,
        rank_pattern,
        alpha_pattern,
    )
    make = lambda layer: lora_class_for(layer)(  # noqa: E731
        layer, **options[id(layer)], **layer_kwargs
    )
    if loftq_mode is not None:
        for path, layer in layers:
            if id(layer) in to_wrap:
                loftq.check_loftq_target(path, layer)

        def make(layer):
            return loftq.make_loftq_wrapper(
                layer,
                lora_class_for(layer),
                options[id(layer)],
                layer_kwargs,
                loftq_mode,
                loftq_iter,
            )

    lora_model = put_adapters(
        model,
        to_wrap,
        make,
        trainable=to_copy,
        in_place=in_place,
        bias=bias,
    )
    return _finish(lora_model, remat)


def put_adapters(
    model,
    targets,
    make_wrapper,
    trainable=frozenset(),
    in_place=False,
    check=None,
    bias="none",
):
    """The one way adapters go into a model (`apply_lora`, `load_adapter`):
    each layer in `targets` (ids) is swapped for `make_wrapper(layer)`
    inside the layers that hold it (`apply_in_place`), in `model` itself if
    `in_place`, else in `copy_for_lora(model, ...)`. Every other weight is
    frozen but those of the layers in `trainable` (ids; copied in a copy)
    and the biases `bias` selects (`extra_trainables.train_biases`).
    `check(lora_model)`, if given, runs once every layer is swapped; if it
    (or anything) raises, nothing is changed. Returns the LoRA model, its
    int8/int4 layers on the lean quantized product."""
    saved_flags = trainable_state(model)
    try:
        if in_place:
            lora_model, keep = model, trainable
        else:
            lora_model, keep = copy_for_lora(model, targets, trainable)
        swaps = [(p, lay) for p, lay in iter_layers(lora_model) if id(lay) in targets]
        apply_in_place(lora_model, swaps, keep, make_wrapper, check=check)
        if bias != "none":
            train_biases(lora_model, bias)
            refresh_compiled(lora_model)
    except Exception:
        restore_trainable_state(saved_flags)
        raise
    same_class.mark_converted(lora_model)
    if not graph_model(lora_model):
        for _, layer in lora_layers(lora_model):
            layer.save_as_base_in(model.name)
    # Every int8/int4 layer (not only the adapted ones) on the lean quantized
    # product: no float kernel kept for the backward pass.
    return lean_quantized(lora_model)


def shared_biases_message(function, what, source=None):
    """Why biases cannot train in a copy, for `function`'s error: `what` is
    `apply_lora`'s `bias` or the layers whose biases a file (`source`)
    holds."""
    trains = (
        f"bias={what!r} trains"
        if source is None
        else f"{source} holds trained biases of layers {what}, which are"
    )
    return (
        f"{function}: {trains} the biases of the base layers, which a copy "
        "shares with the original model (training or loading the copy would "
        "change the original). Pass `in_place=True` to convert the model "
        "itself."
    )


def copy_for_lora(model, targets, to_copy):
    """A copy of `model` for `apply_lora` to put adapters into: the layers
    in `targets` (ids) are shared, as is every layer that holds none of
    `targets` or `to_copy`; the layers in `to_copy` (ids) are copied with
    their weights; every layer holding one of those at any depth is new
    (`copy_model`), its own variables shared. Swapping a target inside the
    copy therefore leaves `model` computing what it did. Returns the copy
    and the ids of the copied layers."""
    held = targets | to_copy
    reaches = Reaches(lambda layer: id(layer) in held)
    copied = set()

    def leaf(layer, deferred):
        if id(layer) in to_copy:
            new = copy_layer(layer, deferred, trainable=True)
            copied.add(id(new))
            return new
        if id(layer) in targets or not reaches(layer):
            return layer
        return None  # holds a target: opened

    copy, deferred = copy_model(model, leaf, share_variables=True)
    for _, new in deferred:
        new.trainable = True
    return copy, copied


def _finish(model, remat):
    return enable_remat(model) if remat else model


def _per_layer_options(targets, rank, alpha, rank_pattern, alpha_pattern):
    """`{id: {"rank", "alpha"}}` of each target `(path, layer)`: `rank` and
    `alpha`, or a pattern's (`config.pattern_value`, PEFT's rule on the
    layer's path). Raises if a key matches no target."""
    for argument, pattern in (
        ("rank_pattern", rank_pattern),
        ("alpha_pattern", alpha_pattern),
    ):
        unused = [
            key
            for key in pattern
            if not any(pattern_value({key: 1}, p, None, "/") for p, _ in targets)
        ]
        if unused:
            raise ValueError(
                f"apply_lora: `{argument}` keys {unused} match no target; "
                "a key matches the end of a target's path after a '/'. "
                f"Targets: {[p for p, _ in targets]}"
            )
    return {
        id(layer): {
            "rank": pattern_value(rank_pattern, path, rank, "/"),
            "alpha": pattern_value(alpha_pattern, path, alpha, "/"),
        }
        for path, layer in targets
    }


def _select_targets(model, layers, targets, exclude):
    supported = lambda layer: lora_class_for(layer) is not None  # noqa: E731
    backbones = kerashub_backbones(model, layers) if targets is None else []
    if backbones:  # KerasHub's (and PEFT's) default: query and value
        selected = kerashub_default(backbones, layers, supported)
        if not selected:
            raise ValueError(
                f"`targets=None` on a KerasHub model selects the layers its "
                f"backbone's `default_lora_layer_names()` names "
                f"({backbones[0].default_lora_layer_names()}), and "
                f"'{model.name}' has none keras_lora can adapt. Pass "
                f"`targets`. Layers: {[p for p, _ in layers]}"
            )
    elif targets is None or is_all_linear(targets):
        what = "`targets=None`" if targets is None else f"`targets={targets!r}`"
        if not graph_model(model):
            raise ValueError(
                f"{what} selects layers that do not produce an output, which "
                f"needs a Functional or Sequential model; '{model.name}' is a "
                f"subclassed {type(model).__name__}. Pass `targets` as names, "
                f"a regex or a callable. Layers: {[p for p, _ in layers]}"
            )
        outputs = _output_layer_ids(model)
        if targets is None:
            selected = [
                (p, layer)
                for p, layer in layers
                if isinstance(layer, keras.layers.Dense) and id(layer) not in outputs
            ]
        else:
            selected = linear_layers(layers, outputs, supported)
        if not selected:
            kind = "Dense" if targets is None else "Dense or EinsumDense"
            raise ValueError(
                f"Model '{model.name}' has no {kind} layer outside its output "
                f"layers, so {what} selects nothing. Pass `targets`. "
                f"Layers: {[p for p, _ in layers]}"
            )
    else:
        selected = match_layers(targets, layers, "targets", supported)
    if exclude is not None:
        excluded = {id(layer) for _, layer in match_layers(exclude, layers, "exclude")}
        selected = [(p, layer) for p, layer in selected if id(layer) not in excluded]
        if not selected:
            raise ValueError("`exclude` removes every layer `targets` selected.")
    by_rule = bool(backbones) or targets is None or is_all_linear(targets)
    selected = _drop_unused(model, selected, by_rule)
    return {id(layer) for _, layer in selected}


def _drop_unused(model, selected, by_rule):
    """The selected layers that an adapter would change the model through.
    A layer never built (the model never calls it: EfficientNet's unused
    squeeze-excite convolutions) or whose owner does its math itself
    (`bypassing_owner`) would not: a rule's selection (`by_rule`: `None`,
    `"all-linear"`) leaves them out with a warning; named targets raise."""
    all_owners = owners(model)
    kept, unused = [], []
    for path, layer in selected:
        if not layer.built:
            reason = "never built: the model does not call it"
        else:
            reason = bypassing_owner(layer, holders_of(all_owners, layer))
        if reason is None:
            kept.append((path, layer))
        else:
            unused.append(f"'{path}' ({reason})")
    if unused and not by_rule:
        raise ValueError(
            f"apply_lora: an adapter on {', '.join(unused)} would never be "
            "used (and merging it would change the model). Leave "
            f"{'it' if len(unused) == 1 else 'them'} out of `targets` (or "
            "pass `exclude`)."
        )
    if unused:
        warnings.warn(
            f"apply_lora: left out {', '.join(unused)}: an adapter there would "
            "never be used.",
            stacklevel=caller_stacklevel(),
        )
    if not kept:
        raise ValueError(
            f"apply_lora: no layer the rule selected in '{model.name}' is "
            "used by the model's computation; pass `targets`."
        )
    return kept


def _output_layer_ids(model):
    """The layers whose outputs are `model`'s outputs, nested graphs
    opened. A layer that holds others (ViT's encoder, BART's last block)
    produces an output, but its sublayers are not the model's head: they
    stay selectable (PEFT's `"all-linear"` leaves out only the output
    layer)."""
    ids = set()
    for tensor in keras.tree.flatten(model.outputs):
        layer = tensor._keras_history.operation
        ids.add(id(layer))
        if graph_model(layer):
            ids |= _output_layer_ids(layer)
    return ids


def _expand(selected):
    """A selected nested model stands for all the layers inside it; a
    selected layer with sublayers (copied whole) for itself and them."""
    out = []
    for path, layer in selected:
        if not graph_model(layer):
            out.append((path, layer))
        out.extend(iter_layers(layer, prefix=f"{path}/"))
    return out
