"""The shared adapter base: A/B weights, scale, delta and merge.

Every LoRA layer type derives from `LoRALayer`. A subclass says only what
differs for its base layer: which Keras class it wraps, how the kernel is
factored into `lora_a` and `lora_b` (`adapter_shapes`), and how it calls.
"""

import numbers
import warnings

import keras
import numpy as np
from keras import ops

from keras_lora.layers import host_merge


def validate_rank(rank):
    """Returns `rank` if it is a positive integer, else raises."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(
            f"`rank` must be a positive integer. Received: rank={rank!r} "
            f"of type {type(rank).__name__}"
        )
    if rank <= 0:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank}")
    return int(rank)


def validate_alpha(alpha):
    """Returns `alpha` as a float if it is `None` or positive, else raises."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"`alpha` must be a positive number or None. Received: alpha={alpha!r} "
            f"of type {type(alpha).__name__}"
        )
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"`alpha` must be a positive number or None. Received: alpha={alpha}"
        )
    return float(alpha)


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
        **kwargs: base `Layer` keyword arguments (`name`, `dtype`, ...).
            `name` and `dtype` default to the wrapped layer's.
    """

    base_class = None
    kernel_attr = "kernel"
    # Keras quantization modes (`layer.quantize(mode)`) a base may have.
    quantization_modes = ()

    def __init__(self, layer, rank=8, alpha=None, use_rslora=False, **kwargs):
        self._check_base_layer(layer)
        rank = validate_rank(rank)
        alpha = validate_alpha(alpha)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", float_policy(layer))
        super().__init__(layer, **kwargs)
        self.rank = rank
        self.alpha = float(rank) if alpha is None else alpha
        self.use_rslora = bool(use_rslora)
        self.layer.trainable = False
        if self.layer.built:
            self._build_adapters()

    @classmethod
    def _check_base_layer(cls, layer):
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
        if not hasattr(self, "lora_a"):
            self._build_adapters()
        self.built = True

    def _build_adapters(self):
        a_shape, b_shape = self.adapter_shapes()
        a_init, b_init = self.adapter_initializers()
        dtype = adapter_dtype(self.variable_dtype)
        self.lora_a = self.add_weight(
            name="lora_a", shape=a_shape, initializer=a_init, dtype=dtype
        )
        self.lora_b = self.add_weight(
            name="lora_b", shape=b_shape, initializer=b_init, dtype=dtype
        )
        self.built = True

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
        # weights stay frozen whatever a user or a parent model sets.
        value = bool(value)
        self._trainable = value
        for variable in self._trainable_variables:
            variable.trainable = value

    @property
    def scale(self):
        """The factor on the update: `alpha / rank`, or `alpha / sqrt(rank)`
        with `use_rslora`."""
        if self.use_rslora:
            return self.alpha / float(np.sqrt(self.rank))
        return self.alpha / self.rank

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
        return variable if variable.dtype == dtype else ops.cast(variable, dtype)

    def delta(self):
        """The kernel update `scale·A·B`, shaped like the base kernel (float32)."""
        a = ops.cast(self.lora_a, "float32")
        b = ops.cast(self.lora_b, "float32")
        a = ops.reshape(a, (-1, self.rank))
        delta = ops.matmul(a, b) * self.scale
        return ops.reshape(delta, self.base_kernel.shape)

    def merged_kernel(self):
        """Returns `W + scale·A·B` in the base kernel's dtype."""
        kernel = self.base_kernel
        merged = ops.add(ops.cast(kernel, "float32"), self.delta())
        return ops.cast(merged, kernel.dtype)

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
        if mode is None:
            merged = host_merge.merged_kernel_array(
                self.base_kernel, self.lora_a, self.lora_b, self.scale, self.rank
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
        config.update({"rank": self.rank, "alpha": self.alpha})
        if self.use_rslora:
            config["use_rslora"] = True
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # `Wrapper.from_config` pops "layer" from the dict it is given.
        return super().from_config(dict(config), custom_objects=custom_objects)
