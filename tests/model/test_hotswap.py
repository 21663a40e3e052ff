"""`prepare_hotswap`: padding keeps outputs; the prepared model still saves,
reloads, merges, trains and takes named adapters; bad input changes nothing."""

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

X = np.random.default_rng(5).normal(size=(8, 16)).astype("float32")
# Padding adds zero terms to the rank sums, which may change the float32
# summation order (BLAS blocking): rounding-level differences only.
ATOL = 1e-6


def lora_mlp(**options):
    base = mlp()
    lora = kl.apply_lora(base, **options)
    randomize_adapters(lora, scale=0.3)
    return base, lora


def mixed_types_model():
    """Embedding -> Conv1D -> MultiHeadAttention (EinsumDense) -> Dense."""
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(tokens)
    x = keras.layers.Conv1D(8, 3, padding="same", name="conv")(x)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(tokens, out)
    lora = kl.apply_lora(
        model, rank=2, alpha=3, targets=["embed", "conv", "query", "value", "head"]
    )
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(lora):
        for v in (layer.lora_a, layer.lora_b):
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    tokens = np.random.default_rng(2).integers(0, 20, (4, 6)).astype("int32")
    return lora, tokens


def snapshot(model):
    """Everything a failed call must leave as it was."""
    layers = lora_layers(model)
    return (
        [
            (v.path, tuple(v.shape), v.trainable, to_numpy(v).tobytes())
            for v in model.weights
        ],
        [
            (p, a.rank, a.alpha, a.use_rslora, a.hotswap)
            for p, layer in layers
            for a in map(layer.get_adapter, layer.adapter_names)
        ],
    )


def test_prepare_pads_and_keeps_outputs():
    _, lora = lora_mlp(rank=4, alpha=6)
    before = to_numpy(lora(X))
    assert kl.prepare_hotswap(lora, max_rank=8) is lora
    np.testing.assert_allclose(to_numpy(lora(X)), before, atol=ATOL, rtol=0)
    layer = dict(lora_layers(lora))["d1"]
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    assert a.shape == (16, 8) and b.shape == (8, 32)
    assert not a[:, 4:].any() and not b[4:].any()
    # It is a rank-8 adapter now, with the same scale 6/4.
    assert layer.rank == 8 and layer.alpha == pytest.approx(12.0)
    assert float(to_numpy(layer.scale)) == pytest.approx(1.5)
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]
    assert [v.name for v in layer.non_trainable_weights if "lora" in v.name] == [
        "lora_scale"
    ]


def test_prepare_keeps_rslora_dora_and_every_layer_type():
    _, lora = lora_mlp(rank=3, alpha=5, use_rslora=True, use_dora=True)
    before = to_numpy(lora(X))
    kl.prepare_hotswap(lora, 6)
    np.testing.assert_allclose(to_numpy(lora(X)), before, atol=ATOL, rtol=0)
    model, tokens = mixed_types_model()
    before = to_numpy(model(tokens))
    kl.prepare_hotswap(model, 5)
    np.testing.assert_allclose(to_numpy(model(tokens)), before, atol=ATOL, rtol=0)
    assert {layer.rank for _, layer in lora_layers(model)} == {5}


@pytest.mark.parametrize(
    "max_rank, error",
    [(3, ValueError), (0, ValueError), (2.0, TypeError), ("8", TypeError)],
    ids=["below-rank", "zero", "float", "string"],
)
def test_bad_max_rank_changes_nothing(max_rank, error):
    _, lora = lora_mlp(rank=4)
    kl.add_adapter(lora, "small", rank=2)
    before = snapshot(lora)
    with pytest.raises(error, match="max_rank"):
        kl.prepare_hotswap(lora, max_rank)
    assert snapshot(lora) == before


def test_prepare_refuses_models_without_lora():
    with pytest.raises(ValueError, match="no LoRA layers"):
        kl.prepare_hotswap(mlp(), 8)
    with pytest.raises(TypeError, match="keras.Model"):
        kl.prepare_hotswap("model", 8)


def test_prepared_model_round_trips_through_keras_file(tmp_path):
    _, lora = lora_mlp(rank=2, alpha=4, use_dora=True)
    kl.add_adapter(lora, "other", rank=3, alpha=2, use_rslora=True)
    randomize_adapters(lora, seed=4)
    kl.prepare_hotswap(lora, 4)
    kl.set_adapter(lora, ["default", "other"])
    expected = to_numpy(lora(X))
    lora.save(tmp_path / "prepared.keras")
    loaded = keras.saving.load_model(tmp_path / "prepared.keras")
    np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=ATOL, rtol=0)
    pairs = zip(lora_layers(lora), lora_layers(loaded), strict=True)
    for (_, layer), (_, twin) in pairs:
        assert [v.name for v in layer.weights] == [v.name for v in twin.weights]
        for name in layer.adapter_names:
            ours, theirs = layer.get_adapter(name), twin.get_adapter(name)
            assert theirs.hotswap and theirs.scale_variable is not None
            assert (theirs.rank, theirs.alpha) == (ours.rank, ours.alpha)
            assert float(to_numpy(theirs.scale)) == float(to_numpy(ours.scale))


def test_merge_save_and_named_adapters_work_on_a_prepared_model(tmp_path):
    base, lora = lora_mlp(rank=2, alpha=4)
    expected = to_numpy(lora(X))
    merged_before = to_numpy(kl.merge_lora(lora)(X))
    kl.prepare_hotswap(lora, 8)
    np.testing.assert_allclose(
        to_numpy(kl.merge_lora(lora)(X)), merged_before, atol=ATOL, rtol=0
    )
    # A saved adapter is the padded one (rank 8, alpha 16): any model loads it.
    kl.save_adapter(lora, tmp_path / "a.safetensors")
    fresh = kl.load_adapter(base, tmp_path / "a.safetensors")
    np.testing.assert_allclose(to_numpy(fresh(X)), expected, atol=ATOL, rtol=0)
    kl.save_adapter(lora, tmp_path / "peft", format="peft")
    fresh = kl.load_adapter(base, tmp_path / "peft")
    np.testing.assert_allclose(to_numpy(fresh(X)), expected, atol=ATOL, rtol=0)
    # Named adapters: add, combine (reads the scale variable), switch back.
    kl.add_adapter(lora, "late", rank=2)
    kl.combine_adapters(lora, {"default": 1.0}, name="copy")
    kl.set_adapter(lora, "copy")
    np.testing.assert_allclose(to_numpy(lora(X)), expected, atol=1e-5, rtol=0)
    kl.set_adapter(lora, "default")
    kl.merge_lora(lora, in_place=True)
    np.testing.assert_allclose(to_numpy(lora(X)), expected, atol=1e-5, rtol=0)
    kl.unmerge_lora(lora)
    with kl.disable_adapters(lora):
        np.testing.assert_allclose(to_numpy(lora(X)), to_numpy(base(X)), rtol=0)
    np.testing.assert_allclose(to_numpy(lora(X)), expected, atol=ATOL, rtol=0)


def test_setting_alpha_on_a_prepared_layer_updates_the_scale_variable():
    _, lora = lora_mlp(rank=2, alpha=4)
    kl.prepare_hotswap(lora, 4)
    layer = dict(lora_layers(lora))["d1"]
    layer.alpha = 2.0  # rank 4 now: scale 0.5
    assert float(to_numpy(layer.scale)) == pytest.approx(0.5)
    layer.use_rslora = True
    assert float(to_numpy(layer.scale)) == pytest.approx(1.0)


def test_training_a_prepared_adapter_keeps_the_padding_zero():
    _, lora = lora_mlp(rank=2)
    kl.prepare_hotswap(lora, 6)
    lora.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    y = np.ones((8, 3), "float32")
    before = to_numpy(lora(X))
    lora.fit(X, y, epochs=2, verbose=0)
    assert np.abs(to_numpy(lora(X)) - before).max() > 1e-4  # it trained
    for _, layer in lora_layers(lora):
        assert not to_numpy(layer.lora_a)[:, 2:].any()
        assert not to_numpy(layer.lora_b)[2:].any()
        assert layer.get_adapter("default").scale_variable.trainable is False


def test_mixed_adapter_batches_on_a_prepared_model():
    _, lora = lora_mlp(rank=2, alpha=4)
    kl.add_adapter(lora, "b", rank=4, alpha=2, use_dora=True)
    randomize_adapters(lora, seed=7)  # the active adapter only
    for _, layer in lora_layers(lora):
        b = layer.get_adapter("b")
        b.b.assign(np.full(b.b.shape, 0.1, "float32"))
    kl.prepare_hotswap(lora, 8)
    expected = {}
    for name in ("default", "b"):
        kl.set_adapter(lora, name)
        expected[name] = to_numpy(lora(X))
    served = kl.mixed_adapter_model(lora, ["default", "b"])
    index = np.array([0, 1, 0, 1, 1, 0, 0, 1], "int32")
    got = to_numpy(served([X, index]))
    want = np.where(index[:, None] == 0, expected["default"], expected["b"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
