"""`LoRAEmbedding`: LoRA on a `keras.layers.Embedding`."""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEmbedding(LoRALayer):
    """A frozen `Embedding` plus a trainable low-rank update.

    `A` (`lora_a`) has shape `(input_dim, rank)` and `B` (`lora_b`) has shape
    `(rank, output_dim)`; the table's update is `scale·A·B`. The forward pass
    gathers the rows of `A` for the input ids and multiplies them by `B`, so
    the merged table is never formed.

    Here `A` starts at zero and `B` is random (normal, stddev 1), as in
    PEFT, so a fresh layer computes exactly what its base does. (The other
    way round, as for `Dense`, `A`'s fan-in initialization would scale with
    `1/sqrt(input_dim)`: a gathered row is not a sum over the vocabulary, so
    the update would start tiny for a large vocabulary.)

    `keras.layers.ReversibleEmbedding` (tied input/output embeddings) is
    supported: with `tie_weights=True`, `call(x, reverse=True)` computes the
    logits against the adapted table, `x·(E + scale·A·B)ᵀ`, again without
    forming it; with untied weights the reverse projection is the base's.

    Args:
        layer: the `keras.layers.Embedding` to adapt, built or not.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.
    """

    base_class = keras.layers.Embedding
    kernel_attr = "embeddings"

    def adapter_shapes(self):
        layer = self.layer
        return (layer.input_dim, self.rank), (self.rank, layer.output_dim)

    def adapter_initializers(self):
        return "zeros", keras.initializers.RandomNormal(stddev=1.0)

    def call(self, inputs, reverse=False):
        layer = self.layer
        if reverse:
            return self._reverse(inputs)
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        dtype = layer.compute_dtype
        outputs = ops.cast(ops.take(layer.embeddings, inputs, axis=0), dtype)
        rows = ops.take(self._adapter(self.lora_a, dtype), inputs, axis=0)
        if self.scale != 1.0:
            rows = ops.multiply(rows, ops.cast(self.scale, dtype))
        update = ops.matmul(rows, self._adapter(self.lora_b, dtype))
        return ops.add(outputs, update)

    def _reverse(self, inputs):
        layer = self.layer
        if not isinstance(layer, keras.layers.ReversibleEmbedding):
            raise ValueError(
                f"LoRAEmbedding '{self.name}': `reverse=True` needs a "
                "`keras.layers.ReversibleEmbedding` base; this one is a "
                f"{type(layer).__name__}."
            )
        if not layer.tie_weights:
            return layer.call(inputs, reverse=True)
        kernel = ops.transpose(layer.embeddings)
        a = ops.transpose(self.lora_a)
        b = ops.transpose(self.lora_b)
        dtype = layer.reverse_dtype or inputs.dtype
        inputs = ops.cast(inputs, dtype)
        update = ops.matmul(ops.matmul(inputs, ops.cast(b, dtype)), ops.cast(a, dtype))
        logits = ops.matmul(inputs, ops.cast(kernel, dtype))
        logits = ops.add(logits, ops.multiply(update, ops.cast(self.scale, dtype)))
        if layer.logit_soft_cap is not None:
            cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def compute_mask(self, inputs, mask=None):
        if not self.layer.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return self.layer.compute_output_shape(input_shape, reverse=True)
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, reverse=False):
        shape = self.compute_output_shape(inputs.shape, reverse=reverse)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)
