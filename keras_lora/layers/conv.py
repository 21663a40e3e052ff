"""`LoRAConv`: LoRA on `keras.layers.Conv1D`, `Conv2D` and `Conv3D`."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.mixed import scale_rows

# The common base of Conv1D/2D/3D (not of the transposed, depthwise or
# separable convolutions, whose kernels are laid out differently).
BaseConv = keras.src.layers.convolutional.base_conv.BaseConv


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv(LoRALayer):
    """A frozen `Conv1D`/`Conv2D`/`Conv3D` plus a trainable low-rank update.

    With the base kernel laid out as Keras does, `(*kernel_size, in, filters)`:
    `A` (`lora_a`, shape `(*kernel_size, in, rank)`) is a convolution with
    the base's kernel size, strides, padding (including Conv1D's `"causal"`)
    and dilation and `rank` filters; `B` (`lora_b`, shape `(rank, filters)`)
    is a 1×1 convolution to the base's filters. This is Keras core's and
    PEFT's factoring, and the kernel's update is `scale·A·B` reshaped to the
    kernel's shape. `B` starts at zero. Both data formats work.

    Grouped convolutions (`groups > 1`) are refused: a grouped `A·B` is not
    a product of two convolutions.

    Args:
        layer: the `Conv1D`, `Conv2D` or `Conv3D` to adapt, built or not.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.
    """

    base_class = BaseConv

    @classmethod
    def _check_base_layer(cls, layer):
        super()._check_base_layer(layer)
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(
                f"LoRAConv cannot adapt layer '{layer.name}': it is a grouped "
                f"convolution (groups={layer.groups}). Only groups=1 is supported."
            )

    def adapter_shapes(self):
        shape = tuple(self.layer.kernel.shape)
        return shape[:-1] + (self.rank,), (self.rank, shape[-1])

    def _conv(self, inputs, kernel, padding):
        layer = self.layer
        return ops.conv(
            inputs,
            kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def _padding(self):
        # Causal padding is applied to the inputs first, then "valid".
        padding = self.layer.padding
        return "valid" if padding == "causal" else padding

    def call(self, inputs, training=None):
        bypass, adapters, frozen = self._call_plan()
        if bypass:  # adapters disabled or none active: the base exactly
            return self._base_call(inputs, training)
        layer = self.layer
        if layer.padding == "causal":
            inputs = ops.pad(inputs, layer._compute_causal_padding())
        outputs = self._conv(inputs, self._frozen_kernel(frozen), self._padding())
        outputs = self._add_updates(inputs, outputs, training, adapters)
        if layer.use_bias:
            if layer.data_format == "channels_last":
                bias_shape = (1,) * (layer.rank + 1) + (layer.filters,)
            else:
                bias_shape = (1, layer.filters) + (1,) * layer.rank
            outputs = ops.add(outputs, ops.reshape(layer.bias, bias_shape))
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs

    def _update(self, inputs, adapter, dtype, training=None):
        update = self._conv(inputs, self._adapter(adapter.a, dtype), self._padding())
        update = self._scaled(update, adapter)
        b = self._adapter(adapter.b, dtype)
        if self.layer.data_format == "channels_last":
            return ops.matmul(update, b)
        return ops.moveaxis(ops.matmul(ops.moveaxis(update, 1, -1), b), -1, 1)

    # ----- mixed batches (`layers.mixed`): x·A, h·B per row ---------------

    def _routed_first(self, inputs, a):
        return self._conv(inputs, a, self._padding())

    def _routed_second(self, h, b):
        if self.layer.data_format == "channels_last":
            return ops.matmul(h, b)
        return ops.moveaxis(ops.matmul(ops.moveaxis(h, 1, -1), b), -1, 1)

    def _routed_rank_axis(self):
        return -1 if self.layer.data_format == "channels_last" else 1

    def _routed_scale_rows(self, y, rows):
        if self.layer.data_format == "channels_last":
            return scale_rows(y, rows)
        return ops.multiply(
            y, ops.reshape(rows, (-1, rows.shape[1]) + (1,) * self.layer.rank)
        )

    def _scale_output(self, y, c):
        if self.layer.data_format == "channels_last":
            return ops.multiply(y, c)
        return ops.multiply(y, ops.reshape(c, (1, -1) + (1,) * self.layer.rank))
