"""`LoRAConv`: LoRA on `keras.layers.Conv1D`, `Conv2D` and `Conv3D`."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.hot_path import leading_shape, reshape
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

    A grouped convolution (`groups=g > 1`) has the kernel
    `(*kernel_size, in/g, filters)`: each output channel reads the `in/g`
    channels of its group, so the kernel holds the weights there are and
    the factoring is the same, `A` `(*kernel_size, in/g, rank)` and `B`
    `(rank, filters)`, with the update `scale·A·B` in the kernel's shape:
    every group's filters are combinations of the same `rank` patterns,
    each read from the group's own channels. `x·A` is the grouped
    convolution with `A` repeated per group (`g·rank` channels), and `B`
    maps each group's `rank` channels to its filters, so the merge is exact.
    (PEFT's LoRA of a grouped `Conv2d` is another one: an ungrouped
    `lora_A`, which no grouped kernel can hold; PEFT cannot merge it.)

    Args:
        layer: the `Conv1D`, `Conv2D` or `Conv3D` to adapt, built or not.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.
    """

    base_class = BaseConv

    @classmethod
    def peft_kind(cls, layer):
        return f"Conv{len(layer.kernel_size)}d"

    @classmethod
    def peft_refusal(cls, layer):
        if layer.groups != 1:
            return (
                f"a grouped convolution (groups={layer.groups}). PEFT's LoRA "
                "of a grouped Conv has an ungrouped lora_A, which is not the "
                "grouped update keras_lora trains (and PEFT cannot merge it)"
            )
        if any(d != 1 for d in layer.dilation_rate):
            return (
                f"a dilated convolution (dilation_rate={layer.dilation_rate}). "
                "PEFT applies lora_A without dilation and keras_lora with it, "
                "so the outputs would differ; PEFT interop supports dilation 1 "
                "only"
            )
        return None

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
        update = self._first(inputs, self._adapter(adapter.a, dtype))
        update = self._scaled(update, adapter)
        return self._second(update, self._adapter(adapter.b, dtype))

    def _first(self, inputs, a):
        """`x·A`: a convolution to `rank` channels; grouped, `A` repeated
        per group and the result `(..., groups, rank)`, channels last."""
        groups = self.layer.groups
        if groups == 1:
            return self._conv(inputs, a, self._padding())
        h = self._conv(
            inputs, ops.tile(a, (1,) * (len(a.shape) - 1) + (groups,)), self._padding()
        )
        if self.layer.data_format == "channels_first":
            h = ops.moveaxis(h, 1, -1)
        return reshape(h, leading_shape(h, 1) + [groups, a.shape[-1]])

    def _second(self, h, b):
        """`h·B` on the channel axis; grouped, each group's `rank` channels
        to its own filters."""
        layer = self.layer
        if layer.groups > 1:
            rank, filters = b.shape
            b = ops.reshape(b, (rank, layer.groups, filters // layer.groups))
            y = ops.einsum("...gr,rgo->...go", h, b)
            y = reshape(y, leading_shape(y, 2) + [filters])
            return y if layer.data_format == "channels_last" else ops.moveaxis(y, -1, 1)
        if layer.data_format == "channels_last":
            return ops.matmul(h, b)
        return ops.moveaxis(ops.matmul(ops.moveaxis(h, 1, -1), b), -1, 1)

    # ----- mixed batches (`layers.mixed`): x·A, h·B per row ---------------

    def _routed_first(self, inputs, a):
        return self._first(inputs, a)

    def _routed_second(self, h, b):
        return self._second(h, b)

    def _routed_rank_axis(self):
        grouped = self.layer.groups > 1
        return -1 if grouped or self.layer.data_format == "channels_last" else 1

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
