"""`prepare_hotswap`: make a LoRA model's adapters swappable without a retrace.

A compiled function (`jax.jit`, `tf.function`, `torch.compile`) is traced
for fixed variable shapes and fixed Python values. Swapping in an adapter of
another rank changes the shapes of `A` and `B`; another alpha changes the
scale, which an unprepared layer multiplies by as a Python float baked into
the trace. `prepare_hotswap` removes both: every adapter is padded with
zeros to one rank (its capacity) and its scale becomes a variable, so that
`keras_lora.hotswap_adapter` only assigns variables.
"""

from keras_lora.config import validate_rank
from keras_lora.model.tracking import drop_compiled
from keras_lora.model.walk import check_is_model, require_lora_layers


def prepare_hotswap(model, max_rank):
    """Pads every adapter of `model` to rank `max_rank` and makes scales variables.

    `A` gets zero columns and `B` zero rows up to `max_rank`, so each adapter
    computes what it did (to float rounding) and is, from then on, a rank-
    `max_rank` adapter whose extra components are zero: `layer.rank` is
    `max_rank` and `alpha` becomes `scale·max_rank` (`scale·sqrt(max_rank)`
    with rsLoRA), which keeps the scale. Each scale becomes a non-trainable
    float32 variable that the layer reads on every call. After this,
    `hotswap_adapter` writes any adapter of rank `<= max_rank` and any alpha
    into the same variables, and compiled functions keep running without a
    retrace.

    The padded factors are new variables, so call this before `compile`
    (the model's compiled functions are dropped; compile again to train).
    Everything else works on a prepared model: `merge_lora`, `save_adapter`
    (which writes the padded adapter at rank `max_rank`, loadable by any
    model), `.keras` files (which record each adapter's `hotswap` option),
    named adapters, DoRA. Calling it again with a larger `max_rank` pads
    further.

    Args:
        model: a `keras.Model` with built LoRA layers.
        max_rank: positive integer, the capacity: the largest rank a swapped
            adapter may have, and at least every current adapter's rank.

    Returns:
        `model`, prepared in place.

    Raises:
        TypeError: `model` is not a `keras.Model`, or `max_rank` is not an
            integer.
        ValueError: `max_rank` is below an adapter's rank, `model` has no
            LoRA layers, or they are not built; nothing was changed.

    Example:

    >>> lora_model = kl.apply_lora(model, rank=4)
    >>> kl.prepare_hotswap(lora_model, max_rank=16)
    >>> lora_model.compile(...)
    >>> kl.hotswap_adapter(lora_model, "tenant_a.safetensors")
    """
    check_is_model(model, "prepare_hotswap")
    max_rank = validate_rank(max_rank, "max_rank")
    layers = require_lora_layers(
        model,
        "prepare_hotswap",
        ". Use `apply_lora` (or `load_adapter`) first.",
        built=True,
    )
    above = [
        f"'{path}' adapter {adapter.name!r} rank {adapter.rank}"
        for path, layer in layers
        for adapter in map(layer.get_adapter, layer.adapter_names)
        if adapter.rank > max_rank
    ]
    if above:
        raise ValueError(
            f"prepare_hotswap: `max_rank` must be at least the rank of every "
            f"adapter. Received: max_rank={max_rank}, but model "
            f"'{model.name}' has:\n  " + "\n  ".join(above) + "\nNothing was changed."
        )
    for _, layer in layers:
        layer.prepare_hotswap(max_rank)
    drop_compiled(model)
    return model
