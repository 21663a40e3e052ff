"""Several named adapters on one model: add, switch, disable, delete,
combine, merge one, and save/load one adapter per file."""

import keras
import numpy as np
import pytest
from conftest import mlp, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

X = np.random.default_rng(5).normal(size=(8, 16)).astype("float32")


def two_adapter_model():
    """An MLP with adapters "default" (rank 2) and "legal" (rank 4, DoRA-free),
    both non-zero, "default" active."""
    base = mlp()
    lora = kl.apply_lora(base, rank=2)
    kl.add_adapter(lora, "legal", rank=4, alpha=8)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(lora):
        for name in ("default", "legal"):
            adapter = layer.get_adapter(name)
            for v in (adapter.a, adapter.b):
                v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    return base, lora


def outputs_with(lora, name):
    kl.set_adapter(lora, name)
    return to_numpy(lora(X))


def test_apply_lora_names_the_first_adapter():
    lora = kl.apply_lora(mlp(), rank=2, adapter_name="first")
    layer = dict(lora_layers(lora))["d1"]
    assert layer.adapter_names == ["first"] and layer.active_adapters == ["first"]
    assert kl.list_adapters(lora) == {"first": ["d1", "d2"]}
    assert [v.name for v in layer.trainable_weights] == ["lora_a_first", "lora_b_first"]
    default = dict(lora_layers(kl.apply_lora(mlp(), rank=2)))["d1"]
    assert [v.name for v in default.trainable_weights] == ["lora_a", "lora_b"]


def test_only_the_active_adapter_trains_and_switching_changes_outputs():
    base, lora = two_adapter_model()
    layer = dict(lora_layers(lora))["d1"]
    out_default = outputs_with(lora, "default")
    assert {v.name for v in lora.trainable_weights} == {"lora_a", "lora_b"}
    assert layer.rank == 2 and layer.lora_a is layer.get_adapter("default").a
    out_legal = outputs_with(lora, "legal")
    assert {v.name for v in lora.trainable_weights} == {"lora_a_legal", "lora_b_legal"}
    assert layer.rank == 4 and layer.scale == 2.0
    assert layer.lora_a is layer.get_adapter("legal").a
    assert np.abs(out_legal - out_default).max() > 1e-3
    # Each output is that of a model with only that adapter.
    for name, out in (("default", out_default), ("legal", out_legal)):
        merged = kl.merge_lora(lora, adapter=name)
        np.testing.assert_allclose(to_numpy(merged(X)), out, atol=1e-5)
    # Both active: the updates add up.
    both = outputs_with(lora, ["default", "legal"])
    with kl.disable_adapters(lora):
        plain = to_numpy(lora(X))
    np.testing.assert_allclose(to_numpy(base(X)), plain)
    d1 = dict(lora_layers(lora))["d1"]
    assert d1.active_adapters == ["default", "legal"]
    assert np.abs(both - out_default).max() > 1e-3
    merged = kl.merge_lora(lora)
    np.testing.assert_allclose(to_numpy(merged(X)), both, atol=1e-5)
    # model.trainable = True keeps inactive adapters frozen.
    kl.set_adapter(lora, "legal")
    lora.trainable = True
    names = {v.name for _, lay in lora_layers(lora) for v in lay.trainable_weights}
    assert names == {"lora_a_legal", "lora_b_legal"}
    with pytest.raises(ValueError, match="unknown adapter"):
        kl.set_adapter(lora, "nope")


def test_switching_moves_outputs_towards_the_trained_adapter():
    base = mlp()
    y_a = np.ones((8, 3), "float32")
    y_b = -np.ones((8, 3), "float32")
    lora = kl.apply_lora(base, rank=2, adapter_name="up")
    kl.add_adapter(lora, "down", rank=2)
    for name, y in (("up", y_a), ("down", y_b)):
        kl.set_adapter(lora, name)
        lora.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        lora.fit(X, y, epochs=20, verbose=0)
    base_mean = to_numpy(base(X)).mean()
    up = outputs_with(lora, "up").mean()
    down = outputs_with(lora, "down").mean()
    assert up > base_mean + 0.2 and down < base_mean - 0.2
    # predict() follows the switch without recompiling.
    kl.set_adapter(lora, "up")
    np.testing.assert_allclose(lora.predict(X, verbose=0).mean(), up, atol=1e-5)
    kl.set_adapter(lora, "down")
    np.testing.assert_allclose(lora.predict(X, verbose=0).mean(), down, atol=1e-5)


def test_disable_adapters_gives_the_base_output_exactly():
    base, lora = two_adapter_model()
    dora = kl.apply_lora(base, rank=2, use_dora=True, init="pissa")
    for model in (lora, dora):
        with kl.disable_adapters(model):
            np.testing.assert_array_equal(to_numpy(model(X)), to_numpy(base(X)))
            np.testing.assert_array_equal(
                model.predict(X, verbose=0), base.predict(X, verbose=0)
            )
    assert np.abs(to_numpy(lora(X)) - to_numpy(base(X))).max() > 1e-3


def test_delete_adapter_falls_back_or_errors():
    _, lora = two_adapter_model()
    layer = dict(lora_layers(lora))["d1"]
    n_vars = len(layer.weights)
    kl.set_adapter(lora, "legal")
    with pytest.warns(UserWarning, match="was active"):
        kl.delete_adapter(lora, "legal")
    assert layer.adapter_names == ["default"] and layer.active_adapters == ["default"]
    assert len(layer.weights) == n_vars - 2
    np.testing.assert_allclose(
        to_numpy(lora(X)),
        to_numpy(kl.merge_lora(lora, adapter="default")(X)),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="only adapter"):
        kl.delete_adapter(lora, "default")
    with pytest.raises(ValueError, match="no LoRA layer has adapter"):
        kl.delete_adapter(lora, "legal")


def test_combine_adapters():
    _, lora = two_adapter_model()
    out_default = outputs_with(lora, "default")
    out_legal = outputs_with(lora, "legal")
    kl.combine_adapters(lora, {"default": 1.0}, name="same")
    np.testing.assert_allclose(outputs_with(lora, "same"), out_default, atol=1e-5)
    kl.combine_adapters(lora, {"default": 0.7, "legal": 0.3}, name="mix")
    layer = dict(lora_layers(lora))["d1"]
    assert layer.get_adapter("mix").rank == 6 and layer.get_adapter("mix").scale == 1.0
    # Exact: the mix's kernel update is the weighted sum of the two.
    kl.set_adapter(lora, "mix")
    mix_delta = to_numpy(layer.delta())
    deltas = {}
    for name in ("default", "legal"):
        kl.set_adapter(lora, name)
        deltas[name] = to_numpy(layer.delta())
    np.testing.assert_allclose(
        mix_delta, 0.7 * deltas["default"] + 0.3 * deltas["legal"], atol=1e-6
    )
    assert np.abs(outputs_with(lora, "mix") - out_legal).max() > 1e-4
    dora = kl.apply_lora(mlp(), rank=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        kl.combine_adapters(dora, {"default": 1.0})
    with pytest.raises(ValueError, match="unknown adapter"):
        kl.combine_adapters(lora, {"nope": 1.0})


def test_add_adapter_with_targets_and_variants_round_trips_through_keras(tmp_path):
    base = mlp()
    lora = kl.apply_lora(base, rank=2)
    kl.add_adapter(lora, "d2only", rank=3, targets=["d2"], use_dora=True, dropout=0.1)
    assert kl.list_adapters(lora) == {"default": ["d1", "d2"], "d2only": ["d2"]}
    with pytest.raises(ValueError, match="matches no layer"):
        kl.add_adapter(lora, "x", targets=["nope"])
    with pytest.raises(ValueError, match="already have"):
        kl.add_adapter(lora, "d2only", targets=["d2"])
    kl.set_adapter(lora, ["default", "d2only"])
    for _, layer in lora_layers(lora):
        for v in layer.trainable_weights:
            v.assign(to_numpy(v) + 0.1)
    expected = to_numpy(lora(X))
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded(X)), expected)
    d2 = dict(lora_layers(loaded))["d2"]
    assert d2.adapter_names == ["default", "d2only"]
    assert d2.active_adapters == ["default", "d2only"]
    assert d2.get_adapter("d2only").use_dora and d2.get_adapter("d2only").rank == 3


def test_one_adapter_per_file_and_files_load_side_by_side(tmp_path):
    base, lora = two_adapter_model()
    want = {name: outputs_with(lora, name) for name in ("default", "legal")}
    kl.save_adapter(lora, tmp_path / "legal.safetensors", adapter="legal")
    kl.save_adapter(lora, tmp_path / "default.safetensors", adapter="default")
    # Onto the base model, then the second file as a second adapter.
    fresh = kl.load_adapter(base, tmp_path / "default.safetensors")
    kl.load_adapter(fresh, tmp_path / "legal.safetensors", adapter_name="legal")
    assert kl.list_adapters(fresh) == {"default": ["d1", "d2"], "legal": ["d1", "d2"]}
    assert kl.active_adapters(fresh) == ["default"]
    for name, out in want.items():
        np.testing.assert_allclose(outputs_with(fresh, name), out, atol=1e-6)
    # A plain model can take a named adapter directly.
    named = kl.load_adapter(base, tmp_path / "legal.safetensors", adapter_name="legal")
    assert kl.list_adapters(named) == {"legal": ["d1", "d2"]}
    np.testing.assert_allclose(to_numpy(named(X)), want["legal"], atol=1e-6)
    with pytest.raises(ValueError, match="adapter named 'nope'"):
        kl.save_adapter(lora, tmp_path / "n.safetensors", adapter="nope")


def test_named_adapters_inside_multi_head_attention_round_trip(tmp_path):
    inputs = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    lora = kl.apply_lora(model, targets=["query", "value"], rank=2, use_dora=True)
    kl.add_adapter(lora, "b", rank=3)
    kl.set_adapter(lora, ["default", "b"])
    for _, layer in lora_layers(lora):
        for v in layer.trainable_weights:
            v.assign(to_numpy(v) + 0.1)
    x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype("float32")
    want = to_numpy(lora(x))
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), want)
    assert kl.list_adapters(loaded) == {
        "default": ["mha/query", "mha/value"],
        "b": ["mha/query", "mha/value"],
    }
    assert kl.active_adapters(loaded) == ["default", "b"]


def test_disable_adapters_called_alone_disables_until_enable_adapters():
    base, lora = two_adapter_model()
    want_base = to_numpy(base(X))
    want_lora = to_numpy(lora(X))
    lora.predict(X, verbose=0)  # a compiled predict exists before the switch
    returned = kl.disable_adapters(lora)  # no `with`: disabled at once
    assert all(layer.adapters_disabled for _, layer in lora_layers(lora))
    np.testing.assert_array_equal(to_numpy(lora(X)), want_base)
    np.testing.assert_array_equal(
        lora.predict(X, verbose=0), base.predict(X, verbose=0)
    )
    assert returned is not None
    assert kl.enable_adapters(lora) is lora
    assert not any(layer.adapters_disabled for _, layer in lora_layers(lora))
    np.testing.assert_allclose(to_numpy(lora(X)), want_lora, atol=1e-6)
    np.testing.assert_allclose(lora.predict(X, verbose=0), want_lora, atol=1e-5)
    kl.enable_adapters(lora)  # nothing disabled: unchanged
    np.testing.assert_allclose(to_numpy(lora(X)), want_lora, atol=1e-6)


def test_disable_adapters_block_restores_each_layers_flag_even_on_error():
    base, lora = two_adapter_model()
    d1, d2 = (layer for _, layer in lora_layers(lora))
    d2.adapters_disabled = True  # a mixed state before the block
    with kl.disable_adapters(lora) as inside:
        assert inside is lora
        assert d1.adapters_disabled and d2.adapters_disabled
        np.testing.assert_array_equal(to_numpy(lora(X)), to_numpy(base(X)))
    assert (d1.adapters_disabled, d2.adapters_disabled) == (False, True)
    with pytest.raises(RuntimeError, match="inside"):
        with kl.disable_adapters(lora):
            raise RuntimeError("inside")
    assert (d1.adapters_disabled, d2.adapters_disabled) == (False, True)
    # A block after a bare call restores "disabled"; enable_adapters ends it.
    kl.disable_adapters(lora)
    with kl.disable_adapters(lora):
        pass
    assert d1.adapters_disabled and d2.adapters_disabled
    kl.enable_adapters(lora)
    assert not d1.adapters_disabled and not d2.adapters_disabled


def test_a_kerashub_generate_follows_disable_and_set_adapter():
    """A KerasHub task caches its compiled `generate` loop; switching
    adapters must drop it, or `generate` keeps the old adapters silently."""
    from conftest import randomize_adapters
    from tiny_kerashub import gpt2_causal_lm

    base = gpt2_causal_lm(seed=0)
    base.compile(sampler="greedy")
    lm = gpt2_causal_lm(seed=0)
    kl.apply_lora(lm, targets=["query", "value"], rank=4, in_place=True)
    kl.add_adapter(lm, "other", rank=4)
    randomize_adapters(lm, scale=2.0)
    lm.compile(sampler="greedy")
    prompt = ["the", "a hat"]
    want_base = base.generate(prompt, max_length=8)
    with_default = lm.generate(prompt, max_length=8)  # compiles the loop
    assert with_default != want_base  # the adapters change the greedy text
    kl.disable_adapters(lm)
    assert lm.generate(prompt, max_length=8) == want_base
    kl.enable_adapters(lm)
    assert lm.generate(prompt, max_length=8) == with_default
    with kl.disable_adapters(lm):
        assert lm.generate(prompt, max_length=8) == want_base
    kl.set_adapter(lm, "other")
    with_other = lm.generate(prompt, max_length=8)
    kl.set_adapter(lm, "default")
    assert lm.generate(prompt, max_length=8) == with_default
    assert with_other == want_base  # "other" still has B = 0


def test_add_adapter_refuses_loftq():
    # LoftQ fits A and B to a float kernel's quantization error, which only
    # apply_lora(init="loftq") has; an added adapter would be LoftQ in name
    # only, and its files would pin the base for nothing.
    model = kl.apply_lora(mlp(), rank=2)
    with pytest.raises(ValueError, match="init='loftq'"):
        kl.add_adapter(model, "second", rank=2, init="loftq")
    assert all(lay.adapter_names == ["default"] for _, lay in lora_layers(model))
