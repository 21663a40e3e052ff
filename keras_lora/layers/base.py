"""The shared adapter base: A/B weights, scale, delta and merge.

Every LoRA layer type derives from `LoRALayer`. A subclass says only what
differs for its base layer: which Keras class it wraps, how the kernel is
factored into `lora_a` and `lora_b` (`adapter_shapes`), and how it calls.
"""

import sys
import warnings

import keras
import numpy as np
from keras import ops

from keras_lora.config import (  # noqa: F401  (validate_rank: older imports)
    DEFAULT_NAME,
    validate_alpha,
    validate_factoring,
    validate_flag,
    validate_rank,
)
from keras_lora.layers import factoring as factoring_math
from keras_lora.layers import host_merge
from keras_lora.layers.variants import Adapter, factor_kernel


def _warn_rank_above_kernel_rank(layer_name, adapter, a_shape, b_shape):
    """A rank above `min(in, out)` is allowed (PEFT allows it too), but the
    extra ranks add parameters and no expressiveness: warn."""
    limit = min(int(np.prod(a_shape[:-1])), int(np.prod(b_shape[1:])))
    if adapter.rank > limit:
        warnings.warn(
            f"LoRA layer '{layer_name}': rank {adapter.rank} is above "
            f"min(in, out) = {limit} of its kernel, so `A·B` has rank at most "
            f"{limit}; the extra ranks add parameters but nothing else.",
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel():
    """The `stacklevel` of the first frame outside keras_lora and Keras."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("keras_lora", "keras")
    ):
        frame, level = frame.f_back, level + 1
    return level


def float_policy(layer):
    """`layer`'s dtype policy; for a quantized layer, its float source."""
    policy = layer.dtype_policy
    source = getattr(policy, "_source_name", None)
    if policy.quantization_mode is not None and source:
        return keras.DTypePolicy(source)
    return policy


def adapter_dtype(variable_dtype):
    """Adapters never train in 16-bit: Adam's updates underflow there."""
    if variable_dtype in ("float16", "bfloat16"):
        return "float32"
    return variable_dtype


class LoRALayer(keras.layers.Wrapper):
    """Base class of all LoRA layers: a frozen base layer plus `A·B`.

    The wrapped layer's weights are frozen, for good: setting `trainable`
    on this layer (or on a model holding it) only toggles the adapters.

    Subclasses set `base_class` and `kernel_attr` and implement
    `adapter_shapes()` and `call()`.

    Args:
        layer: the layer to adapt, built or not.
        rank: positive integer, the inner dimension `r` of `A·B`.
        alpha: positive number, or `None` for `alpha = rank`. The update is
            scaled by `scale = alpha / rank`.
        use_rslora: if true, scale by `alpha / sqrt(rank)` instead
            (rank-stabilized LoRA, PEFT's `use_rslora`).
        dropout: dropout rate in `[0, 1)` on the adapter's input path, in
            training only (`training=True`); the base path never drops.
        init: `"default"`, `"gaussian"`, `"pissa"` or `"olora"`; see
            `keras_lora.layers.variants`. `"pissa"`/`"olora"` give the layer
            a residual kernel of its own (one more kernel of memory); the
            shared base kernel is never modified.
        use_dora: DoRA: a trainable magnitude per output unit and the output
            `m·(W + s·A·B)/‖W + s·A·B‖` (norm constant in the backward pass).
        adapter_name: the name of this first adapter (`"default"`).
        adapters: further adapters, as a list of dicts of `Adapter`
            arguments (`name`, `rank`, `alpha`, ...); used by `get_config`.
        active_adapters: names of the active adapters (default: the first).
        **kwargs: base `Layer` keyword arguments (`name`, `dtype`, ...).
            `name` and `dtype` default to the wrapped layer's.

    Several named adapters can sit on one base (`add_adapter`). The active
    ones (`set_active_adapters`) add up and are the only trainable ones;
    `lora_a`, `lora_b`, `rank`, `alpha`, `scale` refer to the first active
    adapter. The adapter named `"default"` has variables `lora_a`/`lora_b`
    (`lora_magnitude` with DoRA), another one `lora_a_<name>`, ... .
    """

    base_class = None
    kernel_attr = "kernel"
    # Keras quantization modes (`layer.quantize(mode)`) a base may have.
    quantization_modes = ()

    def __init__(
        self,
        layer,
        rank=8,
        alpha=None,
        use_rslora=False,
        dropout=0.0,
        init="default",
        use_dora=False,
        adapter_name=DEFAULT_NAME,
        adapters=None,
        active_adapters=None,
        factoring=None,
        **kwargs,
    ):
        restoring = kwargs.pop("_restoring", False)
        self._check_base_layer(layer)
        factoring = self._resolve_factoring(layer, factoring)
        specs = [
            Adapter(adapter_name, rank, alpha, use_rslora, dropout, init, use_dora)
        ]
        specs += [Adapter(**dict(config)) for config in adapters or ()]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names must be unique. Received: {names}")
        for spec in specs:
            self._check_variant(layer, spec, specs)
        if active_adapters is None:
            active = [names[0]]
        elif isinstance(active_adapters, str):
            active = [active_adapters]
        else:
            active = list(active_adapters)
        unknown = [name for name in active if name not in names]
        if unknown:
            raise ValueError(
                f"`active_adapters` {unknown} are not adapters of this layer "
                f"(adapters: {names})."
            )
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", float_policy(layer))
        super().__init__(layer, **kwargs)
        # Plain Python state, kept out of Keras's (and TensorFlow's) tracking.
        object.__setattr__(self, "_adapters", {spec.name: spec for spec in specs})
        object.__setattr__(self, "_active", active)
        object.__setattr__(self, "_disabled", False)
        object.__setattr__(self, "_merged", None)
        object.__setattr__(self, "_restoring", bool(restoring))
        object.__setattr__(self, "_factoring", factoring)
        self._setup_factoring()
        self.seed_generator = None
        if any(spec.dropout for spec in specs):
            self.seed_generator = keras.random.SeedGenerator()
        self.layer.trainable = False
        if self.layer.built:
            self._build_adapters()

    @classmethod
    def _resolve_factoring(cls, layer, factoring):
        """The factoring this layer type uses for `layer` (see
        `LoRAEinsumDense`); for the other types both names mean the same."""
        validate_factoring(factoring)
        return "standard"

    def _setup_factoring(self):
        """Hook: plain Python state that depends on the factoring."""

    @property
    def factoring(self):
        """How `A·B` covers the kernel: `"standard"` or `"keras"`."""
        return self._factoring

    def kernel_layout(self):
        """The factoring's `(permutation, n_in)`; see `layers.factoring`."""
        return None, None

    def __getattr__(self, name):
        # Only reached when normal lookup fails. A LoRA layer is a drop-in:
        # public attributes it lacks (`kernel`, `units`, `equation`, ...)
        # are read from the wrapped layer. Private names never fall through
        # (Keras probes its own private state with `hasattr`), and writes
        # never do (they go to this layer, as for any attribute).
        parent = getattr(super(), "__getattr__", None)
        if parent is not None:  # torch.nn.Module's: parameters, submodules
            try:
                return parent(name)
            except AttributeError:
                pass
        if name.startswith("_") or name == "layer":
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        state = self.__dict__
        layer = state.get("layer", state.get("_modules", {}).get("layer"))
        if layer is None:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        try:
            return getattr(layer, name)
        except AttributeError as error:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}', "
                f"nor has the {type(layer).__name__} it wraps ({error})"
            ) from None

    def enable_lora(self, *args, **kwargs):
        """Refused: this layer already is a LoRA layer (Keras core's
        `enable_lora` would put a second update on the frozen base)."""
        raise ValueError(
            f"Layer '{self.name}' is a keras_lora {type(self).__name__}; Keras "
            "core's `enable_lora` cannot be used on it (add another adapter "
            "with `add_adapter` instead)."
        )

    def _check_variant(self, layer, spec, specs):
        """Raises if `spec`'s variant options cannot apply to `layer`."""
        quantized = getattr(layer, "quantization_mode", None) is not None
        if quantized and (spec.use_dora or spec.changes_base):
            option = "use_dora=True" if spec.use_dora else f"init={spec.init!r}"
            raise ValueError(
                f"Layer '{layer.name}' is quantized: adapter '{spec.name}' "
                f"cannot use {option} there (DoRA and PiSSA/OLoRA need the "
                "float kernel). Use them on a float base."
            )
        changing = [s.name for s in specs if s.changes_base]
        if len(changing) > 1:
            raise ValueError(
                f"Layer '{layer.name}': only one adapter per layer can use "
                f"init='pissa' or 'olora' (they rewrite the frozen kernel); "
                f"received {changing}."
            )

    @classmethod
    def _check_base_layer(cls, layer):
        if cls.base_class is None:
            raise TypeError(
                f"{cls.__name__} is the abstract base class of the LoRA layers; "
                "use the one for your layer type (LoRADense, LoRAEinsumDense, "
                "LoRAEmbedding, LoRAConv)."
            )
        if isinstance(layer, LoRALayer):
            raise TypeError(
                f"`layer` is already a LoRA layer ('{layer.name}', "
                f"{type(layer).__name__}); wrapping it again is not supported."
            )
        if not isinstance(layer, cls.base_class):
            raise TypeError(
                f"{cls.__name__} wraps a `keras.layers.{cls.base_class.__name__}`. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras core LoRA enabled "
                "(`enable_lora`). Use a layer without it."
            )
        mode = getattr(layer, "quantization_mode", None)
        if mode is not None and mode not in cls.quantization_modes:
            supported = (
                f"{cls.__name__} supports quantized bases in modes "
                f"{list(cls.quantization_modes)} only."
                if cls.quantization_modes
                else f"{cls.__name__} does not support quantized bases."
            )
            raise ValueError(
                f"Layer '{layer.name}' is quantized ({mode!r}). {supported}"
            )

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_adapters()
        self.built = True

    def _build_adapters(self):
        tracker = getattr(self, "_tracker", None)
        locked = tracker is not None and tracker.locked
        if locked:
            tracker.unlock()
        try:
            for adapter in self._adapters.values():
                if adapter.a is None:
                    self._create_adapter(adapter, initialize=not self._restoring)
        finally:
            if locked:
                tracker.lock()
        object.__setattr__(self, "_restoring", False)
        self._sync_trainable()
        self.built = True

    def _create_adapter(self, adapter, initialize=True):
        """Creates `adapter`'s variables; with `initialize`, computes the
        data-dependent starting values (PiSSA/OLoRA factors, DoRA norms)."""
        a_shape, b_shape = self.adapter_shapes()
        a_shape = tuple(a_shape[:-1]) + (adapter.rank,)
        b_shape = (adapter.rank,) + tuple(b_shape[1:])
        if initialize:
            _warn_rank_above_kernel_rank(self.name, adapter, a_shape, b_shape)
        a_init, b_init = self.adapter_initializers()
        if adapter.init == "gaussian":
            normal = keras.initializers.RandomNormal(stddev=1.0 / adapter.rank)
            if b_init == "zeros":
                a_init = normal
            else:
                b_init = normal
        elif adapter.changes_base:
            a_init = b_init = "zeros"
        dtype = adapter_dtype(self.variable_dtype)
        suffix = "" if adapter.name == DEFAULT_NAME else f"_{adapter.name}"
        adapter.a = self.add_weight(
            name=f"lora_a{suffix}", shape=a_shape, initializer=a_init, dtype=dtype
        )
        adapter.b = self.add_weight(
            name=f"lora_b{suffix}", shape=b_shape, initializer=b_init, dtype=dtype
        )
        kernel = self.base_kernel
        if adapter.use_dora:
            shape = [
                d for i, d in enumerate(kernel.shape) if i not in self._norm_axes()
            ]
            adapter.magnitude = self.add_weight(
                name=f"lora_magnitude{suffix}",
                shape=tuple(shape),
                initializer="ones",
                dtype=dtype,
            )
        if adapter.changes_base:
            adapter.residual = self.add_weight(
                name=f"lora_residual_kernel{suffix}",
                shape=tuple(kernel.shape),
                initializer="zeros",
                dtype=kernel.dtype,
                trainable=False,
            )
            value = np.asarray(ops.convert_to_numpy(kernel))
            if initialize:
                layout = self.kernel_layout()
                matrix = factoring_math.to_matrix(value.astype(np.float64), layout, np)
                a, b = factor_kernel(matrix, adapter.rank, adapter.scale, adapter.init)
                a = a.reshape(a_shape).astype(dtype)
                b = b.reshape(b_shape).astype(dtype)
                adapter.a.assign(a)
                adapter.b.assign(b)
                value = value.astype(np.float64) - factoring_math.product(
                    a.astype(np.float64),
                    b.astype(np.float64),
                    adapter.scale,
                    adapter.rank,
                    value.shape,
                    layout,
                    np,
                )
            adapter.residual.assign(value.astype(adapter.residual.dtype))
        if adapter.use_dora:
            frozen = ops.cast(self._frozen_for([adapter]), "float32")
            norm = self._column_norm(ops.add(frozen, self._adapter_delta(adapter)))
            adapter.magnitude.assign(ops.cast(norm, adapter.magnitude.dtype))

    # ----- named adapters -------------------------------------------------

    @property
    def adapter_names(self):
        """The names of this layer's adapters, in creation order."""
        return list(self._adapters)

    @property
    def active_adapters(self):
        """The names of the active adapters (their updates add up)."""
        return [name for name in self._active if name in self._adapters]

    def get_adapter(self, name):
        """The `Adapter` (options and variables) named `name`."""
        if name not in self._adapters:
            raise ValueError(
                f"LoRA layer '{self.name}' has no adapter {name!r} "
                f"(adapters: {self.adapter_names})."
            )
        return self._adapters[name]

    def add_adapter(self, name, rank=8, alpha=None, **options):
        """Adds an inactive adapter `name` (same options as the constructor:
        `use_rslora`, `dropout`, `init`, `use_dora`) on the same frozen base."""
        adapter = Adapter(name, rank, alpha, **options)
        if name in self._adapters:
            raise ValueError(f"LoRA layer '{self.name}' already has adapter {name!r}.")
        specs = list(self._adapters.values()) + [adapter]
        self._check_variant(self.layer, adapter, specs)
        if adapter.dropout and self.seed_generator is None:
            self._unlocked(
                lambda: setattr(self, "seed_generator", keras.random.SeedGenerator())
            )
        self._adapters[name] = adapter
        if self.built or self.layer.built:
            try:
                self._build_adapters()
            except Exception:
                self._remove_variables(adapter)
                del self._adapters[name]
                raise
        return adapter

    def set_active_adapters(self, names):
        """Makes `names` (a name or a list) the active, trainable adapters.
        Names this layer lacks are ignored; with none left the layer computes
        its base output."""
        names = [names] if isinstance(names, str) else list(names)
        names = [name for name in names if name in self._adapters]
        object.__setattr__(self, "_active", names)
        self._sync_trainable()

    def delete_adapter(self, name):
        """Deletes adapter `name` and its variables. If it was active, the
        other active adapters stay active; if none is left, the first
        remaining adapter becomes active. The last adapter cannot go."""
        adapter = self.get_adapter(name)
        if len(self._adapters) == 1:
            raise ValueError(
                f"Adapter {name!r} is the only adapter of LoRA layer "
                f"'{self.name}'; a LoRA layer needs one. Merge "
                "(`merge_lora`) or rebuild the model instead."
            )
        self._remove_variables(adapter)
        del self._adapters[name]
        active = [n for n in self._active if n != name]
        if name in self._active and not any(n in self._adapters for n in active):
            active = [next(iter(self._adapters))]
        object.__setattr__(self, "_active", active)
        self._sync_trainable()

    @property
    def adapters_disabled(self):
        """While true, the layer computes exactly its base layer's output."""
        return self._disabled

    @adapters_disabled.setter
    def adapters_disabled(self, value):
        object.__setattr__(self, "_disabled", bool(value))

    def _unlocked(self, fn):
        tracker = self._tracker
        locked = tracker.locked
        tracker.unlock()
        try:
            return fn()
        finally:
            if locked:
                tracker.lock()

    def _remove_variables(self, adapter):
        doomed = {id(v) for v in adapter.variables}
        if adapter.residual is not None:
            doomed.add(id(adapter.residual))
        for store in ("trainable_variables", "non_trainable_variables"):
            variables = getattr(self, f"_{store}")
            variables[:] = [v for v in variables if id(v) not in doomed]
            self._tracker.stored_ids[store] -= doomed
        adapter.a = adapter.b = adapter.magnitude = adapter.residual = None

    def _sync_trainable(self):
        """Active adapters follow `trainable`; the others are frozen."""
        adapters = getattr(self, "_adapters", None)
        if adapters is None:
            return
        active = set(self._active)
        for adapter in adapters.values():
            on = self._trainable and adapter.name in active
            for variable in adapter.variables:
                variable.trainable = on

    def _primary(self):
        for name in self._active:
            if name in self._adapters:
                return self._adapters[name]
        return next(iter(self._adapters.values()))

    def _primary_variable(self, attr):
        adapters = self.__dict__.get("_adapters")
        value = getattr(self._primary(), attr) if adapters else None
        if value is None:
            raise AttributeError(f"LoRA layer '{self.name}' has no {attr} (not built)")
        return value

    @property
    def lora_a(self):
        """`A` of the first active adapter."""
        return self._primary_variable("a")

    @property
    def lora_b(self):
        """`B` of the first active adapter."""
        return self._primary_variable("b")

    @property
    def lora_magnitude(self):
        """DoRA's magnitude of the first active adapter, or `None`."""
        return self._primary().magnitude

    @property
    def rank(self):
        return self._primary().rank

    @property
    def alpha(self):
        return self._primary().alpha

    @alpha.setter
    def alpha(self, value):
        value = validate_alpha(value)
        self._primary().alpha = float(self._primary().rank if value is None else value)

    @property
    def use_rslora(self):
        return self._primary().use_rslora

    @use_rslora.setter
    def use_rslora(self, value):
        self._primary().use_rslora = validate_flag(value, "use_rslora")

    @property
    def dropout(self):
        return self._primary().dropout

    @property
    def init(self):
        return self._primary().init

    @property
    def use_dora(self):
        return self._primary().use_dora

    # ----- the forward pass, shared by the layer types ---------------------

    def _call_adapters(self):
        """The adapters this call applies (decided in Python, at trace time)."""
        if self._disabled or self._merged is not None:
            return []
        return [self._adapters[n] for n in self._active if n in self._adapters]

    def _bypass(self):
        """Whether a call is exactly the base layer's call."""
        return self._disabled or (
            self._merged is None and not self._call_adapters() and not self._residual()
        )

    def _residual(self):
        for adapter in self._call_adapters():
            if adapter.residual is not None:
                return adapter.residual
        return None

    def _frozen_kernel(self):
        """The kernel the call multiplies by: the in-place merged one, the
        active PiSSA/OLoRA residual, or the base kernel."""
        if self._merged is not None:
            return self._merged
        residual = self._residual()
        if residual is not None:
            return residual
        return getattr(self.layer, self.kernel_attr)

    def _frozen_for(self, adapters):
        for adapter in adapters:
            if adapter.residual is not None:
                return adapter.residual
        return self.base_kernel

    @staticmethod
    def _scaled(x, adapter, dtype):
        """`scale·x` on a rank-sized tensor; no op when the scale is 1."""
        if adapter.scale == 1.0:
            return x
        return ops.multiply(x, ops.cast(adapter.scale, dtype))

    def call(self, inputs, training=None):
        """`activation(x·W + updates + bias)`, `x·W` being the type's
        `_base_op`; layer types with another shape of call override it."""
        if self._bypass():  # adapters disabled or none active: the base exactly
            return self._base_call(inputs, training)
        layer = self.layer
        dtype = inputs.dtype
        if self.quantization_mode is not None and self._merged is None:
            # A frozen int8 base (QLoRA-style): Keras's own quantized op.
            base = self._quantized_base_call(inputs, training)
            x = self._add_updates(inputs, base, training, dtype)
        else:
            base = self._base_op(inputs, self._frozen_kernel())
            x = self._add_updates(inputs, base, training, dtype)
            if layer.bias is not None:
                x = ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    def _base_op(self, inputs, kernel):
        """The base layer's product of inputs and kernel, before bias."""
        raise NotImplementedError

    def _base_call(self, inputs, training=None):
        """The base layer's own call, quantized or not: exact base output."""
        if self.quantization_mode is not None:
            return self.layer.quantized_call(inputs, training=training)
        return self.layer.call(inputs)

    # Whether `dropout` applies to the call's inputs; a layer type whose
    # inputs cannot be dropped (token ids) applies it in `_update` instead.
    drops_inputs = True

    def _update(self, inputs, adapter, dtype, training=None):
        """`scale·(x·A)·B` of one adapter, shaped like the output."""
        raise NotImplementedError

    def _dropout(self, x, adapter, training):
        if adapter.dropout and training:
            return keras.random.dropout(x, adapter.dropout, seed=self.seed_generator)
        return x

    def _add_updates(self, inputs, base, training, dtype, adapters=None):
        """`base` (`x·W`, no bias yet) plus every active adapter's update.

        A DoRA adapter adds `(c - 1)·x·W + c·s·x·A·B` with
        `c = m / ‖W + s·A·B‖` (PEFT's sum over adapters); alone, that is
        `c·(x·W + s·x·A·B)`.
        """
        out = base
        for adapter in self._call_adapters() if adapters is None else adapters:
            x = (
                self._dropout(inputs, adapter, training)
                if self.drops_inputs
                else inputs
            )
            update = self._update(x, adapter, dtype, training)
            if adapter.magnitude is None:
                out = ops.add(out, update)
                continue
            c = ops.cast(self._dora_factor(adapter), dtype)
            out = ops.add(
                out,
                ops.add(
                    self._scale_output(base, ops.subtract(c, 1.0)),
                    self._scale_output(update, c),
                ),
            )
        return out

    def _norm_axes(self):
        """The kernel axes that DoRA's column norm reduces (the input axes)."""
        return tuple(range(len(self.base_kernel.shape) - 1))

    def _column_norm(self, kernel):
        return ops.sqrt(ops.sum(ops.square(kernel), axis=self._norm_axes()))

    def _dora_factor(self, adapter):
        """`m / ‖W + s·A·B‖` per output unit, the norm without gradient."""
        frozen = ops.cast(self._frozen_for([adapter]), "float32")
        norm = self._column_norm(ops.add(frozen, self._adapter_delta(adapter)))
        norm = ops.stop_gradient(norm)
        return ops.divide(ops.cast(adapter.magnitude, "float32"), norm)

    def _scale_output(self, y, c):
        """`y` times the per-output-unit factor `c` (last axis by default)."""
        return ops.multiply(y, c)

    def _expand_to_kernel(self, c):
        for axis in sorted(self._norm_axes()):
            c = ops.expand_dims(c, axis)
        return c

    def _adapter_delta(self, adapter):
        """`scale·A·B` of one adapter, shaped like the kernel, float32."""
        return factoring_math.product(
            ops.cast(adapter.a, "float32"),
            ops.cast(adapter.b, "float32"),
            adapter.scale,
            adapter.rank,
            self.base_kernel.shape,
            self.kernel_layout(),
            ops,
        )

    def adapter_shapes(self):
        """Returns `(a_shape, b_shape)`; `A·B` reshapes to the kernel's shape."""
        raise NotImplementedError

    def adapter_initializers(self):
        """Returns the initializers of `(lora_a, lora_b)`. One must be zeros,
        so that a fresh LoRA layer computes exactly what its base does."""
        # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as loralib and PEFT do.
        a_init = keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        )
        return a_init, "zeros"

    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        # Unlike `Layer.trainable`, never propagate to the base layer: its
        # weights stay frozen whatever a user or a parent model sets. Only
        # the active adapters follow the flag.
        self._trainable = bool(value)
        self._sync_trainable()

    @property
    def scale(self):
        """The factor on the (first active) update: `alpha / rank`, or
        `alpha / sqrt(rank)` with `use_rslora`."""
        return self._primary().scale

    @property
    def quantization_mode(self):
        """The base layer's Keras quantization mode, e.g. `"int8"`, or None."""
        return getattr(self.layer, "quantization_mode", None)

    @property
    def base_kernel(self):
        """The base kernel; for a quantized base, dequantized to float."""
        if self.quantization_mode is None:
            return getattr(self.layer, self.kernel_attr)
        return self._dequantized_kernel()

    def _dequantized_kernel(self):
        layer = self.layer
        if self.quantization_mode != "int8":
            raise NotImplementedError(self.quantization_mode)
        scale = ops.convert_to_tensor(layer.kernel_scale)
        adjust = getattr(layer, "_adjust_scale_for_dequant", None)
        if adjust is not None:
            scale = adjust(scale)
        kernel = ops.cast(layer._kernel, "float32")
        return ops.divide(kernel, ops.cast(scale, "float32"))

    def quantized_call(self, *args, **kwargs):
        # Keras sends a layer whose `quantization_mode` is set here instead
        # of to `call`. A LoRA layer's is its base's, and `call` handles it.
        return self.call(*args, **kwargs)

    def _quantized_base_call(self, inputs, training=None):
        """The quantized base's output before its activation.

        Keras's quantized calls apply the activation last, so it is set
        aside for the call; the adapter's update goes in before it.
        """
        layer = self.layer
        activation = layer.activation
        object.__setattr__(layer, "activation", None)
        try:
            return layer.quantized_call(inputs, training=training)
        finally:
            object.__setattr__(layer, "activation", activation)

    def _adapter(self, variable, dtype):
        # Under a mixed policy Keras autocasts on read; this covers the rest.
        same = keras.backend.standardize_dtype(variable.dtype) == (
            keras.backend.standardize_dtype(dtype)
        )
        return variable if same else ops.cast(variable, dtype)

    def delta(self):
        """The kernel update of the active adapters, shaped like the base
        kernel (float32): `scale·A·B` for one plain adapter."""
        kernel = ops.cast(self.base_kernel, "float32")
        return ops.subtract(self._merged_float32(), kernel)

    def _merged_float32(self):
        adapters = [self._adapters[n] for n in self._active if n in self._adapters]
        frozen = ops.cast(self._frozen_for(adapters), "float32")
        total = frozen
        for adapter in adapters:
            delta = self._adapter_delta(adapter)
            if adapter.magnitude is None:
                total = ops.add(total, delta)
                continue
            c = self._expand_to_kernel(self._dora_factor(adapter))
            total = ops.add(
                total,
                ops.add(
                    ops.multiply(ops.subtract(c, 1.0), frozen), ops.multiply(c, delta)
                ),
            )
        return total

    def _plain_merge(self):
        """Whether the merge is `W + scale·A·B` of one plain adapter."""
        adapters = [self._adapters[n] for n in self._active if n in self._adapters]
        return (
            len(adapters) == 1
            and adapters[0].magnitude is None
            and adapters[0].residual is None
        )

    def merged_kernel(self):
        """Returns the kernel the active adapters amount to, in the base
        kernel's dtype: `W + scale·A·B` for one plain adapter; with several,
        their sum; PiSSA/OLoRA start from the residual; DoRA scales columns."""
        kernel = self.base_kernel
        return ops.cast(self._merged_float32(), kernel.dtype)

    def merged_layer(self, check_finite=True, requantize=False):
        """Returns a new, built base layer holding the merged kernel.

        It has the base layer's class, config and name. Raises `ValueError`
        (and builds nothing) if the merged kernel has NaN or Inf and
        `check_finite` is true.

        A quantized base (`"int8"`) is dequantized and merged in float: the
        new layer has the base's float (source) dtype policy. With
        `requantize=True` it is then quantized again in the base's mode,
        which rounds the merged kernel to int8 (see the README).
        """
        base = self.layer
        mode = self.quantization_mode
        if mode is None and self._plain_merge():
            merged = host_merge.merged_kernel_array(
                self.base_kernel,
                self.lora_a,
                self.lora_b,
                self.scale,
                self.rank,
                self.kernel_layout(),
            )
        else:
            merged = ops.convert_to_numpy(self.merged_kernel())
        if check_finite and not host_merge.all_finite(merged):
            raise ValueError(
                f"Merging LoRA layer '{self.name}' gives NaN or Inf in its "
                "kernel; nothing was merged. Check the adapters, or pass "
                "check_finite=False to merge anyway."
            )
        if mode is None:
            kernel = self.base_kernel
            return host_merge.build_with_weights(
                base,
                [
                    merged if w is kernel else np.array(ops.convert_to_numpy(w))
                    for w in base.weights
                ],
            )
        config = base.get_config()
        config["dtype"] = getattr(base.dtype_policy, "_source_name", None) or (
            keras.config.floatx()
        )
        config.pop("quantization_config", None)
        new = base.__class__.from_config(config)
        new.build_from_config(base.get_build_config())
        kernel = getattr(new, self.kernel_attr)
        old = {w.name: w for w in base.weights}
        new.set_weights(
            [
                merged if w is kernel else ops.convert_to_numpy(old[w.name])
                for w in new.weights
            ]
        )
        if requantize:
            new.quantize(mode)
        return new

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def save_own_variables(self, store):
        # `apply_lora` on a subclassed model sets `_reload_warning`: that
        # model's config rebuilds plain layers, so a `.keras` file of it
        # cannot bring adapters back. Store the base's weights in the base
        # layer's layout instead, so the file reloads as the base model.
        model = getattr(self, "_reload_warning", None)
        if model is None:
            return super().save_own_variables(store)
        warnings.warn(
            f"LoRA layer '{self.name}' is inside '{model}', a subclassed "
            "model whose config rebuilds plain layers: this `.keras` file "
            "reloads as the base model, WITHOUT the adapters. Save them with "
            "`keras_lora.save_adapter(model, path)` and restore them with "
            "`keras_lora.load_adapter` after `apply_lora` on the reloaded "
            "model, or save `keras_lora.merge_lora(model)` instead.",
            UserWarning,
            stacklevel=2,
        )
        self.layer.save_own_variables(store)

    def get_config(self):
        config = super().get_config()
        adapters = list(self._adapters.values())
        config.update(adapters[0].config(with_name=False))
        if adapters[0].name != DEFAULT_NAME:
            config["adapter_name"] = adapters[0].name
        if len(adapters) > 1:
            config["adapters"] = [adapter.config() for adapter in adapters[1:]]
        if self._active != [adapters[0].name]:
            config["active_adapters"] = list(self._active)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # `Wrapper.from_config` pops "layer" from the dict it is given. The
        # weights load next, so data-dependent inits (PiSSA's SVD) are skipped.
        config = cls.upgrade_config(config)
        config["_restoring"] = True
        return super().from_config(config, custom_objects=custom_objects)

    @classmethod
    def upgrade_config(cls, config):
        """A copy of `config` (from `get_config`, maybe of an older file) in
        which the entries older files lack hold what those files meant."""
        return dict(config)

    @classmethod
    def from_layer_config(cls, layer, config):
        """Wraps `layer` with the options of `config`: a `get_config()` dict
        (its `"layer"` entry, if any, ignored), maybe from an older file."""
        config = cls.upgrade_config(config)
        config.pop("layer", None)
        return cls(layer, **config)
