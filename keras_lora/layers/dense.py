"""`LoRADense`: LoRA on a `keras.layers.Dense`."""

import keras
from keras import ops

from keras_lora.layers import variants
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.hot_path import (
    add_low_rank_into,
    low_rank,
    matmul,
    scalar,
    value,
    writable,
)
from keras_lora.layers.mixed import scale_rows


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(variants.QuantizedDoRA, LoRALayer):
    """A frozen `Dense` plus a trainable low-rank update.

    `output = activation(dot(input, kernel) + bias + scale * dot(dot(input, A), B))`
    with `scale = alpha / rank`. `A` (`lora_a`, shape `(input_dim, rank)`)
    starts small and random and `B` (`lora_b`, shape `(rank, units)`) starts
    at zero, so a fresh `LoRADense` computes exactly what its `Dense` does.
    The update is computed as `(x·A)·B` and `W + scale·A·B` is never formed
    while training.

    Args:
        layer: the `keras.layers.Dense` to adapt, built or not. Its kernel
            and bias are frozen.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: base `Layer` keyword arguments; `name` and `dtype` default
            to the wrapped layer's.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> dense = keras.layers.Dense(10_000)
    >>> dense.build((None, 5_000))
    >>> lora = LoRADense(dense, rank=8)
    >>> sum(int(np.prod(w.shape)) for w in lora.trainable_weights)
    120000
    """

    base_class = keras.layers.Dense
    quantization_modes = ("int8", "int4", "float8", "nf4")

    def __init__(self, layer, rank=8, alpha=None, **kwargs):
        super().__init__(layer, rank=rank, alpha=alpha, **kwargs)
        self.supports_masking = True

    @classmethod
    def peft_kind(cls, layer):
        return "Linear"

    def adapter_shapes(self):
        input_dim, units = self.layer.kernel.shape
        return (input_dim, self.rank), (self.rank, units)

    def _base_op(self, inputs, kernel):
        return matmul(inputs, value(kernel))

    def _update(self, inputs, adapter, dtype, training=None):
        a = self._adapter(adapter.a, dtype)
        b = self._adapter(adapter.b, dtype)
        return low_rank(inputs, a, b, scalar(adapter.scale, dtype))

    def _add_update(self, out, inputs, adapter, dtype, training=None):
        # In place only where `_update` is this class's (a subclass's own
        # `_update` is always called).
        if not writable(out) or type(self)._update is not LoRADense._update:
            return super()._add_update(out, inputs, adapter, dtype, training)
        a = self._adapter(adapter.a, dtype)
        b = self._adapter(adapter.b, dtype)
        return add_low_rank_into(out, inputs, a, b, scalar(adapter.scale, dtype))

    # ----- mixed batches (`layers.mixed`): x·A, h·B, both per row ----------

    def _routed_first(self, inputs, a):
        return matmul(inputs, a)

    def _routed_second(self, h, b):
        return matmul(h, b)

    def _routed_second_is_matmul(self):
        return type(self)._routed_second is LoRADense._routed_second

    def _routed_rank_axis(self):
        return -1

    def _routed_gather(self, inputs, a_stack, b_stack, index):
        h = ops.einsum("b...i,bir->b...r", inputs, ops.take(a_stack, index, axis=0))
        return ops.einsum("b...r,bro->b...o", h, ops.take(b_stack, index, axis=0))

    def _routed_scale_rows(self, y, rows):
        return scale_rows(y, rows)

    def _routed_flat_inputs(self):
        return 1  # `x·A·B` over the last input axis (the "grouped" strategy)

    def to_dense(self, check_finite=True):
        """Returns a plain `Dense` with this layer's config, name and the
        merged kernel `W + scale·A·B`."""
        return self.merged_layer(check_finite=check_finite)
