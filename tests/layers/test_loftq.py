"""LoftQ (`apply_lora(init="loftq")`): a quantized base plus adapters that
make up for its quantization error (`keras_lora.model.loftq`)."""

import json

import keras
import numpy as np
import pytest
import safetensors

import keras_lora as kl
from keras_lora.io.records import kernel_digest
from keras_lora.layers import quantized
from keras_lora.model.loftq import error_ratio
from keras_lora.model.walk import lora_layers

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


# ----- adapter files: a LoftQ adapter is right on its quantized base only --


def _trained_loftq(mode="int4", iters=3):
    """A float model and its LoftQ copy, the adapters moved off their init."""
    keras.utils.set_random_seed(0)
    model = _mlp()
    lora = kl.apply_lora(
        model,
        targets=["d1", "d2"],
        rank=4,
        init="loftq",
        loftq_mode=mode,
        loftq_iter=iters,
    )
    rng = np.random.default_rng(2)
    for name in ("d1", "d2"):
        b = lora.get_layer(name).lora_b
        b.assign(b + rng.standard_normal(b.shape).astype("float32") * 0.05)
    return model, lora


def _out(model):
    return keras.ops.convert_to_numpy(model(_inputs()))


@pytest.mark.parametrize("mode", MODES)
def test_adapter_file_records_loftq_and_its_base(tmp_path, mode):
    _, lora = _trained_loftq(mode)
    path = tmp_path / "loftq.safetensors"
    kl.save_adapter(lora, path)
    with safetensors.safe_open(str(path), "np") as f:
        entries = json.loads(f.metadata()["keras_lora"])["layers"]
    assert {e["init"] for e in entries.values()} == {"loftq"}
    assert {e["base_sha256"] for e in entries.values()} == {
        kernel_digest(lora.get_layer(name)) for name in ("d1", "d2")
    }


def test_adapter_file_loads_on_the_same_loftq_base(tmp_path):
    model, lora = _trained_loftq()
    path = tmp_path / "loftq.safetensors"
    kl.save_adapter(lora, path)
    # The same LoftQ conversion of the same float model: the same base Q
    # (quantization and SVD are deterministic), so the file loads exactly.
    keras.utils.set_random_seed(1)
    again = kl.apply_lora(
        model,
        targets=["d1", "d2"],
        rank=4,
        init="loftq",
        loftq_mode="int4",
        loftq_iter=3,
    )
    kl.load_adapter(again, path)
    np.testing.assert_array_equal(_out(again), _out(lora))
    # And the model reloaded from its `.keras` file.
    saved = str(tmp_path / "loftq.keras")
    lora.save(saved)
    reloaded = keras.models.load_model(saved)
    for name in ("d1", "d2"):
        assert reloaded.get_layer(name).get_adapter("default").init == "loftq"
    kl.load_adapter(reloaded, path)
    np.testing.assert_array_equal(_out(reloaded), _out(lora))


def test_adapter_file_refused_on_another_base(tmp_path):
    model, lora = _trained_loftq()
    path = tmp_path / "loftq.safetensors"
    kl.save_adapter(lora, path)
    before = _out(model)
    # The float model: its kernel is W, not Q.
    with pytest.raises(ValueError, match="init='loftq'.*quantized base"):
        kl.load_adapter(model, path)
    assert not lora_layers(model)
    np.testing.assert_array_equal(_out(model), before)
    # A plain int4 quantization of W, with or without LoRA layers: another Q
    # (after 3 alternations the base is quantized from W - s·A·B).
    plain = _mlp()
    plain.set_weights(model.get_weights())
    plain.quantize("int4")
    with pytest.raises(ValueError, match="init='loftq'.*quantized base"):
        kl.load_adapter(plain, path)
    plain_lora = kl.apply_lora(plain, targets=["d1", "d2"], rank=4)
    kernel_before = [keras.ops.convert_to_numpy(v) for v in plain_lora.weights]
    with pytest.raises(ValueError, match="init='loftq'.*quantized base"):
        kl.load_adapter(plain_lora, path)
    for variable, value in zip(plain_lora.weights, kernel_before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)


def test_peft_file_warns_that_the_base_must_travel_with_it(tmp_path):
    _, lora = _trained_loftq()
    with pytest.warns(UserWarning, match="init='loftq'"):
        kl.save_adapter(lora, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # As PEFT's own LoftQ workflow writes it: plain weights, a plain init.
    assert config["init_lora_weights"] is True


def test_peft_loftq_config_reads_as_plain_weights_with_a_warning(tmp_path):
    _, lora = _trained_loftq()
    directory = tmp_path / "peft"
    with pytest.warns(UserWarning):
        kl.save_adapter(lora, directory, format="peft")
    # What PEFT writes when its LoftQ config is kept on save.
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}
    )
    config_path.write_text(json.dumps(config))
    # The base PEFT saved would be Q's float weights; the weights load as is.
    target = _mlp()
    with pytest.warns(UserWarning, match="LoftQ base"):
        loaded = kl.load_adapter(target, directory)
    for name in ("d1", "d2"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded.get_layer(name).lora_b),
            keras.ops.convert_to_numpy(lora.get_layer(name).lora_b),
        )


def test_one_iteration_base_is_the_plain_quantization(tmp_path):
    # With loftq_iter=1 the base is quantized from W itself: the plain
    # quantization of the float model is the same Q, and the file loads.
    model, lora = _trained_loftq(iters=1)
    path = tmp_path / "loftq.safetensors"
    kl.save_adapter(lora, path)
    plain = _mlp()
    plain.set_weights(model.get_weights())
    plain.quantize("int4")
    loaded = kl.load_adapter(plain, path)
    np.testing.assert_array_equal(_out(loaded), _out(lora))


@pytest.mark.parametrize("mode", MODES)
def test_with_dora_starts_where_loftq_does(mode):
    # QDoRA over the LoftQ base: m = ‖Q + s·A·B‖ per output unit, so the
    # output starts at Q + s·A·B, the LoftQ model's, not at Q's norm.
    keras.utils.set_random_seed(0)
    model = _mlp()
    x = _inputs()
    options = dict(targets=["d1", "d2"], rank=4, init="loftq", loftq_mode=mode)
    plain = kl.apply_lora(model, **options, loftq_iter=2)
    dora = kl.apply_lora(model, **options, loftq_iter=2, use_dora=True)
    for name in ("d1", "d2"):
        assert dora.get_layer(name).use_dora
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(dora.get_layer(name).lora_a),
            keras.ops.convert_to_numpy(plain.get_layer(name).lora_a),
        )
    want = keras.ops.convert_to_numpy(plain(x))
    # m / ‖Q + s·A·B‖ is 1 up to float32 rounding of the norm (~1e-7 relative,
    # the norm computed in float32 at call time, m in float64 here).
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dora(x)), want, rtol=1e-5, atol=1e-5
    )
    trainable = sorted(v.path for v in dora.trainable_weights)
    assert trainable == [
        f"{n}/{v}" for n in ("d1", "d2") for v in ("lora_a", "lora_b", "lora_magnitude")
    ]


def _peft_loftq(weight, rank, iters):
    """PEFT's `loftq_init` loop for NF4 (peft 0.21.2, `utils/loftq_utils.py`)
    on CPU: its `_low_rank_decomposition` and bitsandbytes' NF4, blocks of
    64. `loftq_init` itself moves the weight to "cuda" (or "xpu")
    unconditionally, so it cannot run on a CPU-only machine; this runs its
    loop, step for step. Returns PEFT's `(dequantized Q, lora_B @ lora_A)`."""
    import bitsandbytes.functional as bnb
    import torch
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = torch.from_numpy(weight)
    res = weight.clone()
    for i in range(iters):
        packed, state = bnb.quantize_4bit(res, blocksize=64, quant_type="nf4")
        dequantized = bnb.dequantize_4bit(packed, state)
        res = weight - dequantized
        output = _low_rank_decomposition(res, reduced_rank=rank)
        low, high = output["L"], output["R"]
        if i + 1 == iters:
            break
        res = weight - low @ high
    return dequantized.numpy(), (low @ high).numpy()


@pytest.mark.parametrize("iters", [1, 5])
def test_nf4_loftq_is_peft_loftq_on_bitsandbytes_nf4(iters):
    from keras_lora.model.loftq import loftq_factors

    # A (256, 128) matrix, PEFT's weight and our kernel alike (rows whole
    # NF4 blocks: see test_nf4's bitsandbytes test); PEFT's scale is 1.
    w = np.random.default_rng(0).normal(0, 0.02, (256, 128)).astype("float32")
    layer = keras.layers.Dense(128, use_bias=False)
    layer.build((None, 256))
    peft_q, peft_update = _peft_loftq(w, 8, iters)
    _, q, a, b = loftq_factors(layer, w, 8, 1.0, "nf4", iters, (None, None))
    w64 = w.astype("float64")
    ours = np.linalg.norm(w64 - q - a @ b)
    theirs = np.linalg.norm(w64 - peft_q - peft_update)
    # The same fit: PEFT's error, to float32 rounding of its residuals (ours
    # are float64; measured: equal to 9 digits).
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # The same update (the top-8 singular triplets of the same residual;
    # measured max difference 3e-8, against updates of about 1e-3).
    np.testing.assert_allclose(a @ b, peft_update, atol=1e-6)
    if iters == 1:  # the same quantizer on the same float32 W: bitwise
        np.testing.assert_array_equal(q, peft_q)
    else:  # quantizer inputs W - L·R differ in the last float32 bits:
        # absmax values an ulp apart (measured max 7.5e-9 on values of 0.09)
        np.testing.assert_allclose(q, peft_q, rtol=0, atol=1e-7)
