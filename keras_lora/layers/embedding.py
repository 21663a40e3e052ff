"""`LoRAEmbedding`: LoRA on a `keras.layers.Embedding`."""

import keras
from keras import ops

from keras_lora.layers import mixed, quantized, quantized_product
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

    A base quantized by Keras to `"int8"` or `"int4"`, or stored as NF4
    (`keras_lora.quantize_nf4`), keeps its own quantized lookup and tied
    logits (`layers.quantized`); a quantized untied `ReversibleEmbedding`
    is refused.

    Args:
        layer: the `keras.layers.Embedding` to adapt, built or not.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.
    """

    base_class = keras.layers.Embedding
    kernel_attr = "embeddings"
    quantization_modes = ("int8", "int4", "nf4")

    @classmethod
    def peft_kind(cls, layer):
        return "Embedding"

    @classmethod
    def core_factors(cls, layer):
        return layer.lora_embeddings_a, layer.lora_embeddings_b

    @classmethod
    def _check_base_layer(cls, layer):
        super()._check_base_layer(layer)
        quantized.check_embedding(layer)

    def adapter_shapes(self):
        layer = self.layer
        return (layer.input_dim, self.rank), (self.rank, layer.output_dim)

    def adapter_initializers(self):
        return "zeros", keras.initializers.RandomNormal(stddev=1.0)

    # Token ids cannot be dropped: `dropout` drops the looked-up rows of A.
    drops_inputs = False

    def call(self, inputs, reverse=False, training=None):
        if reverse:
            return self._reverse(inputs)
        bypass, adapters, frozen = self._call_plan()
        if bypass:  # adapters disabled or none active: the base exactly
            return self._base_call(inputs, training)
        if keras.backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        if frozen is None:  # a quantized base: Keras's own quantized lookup
            outputs = quantized_product.base_lookup(self._quantized_view, inputs)
        else:
            table = self._frozen_kernel(frozen)
            outputs = ops.cast(ops.take(table, inputs, axis=0), self.compute_dtype)
        return self._add_updates(inputs, outputs, training, adapters)

    def _base_call(self, inputs, training=None):
        # A ReversibleEmbedding's quantized call takes no `training`.
        if self.quantization_mode is not None:
            return self.layer.quantized_call(inputs)
        return super()._base_call(inputs, training)

    def _update(self, inputs, adapter, dtype, training=None):
        rows = ops.take(self._adapter(adapter.a, dtype), inputs, axis=0)
        rows = self._dropout(rows, adapter, training)
        rows = self._scaled(rows, adapter)
        return ops.matmul(rows, self._adapter(adapter.b, dtype))

    # ----- mixed batches (`layers.mixed`): A's rows, h·B, both per row -----

    # Token ids have no feature axis: every axis after the batch is positions.
    _routed_feature_axes = 0

    def _routed_first(self, inputs, a):
        return ops.take(a, inputs, axis=0)

    def _routed_second(self, h, b):
        return ops.matmul(h, b)

    def _routed_rank_axis(self):
        return -1

    def _routed_gather(self, inputs, a_stack, b_stack, index):
        # Row i's token t reads row `index[i]·input_dim + t` of the stacked A.
        slots, input_dim, width = a_stack.shape
        flat = ops.reshape(a_stack, (slots * input_dim, width))
        offset = ops.reshape(index * input_dim, (-1,) + (1,) * (len(inputs.shape) - 1))
        # Broadcast first: on TensorFlow `ops.add` takes a `(batch, 1)` second
        # operand for a bias on the LAST axis when that has `batch` entries.
        offset = ops.broadcast_to(offset, ops.shape(inputs))
        h = ops.take(flat, ops.add(inputs, offset), axis=0)
        return ops.einsum("b...r,bro->b...o", h, ops.take(b_stack, index, axis=0))

    def _routed_scale_rows(self, y, rows):
        return mixed.scale_rows(y, rows)

    def _reverse(self, inputs):
        layer = self.layer
        if not isinstance(layer, keras.layers.ReversibleEmbedding):
            raise ValueError(
                f"LoRAEmbedding '{self.name}': `reverse=True` needs a "
                "`keras.layers.ReversibleEmbedding` base; this one is a "
                f"{type(layer).__name__}."
            )
        bypass, adapters, frozen = self._call_plan()
        if not layer.tie_weights or bypass:
            if self.quantization_mode is not None:
                return layer.quantized_call(inputs, reverse=True)
            return layer.call(inputs, reverse=True)
        if frozen is None:  # a quantized table: Keras's own quantized logits
            logits = quantized_product.base_lookup(
                self._quantized_view, inputs, reverse=True
            )
            dtype = keras.backend.standardize_dtype(logits.dtype)
            inputs = ops.cast(inputs, dtype)
        else:
            dtype = layer.reverse_dtype or keras.backend.standardize_dtype(inputs.dtype)
            inputs = ops.cast(inputs, dtype)
            # x·(E + Σ update)ᵀ without forming the adapted table.
            table = ops.cast(ops.transpose(self._frozen_kernel(frozen)), dtype)
            logits = ops.matmul(inputs, table)
        route = mixed.current()
        if route is not None:  # a mixed batch: each row with its own adapter
            logits = mixed.routed_reverse(self, inputs, logits, dtype, route)
        for adapter in adapters:
            x = inputs
            if adapter.magnitude is not None:
                c = ops.cast(self._dora_factor(adapter), dtype)
                base = ops.matmul(ops.multiply(inputs, ops.subtract(c, 1.0)), table)
                logits = ops.add(logits, base)
                x = ops.multiply(inputs, c)
            a = ops.cast(ops.transpose(adapter.a), dtype)
            b = ops.cast(ops.transpose(adapter.b), dtype)
            low_rank = self._scaled(ops.matmul(x, b), adapter)
            logits = ops.add(logits, ops.matmul(low_rank, a))
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
