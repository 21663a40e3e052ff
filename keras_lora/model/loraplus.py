"""LoRA+: a learning rate for the `B` factors that is `ratio` times that of
the rest (Hayou et al., 2024; PEFT's `create_loraplus_optimizer`).

`loraplus_optimizer(optimizer, ratio=16)` returns a new optimizer of a
subclass of `type(optimizer)`, built from `optimizer.get_config()` plus
`ratio`. Its `_backend_update_step` (the step every Keras 3 backend runs:
the per-variable `update_step` loop on JAX, TF's distributed step, torch's
foreach `_parallel_update_step`) is called twice: once for the other
variables at the learning rate, once for the `B` group at
`learning_rate * ratio`. Decoupled weight decay of the `B` group uses
`learning_rate * ratio` too, as a torch param group with that `lr` does.
JAX's `stateless_apply` runs the same `apply`, so `model.fit` works on all
three backends.

Which variables are `B`: the optimizer sees variables, not the model, so
they are told apart by name, following PEFT's rule (`"lora_B" in name or
param.ndim == 1`):

- a LoRA layer's `lora_b` (adapter `"default"`) or `lora_b_<adapter>`,
  of every layer type (Dense, EinsumDense, Conv, Embedding);
- every trainable 1-D variable: DoRA's `lora_magnitude*`, and biases or
  norm scales that are trained alongside the adapters.

Where this differs from PEFT 0.21: PEFT trains both factors of an
Embedding's adapter at a fixed `loraplus_lr_embedding` (default 1e-6);
here an Embedding's `lora_a` gets the learning rate and its `lora_b`
`ratio` times it, since a variable's name does not say which layer type
made it. Weight decay is the Keras optimizer's own (PEFT's is
`loraplus_weight_decay`).

The subclass of each Keras optimizer class is registered at import (as
`keras_lora>LoRAPlus<Class>`), so a compiled model saved to `.keras` loads
with its LoRA+ optimizer and `ratio`. A custom optimizer class gets its
subclass registered when it is first wrapped; wrap one instance of it
before loading such a file in a new process.
"""

import math
import numbers

import keras
from keras import ops

_CLASSES = {}
# Optimizer variables that a step advances once for all trainable variables.
_STEP_STATE = ("_u_product",)


def is_b_variable(variable):
    """Whether `variable` gets `ratio` times the learning rate: a LoRA `B`
    factor (`lora_b`, `lora_b_<adapter>`) or any 1-D variable (PEFT's rule;
    DoRA's magnitude)."""
    name = variable.name.split("/")[-1]
    if name == "lora_b" or name.startswith("lora_b_"):
        return True
    return len(variable.shape) == 1


class _LoRAPlusMixin:
    """The LoRA+ step over a Keras optimizer class (see the module)."""

    def __init__(self, *args, ratio=16.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ratio = _check_ratio(ratio)
        self._loraplus_scale = None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        rest, b_group = [], []
        for grad, variable in zip(grads, trainable_variables, strict=True):
            group = b_group if is_b_variable(variable) else rest
            group.append((grad, variable))
        # Optimizer state shared by all variables and advanced once a step
        # (Nadam's `_u_product`): the B group's call starts from the same
        # value, so it advances once, not twice.
        shared = [
            v
            for v in (getattr(self, n, None) for n in _STEP_STATE)
            if isinstance(v, keras.Variable)
        ]
        start = [ops.copy(v) for v in shared] if rest and b_group else []
        if rest:
            super()._backend_update_step(
                [g for g, _ in rest], [v for _, v in rest], learning_rate
            )
        for variable, value in zip(shared, start, strict=False):
            variable.assign(value)
        if b_group:
            super()._backend_update_step(
                [g for g, _ in b_group],
                [v for _, v in b_group],
                ops.multiply(learning_rate, self.ratio),
            )

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return super()._apply_weight_decay(variables)
        rest = [v for v in variables if not is_b_variable(v)]
        b_group = [v for v in variables if is_b_variable(v)]
        if rest:
            super()._apply_weight_decay(rest)
        if b_group:
            self._loraplus_scale = self.ratio
            try:
                super()._apply_weight_decay(b_group)
            finally:
                self._loraplus_scale = None

    def _get_current_learning_rate(self):
        learning_rate = super()._get_current_learning_rate()
        scale = getattr(self, "_loraplus_scale", None)
        if scale is None:
            return learning_rate
        return ops.multiply(learning_rate, scale)

    def get_config(self):
        config = super().get_config()
        config["ratio"] = self.ratio
        return config


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(
            f"`ratio` must be a positive finite number; got {ratio!r} "
            f"({type(ratio).__name__})."
        )
    ratio = float(ratio)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"`ratio` must be a positive finite number; got {ratio!r}.")
    return ratio


def loraplus_class(base):
    """The registered LoRA+ subclass of the optimizer class `base` (the
    backend's class: torch maps `keras.optimizers.Adam` to its own)."""
    if isinstance(base, type) and issubclass(base, _LoRAPlusMixin):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"LoRAPlus{base.__name__}"
        cls = type(
            name,
            (_LoRAPlusMixin, base),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": (
                    f"`{base.__name__}` with LoRA+: the `B` factors' learning rate "
                    "is `ratio` times the rest (see `kl.loraplus_optimizer`)."
                ),
            },
        )
        cls = keras.saving.register_keras_serializable(package="keras_lora", name=name)(
            cls
        )
        _CLASSES[base] = cls
    return cls


def loraplus_optimizer(optimizer, ratio=16):
    """A LoRA+ copy of `optimizer`: the same class and configuration, with
    the learning rate of the LoRA `B` factors `ratio` times that of the
    other variables (PEFT's `create_loraplus_optimizer`).

    Args:
        optimizer: a `keras.optimizers.Optimizer` instance, not yet used or
            used (its configuration is copied, not its state); it is not
            modified. A `LossScaleOptimizer` or `MultiOptimizer` is
            refused: wrap the optimizers inside it (Keras wraps a LoRA+
            optimizer in a `LossScaleOptimizer` itself under a
            mixed-precision policy).
        ratio: positive finite number, `lr_B / lr_A` (the paper suggests
            about 16; PEFT's `loraplus_lr_ratio`).

    Returns:
        A new optimizer, ready for `model.compile(optimizer=...)`. `B` is a
        variable named `lora_b` or `lora_b_<adapter>`, or any 1-D variable
        (DoRA's magnitude), as in PEFT; see docs/variants.md.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` must be a keras.optimizers.Optimizer instance; got "
            f"{type(optimizer).__name__}."
        )
    if isinstance(optimizer, _wrappers()):
        raise TypeError(
            f"`optimizer` is a {type(optimizer).__name__}, which applies other "
            "optimizers; wrap the optimizer(s) inside it instead."
        )
    if isinstance(optimizer, _LoRAPlusMixin):
        raise ValueError(
            f"`optimizer` is already a LoRA+ optimizer (ratio={optimizer.ratio}); "
            "wrap the plain optimizer."
        )
    ratio = _check_ratio(ratio)
    cls = loraplus_class(type(optimizer))
    # `from_config` rebuilds a learning-rate schedule from its config.
    return cls.from_config({**optimizer.get_config(), "ratio": ratio})


def _wrappers():
    """Keras optimizers that hand the step to other optimizers."""
    names = ("LossScaleOptimizer", "MultiOptimizer")
    return tuple(
        getattr(keras.optimizers, n) for n in names if hasattr(keras.optimizers, n)
    )


def _register_builtins():
    for name in dir(keras.optimizers):
        base = getattr(keras.optimizers, name)
        if (
            isinstance(base, type)
            and issubclass(base, keras.optimizers.Optimizer)
            and base is not keras.optimizers.Optimizer
            and not issubclass(base, _wrappers())
        ):
            loraplus_class(type(base.__new__(base)))


_register_builtins()
