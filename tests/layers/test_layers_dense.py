import os

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl


def built_dense(input_dim, units, **kwargs):
    dense = keras.layers.Dense(units, **kwargs)
    dense.build((None, input_dim))
    return dense


def n_params(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def test_seed_worked_example_has_120000_trainable_params():
    layer = kl.LoRADense(built_dense(5_000, 10_000), rank=8)
    assert [tuple(w.shape) for w in layer.trainable_weights] == [
        (5_000, 8),
        (8, 10_000),
    ]
    assert n_params(layer.trainable_weights) == 120_000
    assert n_params([layer.layer.kernel]) // 120_000 == 416  # 50M / 120k
    assert {w.name for w in layer.trainable_weights} == {"lora_a", "lora_b"}


def test_rank_alpha_scale_and_defaults():
    layer = kl.LoRADense(built_dense(4, 6), rank=4, alpha=16)
    assert (layer.rank, layer.alpha, layer.scale) == (4, 16.0, 4.0)
    default = kl.LoRADense(built_dense(4, 6), rank=4)
    assert (default.alpha, default.scale) == (4.0, 1.0)
    assert default.name == default.layer.name


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((5, 12), {"activation": "relu"}),
        ((5, 12), {"use_bias": False}),
        ((2, 7, 12), {"activation": "tanh"}),  # (batch, seq, features)
    ],
    ids=["relu", "no-bias", "3d-input"],
)
def test_fresh_layer_equals_base_exactly(input_shape, kwargs):
    dense = keras.layers.Dense(9, bias_initializer="random_normal", **kwargs)
    layer = kl.LoRADense(dense, rank=3)  # unbuilt base: built on first call
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    out = to_numpy(layer(x))
    assert out.shape == input_shape[:-1] + (9,)
    np.testing.assert_array_equal(out, to_numpy(dense(x)))
    assert not np.any(to_numpy(layer.lora_b))
    assert np.any(to_numpy(layer.lora_a))


def test_output_matches_formula():
    dense = built_dense(12, 9, activation="relu", bias_initializer="random_normal")
    layer = kl.LoRADense(dense, rank=4, alpha=6)
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(size=(4, 9)).astype("float32"))
    x = rng.normal(size=(5, 12)).astype("float32")
    w, b = to_numpy(dense.kernel), to_numpy(dense.bias)
    a, bb = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    expected = np.maximum(x @ w + b + 1.5 * (x @ a) @ bb, 0)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_merged_kernel_and_to_dense():
    dense = built_dense(12, 9, activation="relu", name="proj")
    layer = kl.LoRADense(dense, rank=4, alpha=8)
    layer.lora_b.assign(np.random.default_rng(2).normal(size=(4, 9)))
    expected = to_numpy(dense.kernel) + 2.0 * to_numpy(layer.lora_a) @ to_numpy(
        layer.lora_b
    )
    np.testing.assert_allclose(to_numpy(layer.merged_kernel()), expected, atol=1e-6)
    plain = layer.to_dense()
    assert type(plain) is keras.layers.Dense
    assert plain.name == "proj"
    assert plain.get_config() == dense.get_config()
    x = np.random.default_rng(3).normal(size=(6, 12)).astype("float32")
    np.testing.assert_allclose(to_numpy(plain(x)), to_numpy(layer(x)), atol=1e-5)


def test_base_stays_frozen_whatever_trainable_says():
    inputs = keras.Input((8,))
    layer = kl.LoRADense(keras.layers.Dense(4), rank=2)
    model = keras.Model(inputs, layer(inputs))
    lora = {id(layer.lora_a), id(layer.lora_b)}
    assert {id(w) for w in model.trainable_weights} == lora
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True  # Keras core's enable_lora unfreezes the kernel here
    assert {id(w) for w in model.trainable_weights} == lora
    layer.trainable = False
    layer.trainable = True
    assert {id(w) for w in model.trainable_weights} == lora
    assert not layer.layer.kernel.trainable and not layer.layer.bias.trainable


def test_get_config_round_trip():
    layer = kl.LoRADense(built_dense(6, 5, activation="gelu"), rank=3, alpha=5)
    config = layer.get_config()
    clone = kl.LoRADense.from_config(config)
    assert clone.get_config() == config
    assert (clone.rank, clone.alpha) == (3, 5.0)
    assert isinstance(clone.layer, keras.layers.Dense)


def test_keras_file_round_trip_restores_adapters_and_training_resumes(tmp_path):
    inputs = keras.Input((10,))
    x = kl.LoRADense(keras.layers.Dense(16, activation="relu"), rank=4, alpha=12)(
        inputs
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.layers[-1].trainable = False
    rng = np.random.default_rng(4)
    x_data = rng.normal(size=(64, 10)).astype("float32")
    y_data = rng.normal(size=(64, 1)).astype("float32")
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x_data, y_data, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)
    for before, after in zip(model.weights, loaded.weights, strict=True):
        assert before.name == after.name
        np.testing.assert_array_equal(to_numpy(before), to_numpy(after))
    lora = loaded.layers[1]
    assert (lora.rank, lora.alpha) == (4, 12.0)
    assert np.any(to_numpy(lora.lora_b))  # Keras core reloads B as zeros
    np.testing.assert_array_equal(model.predict(x_data), loaded.predict(x_data))

    kernel = to_numpy(lora.layer.kernel).copy()
    b_before = to_numpy(lora.lora_b).copy()
    loss_before = loaded.evaluate(x_data, y_data, verbose=0)
    loaded.fit(x_data, y_data, epochs=5, verbose=0)
    assert loaded.evaluate(x_data, y_data, verbose=0) < loss_before
    assert not np.array_equal(to_numpy(lora.lora_b), b_before)
    np.testing.assert_array_equal(to_numpy(lora.layer.kernel), kernel)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_adapters_float32_and_trains(policy):
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((8,))
    layer = kl.LoRADense(keras.layers.Dense(8, activation="relu"), rank=4)
    model = keras.Model(inputs, keras.layers.Dense(1, trainable=False)(layer(inputs)))
    assert layer.dtype_policy.name == policy
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
    rng = np.random.default_rng(5)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = rng.normal(size=(128, 1)).astype("float32")
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    model.compile(keras.optimizers.Adam(0.02), "mse")
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": -2}, ValueError, "rank=-2"),
        ({"rank": 2.5}, TypeError, "rank=2.5"),
        ({"rank": "8"}, TypeError, "rank='8'"),
        ({"rank": True}, TypeError, "rank=True"),
        ({"alpha": 0}, ValueError, "alpha=0"),
        ({"alpha": -1.0}, ValueError, "alpha=-1.0"),
        ({"alpha": float("nan")}, ValueError, "alpha=nan"),
        ({"alpha": "big"}, TypeError, "alpha='big'"),
    ],
)
def test_bad_arguments_are_refused_and_base_untouched(kwargs, error, match):
    dense = built_dense(4, 4)
    with pytest.raises(error, match=match):
        kl.LoRADense(dense, **kwargs)
    assert dense.trainable and dense.kernel.trainable


def test_refuses_non_dense_and_double_wrapping():
    conv = keras.layers.Conv1D(2, 3)
    with pytest.raises(TypeError, match="LoRADense wraps a `keras.layers.Dense`"):
        kl.LoRADense(conv)
    layer = kl.LoRADense(built_dense(4, 4))
    with pytest.raises(TypeError, match="already a LoRA layer"):
        kl.LoRADense(layer)
    core = built_dense(4, 4)
    core.enable_lora(2)
    with pytest.raises(ValueError, match="core LoRA enabled"):
        kl.LoRADense(core)
