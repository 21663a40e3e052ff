"""LoftQ (`apply_lora(init="loftq")`): a quantized base plus adapters that
make up for its quantization error (`keras_lora.model.loftq`)."""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.layers import quantized
from keras_lora.model.loftq import error_ratio

MODES = ("int8", "int4", "nf4")


def _mlp():
    inputs = keras.Input((32,))
    hidden = keras.layers.Dense(64, activation="relu", name="d1")(inputs)
    outputs = keras.layers.Dense(8, name="d2")(hidden)
    return keras.Model(inputs, outputs)


def _inputs():
    return np.random.default_rng(1).standard_normal((64, 32)).astype("float32")


@pytest.mark.parametrize("mode", MODES)
def test_error_ratio_below_one_and_not_increasing(mode):
    kernel = np.random.default_rng(0).standard_normal((128, 128)).astype("float32")
    one = error_ratio(kernel, 8, mode, 1)
    five = error_ratio(kernel, 8, mode, 5)
    assert one < 1.0
    # Each alternation takes the best rank-8 fit of the error of the last
    # quantization; a small slack (1e-6) covers float32 factor rounding.
    assert five <= one + 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_model_quantized_base_trainable_adapters_closer(mode):
    keras.utils.set_random_seed(0)
    model = _mlp()
    x = _inputs()
    reference = keras.ops.convert_to_numpy(model(x))
    lora = kl.apply_lora(
        model, targets=["d1", "d2"], rank=4, init="loftq", loftq_mode=mode
    )
    for name in ("d1", "d2"):
        wrapper = lora.get_layer(name)
        assert wrapper.quantization_mode == mode
        assert model.get_layer(name).quantization_mode is None  # original kept
    trainable = sorted(v.path for v in lora.trainable_weights)
    assert trainable == ["d1/lora_a", "d1/lora_b", "d2/lora_a", "d2/lora_b"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), reference)

    # Plain quantization + a zero-B LoRA: the quantized base alone.
    plain = _mlp()
    plain.set_weights(model.get_weights())
    if mode == "nf4":
        kl.quantize_nf4(plain)
    else:
        plain.quantize(mode)
    plain = kl.apply_lora(plain, targets=["d1", "d2"], rank=4)
    loftq_error = np.linalg.norm(keras.ops.convert_to_numpy(lora(x)) - reference)
    plain_error = np.linalg.norm(keras.ops.convert_to_numpy(plain(x)) - reference)
    assert loftq_error < plain_error


@pytest.mark.parametrize("mode", MODES)
def test_merge(mode):
    keras.utils.set_random_seed(0)
    lora = kl.apply_lora(
        _mlp(), targets=["d1"], rank=4, alpha=8, init="loftq", loftq_mode=mode
    )
    wrapper = lora.get_layer("d1")
    base = np.asarray(quantized.dequantized_kernel(wrapper.layer), np.float64)
    a = np.asarray(wrapper.lora_a, np.float64)
    b = np.asarray(wrapper.lora_b, np.float64)
    merged = kl.merge_lora(lora).get_layer("d1")
    assert merged.quantization_mode is None
    # float32 kernel against a float64 reference of Q + s·A·B.
    np.testing.assert_allclose(merged.kernel, base + 2.0 * a @ b, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loftq_mode": "int8"}, ValueError, "only with init='loftq'"),
        ({"init": "pissa", "loftq_iter": 2}, ValueError, "only with init='loftq'"),
        ({"init": "loftq"}, ValueError, "loftq_mode"),
        ({"init": "loftq", "loftq_mode": "int2"}, ValueError, "loftq_mode"),
        (
            {"init": "loftq", "loftq_mode": "int8", "loftq_iter": 0},
            ValueError,
            "loftq_iter",
        ),
        (
            {"init": "loftq", "loftq_mode": "int8", "loftq_iter": 1.5},
            TypeError,
            "loftq_iter",
        ),
        (
            {"init": "loftq", "loftq_mode": "int8", "loftq_iter": True},
            TypeError,
            "loftq_iter",
        ),
        (
            {"init": "loftq", "loftq_mode": "int8", "use_dora": True},
            ValueError,
            "use_dora",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = _mlp()
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(error, match=match):
        kl.apply_lora(model, targets=["d1"], rank=4, **kwargs)
    for old, new in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_quantized_base_refused():
    model = _mlp()
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        kl.apply_lora(model, targets=["d1"], rank=4, init="loftq", loftq_mode="int8")
    assert model.get_layer("d1").quantization_mode == "int8"


def test_rank_above_kernel_refused_model_unchanged():
    model = _mlp()
    with pytest.warns(UserWarning, match="above min"):
        with pytest.raises(ValueError, match="init='loftq' needs rank"):
            kl.apply_lora(
                model, targets=["d2"], rank=16, init="loftq", loftq_mode="int8"
            )
    assert model.get_layer("d2").quantization_mode is None


@pytest.mark.parametrize("mode", MODES)
def test_einsum_dense(mode):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 16))
    outputs = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 4, 8), bias_axes="de", name="q"
    )(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).standard_normal((4, 6, 16)).astype("float32")
    reference = keras.ops.convert_to_numpy(model(x))
    lora = kl.apply_lora(model, targets=["q"], rank=4, init="loftq", loftq_mode=mode)
    assert lora.get_layer("q").quantization_mode == mode
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    if mode == "nf4":
        kl.quantize_nf4(plain)
    else:
        plain.quantize(mode)
    loftq_error = np.linalg.norm(keras.ops.convert_to_numpy(lora(x)) - reference)
    plain_error = np.linalg.norm(keras.ops.convert_to_numpy(plain(x)) - reference)
    assert loftq_error < plain_error


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    lora = kl.apply_lora(
        _mlp(), targets=["d1"], rank=4, init="loftq", loftq_mode="int4"
    )
    path = str(tmp_path / "loftq.keras")
    lora.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.get_layer("d1").quantization_mode == "int4"
    x = _inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reloaded(x)), keras.ops.convert_to_numpy(lora(x))
    )


def test_in_place():
    model = _mlp()
    x = _inputs()
    reference = keras.ops.convert_to_numpy(model(x))
    lora = kl.apply_lora(
        model, targets=["d1"], rank=4, init="loftq", loftq_mode="int8", in_place=True
    )
    assert lora is model
    assert model.get_layer("d1").quantization_mode == "int8"
    # int8 base and activations: close to the float model, not equal.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), reference, atol=0.1
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factors_follow_the_scale(use_rslora):
    # Q + s·A·B fits W whatever the scale s (PEFT's factors assume s = 1).
    keras.utils.set_random_seed(0)
    model = _mlp()
    lora = kl.apply_lora(
        model,
        targets=["d1"],
        rank=4,
        alpha=16,
        use_rslora=use_rslora,
        init="loftq",
        loftq_mode="int4",
    )
    w = keras.ops.convert_to_numpy(model.get_layer("d1").kernel)
    q = keras.ops.convert_to_numpy(
        quantized.dequantized_kernel(lora.get_layer("d1").layer)
    )
    merged = keras.ops.convert_to_numpy(kl.merge_lora(lora).get_layer("d1").kernel)
    assert np.linalg.norm(w - merged) < np.linalg.norm(w - q)
