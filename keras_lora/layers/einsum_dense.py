"""`LoRAEinsumDense`: LoRA on a `keras.layers.EinsumDense`.

This is the layer type of the `query`, `key`, `value` and
`attention_output` projections inside `keras.layers.MultiHeadAttention`
and most KerasHub attention blocks.
"""

import math
import string

import keras
from keras import ops

from keras_lora.config import LEGACY_FACTORING, validate_factoring
from keras_lora.layers import variants
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.hot_path import (
    add_low_rank_into,
    leading_shape,
    low_rank,
    matmul,
    reshape,
    scalar,
    writable,
)
from keras_lora.layers.mixed import scale_rows


def kernel_axes(equation):
    """Sorts the kernel's axes of `equation` by role.

    Returns:
        `(inputs, outputs, shared)`, lists of kernel axis indices: `inputs`
        do not reach the output (contracted with the input), `outputs`
        reach the output but are not in the input, `shared` are in input,
        kernel and output alike (a per-position kernel, such as
        `"abc,bc->abc"`).
    """
    lhs, output = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    inputs = [i for i, c in enumerate(k_spec) if c not in output]
    outputs = [i for i, c in enumerate(k_spec) if c in output and c not in x_spec]
    shared = [i for i, c in enumerate(k_spec) if c in output and c in x_spec]
    return inputs, outputs, shared


def standard_equations(equation):
    """The two einsums of the standard factoring: `x·A`, then `·B`.

    `A` has the kernel's input axes (in kernel order) plus `r`, `B` has `r`
    plus the kernel's output axes (in kernel order).
    """
    lhs, output = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    inputs, outputs, _ = kernel_axes(equation)
    r = next(c for c in string.ascii_letters if c not in equation)
    out = "".join(k_spec[i] for i in outputs)
    batch = "".join(c for c in output if c not in out)
    mid = batch + r
    first = f"{x_spec},{''.join(k_spec[i] for i in inputs)}{r}->{mid}"
    second = f"{mid},{r}{out}->{output}"
    return first, second


def lora_equations(equation):
    """Keras core's factoring of `equation`'s kernel and its two einsums.

    `A` has the kernel's axes with its last axis replaced by the rank `r`,
    and `B` has shape `(r, kernel.shape[-1])`. `einsum(equation, x, A·B)` is
    computed as `einsum(second, einsum(first, x, A), B)`, which never forms
    `A·B`.

    Returns:
        `(first, second, is_matmul)`, where `is_matmul` says that `second`
        is a plain matmul on the last axis (e.g. attention projections).
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


def flat_inputs(equation):
    """How many trailing input axes the standard factoring's `x·A·B`
    flattens into one, so that it is one 2-D product `low_rank` can take,
    or `None` when it cannot: the input must end with the kernel's input
    axes and the output be the input's other axes then the kernel's output
    axes, each in kernel order (every attention projection of
    `MultiHeadAttention` and KerasHub's GPT-2 is so)."""
    lhs, output = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    inputs, outputs, shared = kernel_axes(equation)
    in_chars = "".join(k_spec[i] for i in inputs)
    out_chars = "".join(k_spec[i] for i in outputs)
    batch = x_spec[: len(x_spec) - len(in_chars)]
    if shared or x_spec != batch + in_chars or output != batch + out_chars:
        return None
    return len(in_chars)


def _is_matmul(equation):
    """Whether `equation` is `x @ w` over the last axis of `x` (2-D `w`)."""
    lhs, output = equation.split("->")
    x_spec, w_spec = lhs.split(",")
    return (
        len(w_spec) == 2
        and x_spec.endswith(w_spec[0])
        and output == x_spec[:-1] + w_spec[1]
        and w_spec[0] not in x_spec[:-1]
    )


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(variants.QuantizedDoRA, LoRALayer):
    """A frozen `EinsumDense` plus a trainable low-rank update.

    `output = einsum(equation, input, kernel + scale·A·B) + bias`, computed
    as `einsum(equation, input, kernel)` plus the update through `A` then
    `B`, never as a merged kernel. `B` starts at zero.

    How `A·B` covers the kernel is the `factoring`:

    - `"standard"` (the default): the kernel is a matrix from its input
      (contracted) axes to its output axes. `A` (`lora_a`) has the input
      axes in kernel order plus `(rank,)`, `B` (`lora_b`) has `(rank,)` plus
      the output axes in kernel order. For a `MultiHeadAttention` query
      kernel `(dim, heads, head_dim)`: `A` is `(dim, rank)` and `B` is
      `(rank, heads, head_dim)`, which is PEFT's LoRA on the flattened
      `(dim, heads*head_dim)` matrix. For `attention_output`
      `(heads, head_dim, dim)`: `A` is `(heads, head_dim, rank)`, `B` is
      `(rank, dim)`.
    - `"keras"`: Keras core's factoring (`enable_lora`): `A` has shape
      `kernel.shape[:-1] + (rank,)` and `B` has `(rank, kernel.shape[-1])`.
      For the query kernel, `A` is `(dim, heads, rank)` and one `B` of
      `(rank, head_dim)` is shared by all heads.

    A kernel axis that is in the input, the kernel and the output (e.g.
    `"abc,bc->abc"`) makes the kernel no matrix, so the standard factoring
    does not exist for it: with `factoring=None` such a layer uses
    `"keras"`, and `factoring="standard"` raises `ValueError`. The
    `factoring` property tells which one a layer uses. A config without a
    `factoring` entry (every `.keras` file written before the option
    existed) means `"keras"`. For a 2-D kernel both are the same.

    Args:
        layer: the `keras.layers.EinsumDense` to adapt, built or not, float
            or quantized to `"int8"`, `"int4"` or `"float8"`.
        rank: positive integer, the rank `r` of the update.
        alpha: positive number, or `None` for `alpha = rank`.
        factoring: `"standard"`, `"keras"` or `None` (standard where the
            kernel is a matrix, else Keras's).
        **kwargs: as for `LoRALayer`.

    Input shape:
        The base layer's input shape.

    Output shape:
        The base layer's output shape.

    Example:

    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> mha.build((None, 3, 8), (None, 3, 8))
    >>> lora = LoRAEinsumDense(mha.query_dense, rank=2)
    >>> tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
    ((8, 2), (2, 2, 4))
    """

    base_class = keras.layers.EinsumDense
    quantization_modes = ("int8", "int4", "float8", "nf4")

    def __init__(self, layer, rank=8, alpha=None, factoring=None, **kwargs):
        super().__init__(layer, rank=rank, alpha=alpha, factoring=factoring, **kwargs)
        self.supports_masking = True

    @classmethod
    def kernel_axes(cls, layer):
        inputs, outputs, shared = kernel_axes(layer.equation)
        return None if shared else (tuple(inputs), tuple(outputs))

    @classmethod
    def peft_kind(cls, layer):
        # PEFT's LoRA on the kernel flattened to `(inputs, outputs)`, axes in
        # kernel order: exists where the kernel is a matrix.
        return None if cls.kernel_axes(layer) is None else "Linear"

    @classmethod
    def file_factoring(cls, factoring):
        return LEGACY_FACTORING if factoring is None else factoring

    core_factoring = "keras"

    @classmethod
    def _resolve_factoring(cls, layer, factoring):
        factoring = validate_factoring(factoring)
        _, _, shared = kernel_axes(layer.equation)
        if factoring is None:
            return "keras" if shared else "standard"
        if factoring == "standard" and shared:
            raise ValueError(
                f"Layer '{layer.name}' (equation {layer.equation!r}) has a "
                "kernel axis shared by input, kernel and output, so its kernel "
                "is not a matrix and has no standard factoring. Use "
                "factoring='keras' (or None)."
            )
        return factoring

    def _setup_factoring(self):
        equation = self.layer.equation.replace(" ", "")
        inputs, outputs, _ = kernel_axes(equation)
        if self.factoring == "standard":
            first, second = standard_equations(equation)
            layout = (tuple(inputs + outputs), len(inputs))
            matmuls = (_is_matmul(first), _is_matmul(second))
            flat = flat_inputs(equation)
        else:
            flat = None
            first, second, is_matmul = lora_equations(equation)
            layout, matmuls = (None, None), (False, is_matmul)
        # Plain Python state, decided once (not re-parsed per call).
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_equations", (first, second))
        object.__setattr__(self, "_matmuls", matmuls)
        object.__setattr__(self, "_flat_inputs", flat)
        object.__setattr__(self, "_norm_axes_cache", tuple(inputs))
        lhs, output = equation.split("->")
        c_spec = "".join(ch for ch in lhs.split(",")[1] if ch in output)
        dora = None if output.endswith(c_spec) else f"{output},{c_spec}->{output}"
        object.__setattr__(self, "_dora_equation", dora)

    def adapter_shapes(self):
        shape = tuple(self.layer.kernel.shape)
        perm, n_in = self._layout
        if perm is None:
            return shape[:-1] + (self.rank,), (self.rank, shape[-1])
        a = tuple(shape[i] for i in perm[:n_in])
        b = tuple(shape[i] for i in perm[n_in:])
        return a + (self.rank,), (self.rank,) + b

    def kernel_layout(self):
        perm, n_in = self._layout
        if perm is None:
            return super().kernel_layout()
        return perm, n_in

    def _base_op(self, inputs, kernel):
        return ops.einsum(self.layer.equation, inputs, kernel)

    def _update(self, inputs, adapter, dtype, training=None):
        n_in = self._flat_inputs
        if n_in is not None:  # one 2-D product: `low_rank`'s fast backward
            return self._flat_update(inputs, adapter, dtype, n_in)
        (first, second), (first_matmul, second_matmul) = self._equations, self._matmuls
        a = self._adapter(adapter.a, dtype)
        update = matmul(inputs, a) if first_matmul else ops.einsum(first, inputs, a)
        update = self._scaled(update, adapter)
        b = self._adapter(adapter.b, dtype)
        if second_matmul:
            return matmul(update, b)
        return ops.einsum(second, update, b)

    def _flat_update(self, inputs, adapter, dtype, n_in):
        x, a, b, out_dims = self._flat_operands(inputs, adapter, dtype, n_in)
        y = low_rank(x, a, b, scalar(adapter.scale, dtype))
        if len(out_dims) > 1:
            y = reshape(y, leading_shape(x, 1) + out_dims)
        return y

    def _flat_operands(self, inputs, adapter, dtype, n_in):
        """`(x, A, B, out_dims)` of the one 2-D product: `x` `(..., fan_in)`,
        `A` `(fan_in, rank)`, `B` `(rank, fan_out)`."""
        a = self._adapter(adapter.a, dtype)
        b = self._adapter(adapter.b, dtype)
        rank = b.shape[0]
        x = inputs
        if n_in > 1:
            fan_in = math.prod(a.shape[:-1])
            x = reshape(inputs, leading_shape(inputs, n_in) + [fan_in])
            a = reshape(a, (fan_in, rank))
        out_dims = list(b.shape[1:])
        if len(out_dims) > 1:
            b = reshape(b, (rank, math.prod(out_dims)))
        return x, a, b, out_dims

    def _add_update(self, out, inputs, adapter, dtype, training=None):
        n_in = self._flat_inputs
        own = type(self)._update is LoRAEinsumDense._update  # not a subclass's
        if n_in is None or not own or not writable(out):
            return super()._add_update(out, inputs, adapter, dtype, training)
        x, a, b, _ = self._flat_operands(inputs, adapter, dtype, n_in)
        return add_low_rank_into(out, x, a, b, scalar(adapter.scale, dtype))

    # ----- mixed batches (`layers.mixed`): x·A, h·B, both per row ----------

    def _routed_first(self, inputs, a):
        first = self._equations[0]
        return matmul(inputs, a) if self._matmuls[0] else ops.einsum(first, inputs, a)

    def _routed_second(self, h, b):
        second = self._equations[1]
        return matmul(h, b) if self._matmuls[1] else ops.einsum(second, h, b)

    def _routed_second_is_matmul(self):
        own = type(self)._routed_second is LoRAEinsumDense._routed_second
        return own and self._matmuls[1]

    def _routed_rank_axis(self):
        first, second = self._equations
        return first.split("->")[1].index(second.split(",")[1][0])

    def _routed_flat_inputs(self):
        # Trailing input axes `x·A·B` flattens ("grouped"); None: Keras's.
        return self._flat_inputs

    def _routed_gather(self, inputs, a_stack, b_stack, index):
        # The gathered factors get the input's batch axis as a leading axis.
        first, second = self._equations
        x_spec, a_spec = first.split("->")[0].split(",")
        mid = first.split("->")[1]
        b_spec, output = second.split("->")[0].split(",")[1], second.split("->")[1]
        row = x_spec[0]
        a_rows = ops.take(a_stack, index, axis=0)
        h = ops.einsum(f"{x_spec},{row}{a_spec}->{mid}", inputs, a_rows)
        b_rows = ops.take(b_stack, index, axis=0)
        return ops.einsum(f"{mid},{row}{b_spec}->{output}", h, b_rows)

    def _routed_scale_rows(self, y, rows):
        equation = self._dora_equation
        if equation is None:
            return scale_rows(y, rows)
        output, c_spec = equation.split("->")[0].split(",")
        return ops.einsum(f"{output},{output[0]}{c_spec}->{output}", y, rows)

    def _norm_axes(self):
        # DoRA's norm runs over the kernel axes that do not reach the output.
        return self._norm_axes_cache

    def _scale_output(self, y, c):
        # `y` times DoRA's per-output-unit `c`: a broadcast product when the
        # output ends with `c`'s axes, else the einsum set up once.
        equation = self._dora_equation
        return ops.multiply(y, c) if equation is None else ops.einsum(equation, y, c)

    def get_config(self):
        config = super().get_config()
        config["factoring"] = self.factoring
        return config

    @classmethod
    def upgrade_config(cls, config):
        config = super().upgrade_config(config)
        config.setdefault("factoring", LEGACY_FACTORING)
        return config
