"""`LoRAEinsumDense`: LoRA on a `keras.layers.EinsumDense`.

This is the layer type of the `query`, `key`, `value` and
`attention_output` projections inside `keras.layers.MultiHeadAttention`.
"""

import string

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer


def lora_equations(equation):
    """Splits `equation`'s kernel into `A·B` and returns the two einsums.

    The kernel is factored the way Keras core does: `A` has the kernel's
    axes with its last axis replaced by the rank `r`, and `B` has shape
    `(r, kernel.shape[-1])`. `einsum(equation, x, A·B)` is then computed as
    `einsum(second, einsum(first, x, A), B)`, which never forms `A·B`.

    Returns:
        `(first, second, is_matmul)`, where `is_matmul` says that `second`
        is a plain matmul on the last axis (the common case, e.g. attention
        projections), which `call` then uses.
    """
    lhs, output = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    last = k_spec[-1]
    r = next(c for c in string.ascii_letters if c not in equation)
    a_spec = k_spec[:-1] + r
    if last in output and last not in x_spec:
        # The kernel's last axis goes to the output only: swap it for `r`.
        mid = output.replace(last, r)
    elif last in x_spec and last not in output:
        # Contracted with the input: keep it until B contracts it.
        mid = output + last + r
    else:
        mid = output + r
    first = f"{x_spec},{a_spec}->{mid}"
    second = f"{mid},{r}{last}->{output}"
    is_matmul = mid == output.replace(last, r) and output.endswith(last)
    return first, second, is_matmul


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(LoRALayer):
    """A frozen `EinsumDense` plus a trainable low-rank update.

    With `W` the kernel and `K = W.shape`, `A` (`lora_a`) has shape
    `K[:-1] + (rank,)` and `B` (`lora_b`) has shape `(rank, K[-1])`, as in
    Keras core, and the update of the kernel is `scale·A·B` reshaped to `K`.
    The update is computed as `einsum(equation, x, A)` followed by `B`
    (see `lora_equations`), never as a merged kernel. `B` starts at zero.

    In `MultiHeadAttention`, `query`/`key`/`value` have the kernel
    `(dim, heads, head_dim)`, so `A` is `(dim, heads, rank)` and `B` is
    `(rank, head_dim)`, shared by all heads: Keras core's factoring, which
    is not LoRA on the flattened `(dim, heads*head_dim)` matrix. The
    `attention_output` kernel `(heads, head_dim, dim)` gives `A` of
    `(heads, head_dim, rank)` and `B` of `(rank, dim)`, which is exactly
    LoRA on the flattened `(heads*head_dim, dim)` matrix. An EinsumDense
    with a 2-D kernel (a plain matmul) is exactly a `Dense` LoRA.

    Args:
        layer: the `keras.layers.EinsumDense` to adapt, built or not, float
            or quantized to `"int8"`.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        **kwargs: as for `LoRALayer`.
    """

    base_class = keras.layers.EinsumDense
    quantization_modes = ("int8",)

    def __init__(self, layer, rank=8, alpha=None, **kwargs):
        super().__init__(layer, rank=rank, alpha=alpha, **kwargs)
        self.supports_masking = True
        self._first, self._second, self._is_matmul = lora_equations(self.layer.equation)

    def adapter_shapes(self):
        shape = tuple(self.layer.kernel.shape)
        return shape[:-1] + (self.rank,), (self.rank, shape[-1])

    def _base_op(self, inputs, kernel):
        return ops.einsum(self.layer.equation, inputs, kernel)

    def _update(self, inputs, adapter, dtype, training=None):
        update = ops.einsum(self._first, inputs, self._adapter(adapter.a, dtype))
        update = self._scaled(update, adapter, dtype)
        b = self._adapter(adapter.b, dtype)
        if self._is_matmul:
            return ops.matmul(update, b)
        return ops.einsum(self._second, update, b)

    def _specs(self):
        lhs, output = self.layer.equation.replace(" ", "").split("->")
        return lhs.split(",")[1], output

    def _norm_axes(self):
        # DoRA's norm runs over the kernel axes that do not reach the output.
        k_spec, output = self._specs()
        return tuple(i for i, c in enumerate(k_spec) if c not in output)

    def _scale_output(self, y, c):
        k_spec, output = self._specs()
        c_spec = "".join(ch for ch in k_spec if ch in output)
        if output.endswith(c_spec):
            return ops.multiply(y, c)
        return ops.einsum(f"{output},{c_spec}->{output}", y, c)
