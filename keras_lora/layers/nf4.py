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
quantized mode. `quantize_nf4` (in `model.nf4_conversion`) converts a
model's float layers in place, as Keras's `model.quantize` does.

Embeddings (`NF4Embedding`, `NF4ReversibleEmbedding`) store their table
`(input_dim, output_dim)` the same way. A lookup gathers the codes and
absmax of its rows and dequantizes only those (when `output_dim` is a
multiple of the block size, so that rows are whole blocks; otherwise the
table, once per call). An untied `ReversibleEmbedding`'s reverse table
`(output_dim, input_dim)` is stored transposed, as `nf4_reverse_*`, so
that both tables are read by vocabulary rows: the LM head's logits
dequantize one chunk of rows at a time (`layers.quantized_product`).
"""

import gc
import math

import keras
import numpy as np
from keras import ops
from keras.src.layers.core.einsum_dense import _analyze_einsum_string

from keras_lora.layers import quantized, quantized_product

_ABSMAX = ("absmax",)
_DOUBLE = ("absmax_codes", "absmax_scale", "absmax_offset")


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


def check_flag(value, argument, function="quantize_nf4"):
    """Raises a `TypeError` naming `argument` unless `value` is a bool
    (`double_quant`, `embeddings`)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{function}: `{argument}` must be a bool. "
            f"Received: {argument}={value!r} of type {type(value).__name__}"
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


def storage_shapes(kernel_shape, block_size, double_quant, prefix="nf4_"):
    """`{name: (shape, dtype)}` of the NF4 variables of a kernel (names as
    `quantize_array`'s, `"nf4_"` replaced by `prefix`)."""
    blocks = -(-math.prod(kernel_shape) // block_size)
    shapes = {"codes": ((blocks * block_size // 2,), "int8")}
    if not double_quant:
        shapes["absmax"] = ((blocks,), "float32")
    else:
        groups = -(-blocks // quantized.ABSMAX_BLOCK)
        shapes["absmax_codes"] = ((groups * quantized.ABSMAX_BLOCK,), "int8")
        shapes["absmax_scale"] = ((groups,), "float32")
        shapes["absmax_offset"] = ((), "float32")
    return {prefix + name: value for name, value in shapes.items()}


def float_tables(layer):
    """`{prefix: float kernel (NumPy)}` of the float `layer` that its NF4
    class stores: `"nf4_"` the kernel (an embedding's table), and for an
    untied `ReversibleEmbedding` `"nf4_reverse_"` its reverse table,
    transposed to `(input_dim, output_dim)`."""
    if not isinstance(layer, keras.layers.Embedding):
        return {"nf4_": ops.convert_to_numpy(layer._kernel)}
    tables = {"nf4_": ops.convert_to_numpy(layer._embeddings)}
    if _untied(layer):
        tables["nf4_reverse_"] = ops.convert_to_numpy(layer.reverse_embeddings).T
    return tables


def quantize_layer(layer, block_size, double_quant):
    """Every NF4 variable's value (`quantize_array`) for the float `layer`
    (see `nf4_class`): `{name: NumPy value}`, as `convert` takes them."""
    values = {}
    for prefix, table in float_tables(layer).items():
        for name, value in quantize_array(table, block_size, double_quant).items():
            values[prefix + name[len("nf4_") :]] = value
    return values


def _untied(layer):
    return isinstance(layer, keras.layers.ReversibleEmbedding) and not layer.tie_weights


class NF4Storage:
    """What `NF4Dense` and `NF4EinsumDense` share: the NF4 variables, the
    call on the lean product, saving, config, and conversion."""

    # The Keras class this NF4 class stores (a merge gives one back).
    float_class = None

    def __init__(self, *args, block_size=64, double_quant=False, **kwargs):
        check_block_size(block_size, type(self).__name__)
        check_flag(double_quant, "double_quant", type(self).__name__)
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

    def nf4_variables(self, reverse=False):
        """The NF4 variables, in `quantized.kernel_params`'s order; with
        `reverse`, those of an untied `ReversibleEmbedding`'s reverse
        table."""
        prefix = "nf4_reverse_" if reverse else "nf4_"
        names = ("codes",) + (_DOUBLE if self.nf4_double_quant else _ABSMAX)
        return [getattr(self, prefix + name) for name in names]

    def _build_nf4(self, kernel_shape, prefix="nf4_"):
        self.nf4_kernel_shape = tuple(int(d) for d in kernel_shape)
        shapes = storage_shapes(
            self.nf4_kernel_shape, self.nf4_block_size, self.nf4_double_quant, prefix
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
        variables = self.nf4_variables()
        if _untied(self):
            variables += self.nf4_variables(reverse=True)
        bias = getattr(self, "bias", None)
        return variables + ([] if bias is None else [bias])

    def get_config(self):
        config = super().get_config()
        config["quantization_config"] = {
            "mode": "nf4",
            "block_size": self.nf4_block_size,
            "double_quant": self.nf4_double_quant,
        }
        float_class = getattr(self, "nf4_float_class", None)
        if float_class is not None:  # a subclass stored (KerasHub's)
            config["quantization_config"]["float_class"] = float_class
        return config

    @classmethod
    def from_config(cls, config):
        """The NF4 layer of `config`; without its `quantization_config` (as
        a merge asks for the float layer), the float layer it stores."""
        config = dict(config)
        nf4 = config.pop("quantization_config", None)
        if not (isinstance(nf4, dict) and nf4.get("mode") == "nf4"):
            return cls.float_class.from_config(config)
        config["block_size"] = nf4["block_size"]
        config["double_quant"] = nf4["double_quant"]
        layer = super().from_config(config)
        if nf4.get("float_class") is not None:
            layer.nf4_float_class = nf4["float_class"]
        return layer

    # ----- conversion -------------------------------------------------------

    def float_layer_class(self):
        """The float class this layer stores (a merge builds one): the
        Keras class, or the subclass it was converted from (KerasHub's
        `ReversibleEmbedding`)."""
        name = getattr(self, "nf4_float_class", None)
        if name is None:
            return self.float_class
        return keras.saving.get_registered_object(name) or self.float_class

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


class NF4EmbeddingStorage(NF4Storage):
    """What `NF4Embedding` and `NF4ReversibleEmbedding` add: the table
    read back, and the lookup that dequantizes only the rows it reads."""

    @property
    def embeddings(self):
        """The float32 table the NF4 codes stand for, dequantized on each
        read (for shapes and inspection; calls never read it)."""
        return quantized.dequantized_kernel(self)

    def call(self, inputs, reverse=False):
        return self.quantized_call(inputs, reverse=reverse)

    def quantized_call(self, inputs, reverse=False):
        if reverse:  # a ReversibleEmbedding's logits, the product lean
            logits = quantized_product.product(self, inputs, reverse=True)
            cap = self.logit_soft_cap
            if cap is not None:  # as Keras's call: after the product
                logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
            return logits
        return self.lookup(inputs)

    def lookup(self, inputs):
        """`take(table, inputs)` in the compute dtype, dequantizing the
        looked-up rows only (a whole table per call when `output_dim` is
        not a multiple of the block size)."""
        if keras.backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        width, block = self.output_dim, self.nf4_block_size
        if width % block:
            rows = ops.take(self.embeddings, inputs, axis=0)
        else:
            codes, absmax = quantized.nf4_plain(quantized.kernel_params(self))
            ids = ops.reshape(inputs, (-1,))
            codes = ops.take(ops.reshape(codes, (self.input_dim, width // 2)), ids, 0)
            absmax = absmax[: self.input_dim * (width // block)]
            absmax = ops.take(ops.reshape(absmax, (self.input_dim, -1)), ids, 0)
            flat = quantized.dequantize_nf4(
                (ops.reshape(codes, (-1,)), ops.reshape(absmax, (-1,))),
                block,
                None,
            )
            rows = ops.reshape(flat, tuple(ops.shape(inputs)) + (width,))
        outputs = ops.cast(rows, self.compute_dtype)
        if isinstance(self, keras.layers.ReversibleEmbedding) and self.mask_zero:
            # As Keras's `ReversibleEmbedding.call` (its `compute_mask` is None).
            from keras.src.utils.masking import set_keras_mask

            set_keras_mask(outputs, ops.not_equal(inputs, 0))
        return outputs


@keras.saving.register_keras_serializable(package="keras_lora")
class NF4Embedding(NF4EmbeddingStorage, keras.layers.Embedding):
    """An `Embedding` whose table is stored as NF4 (see the module
    docstring). Made by `keras_lora.quantize_nf4`.

    Args:
        block_size: positive even int, the codes per absmax (default 64).
        double_quant: bool, whether the absmax values are quantized to int8.
        *args, **kwargs: `keras.layers.Embedding`'s.
    """

    float_class = keras.layers.Embedding

    def build(self, input_shape=None):
        self._build_nf4((self.input_dim, self.output_dim))
        self.built = True


@keras.saving.register_keras_serializable(package="keras_lora")
class NF4ReversibleEmbedding(NF4EmbeddingStorage, keras.layers.ReversibleEmbedding):
    """A `ReversibleEmbedding` whose table, and reverse table if untied,
    are stored as NF4 (see the module docstring). `call(x, reverse=True)`
    gives the logits against the dequantized table, chunk by chunk.

    Args:
        block_size: positive even int, the codes per absmax (default 64).
        double_quant: bool, whether the absmax values are quantized to int8.
        *args, **kwargs: `keras.layers.ReversibleEmbedding`'s.
    """

    float_class = keras.layers.ReversibleEmbedding

    @property
    def reverse_embeddings(self):
        """An untied layer's float32 reverse table `(output_dim,
        input_dim)`, dequantized on each read."""
        if self.tie_weights:
            raise AttributeError("a tied ReversibleEmbedding has no reverse table")
        return quantized.dequantized_kernel(self, reverse=True)

    def build(self, input_shape=None):
        self._build_nf4((self.input_dim, self.output_dim))
        if not self.tie_weights:
            self._build_nf4((self.input_dim, self.output_dim), "nf4_reverse_")
        self.built = True


_NF4_CLASS = {
    keras.layers.Dense: NF4Dense,
    keras.layers.EinsumDense: NF4EinsumDense,
    keras.layers.Embedding: NF4Embedding,
    keras.layers.ReversibleEmbedding: NF4ReversibleEmbedding,
}

# What a subclass of a Keras class may not override for its NF4 class to
# store it (KerasHub's `ReversibleEmbedding` overrides nothing).
_BEHAVIOUR = ("call", "build", "quantized_call", "compute_output_spec")


def nf4_class(layer, embeddings=True):
    """The NF4 class that stores `layer`, else `None`: a float Keras
    `Dense`, `EinsumDense`, or (with `embeddings`) `Embedding` or
    `ReversibleEmbedding` (exactly, or a subclass that changes none of
    their behaviour, as KerasHub's), built, not quantized, no Keras
    `enable_lora`."""
    cls = _NF4_CLASS.get(type(layer))
    if cls is None and isinstance(layer, keras.layers.ReversibleEmbedding):
        family = keras.layers.ReversibleEmbedding
        if all(getattr(type(layer), n) is getattr(family, n) for n in _BEHAVIOUR):
            cls = NF4ReversibleEmbedding
    if cls is None or not layer.built or getattr(layer, "lora_enabled", False):
        return None
    if not embeddings and issubclass(cls, NF4EmbeddingStorage):
        return None
    if layer.dtype_policy.quantization_mode is not None:
        return None
    return cls


def convert(layer, block_size, double_quant, values=None, collect=True):
    """Makes the float `layer` (see `nf4_class`) an NF4 layer, in place as
    Keras's `quantize` does: its float tables are deleted, the NF4
    variables hold `values` (by default `quantize_layer(layer, ...)`).

    Keras's `Layer.__delattr__` runs a full `gc.collect()` for every
    variable it deletes, to free device buffers at once; with TensorFlow or
    KerasHub imported, one collection walks some 450,000 objects (0.3 to
    0.7 s on a 2-core machine). `collect=True` collects once here; a caller
    converting many layers passes `collect=False` and calls `gc.collect()`
    once after the last."""
    cls = nf4_class(layer)
    if values is None:
        values = quantize_layer(layer, block_size, double_quant)
    float_class = None
    if type(layer) is not cls.float_class:
        float_class = keras.saving.get_registered_name(type(layer))
    untied = _untied(layer)
    embedding = isinstance(layer, keras.layers.Embedding)
    kernel_shape = (
        (layer.input_dim, layer.output_dim) if embedding else tuple(layer._kernel.shape)
    )
    layer._tracker.unlock()
    if embedding:
        _delete_variable(layer, "_embeddings")
        if untied:
            _delete_variable(layer, "reverse_embeddings")
    else:
        _delete_variable(layer, "_kernel")
    layer.__class__ = cls
    layer.nf4_block_size = int(block_size)
    layer.nf4_double_quant = bool(double_quant)
    if float_class is not None:
        layer.nf4_float_class = float_class
    layer._build_nf4(kernel_shape)
    if untied:
        layer._build_nf4(kernel_shape, "nf4_reverse_")
    if cls is NF4EinsumDense:
        layer._set_quantization_info()
    layer._tracker.lock()
    # Its own policy object: KerasHub's `Backbone.get_config` puts every
    # layer with a `quantization_mode` in a `DTypePolicyMap`, whose
    # `get_config` sets the name of each policy in it to `None`; a policy
    # shared with the model would lose its name for the model too.
    layer.dtype_policy = _float_policy(layer.dtype_policy)
    if keras.backend.backend() == "torch":  # as Keras's `_post_quantize`
        layer._track_variables()  # drops the deleted kernel's parameter
    for name, value in values.items():
        getattr(layer, name).assign(value)
    if collect:
        gc.collect()
    return layer


def _delete_variable(layer, name):
    """`del layer.<name>` as Keras's `Layer.__delattr__` does it (untrack,
    then the backend layer's own delete), without its `gc.collect()`."""
    layer._untrack_variable(getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)


def _float_policy(policy):
    """A new float `DTypePolicy` with `policy`'s compute and variable dtypes
    (`policy` may be a `DTypePolicyMap`'s, named `"map_..."`)."""
    compute, variable = policy.compute_dtype, policy.variable_dtype
    name = compute if compute == variable else f"mixed_{compute}"
    return keras.dtype_policies.DTypePolicy(name)
