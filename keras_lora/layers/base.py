"""The shared adapter base: A/B weights, scale, delta and merge.

Every LoRA layer type derives from `LoRALayer`. A subclass says only what
differs for its base layer: which Keras class it wraps, how the kernel is
factored into `lora_a` and `lora_b` (`adapter_shapes`), and how it calls.
"""

import numbers

import keras
import numpy as np
from keras import ops


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

    def __init__(self, layer, rank=8, alpha=None, use_rslora=False, **kwargs):
        self._check_base_layer(layer)
        rank = validate_rank(rank)
        alpha = validate_alpha(alpha)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
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
        if getattr(layer, "quantization_mode", None) is not None:
            raise ValueError(
                f"Layer '{layer.name}' is quantized "
                f"({layer.quantization_mode!r}); quantized bases are not "
                "supported yet."
            )

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if not hasattr(self, "lora_a"):
            self._build_adapters()
        self.built = True

    def _build_adapters(self):
        a_shape, b_shape = self.adapter_shapes()
        dtype = adapter_dtype(self.variable_dtype)
        # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as loralib and PEFT do.
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=a_shape,
            initializer=keras.initializers.VarianceScaling(
                scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
            ),
            dtype=dtype,
        )
        self.lora_b = self.add_weight(
            name="lora_b", shape=b_shape, initializer="zeros", dtype=dtype
        )
        self.built = True

    def adapter_shapes(self):
        """Returns `(a_shape, b_shape)`; `A·B` reshapes to the kernel's shape."""
        raise NotImplementedError

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
    def base_kernel(self):
        return getattr(self.layer, self.kernel_attr)

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

    def merged_layer(self, check_finite=True):
        """Returns a new, built base layer holding the merged kernel.

        It has the base layer's class, config and name. Raises `ValueError`
        (and builds nothing) if the merged kernel has NaN or Inf and
        `check_finite` is true.
        """
        merged = ops.convert_to_numpy(self.merged_kernel())
        if check_finite and not np.all(np.isfinite(merged)):
            raise ValueError(
                f"Merging LoRA layer '{self.name}' gives NaN or Inf in its "
                "kernel; nothing was merged. Check the adapters, or pass "
                "check_finite=False to merge anyway."
            )
        base = self.layer
        new = base.__class__.from_config(base.get_config())
        new.build_from_config(base.get_build_config())
        kernel = self.base_kernel
        new.set_weights(
            [merged if w is kernel else ops.convert_to_numpy(w) for w in base.weights]
        )
        return new

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"rank": self.rank, "alpha": self.alpha})
        if self.use_rslora:
            config["use_rslora"] = True
        return config
