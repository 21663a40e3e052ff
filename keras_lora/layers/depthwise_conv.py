"""`LoRADepthwiseConv`: LoRA on `keras.layers.DepthwiseConv1D` and `DepthwiseConv2D`."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.hot_path import leading_shape, reshape
from keras_lora.layers.mixed import scale_rows

BaseDepthwiseConv = keras.src.layers.convolutional.base_depthwise_conv.BaseDepthwiseConv


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADepthwiseConv(LoRALayer):
    """A frozen `DepthwiseConv1D`/`DepthwiseConv2D` plus a low-rank update.

    A depthwise kernel `(*kernel_size, channels, depth_multiplier)` gives
    output channel `(c, m)` the `prod(kernel_size)` taps it applies to input
    channel `c`: it is a matrix from the taps to the output channels. LoRA
    factors that matrix: `A` (`lora_a`, shape `(*kernel_size, rank)`) holds
    `rank` spatial filters and `B` (`lora_b`, shape
    `(rank, channels, depth_multiplier)`) mixes them per output channel, so
    the kernel's update is `scale·A·B` in the kernel's shape and every
    output channel's new filter is a combination of the same `rank`
    filters. The rank is at most `prod(kernel_size)` (9 for a 3×3 kernel).
    (Low rank per channel would be no saving: each channel's matrix is
    `(prod(kernel_size), depth_multiplier)`, of rank 1 for the common
    `depth_multiplier=1`.)

    The forward pass never forms the update: `x·A` is the depthwise
    convolution of every channel with each of the `rank` filters (with the
    base's strides, padding and dilation), and `B` maps each channel's
    `rank` responses to its `depth_multiplier` outputs. `B` starts at zero,
    so a fresh layer computes what its base does, and the merge is exact.
    Both data formats work. PEFT has no LoRA of this kind (its LoRA of a
    grouped `Conv2d` has an ungrouped `lora_A` and cannot be merged), so
    these adapters are saved in the `keras_lora` format only.

    Args:
        layer: the `DepthwiseConv1D` or `DepthwiseConv2D` to adapt, built or
            not.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.

    Input shape:
        The base layer's input shape.

    Output shape:
        The base layer's output shape.

    Example:

    >>> conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    >>> conv.build((None, 8, 8, 16))
    >>> lora = LoRADepthwiseConv(conv, rank=4)
    >>> tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
    ((3, 3, 4), (4, 16, 2))
    """

    base_class = BaseDepthwiseConv

    @classmethod
    def kernel_axes(cls, layer):
        spatial = len(layer.kernel_size)
        return tuple(range(spatial)), (spatial, spatial + 1)

    def adapter_shapes(self):
        shape = tuple(self.layer.kernel.shape)
        spatial = self.layer.rank
        return shape[:spatial] + (self.rank,), (self.rank,) + shape[spatial:]

    def kernel_layout(self):
        return None, self.layer.rank

    def _base_op(self, inputs, kernel):
        return self._depthwise(inputs, kernel)

    def _depthwise(self, inputs, kernel):
        layer = self.layer
        return ops.depthwise_conv(
            inputs,
            kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def call(self, inputs, training=None):
        bypass, adapters, frozen = self._call_plan()
        if bypass:  # adapters disabled or none active: the base exactly
            return self._base_call(inputs, training)
        layer = self.layer
        outputs = self._base_op(inputs, self._frozen_kernel(frozen))
        outputs = self._add_updates(inputs, outputs, training, adapters)
        if layer.use_bias:
            outputs = ops.add(outputs, self._per_channel(layer.bias))
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs

    def _per_channel(self, c):
        """`c` (the output channels, flattened) shaped to broadcast on them."""
        if self.layer.data_format == "channels_last":
            return ops.reshape(c, (-1,))
        return ops.reshape(c, (-1,) + (1,) * self.layer.rank)

    def _update(self, inputs, adapter, dtype, training=None):
        h = self._first(inputs, self._adapter(adapter.a, dtype))
        h = self._scaled(h, adapter)
        return self._second(h, self._adapter(adapter.b, dtype))

    def _first(self, inputs, a):
        """`x·A`: each channel against each of the `rank` filters, as
        `(..., channels, rank)`, channels last."""
        channels, rank = self.layer.kernel.shape[-2], a.shape[-1]
        spatial = self.layer.rank
        filters = ops.broadcast_to(
            ops.expand_dims(a, spatial), tuple(a.shape[:-1]) + (channels, rank)
        )
        h = self._depthwise(inputs, filters)  # output channel c·rank + t
        if self.layer.data_format == "channels_first":
            h = ops.moveaxis(h, 1, -1)
        return reshape(h, leading_shape(h, 1) + [channels, rank])

    def _second(self, h, b):
        """`h·B` per channel: `(..., channels, rank)` to the output channels."""
        y = ops.einsum("...cr,rcm->...cm", h, b)
        y = reshape(y, leading_shape(y, 2) + [b.shape[1] * b.shape[2]])
        if self.layer.data_format == "channels_first":
            return ops.moveaxis(y, -1, 1)
        return y

    def _norm_axes(self):
        # DoRA's norm per output channel runs over the taps.
        return tuple(range(self.layer.rank))

    def _scale_output(self, y, c):
        return ops.multiply(y, self._per_channel(c))

    # ----- mixed batches (`layers.mixed`): x·A, h·B per row ---------------

    def _routed_first(self, inputs, a):
        return self._first(inputs, a)

    def _routed_second(self, h, b):
        return self._second(h, b)

    def _routed_rank_axis(self):
        return -1

    def _routed_scale_rows(self, y, rows):
        rows = ops.reshape(rows, (-1, rows.shape[1] * rows.shape[2]))
        if self.layer.data_format == "channels_last":
            return scale_rows(y, rows)
        return ops.multiply(
            y, ops.reshape(rows, (-1, rows.shape[1]) + (1,) * self.layer.rank)
        )
