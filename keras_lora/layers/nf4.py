"""NF4 bases: `Dense` and `EinsumDense` with QLoRA's 4-bit NormalFloat kernel.

Keras has no NF4 mode, so an NF4 layer is a subclass of its Keras layer
(`NF4Dense`, `NF4EinsumDense`) whose `quantization_mode` is `"nf4"` and
which holds, instead of a float kernel:

- `nf4_codes`: int8, two 4-bit codes per byte, each an index into the 16
  NF4 levels (`quantized.NF4_LEVELS`), over the kernel flattened in its own
  order and padded with zeros to whole blocks;
- `nf4_absmax`: float32, one absmax per block of `block_size` codes; or,
  with double quantization, `nf4_absmax_codes` (int8),
  `nf4_absmax_scale` (float32, one per 256 absmax) and `nf4_absmax_offset`
  (float32, their mean).

`W = level[code]·absmax` of the code's block (`quantized.dequantize_nf4`,
next to the int8/int4 dequantization), so merging, the lean product of
`layers.quantized_product` and every LoRA path treat NF4 as one more
quantized mode. `quantize_nf4` (in `model.quantized_bases`) converts a
model's float layers in place, as Keras's `model.quantize` does.
"""

import math

import keras
import numpy as np
from keras import ops
from keras.src.layers.core.einsum_dense import _analyze_einsum_string

from keras_lora.layers import quantized, quantized_product

_ABSMAX = ("nf4_absmax",)
_DOUBLE = ("nf4_absmax_codes", "nf4_absmax_scale", "nf4_absmax_offset")


def check_block_size(block_size, function="quantize_nf4"):
    """Raises unless `block_size` is a positive even int (two codes a byte,
    and whole bytes per block)."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size <= 0
        or block_size % 2
    ):
        raise ValueError(
            f"{function}: `block_size` must be a positive even integer (NF4 "
            f"packs two codes per byte). Received: block_size={block_size!r}"
        )


def check_double_quant(double_quant, function="quantize_nf4"):
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(
            f"{function}: `double_quant` must be a bool. "
            f"Received: double_quant={double_quant!r} of type "
            f"{type(double_quant).__name__}"
        )


def quantize_array(kernel, block_size, double_quant):
    """NF4 storage of the float `kernel` (NumPy): a dict of variable name to
    value, as `NF4Dense` holds them.

    Each block's values are divided by its absmax and rounded to the
    nearest NF4 level (ties to the lower one). With `double_quant`, the
    absmax values, less their mean, are quantized to int8 in blocks of 256
    (one float32 scale each): as the paper, but with a linear int8 code
    where the paper uses an 8-bit float.
    """
    flat = np.asarray(kernel, dtype="float32").reshape(-1)
    blocks = -(-flat.size // block_size)
    padded = np.zeros(blocks * block_size, "float32")
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, block_size)
    absmax = np.abs(padded).max(axis=1)
    normalized = padded / np.where(absmax > 0, absmax, 1.0)[:, None]
    levels = quantized.NF4_LEVELS
    index = np.searchsorted((levels[1:] + levels[:-1]) / 2, normalized.reshape(-1))
    index = index.astype("uint8")
    packed = (index[0::2] | (index[1::2] << 4)).astype("uint8").view("int8")
    values = {"nf4_codes": packed}
    if not double_quant:
        values["nf4_absmax"] = absmax.astype("float32")
        return values
    offset = np.float32(absmax.mean())
    groups = -(-blocks // quantized.ABSMAX_BLOCK)
    centered = np.zeros(groups * quantized.ABSMAX_BLOCK, "float32")
    centered[:blocks] = absmax - offset
    centered = centered.reshape(groups, quantized.ABSMAX_BLOCK)
    scale = np.abs(centered).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype("float32")
    codes = np.clip(np.round(centered / scale[:, None]), -127, 127)
    values["nf4_absmax_codes"] = codes.astype("int8").reshape(-1)
    values["nf4_absmax_scale"] = scale
    values["nf4_absmax_offset"] = np.asarray(offset, "float32")
    return values


def storage_shapes(kernel_shape, block_size, double_quant):
    """`{name: (shape, dtype)}` of the NF4 variables of a kernel."""
    blocks = -(-math.prod(kernel_shape) // block_size)
    shapes = {"nf4_codes": ((blocks * block_size // 2,), "int8")}
    if not double_quant:
        shapes["nf4_absmax"] = ((blocks,), "float32")
        return shapes
    groups = -(-blocks // quantized.ABSMAX_BLOCK)
    shapes["nf4_absmax_codes"] = ((groups * quantized.ABSMAX_BLOCK,), "int8")
    shapes["nf4_absmax_scale"] = ((groups,), "float32")
    shapes["nf4_absmax_offset"] = ((), "float32")
    return shapes


class NF4Storage:
    """What `NF4Dense` and `NF4EinsumDense` share: the NF4 variables, the
    call on the lean product, saving, config, and conversion."""

    # The Keras class this NF4 class stores (a merge gives one back).
    float_class = None

    def __init__(self, *args, block_size=64, double_quant=False, **kwargs):
        check_block_size(block_size, type(self).__name__)
        check_double_quant(double_quant, type(self).__name__)
        super().__init__(*args, **kwargs)
        self.nf4_block_size = int(block_size)
        self.nf4_double_quant = bool(double_quant)

    @property
    def quantization_mode(self):
        """`"nf4"` (the dtype policy stays the float one: Keras knows no
        NF4, and calls `call`, which runs the NF4 product)."""
        return "nf4"

    @property
    def kernel(self):
        """The float32 kernel the NF4 codes stand for, dequantized on each
        read (for shapes and inspection; the call never reads it)."""
        return quantized.dequantized_kernel(self)

    def nf4_variables(self):
        """The NF4 variables, in `quantized.kernel_params`'s order."""
        names = ("nf4_codes",) + (_DOUBLE if self.nf4_double_quant else _ABSMAX)
        return [getattr(self, name) for name in names]

    def _build_nf4(self, kernel_shape):
        self.nf4_kernel_shape = tuple(int(d) for d in kernel_shape)
        shapes = storage_shapes(
            self.nf4_kernel_shape, self.nf4_block_size, self.nf4_double_quant
        )
        for name, (shape, dtype) in shapes.items():
            variable = self.add_weight(
                name=name,
                shape=shape,
                initializer="zeros",
                dtype=dtype,
                trainable=False,
            )
            setattr(self, name, variable)

    # ----- call -------------------------------------------------------------

    def call(self, inputs, training=None):
        return self.quantized_call(inputs, training=training)

    def quantized_call(self, inputs, training=None):
        """`activation(x·W_nf4 + bias)`, the product lean (no kernel-sized
        residual for the backward pass; `layers.quantized_product`)."""
        return quantized_product.dense_call(self, inputs)

    # ----- saving -----------------------------------------------------------

    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) expects "
                f"{len(variables)} variables "
                f"({[v.name for v in variables]}), the file has "
                f"{len(store.keys())}."
            )
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])

    def _saved_variables(self):
        bias = [] if self.bias is None else [self.bias]
        return self.nf4_variables() + bias

    def get_config(self):
        config = super().get_config()
        config["quantization_config"] = {
            "mode": "nf4",
            "block_size": self.nf4_block_size,
            "double_quant": self.nf4_double_quant,
        }
        return config

    @classmethod
    def from_config(cls, config):
        """The NF4 layer of `config`; without its `quantization_config` (as
        a merge asks for the float layer), the plain Keras layer."""
        config = dict(config)
        nf4 = config.pop("quantization_config", None)
        if not (isinstance(nf4, dict) and nf4.get("mode") == "nf4"):
            return cls.float_class.from_config(config)
        config["block_size"] = nf4["block_size"]
        config["double_quant"] = nf4["double_quant"]
        return super().from_config(config)

    # ----- conversion -------------------------------------------------------

    def requantize(self, layer):
        """Quantizes the float `layer` (a merged copy of this one) in place
        with this layer's block size and double quantization."""
        convert(layer, self.nf4_block_size, self.nf4_double_quant)

    def quantize(self, mode=None, type_check=True, config=None):
        # NotImplementedError: `Model.quantize` warns and leaves it as it is.
        raise NotImplementedError(
            f"Layer '{self.name}' is stored as NF4; quantizing it again "
            f"(mode={mode!r}) is not supported. Merge it to a float layer "
            "first (`keras_lora.merge_lora`)."
        )

    def enable_lora(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' is stored as NF4: Keras core's `enable_lora` "
            "does not know it. Use `keras_lora.apply_lora`."
        )


@keras.saving.register_keras_serializable(package="keras_lora")
class NF4Dense(NF4Storage, keras.layers.Dense):
    """A `Dense` whose kernel is stored as NF4 (see the module docstring).

    `output = activation(dot(input, dequant(kernel)) + bias)`. Made by
    `keras_lora.quantize_nf4`; built from its config, it creates the NF4
    variables (zeros) and no float kernel.

    Args:
        block_size: positive even int, the codes per absmax (default 64).
        double_quant: bool, whether the absmax values are quantized to int8.
        *args, **kwargs: `keras.layers.Dense`'s.
    """

    float_class = keras.layers.Dense

    def build(self, input_shape):
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self._build_nf4((input_shape[-1], self.units))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_shape[-1]})
        self.built = True


@keras.saving.register_keras_serializable(package="keras_lora")
class NF4EinsumDense(NF4Storage, keras.layers.EinsumDense):
    """An `EinsumDense` whose kernel is stored as NF4 (see the module
    docstring): `output = einsum(equation, input, dequant(kernel)) + bias`.

    Args:
        block_size: positive even int, the codes per absmax (default 64).
        double_quant: bool, whether the absmax values are quantized to int8.
        *args, **kwargs: `keras.layers.EinsumDense`'s.
    """

    float_class = keras.layers.EinsumDense

    def build(self, input_shape):
        kernel_shape, bias_shape, _, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape))
        if bias_shape is not None:
            self.bias = self.add_weight(
                name="bias",
                shape=tuple(bias_shape),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self._build_nf4(kernel_shape)
        self._set_quantization_info()  # the backward's einsum equation
        self.built = True


_NF4_CLASS = {keras.layers.Dense: NF4Dense, keras.layers.EinsumDense: NF4EinsumDense}


def nf4_class(layer):
    """The NF4 class that stores `layer` (exactly a float Keras `Dense` or
    `EinsumDense`, built, not quantized, no Keras `enable_lora`), else
    `None`."""
    cls = _NF4_CLASS.get(type(layer))
    if cls is None or not layer.built or getattr(layer, "lora_enabled", False):
        return None
    if layer.dtype_policy.quantization_mode is not None:
        return None
    return cls


def convert(layer, block_size, double_quant, values=None):
    """Makes the float `layer` (see `nf4_class`) an NF4 layer, in place as
    Keras's `quantize` does: its float kernel is deleted, the NF4 variables
    hold `values` (by default `quantize_array` of the kernel)."""
    cls = nf4_class(layer)
    if values is None:
        kernel = ops.convert_to_numpy(layer._kernel)
        values = quantize_array(kernel, block_size, double_quant)
    kernel_shape = tuple(layer._kernel.shape)
    layer._tracker.unlock()
    del layer._kernel
    layer.__class__ = cls
    layer.nf4_block_size = int(block_size)
    layer.nf4_double_quant = bool(double_quant)
    layer._build_nf4(kernel_shape)
    if cls is NF4EinsumDense:
        layer._set_quantization_info()
    layer._tracker.lock()
    if keras.backend.backend() == "torch":  # as Keras's `_post_quantize`
        layer._track_variables()  # drops the deleted kernel's parameter
    for name, value in values.items():
        getattr(layer, name).assign(value)
    return layer
