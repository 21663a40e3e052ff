"""LoRA variants on every layer type: dropout, rsLoRA, gaussian/PiSSA/OLoRA
init and DoRA. Each: initial output equals the base's, training lowers the
loss, merged equals unmerged, `.keras` round trip, exact scale."""

import math
import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

LAYER_TYPES = ("dense", "einsum", "embedding", "conv")

VARIANTS = {
    "dropout": {"dropout": 0.25},
    "rslora": {"use_rslora": True, "alpha": 8},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "dora": {"use_dora": True},
    "pissa_dora": {"init": "pissa", "use_dora": True},
}


def model_and_data(kind, batch=8):
    """A tiny model whose layer 't' is of `kind`, and inputs for it."""
    rng = np.random.default_rng(0)
    if kind == "dense":
        inputs = keras.Input((6,))
        x = keras.layers.Dense(5, activation="tanh", name="t")(inputs)
        data = rng.normal(size=(batch, 6))
    elif kind == "einsum":
        inputs = keras.Input((3, 6))
        x = keras.layers.EinsumDense(
            "abc,cde->abde", output_shape=(None, 2, 4), bias_axes="de", name="t"
        )(inputs)
        x = keras.layers.Reshape((3, 8))(x)
        data = rng.normal(size=(batch, 3, 6))
    elif kind == "embedding":
        inputs = keras.Input((5,), dtype="int32")
        x = keras.layers.Embedding(11, 6, name="t")(inputs)
        data = rng.integers(0, 11, size=(batch, 5)).astype("int32")
    else:
        inputs = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(4, 3, name="t")(inputs)
        data = rng.normal(size=(batch, 6, 6, 3))
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    if data.dtype != np.int32:
        data = data.astype("float32")
    return model, data


def lora_of(model, **options):
    options.setdefault("rank", 2)
    lora = kl.apply_lora(model, targets=["t"], **options)
    return lora, dict(lora_layers(lora))["t"]


def perturb(layer, seed=0, scale=0.2):
    """Moves every trainable adapter weight away from its initial value."""
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(to_numpy(v) + rng.normal(0, scale, v.shape).astype("float32"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_initial_output_equals_base_and_merge_is_exact(kind, variant):
    model, x = model_and_data(kind)
    base = to_numpy(model(x))
    kernel = to_numpy(model.get_layer("t").weights[0])
    lora, layer = lora_of(model, **VARIANTS[variant])
    np.testing.assert_allclose(to_numpy(lora(x)), base, rtol=1e-5, atol=1e-5)
    if variant in ("pissa", "olora", "pissa_dora"):
        assert layer.adapters_disabled is False
        assert np.abs(to_numpy(layer.lora_b)).max() > 0  # A and B both start non-zero
    perturb(layer)
    out = to_numpy(lora(x))
    assert np.abs(out - base).max() > 1e-3
    merged = kl.merge_lora(lora)
    np.testing.assert_allclose(to_numpy(merged(x)), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.merged_kernel()),
        to_numpy(merged.get_layer("t").weights[0]),
        rtol=1e-6,
        atol=1e-6,
    )
    # The original model (whose kernel the LoRA model shares) is untouched.
    np.testing.assert_array_equal(to_numpy(model.get_layer("t").weights[0]), kernel)
    np.testing.assert_array_equal(to_numpy(model(x)), base)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_keras_round_trip(kind, variant, tmp_path):
    model, x = model_and_data(kind)
    lora, layer = lora_of(model, **VARIANTS[variant])
    perturb(layer)
    expected = to_numpy(lora(x))
    path = tmp_path / "m.keras"
    lora.save(path)
    loaded = keras.saving.load_model(path)
    again = dict(lora_layers(loaded))["t"]
    for option in ("rank", "alpha", "use_rslora", "dropout", "init", "use_dora"):
        assert getattr(again, option) == getattr(layer, option)
    assert again.scale == layer.scale
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)


@pytest.mark.parametrize(
    "kind, options",
    [
        ("dense", {"use_dora": True, "init": "gaussian", "dropout": 0.1}),
        ("dense", {"init": "pissa", "use_rslora": True}),
        ("dense", {"init": "olora"}),
        ("einsum", {"use_dora": True, "dropout": 0.1}),
        ("embedding", {"use_dora": True, "dropout": 0.1}),
        ("conv", {"init": "pissa", "use_dora": True, "dropout": 0.1}),
    ],
)
def test_training_lowers_the_loss(kind, options):
    model, x = model_and_data(kind, batch=32)
    y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")
    lora, layer = lora_of(model, **options)
    frozen = [to_numpy(w) for w in layer.layer.weights]
    lora.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = lora.evaluate(x, y, verbose=0)
    lora.fit(x, y, epochs=15, batch_size=32, verbose=0)
    after = lora.evaluate(x, y, verbose=0)
    assert after < 0.9 * before
    names = {v.name for v in lora.trainable_weights}
    expected = {"lora_a", "lora_b"} | ({"lora_magnitude"} if layer.use_dora else set())
    assert names == expected
    for w, value in zip(layer.layer.weights, frozen, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_scale_values_are_exact():
    model, _ = model_and_data("dense")
    cases = [
        ({"rank": 4}, 1.0),
        ({"rank": 4, "alpha": 8}, 2.0),
        ({"rank": 4, "alpha": 8, "use_rslora": True}, 4.0),
        ({"rank": 2, "alpha": 3, "use_rslora": True}, 3 / math.sqrt(2)),
        ({"rank": 4, "alpha": 8, "init": "pissa"}, 2.0),
        ({"rank": 4, "alpha": 8, "use_dora": True}, 2.0),
    ]
    for options, scale in cases:
        _, layer = lora_of(model, **options)
        assert layer.scale == scale
        perturb(layer)
        if not layer.use_dora and layer.init == "default":
            a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
            delta = to_numpy(layer.delta())
            np.testing.assert_allclose(delta, scale * a @ b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_dropout_only_in_training(kind):
    model, x = model_and_data(kind)
    lora, layer = lora_of(model, dropout=0.5)
    perturb(layer, scale=0.5)
    out = to_numpy(lora(x))
    np.testing.assert_array_equal(to_numpy(lora(x, training=False)), out)
    np.testing.assert_array_equal(to_numpy(lora(x)), out)
    assert np.abs(to_numpy(lora(x, training=True)) - out).max() > 1e-4
    # Without dropout, training and inference agree.
    plain, player = lora_of(model)
    perturb(player, scale=0.5)
    np.testing.assert_allclose(
        to_numpy(plain(x, training=True)), to_numpy(plain(x)), atol=1e-6
    )


def test_bad_variant_arguments():
    model, _ = model_and_data("dense")
    dense = model.get_layer("t")
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout"):
            kl.LoRADense(dense, dropout=bad)
    with pytest.raises(TypeError, match="dropout"):
        kl.LoRADense(dense, dropout="0.1")
    with pytest.raises(ValueError, match="init"):
        kl.LoRADense(dense, init="loftq")
    with pytest.raises(ValueError, match="init"):
        kl.apply_lora(model, targets=["t"], init="svd")
    with pytest.raises(ValueError, match="rank <= min"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank above min(in, out) also warns
        kl.LoRADense(dense, rank=8, init="pissa")  # kernel is 6 x 5


def test_pissa_leaves_the_shared_kernel_alone_and_costs_one_kernel():
    model, x = model_and_data("dense")
    dense = model.get_layer("t")
    kernel = to_numpy(dense.kernel)
    layer = kl.LoRADense(dense, rank=2, init="pissa")
    np.testing.assert_array_equal(to_numpy(dense.kernel), kernel)
    residual = layer.get_adapter("default").residual
    assert tuple(residual.shape) == kernel.shape and not residual.trainable
    # W = residual + scale·A·B, and the residual lacks the top-2 directions.
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    np.testing.assert_allclose(
        to_numpy(residual) + layer.scale * a @ b, kernel, atol=1e-6
    )
    s = np.linalg.svd(kernel, compute_uv=False)
    np.testing.assert_allclose(
        np.linalg.svd(to_numpy(residual), compute_uv=False)[:3], s[2:5], atol=1e-5
    )
    assert len(layer.trainable_weights) == 2


def test_dora_magnitude_starts_at_the_column_norms():
    model, x = model_and_data("dense")
    dense = model.get_layer("t")
    layer = kl.LoRADense(dense, rank=2, use_dora=True)
    kernel = to_numpy(dense.kernel)
    np.testing.assert_allclose(
        to_numpy(layer.lora_magnitude), np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    assert tuple(layer.lora_magnitude.shape) == (5,)
    assert [v.name for v in layer.trainable_weights] == [
        "lora_a",
        "lora_b",
        "lora_magnitude",
    ]


@pytest.mark.parametrize(
    "kind, variants",
    [
        ("dense", ("dropout", "rslora", "gaussian", "pissa", "olora", "dora")),
        ("einsum", ("pissa_dora",)),
        ("embedding", ("dora", "olora")),
        ("conv", ("pissa_dora",)),
    ],
)
def test_adapter_file_round_trip(kind, variants, tmp_path):
    model, x = model_and_data(kind)
    for variant in variants:
        lora, layer = lora_of(model, **VARIANTS[variant])
        perturb(layer)
        expected = to_numpy(lora(x))
        path = tmp_path / f"{variant}.safetensors"
        kl.save_adapter(lora, path)
        # Onto the plain base model: LoRA is applied with the same variant.
        loaded = kl.load_adapter(model, path)
        again = dict(lora_layers(loaded))["t"]
        for option in ("rank", "alpha", "use_rslora", "dropout", "init", "use_dora"):
            assert getattr(again, option) == getattr(layer, option), option
        np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-6)
        # Into a fresh LoRA model of the same variant.
        fresh, _ = lora_of(model, **VARIANTS[variant])
        kl.load_adapter(fresh, path)
        np.testing.assert_allclose(to_numpy(fresh(x)), expected, atol=1e-6)


def test_adapter_file_refuses_another_variant_or_base(tmp_path):
    model, x = model_and_data("dense")
    lora, layer = lora_of(model, init="pissa")
    perturb(layer)
    path = tmp_path / "pissa.safetensors"
    kl.save_adapter(lora, path)
    plain, _ = lora_of(model)
    with pytest.raises(ValueError, match="PiSSA adapter .* plain LoRA layer"):
        kl.load_adapter(plain, path)
    other, _ = model_and_data("dense")
    other.get_layer("t").kernel.assign(np.ones((6, 5), "float32"))
    with pytest.raises(ValueError, match="base kernel differs"):
        kl.load_adapter(other, path)


def test_peft_format_maps_dora_rslora_dropout_and_refuses_pissa(tmp_path):
    import json

    model, x = model_and_data("dense")
    lora, layer = lora_of(model, use_dora=True, use_rslora=True, dropout=0.1)
    perturb(layer)
    kl.save_adapter(lora, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert config["lora_dropout"] == 0.1 and config["init_lora_weights"] is True
    loaded = kl.load_adapter(model, tmp_path / "peft")
    assert dict(lora_layers(loaded))["t"].use_dora
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(lora(x)), atol=1e-6)
    for options, message in (
        ({"init": "pissa"}, "PEFT recomputes that residual"),
        ({"init": "olora"}, "PEFT recomputes that residual"),
    ):
        with pytest.raises(ValueError, match=message):
            kl.save_adapter(lora_of(model, **options)[0], tmp_path / "x", format="peft")
    emb, _ = model_and_data("embedding")
    with pytest.raises(ValueError, match="DoRA on Dense"):
        kl.save_adapter(lora_of(emb, use_dora=True)[0], tmp_path / "x", format="peft")


def test_dora_adapter_matches_real_peft_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, x = model_and_data("dense")
    lora, layer = lora_of(model, use_dora=True, rank=2, alpha=3)
    perturb(layer)
    want = to_numpy(lora(x))

    def torch_net():
        net = torch.nn.Sequential(
            torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
        )
        with torch.no_grad():
            for module, name in (("0", "t"), ("2", "head")):
                kernel, bias = (to_numpy(w) for w in model.get_layer(name).weights)
                net.get_submodule(module).weight.copy_(
                    torch.from_numpy(kernel.T.copy())
                )
                net.get_submodule(module).bias.copy_(torch.from_numpy(bias))
        return net

    kl.save_adapter(lora, tmp_path / "p", format="peft", name_map={"t": "0"})
    peft_model = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "p"))
    with torch.no_grad():
        got = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # And back: PEFT's own save of that DoRA adapter loads into Keras.
    peft_model.save_pretrained(str(tmp_path / "again"))
    back = kl.load_adapter(model, tmp_path / "again", name_map={"0": "t"})
    np.testing.assert_allclose(to_numpy(back(x)), want, atol=1e-5)


def test_quantized_bases_refuse_pissa_and_olora():
    # DoRA over quantized bases (QDoRA) is tested in test_qdora.py.
    model, _ = model_and_data("dense")
    model.get_layer("t").quantize("int8")
    for options, option in (
        ({"init": "pissa"}, "init='pissa'"),
        ({"init": "olora"}, "init='olora'"),
    ):
        with pytest.raises(ValueError, match=f"quantized.*cannot use {option}"):
            lora_of(model, **options)
    lora, layer = lora_of(model, dropout=0.1, use_rslora=True, init="gaussian")
    assert layer.quantization_mode == "int8"


@pytest.mark.parametrize("argument", ["use_rslora", "use_dora"])
def test_flags_must_be_real_booleans(argument):
    dense = keras.layers.Dense(4)
    dense.build((None, 4))
    with pytest.raises(TypeError, match=f"`{argument}` must be True or False"):
        kl.LoRADense(dense, rank=2, **{argument: "false"})
    assert dense.trainable
