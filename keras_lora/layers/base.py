"""`LoRALayer`: a frozen Keras layer plus named low-rank adapters.

Each LoRA layer type (`LoRADense`, `LoRAEinsumDense`, `LoRAEmbedding`,
`LoRAConv`) derives from `LoRALayer` and says only what differs for its
base layer: which Keras class it wraps, how `A·B` covers the kernel
(`adapter_shapes`, `kernel_layout`), the base product (`_base_op`) and an
adapter's update (`_update`). The named adapters live in
`layers.registry`, the variants (init strategies, DoRA) in
`layers.variants`, quantized bases in `layers.quantized`, and the delta
with every merge in `layers.merging`.
"""

import math
import warnings

import keras
from keras import ops

from keras_lora.config import DEFAULT_NAME, validate_factoring, validate_flag
from keras_lora.layers import checks, hot_path, mixed, quantized, quantized_product
from keras_lora.layers.drop_in import DropIn
from keras_lora.layers.merging import Merging
from keras_lora.layers.registry import AdapterRegistry, adapter_specs
from keras_lora.layers.variants import Adapter


class LoRALayer(DropIn, AdapterRegistry, Merging, keras.layers.Wrapper):
    """Base class of the LoRA layers: a frozen base layer plus `A·B`.

    `output = base(x)` with the kernel `W` replaced by
    `W + scale·A·B`, `scale = alpha / rank` (or `alpha / sqrt(rank)` with
    rsLoRA), computed as `x·W + scale·(x·A)·B`: the sum is never formed
    while training. The wrapped layer's weights are frozen for good:
    `trainable` on this layer (or a model holding it) toggles the adapters
    only. Attributes this layer lacks (`kernel`, `units`, `equation`, ...)
    are read from the wrapped layer, so it is a drop-in for it.

    Subclasses set `base_class` (and `kernel_attr`, `quantization_modes`)
    and implement `adapter_shapes()`, `_base_op()` and `_update()`; a type
    whose call has another shape (embeddings, convolutions) overrides
    `call()` too.

    Args:
        layer: the layer to adapt, built or not.
        rank: positive integer, the inner dimension `r` of `A·B`.
        alpha: positive number, or `None` for `alpha = rank`.
        use_rslora: scale by `alpha / sqrt(rank)` (PEFT's `use_rslora`).
        dropout: dropout rate in `[0, 1)` on the adapter's input path, in
            training only; the base path never drops.
        init: `"default"`, `"gaussian"`, `"pissa"` or `"olora"` (see
            `layers.variants`); PiSSA/OLoRA give the layer a residual kernel
            of its own, the shared base kernel is never modified.
        use_dora: DoRA: a trainable magnitude per output unit and the output
            `m·(W + s·A·B)/‖W + s·A·B‖` (norm constant in the backward pass).
        adapter_name: the name of this first adapter (`"default"`).
        adapters: further adapters, a list of dicts of `Adapter` arguments.
        active_adapters: names of the active adapters (default: the first).
        factoring: how `A·B` covers the kernel (`LoRAEinsumDense`); the
            other types have one factoring.
        hotswap: the scale is a variable (set by `prepare_hotswap`).
        train_bias: whether the base layer's bias trains with the adapters
            (PEFT's `bias="lora_only"`); its kernel stays frozen. See
            `train_bias`.
        **kwargs: base `Layer` arguments; `name` and `dtype` default to the
            wrapped layer's.

    Several named adapters can sit on one base (`add_adapter`). The active
    ones add up and are the only trainable ones; `lora_a`, `lora_b`,
    `rank`, `alpha`, `scale` refer to the first active adapter. The
    adapter named `"default"` has variables `lora_a`/`lora_b`
    (`lora_magnitude` with DoRA), another one `lora_a_<name>`, ... .
    """

    base_class = None
    kernel_attr = "kernel"
    # Keras quantization modes (`layer.quantize(mode)`) a base may have.
    quantization_modes = ()
    # Whether `dropout` applies to the call's inputs; a type whose inputs
    # cannot be dropped (token ids) applies it in `_update` instead.
    drops_inputs = True

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
        hotswap=False,
        train_bias=False,
        **kwargs,
    ):
        restoring = kwargs.pop("_restoring", False)
        self._check_base_layer(layer)
        factoring = self._resolve_factoring(layer, factoring)
        first = Adapter(
            adapter_name, rank, alpha, use_rslora, dropout, init, use_dora, hotswap
        )
        specs, active = adapter_specs(layer, first, adapters, active_adapters)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", checks.float_policy(layer))
        super().__init__(layer, **kwargs)
        # Plain Python state, kept out of Keras's (and TensorFlow's) tracking.
        state = {
            "_adapters": {spec.name: spec for spec in specs},
            "_active": active,
            "_disabled": False,
            "_merged": None,
            "_plan": None,
            "_restoring": bool(restoring),
            "_factoring": factoring,
            "_quantized_view": quantized.without_epilogue(layer),
            "_train_bias": False,
        }
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self._setup_factoring()
        self.seed_generator = None
        if any(spec.dropout for spec in specs):
            self.seed_generator = keras.random.SeedGenerator()
        self.layer.trainable = False
        self.train_bias = train_bias
        if self.layer.built:
            self._build_adapters()

    @classmethod
    def _check_base_layer(cls, layer):
        if isinstance(layer, LoRALayer):
            raise TypeError(
                f"`layer` is already a LoRA layer ('{layer.name}', "
                f"{type(layer).__name__}); wrapping it again is not supported."
            )
        checks.check_base_layer(cls, layer)

    @classmethod
    def _resolve_factoring(cls, layer, factoring):
        """The factoring this type uses for `layer` (see `LoRAEinsumDense`);
        for the other types both names mean the same one."""
        validate_factoring(factoring)
        return "standard"

    def _setup_factoring(self):
        """Hook: plain Python state that depends on the factoring."""

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_adapters()
        self.built = True

    # ----- properties -------------------------------------------------------

    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        # Unlike `Layer.trainable`, never propagate to the base layer: its
        # weights stay frozen whatever a user or a parent model sets.
        self._trainable = bool(value)
        self._sync_trainable()

    @property
    def train_bias(self):
        """Whether the base layer's bias trains (while this layer is
        `trainable`). Every other base weight stays frozen; a base without
        a bias has nothing to train."""
        return self._train_bias

    @train_bias.setter
    def train_bias(self, value):
        object.__setattr__(self, "_train_bias", validate_flag(value, "train_bias"))
        self._sync_trainable()

    def _sync_trainable(self):
        # The one place the base's bias is frozen or not: it follows
        # `trainable` where `train_bias` is set (the base layer itself stays
        # `trainable=False`, so setting it never thaws the kernel).
        super()._sync_trainable()
        if "_train_bias" not in self.__dict__:
            return  # still in `__init__`
        bias = getattr(self.layer, "bias", None)
        if isinstance(bias, keras.Variable):
            bias.trainable = self._trainable and self._train_bias

    @property
    def factoring(self):
        """How `A·B` covers the kernel: `"standard"` or `"keras"`."""
        return self._factoring

    @property
    def quantization_mode(self):
        """The base layer's Keras quantization mode, e.g. `"int8"`, or None."""
        return getattr(self.layer, "quantization_mode", None)

    @property
    def base_kernel(self):
        """The base kernel; for a quantized base, dequantized to float32."""
        if self.quantization_mode is None:
            return getattr(self.layer, self.kernel_attr)
        return quantized.dequantized_kernel(self.layer)

    def adapter_shapes(self):
        """Returns `(a_shape, b_shape)` at the layer's rank."""
        raise NotImplementedError

    def kernel_layout(self):
        """The factoring's `(permutation, n_in)`; see `layers.factoring`."""
        return None, None

    # ----- interop facts: what `io` asks a layer type ------------------------
    # Each takes a base layer (plain, or the one a LoRA layer wraps), so that
    # a file can be checked against a model before any layer is wrapped.

    @classmethod
    def kernel_variable(cls, layer):
        """The variable holding base `layer`'s kernel (not a property that
        Keras core's LoRA changes)."""
        variable = getattr(layer, f"_{cls.kernel_attr}", None)
        return getattr(layer, cls.kernel_attr) if variable is None else variable

    @classmethod
    def kernel_axes(cls, layer):
        """`(in_axes, out_axes)` of base `layer`'s kernel under the standard
        factoring (`A` over `in_axes` plus `(rank,)`, `B` over `(rank,)`
        plus `out_axes`), or `None` where the kernel is no matrix."""
        ndim = len(cls.kernel_variable(layer).shape)
        return tuple(range(ndim - 1)), (ndim - 1,)

    @classmethod
    def adapter_size(cls, layer, rank):
        """How many values an adapter of `rank` on base `layer` has (`A`
        and `B`), under the standard factoring."""
        shape = tuple(cls.kernel_variable(layer).shape)
        axes = cls.kernel_axes(layer) or (range(len(shape) - 1), (len(shape) - 1,))
        fan_in, fan_out = ([shape[i] for i in group] for group in axes)
        return rank * (math.prod(fan_in) + math.prod(fan_out))

    @classmethod
    def peft_kind(cls, layer):
        """The PEFT module kind (`"Linear"`, `"Embedding"`, `"Conv2d"`) whose
        LoRA is this type's LoRA of base `layer`, or `None`."""
        return None

    @classmethod
    def peft_refusal(cls, layer):
        """Why PEFT's LoRA of base `layer` would compute something else than
        this type's, or `None`."""
        return None

    @classmethod
    def file_factoring(cls, factoring):
        """What a file records for an adapter factored `factoring`: `None`
        for a type with one factoring; a type with several also maps a
        file's missing entry (`None`) to what older files meant."""
        return None

    @classmethod
    def core_factors(cls, layer):
        """`(A, B)` of Keras core's LoRA (`enable_lora`) on `layer`."""
        return layer.lora_kernel_a, layer.lora_kernel_b

    # The factoring of Keras core's LoRA for this type (`None`: the only one).
    core_factoring = None

    def adapter_initializers(self):
        """The initializers of `(lora_a, lora_b)`. One must be zeros, so that
        a fresh LoRA layer computes exactly what its base does."""
        # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as loralib and PEFT do.
        a_init = keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        )
        return a_init, "zeros"

    # ----- the forward pass -------------------------------------------------

    def call(self, inputs, training=None):
        """`activation(x·W + updates + bias)`, `x·W` being `_base_op`."""
        bypass, adapters, frozen = self._call_plan()
        if bypass:  # adapters disabled or none active: the base exactly
            return self._base_call(inputs, training)
        layer = self.layer
        if frozen is None:  # a quantized base: Keras's own quantized op
            base = quantized_product.base_call(self._quantized_view, inputs, training)
        else:
            base = self._base_op(inputs, self._frozen_kernel(frozen))
        x = self._add_updates(inputs, base, training, adapters)
        if layer.bias is not None and frozen is None:
            x = quantized.add_bias(layer, x)
        elif layer.bias is not None:
            x = hot_path.add_bias(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    def _call_plan(self):
        """`(bypass, adapters, frozen)` for a call, decided once per change
        of state (not per call): whether the call is exactly the base's,
        the adapters it applies, and which kernel it multiplies by
        (`"merged"`, `"residual"`, `"base"`, or `None` for a quantized
        base's own op)."""
        if mixed.current() is not None:  # a mixed batch: see `layers.mixed`
            return mixed.plan(self)
        plan = self._plan
        if plan is None:
            plan = self._make_plan()
            object.__setattr__(self, "_plan", plan)
        return plan

    def _make_plan(self):
        if self._disabled:
            return True, (), "base"
        if self._merged is not None:
            return False, (), "merged"
        adapters = tuple(self._merge_adapters(None))
        if any(a.residual is not None for a in adapters):
            return False, adapters, "residual"
        if not adapters:
            return True, (), "base"
        return False, adapters, None if self.quantization_mode else "base"

    def _frozen_kernel(self, source):
        if source == "merged":
            return self._merged
        if source == "residual":
            return self._frozen_for(self._call_plan()[1])
        return getattr(self.layer, self.kernel_attr)

    def _frozen_for(self, adapters):
        for adapter in adapters:
            if adapter.residual is not None:
                return adapter.residual
        return self.base_kernel

    def _base_op(self, inputs, kernel):
        """The base layer's product of inputs and kernel, before bias."""
        raise NotImplementedError

    def _base_call(self, inputs, training=None):
        """The base layer's own call, quantized or not: exact base output."""
        if self.quantization_mode is not None:
            return self.layer.quantized_call(inputs, training=training)
        return self.layer.call(inputs)

    def _update(self, inputs, adapter, dtype, training=None):
        """`scale·(x·A)·B` of one adapter, shaped like the output."""
        raise NotImplementedError

    def _add_update(self, out, inputs, adapter, dtype, training=None):
        """`out` plus `adapter`'s update (`_update`). `out` is a tensor this
        call made and reads nowhere else, so a type may add into it in
        place (`LoRADense`, `LoRAEinsumDense`: `hot_path.add_low_rank_into`
        on torch without autograd)."""
        return out + self._update(inputs, adapter, dtype, training)

    def _add_updates(self, inputs, base, training, adapters):
        """`base` (`x·W`, no bias yet) plus the `adapters`' updates.

        A DoRA adapter adds `(c - 1)·x·W + c·s·x·A·B` with
        `c = m / ‖W + s·A·B‖` (PEFT's sum over adapters); alone, that is
        `c·(x·W + s·x·A·B)`.
        """
        route = mixed.current()
        if route is not None:  # each row with its own adapter
            return mixed.routed_updates(self, inputs, base, training, route)
        out = base
        dtype = keras.backend.standardize_dtype(base.dtype)
        # DoRA reads `base` again: then nothing may be added into it.
        into_base = all(adapter.magnitude is None for adapter in adapters)
        for adapter in adapters:
            x = inputs
            if self.drops_inputs and adapter.dropout and training:
                x = self._dropout(inputs, adapter, training)
            if into_base:
                out = self._add_update(out, x, adapter, dtype, training)
                continue
            update = self._update(x, adapter, dtype, training)
            if adapter.magnitude is None:
                out = out + update
                continue
            c = ops.cast(self._dora_factor(adapter), dtype)
            if len(adapters) == 1:  # alone: one product, one pass over y
                return self._scale_output(base + update, c)
            dora = ops.add(
                self._scale_output(base, ops.subtract(c, 1.0)),
                self._scale_output(update, c),
            )
            out = out + dora
        return out

    def _dropout(self, x, adapter, training):
        if adapter.dropout and training:
            return keras.random.dropout(x, adapter.dropout, seed=self.seed_generator)
        return x

    @staticmethod
    def _scaled(x, adapter):
        """`scale·x` on a rank-sized tensor; nothing when the scale is 1. A
        Python float keeps `x`'s dtype and makes no tensor per call."""
        scale = adapter.scale
        if isinstance(scale, keras.Variable):  # `prepare_hotswap`: read per call
            return x * hot_path.read(scale, keras.backend.standardize_dtype(x.dtype))
        return x if scale == 1.0 else x * scale

    @staticmethod
    def _adapter(variable, dtype):
        """`variable`'s value in the call's `dtype` (a standardized name)."""
        # Under a mixed policy Keras autocasts on read; this covers the rest.
        return hot_path.read(variable, dtype)

    def _norm_axes(self):
        """The kernel axes that DoRA's column norm reduces (the input axes)."""
        return tuple(range(len(self.base_kernel.shape) - 1))

    def _scale_output(self, y, c):
        """`y` times the per-output-unit factor `c` (last axis by default)."""
        return ops.multiply(y, c)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    # ----- saving -----------------------------------------------------------

    def save_as_base_in(self, model_name):
        """Marks this layer as inside `model_name`, a subclassed model whose
        config rebuilds plain layers: `.keras` files then store the base
        layer's weights in its own layout, with a warning."""
        object.__setattr__(self, "_reload_warning", model_name)

    def save_own_variables(self, store):
        # A subclassed model's config rebuilds plain layers, so a `.keras`
        # file of it cannot bring adapters back (`save_as_base_in`). Store
        # the base's weights in the base layer's layout instead, so the file
        # reloads as the base model.
        model = self.__dict__.get("_reload_warning")
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
        if self._train_bias:
            config["train_bias"] = True
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

    # ----- special modes ----------------------------------------------------

    def quantized_call(self, *args, **kwargs):
        # Keras sends a layer whose `quantization_mode` is set here instead
        # of to `call`. A LoRA layer's is its base's, and `call` handles it.
        return self.call(*args, **kwargs)
