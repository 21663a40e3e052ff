"""Reach: targets nested inside MultiHeadAttention, custom layers, subclassed
models and KerasHub-style Functional subclasses."""

import warnings
import zipfile

import keras
import numpy as np
import pytest
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.containers import LoRAContainer
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers

VOCAB, SEQ, DIM = 30, 6, 8


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class TransformerBlock(keras.layers.Layer):
    """A user's block: sublayers created in __init__, held as attributes."""

    def __init__(self, dim=DIM, heads=2, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.hidden = dim, heads, hidden
        self.mha = keras.layers.MultiHeadAttention(heads, dim // heads, name="mha")
        self.ffn_1 = keras.layers.Dense(hidden, activation="relu", name="ffn_1")
        self.ffn_2 = keras.layers.Dense(dim, name="ffn_2")
        self.norms = [keras.layers.LayerNormalization(name=f"norm_{i}") for i in (1, 2)]

    def call(self, x):
        x = self.norms[0](x + self.mha(x, x))
        return self.norms[1](x + self.ffn_2(self.ffn_1(x)))

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, heads=self.heads, hidden=self.hidden)
        return config


def transformer_classifier():
    inputs = keras.Input((SEQ,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, DIM, name="embedding")(inputs)
    x = TransformerBlock(name="block_0")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def token_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    y = (x[:, 0] > VOCAB // 2).astype("int32")
    return x, y


def cross_entropy(model, x, y):
    """Sparse categorical cross-entropy from logits, computed eagerly."""
    logits = to_numpy(model(x)).astype("float64")
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def test_iter_layers_reaches_inside_blocks_and_mha():
    paths = [p for p, _ in iter_layers(transformer_classifier())]
    for path in [
        "block_0",
        "block_0/mha",
        "block_0/mha/query",
        "block_0/mha/key",
        "block_0/mha/value",
        "block_0/mha/attention_output",
        "block_0/ffn_1",
        "block_0/norm_2",
    ]:
        assert path in paths
    assert len(paths) == len(set(paths))


def test_transformer_query_value_adapters_end_to_end(tmp_path):
    model = transformer_classifier()
    x, y = token_data()
    before = to_numpy(model(x))
    original = {w.path: to_numpy(w).copy() for w in model.weights}

    lora_model = kl.apply_lora(model, targets=["query", "value"], rank=4)
    assert [p for p, _ in lora_layers(lora_model)] == [
        "block_0/mha/query",
        "block_0/mha/value",
    ]
    block = lora_model.get_layer("block_0")
    assert isinstance(block, LoRAContainer)
    assert isinstance(block.layer, TransformerBlock)
    assert block.layer is not model.get_layer("block_0")
    assert isinstance(block.layer.mha._query_dense, kl.LoRAEinsumDense)
    assert type(model.get_layer("block_0").mha._query_dense) is keras.layers.EinsumDense
    # Base weights are shared, not copied.
    assert block.layer.mha._key_dense is model.get_layer("block_0").mha._key_dense
    assert block.layer.ffn_1 is model.get_layer("block_0").ffn_1
    # Trainable weights are exactly the four adapters.
    trainable = sorted(w.path for w in lora_model.trainable_weights)
    assert len(trainable) == 4 and all(
        p.split("/")[-1] in ("lora_a", "lora_b") for p in trainable
    )
    # Standard factoring of query/value `(DIM, 2 heads, DIM // 2)`:
    # A `(DIM, 4)`, B `(4, 2, DIM // 2)`.
    assert kl.trainable_summary(lora_model, print_fn=None).trainable == 2 * (
        DIM * 4 + 4 * 2 * (DIM // 2)
    )
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)

    lora_model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    first = cross_entropy(lora_model, x, y)
    lora_model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert cross_entropy(lora_model, x, y) < first
    # The original model is untouched, base weights bitwise.
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    for w in model.weights:
        np.testing.assert_array_equal(to_numpy(w), original[w.path])

    out = to_numpy(lora_model(x))
    assert np.abs(out - before).max() > 1e-4
    merged = kl.merge_lora(lora_model)
    merged_block = merged.get_layer("block_0")
    assert type(merged_block) is TransformerBlock
    assert type(merged_block.mha._query_dense) is keras.layers.EinsumDense
    assert not lora_layers(merged)
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)

    # .keras round trip keeps the adapters inside the block's MHA.
    lora_model.save(tmp_path / "t.keras")
    reloaded = keras.saving.load_model(tmp_path / "t.keras")
    assert [p for p, _ in lora_layers(reloaded)] == [
        "block_0/mha/query",
        "block_0/mha/value",
    ]
    np.testing.assert_array_equal(to_numpy(reloaded(x)), out)
    assert len(reloaded.trainable_weights) == 4

    # So does the adapter file, onto a fresh apply_lora of the base model.
    kl.save_adapter(lora_model, tmp_path / "adapter")
    fresh = kl.apply_lora(model, targets=["query", "value"], rank=4)
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(to_numpy(fresh(x)), out)


def test_targets_by_path_regex_and_predicate():
    model = transformer_classifier()
    by_path = kl.apply_lora(model, targets=["block_0/mha/query", "block_0/ffn_1"])
    assert [p for p, _ in lora_layers(by_path)] == [
        "block_0/mha/query",
        "block_0/ffn_1",
    ]
    by_regex = kl.apply_lora(model, targets=r".*mha/(key|attention_output)")
    assert [p for p, _ in lora_layers(by_regex)] == [
        "block_0/mha/key",
        "block_0/mha/attention_output",
    ]
    by_type = kl.apply_lora(
        model, targets=lambda layer: isinstance(layer, keras.layers.EinsumDense)
    )
    assert len(lora_layers(by_type)) == 4
    # Default: every Dense except the output layer, now inside the block too.
    default = kl.apply_lora(model)
    assert [p for p, _ in lora_layers(default)] == ["block_0/ffn_1", "block_0/ffn_2"]
    with pytest.raises(
        ValueError, match="'querry' matches no layer.*block_0/mha/query"
    ):
        kl.apply_lora(model, targets=["querry"])


def test_trainable_copies_a_nested_layer_and_keeps_original():
    model = transformer_classifier()
    x, _ = token_data(8)
    lora_model = kl.apply_lora(model, targets=["query"], trainable=["block_0/ffn_2"])
    inner = lora_model.get_layer("block_0").layer
    assert inner.ffn_2 is not model.get_layer("block_0").ffn_2
    assert inner.ffn_2.trainable and model.get_layer("block_0").ffn_2.trainable
    assert not model.get_layer("block_0").ffn_1.trainable  # shared, so frozen
    paths = sorted(w.path for w in lora_model.trainable_weights)
    assert len(paths) == 4  # lora_a, lora_b, ffn_2 kernel and bias
    np.testing.assert_array_equal(to_numpy(lora_model(x)), to_numpy(model(x)))


def test_mha_as_a_graph_layer_with_dropout_and_mask():
    inputs = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM, mask_zero=True, name="emb")(inputs)
    h = keras.layers.MultiHeadAttention(2, 4, dropout=0.5, name="mha")(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    x, _ = token_data(4)
    x[:, -2:] = 0
    lora_model = kl.apply_lora(model, targets=["query", "value"], rank=2)
    randomize_adapters(lora_model)
    inference = to_numpy(lora_model(x, training=False))
    np.testing.assert_array_equal(to_numpy(lora_model(x, training=False)), inference)
    # training=True reaches the MHA inside the container: dropout is on.
    assert np.abs(to_numpy(lora_model(x, training=True)) - inference).max() > 1e-6
    merged = kl.merge_lora(lora_model)
    np.testing.assert_allclose(to_numpy(merged(x)), inference, atol=1e-5)


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class SubclassedClassifier(keras.Model):
    def __init__(self, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.dense_1 = keras.layers.Dense(DIM, activation="relu", name="dense_1")
        self.block = TransformerBlock(name="block")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        h = self.block(self.dense_1(x))
        return self.head(keras.ops.mean(h, axis=1))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}


def test_subclassed_model_rebuilt_not_modified(tmp_path):
    model = SubclassedClassifier()
    x = np.random.default_rng(0).normal(size=(32, SEQ, 4)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None] * 0.1
    before = to_numpy(model(x))
    with pytest.raises(ValueError, match="targets=None.*subclassed"):
        kl.apply_lora(model)

    lora_model = kl.apply_lora(model, targets=["dense_1", "block/mha/value"], rank=2)
    assert type(lora_model) is SubclassedClassifier and lora_model is not model
    assert [p for p, _ in lora_layers(lora_model)] == ["dense_1", "block/mha/value"]
    assert not lora_layers(model)
    assert lora_model.head is model.head  # shared, frozen
    assert len(lora_model.trainable_weights) == 4
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)

    lora_model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    first = np.mean((to_numpy(lora_model(x)) - y) ** 2)
    lora_model.fit(x, y, epochs=4, batch_size=8, verbose=0)
    assert np.mean((to_numpy(lora_model(x)) - y) ** 2) < first
    np.testing.assert_array_equal(to_numpy(model(x)), before)

    out = to_numpy(lora_model(x))
    merged = kl.merge_lora(lora_model)
    assert type(merged) is SubclassedClassifier and not lora_layers(merged)
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)

    # A subclassed model's config cannot carry adapters: saving warns, and
    # the adapter file restores them.
    with pytest.warns(UserWarning, match="save_adapter"):
        lora_model.save(tmp_path / "sub.keras")
    kl.save_adapter(lora_model, tmp_path / "adapter")
    fresh = kl.apply_lora(model, targets=["dense_1", "block/mha/value"], rank=2)
    kl.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(to_numpy(fresh(x)), out)


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class MiniBackbone(keras.Model):
    """The KerasHub pattern: a Functional subclass built in __init__."""

    def __init__(self, vocab=VOCAB, dim=DIM, **kwargs):
        tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
        x = keras.layers.Embedding(vocab, dim, name="token_embedding")(tokens)
        x = TransformerBlock(dim=dim, name="transformer_layer_0")(x)
        super().__init__(inputs=tokens, outputs=x, **kwargs)
        self.vocab, self.dim = vocab, dim

    def get_config(self):
        return {"vocab": self.vocab, "dim": self.dim, "name": self.name}


def test_functional_subclass_needs_in_place(tmp_path):
    backbone = MiniBackbone()
    before = [w.copy() for w in backbone.get_weights()]
    with pytest.raises(ValueError, match="in_place=True"):
        kl.apply_lora(backbone, targets=["query"], rank=2)
    assert not lora_layers(backbone)
    for old, new in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_kerashub_style_functional_subclass_in_place(tmp_path):
    backbone = MiniBackbone()
    x, _ = token_data(8)
    before = to_numpy(backbone(x))
    lora = kl.apply_lora(
        backbone, targets=["query", "value", "token_embedding"], rank=2, in_place=True
    )
    assert lora is backbone and type(lora) is MiniBackbone
    assert [p for p, _ in lora_layers(lora)] == [
        "token_embedding",
        "transformer_layer_0/mha/query",
        "transformer_layer_0/mha/value",
    ]
    np.testing.assert_array_equal(to_numpy(lora(x)), before)
    randomize_adapters(lora)
    out = to_numpy(lora(x))
    assert np.abs(out - before).max() > 1e-4  # the adapters are in the call path
    merged = kl.merge_lora(lora)
    assert type(merged) is MiniBackbone and not lora_layers(merged)
    # float32 sums in another order: 1e-5 is far below the adapters' effect.
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)
    # Its class rebuilds it from (vocab, dim): a `.keras` file could not
    # bring the adapters back, so saving refuses instead of writing one.
    with pytest.raises(ValueError, match="converted to LoRA in place"):
        lora.save(tmp_path / "b.keras")
    merged.save(tmp_path / "merged.keras")
    reloaded = keras.saving.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(to_numpy(reloaded(x)), out, atol=1e-5)


def test_export_of_nested_adapters(tmp_path):
    model = transformer_classifier()
    x, _ = token_data(4)
    lora_model = randomize_adapters(kl.apply_lora(model, targets=["query", "value"]))
    path = kl.export(lora_model, tmp_path / "m.keras", format="keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = keras.saving.load_model(path)
    assert not [w for w in caught if "lora" in str(w.message).lower()]
    assert not lora_layers(plain)
    np.testing.assert_allclose(to_numpy(plain(x)), to_numpy(lora_model(x)), atol=1e-5)


def test_subclassed_save_reloads_as_the_base_model(tmp_path):
    model = SubclassedClassifier()
    x = np.random.default_rng(0).normal(size=(4, SEQ, 4)).astype("float32")
    base_out = to_numpy(model(x))
    lora_model = randomize_adapters(kl.apply_lora(model, targets=["dense_1"], rank=2))
    assert np.abs(to_numpy(lora_model(x)) - base_out).max() > 1e-3
    with pytest.warns(UserWarning, match="WITHOUT the adapters"):
        lora_model.save(tmp_path / "sub.keras")
    reloaded = keras.saving.load_model(tmp_path / "sub.keras")
    assert type(reloaded.dense_1) is keras.layers.Dense
    np.testing.assert_allclose(to_numpy(reloaded(x)), base_out, atol=1e-6)


def test_sequential_two_blocks_and_a_keras_wrapper_round_trip(tmp_path):
    """Blocks in a Sequential model, and TimeDistributed, whose own config
    does carry its inner layer (so reloading must not wrap it twice)."""
    model = keras.Sequential(
        [
            keras.Input((SEQ, DIM)),
            TransformerBlock(name="block_0"),
            TransformerBlock(name="block_1"),
            keras.layers.TimeDistributed(
                keras.layers.Dense(3, name="td_dense"), name="td"
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(1, name="head"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(2, SEQ, DIM)).astype("float32")
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["query", "td_dense"], rank=2)
    paths = ["block_0/mha/query", "block_1/mha/query", "td/td_dense"]
    assert [p for p, _ in lora_layers(lora_model)] == paths
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    out = to_numpy(randomize_adapters(lora_model)(x))
    np.testing.assert_allclose(to_numpy(kl.merge_lora(lora_model)(x)), out, atol=1e-5)
    lora_model.save(tmp_path / "s.keras")
    reloaded = keras.saving.load_model(tmp_path / "s.keras")
    assert [p for p, _ in lora_layers(reloaded)] == paths
    np.testing.assert_array_equal(to_numpy(reloaded(x)), out)


@pytest.mark.parametrize(
    "old_module", [b'"keras_lora.layers.container"', b'"keras_lora.model.containers"']
)
def test_keras_file_naming_the_old_container_module_loads(tmp_path, old_module):
    # Files written before the moves name `keras_lora.layers.container` or
    # `keras_lora.model.containers` as the container's module; the
    # registered name finds the class.
    model = transformer_classifier()
    x, _ = token_data(4)
    lora_model = randomize_adapters(kl.apply_lora(model, targets=["query"], rank=2))
    lora_model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as new:
        with zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
            for item in new.infolist():
                data = new.read(item.filename)
                if item.filename == "config.json":
                    assert b'"keras_lora.model.in_place"' in data
                    data = data.replace(b'"keras_lora.model.in_place"', old_module)
                old.writestr(item, data)
    loaded = keras.saving.load_model(tmp_path / "old.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(lora_model(x)))
