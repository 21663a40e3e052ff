import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl


def mse(model, x, y):
    """The loss, computed eagerly: no extra compiled `evaluate` step."""
    return float(np.mean((to_numpy(model(x)) - y) ** 2))


VOCAB, DIM, SEQ = 20, 8, 5


def ids(n=32, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype("int32")


def built_embedding(cls=keras.layers.Embedding, **kwargs):
    layer = cls(VOCAB, DIM, name="emb", **kwargs)
    layer.build((None, SEQ))
    return layer


def test_shapes_init_and_unmerged_equals_merged():
    base = built_embedding()
    lora = kl.LoRAEmbedding(base, rank=3, alpha=6)
    assert tuple(lora.lora_a.shape) == (VOCAB, 3)
    assert tuple(lora.lora_b.shape) == (3, DIM)
    # A starts at zero (B is random), so the output is the base's.
    assert not np.any(to_numpy(lora.lora_a))
    assert np.std(to_numpy(lora.lora_b)) > 0.5
    x = ids()
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))
    assert {w.name for w in lora.trainable_weights} == {"lora_a", "lora_b"}

    lora.lora_a.assign(np.random.default_rng(1).normal(0, 0.3, (VOCAB, 3)))
    table = to_numpy(lora.merged_kernel())
    np.testing.assert_allclose(
        table,
        to_numpy(base.embeddings) + 2.0 * to_numpy(lora.lora_a) @ to_numpy(lora.lora_b),
        rtol=1e-5,
        atol=1e-6,
    )
    got = to_numpy(lora(x))
    np.testing.assert_allclose(got, table[x], rtol=1e-5, atol=1e-5)
    merged = lora.merged_layer()
    assert type(merged) is keras.layers.Embedding and merged.name == "emb"
    np.testing.assert_allclose(to_numpy(merged(x)), got, rtol=1e-5, atol=1e-5)


def test_mask_zero_is_kept():
    lora = kl.LoRAEmbedding(built_embedding(mask_zero=True), rank=2)
    x = np.array([[3, 0, 1, 0, 2]], dtype="int32")
    np.testing.assert_array_equal(
        to_numpy(lora.compute_mask(x)), [[True, False, True, False, True]]
    )


def test_refuses_other_layers():
    with pytest.raises(TypeError, match="LoRAEmbedding wraps"):
        kl.LoRAEmbedding(keras.layers.Dense(3), rank=2)


def test_reversible_embedding_tied_reverse_uses_adapted_table():
    base = built_embedding(keras.layers.ReversibleEmbedding, tie_weights=True)
    lora = kl.LoRAEmbedding(base, rank=2)
    h = np.random.default_rng(2).normal(size=(3, SEQ, DIM)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(lora(h, reverse=True)), to_numpy(base(h, reverse=True)), atol=1e-6
    )
    lora.lora_a.assign(np.random.default_rng(3).normal(0, 0.3, (VOCAB, 2)))
    expected = h @ to_numpy(lora.merged_kernel()).T
    np.testing.assert_allclose(
        to_numpy(lora(h, reverse=True)), expected, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="ReversibleEmbedding"):
        kl.LoRAEmbedding(built_embedding(), rank=2)(h, reverse=True)


def embedding_model():
    inputs = keras.Input((SEQ,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, name="emb")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def test_embedding_model_fit_merge_and_round_trip(tmp_path):
    model = embedding_model()
    x = ids(64)
    y = (x[:, :1] % 2).astype("float32")
    before = to_numpy(model(x))
    lora_model = kl.apply_lora(model, targets=["emb"], rank=4)
    np.testing.assert_array_equal(to_numpy(lora_model(x)), before)
    assert sorted(w.name for w in lora_model.trainable_weights) == ["lora_a", "lora_b"]
    table = to_numpy(model.get_layer("emb").embeddings).copy()

    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first = mse(lora_model, x, y)
    lora_model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert mse(lora_model, x, y) < 0.9 * first
    np.testing.assert_array_equal(to_numpy(model.get_layer("emb").embeddings), table)

    out = to_numpy(lora_model(x))
    merged = kl.merge_lora(lora_model)
    assert type(merged.get_layer("emb")) is keras.layers.Embedding
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)

    lora_model.save(tmp_path / "emb.keras")
    reloaded = keras.saving.load_model(tmp_path / "emb.keras")
    layer = reloaded.get_layer("emb")
    assert isinstance(layer, kl.LoRAEmbedding) and (layer.rank, layer.alpha) == (4, 4.0)
    np.testing.assert_array_equal(to_numpy(reloaded(x)), out)

    # The adapter file alone, onto the base model, restores the outputs.
    kl.save_adapter(lora_model, tmp_path / "adapter.safetensors")
    restored = kl.load_adapter(model, tmp_path / "adapter.safetensors")
    np.testing.assert_array_equal(to_numpy(restored(x)), out)
