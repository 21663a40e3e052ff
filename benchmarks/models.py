"""The models every section measures, built the same way for every row."""

import keras
import numpy as np

from benchmarks.config import CAUSAL_LM  # noqa: F401 (the transformer row)


def mlp(input_dim, width, depth, classes, name="mlp"):
    """`depth` x `Dense(width, relu)` plus a `Dense(classes)` head."""
    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def dense_block(seq_len, d_model, d_ff, classes, name="block"):
    """A Dense-only transformer-ish block on `(batch, seq_len, d_model)`.

    Attention projections `query`, `key`, `value`, `attention_output` (the
    adapter targets), single-head softmax attention computed with
    `keras.ops`, residuals, layer norms and a `Dense` FFN, then a pooled
    head. It stands in for `MultiHeadAttention` until LoRA covers
    `EinsumDense`.
    """
    inputs = keras.Input((seq_len, d_model), name="tokens")
    q = keras.layers.Dense(d_model, name="query")(inputs)
    k = keras.layers.Dense(d_model, name="key")(inputs)
    v = keras.layers.Dense(d_model, name="value")(inputs)
    attended = SoftmaxAttention(name="attention")([q, k, v])
    x = keras.layers.Dense(d_model, name="attention_output")(attended)
    x = keras.layers.LayerNormalization(name="norm_1")(inputs + x)
    h = keras.layers.Dense(d_ff, activation="relu", name="ffn_in")(x)
    h = keras.layers.Dense(d_model, name="ffn_out")(h)
    x = keras.layers.LayerNormalization(name="norm_2")(x + h)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


class SoftmaxAttention(keras.layers.Layer):
    """`softmax(q·kᵀ/√d)·v`, no weights."""

    def call(self, inputs):
        q, k, v = inputs
        scale = 1.0 / float(q.shape[-1]) ** 0.5
        scores = keras.ops.einsum("bqd,bkd->bqk", q, k) * scale
        return keras.ops.einsum("bqk,bkd->bqd", keras.ops.softmax(scores), v)

    def compute_output_shape(self, input_shapes):
        return input_shapes[2]


def dense_layers(model, names=None):
    """The model's `Dense` layers, optionally only those named in `names`."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense)
        and (names is None or layer.name in names)
    ]


def weight_bytes(weights):
    """Bytes held by `weights`, from their shapes and dtypes."""
    total = 0
    for variable in weights:
        size = 1
        for dim in variable.shape:
            size *= int(dim)
        total += (
            size * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
        )
    return total


def causal_lm(
    num_layers=4,
    hidden_dim=256,
    num_heads=4,
    intermediate_dim=1024,
    vocabulary_size=4096,
    sequence_length=128,
    seed=0,
    **_,
):
    """A `keras_hub.models.GPT2CausalLM` with random weights and no
    preprocessor (it trains on token ids), built offline from config."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        max_sequence_length=sequence_length,
        dropout=0.0,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def llama_causal_lm(
    num_layers=12,
    hidden_dim=2048,
    num_query_heads=16,
    num_key_value_heads=8,
    intermediate_dim=5632,
    vocabulary_size=32000,
    seed=0,
    **_,
):
    """A `keras_hub.models.Llama3CausalLM` with random weights and no
    preprocessor (it trains on token ids), built offline from config. The
    defaults are issue 19's model: 0.70B parameters, 2,660 MiB of float32
    kernels and embeddings."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def causal_lm_batch(batch, sequence_length, vocabulary_size, seed=0, **_):
    """`(x, y, sample_weight)` numpy arrays for one next-token step."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocabulary_size, (batch, sequence_length + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((batch, sequence_length), "int32"),
    }
    return (
        x,
        tokens[:, 1:].astype("int32"),
        np.ones((batch, sequence_length), "float32"),
    )
