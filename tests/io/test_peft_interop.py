"""Round trips through real `peft` and `torch`, in both directions."""

import json

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

X = np.random.default_rng(3).normal(size=(7, 6)).astype("float32")
# torch module path -> Keras layer name, for the nn.Sequential MLP.
TORCH_TO_KERAS = {"0": "fc1", "2": "fc2", "4": "head"}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def keras_mlp():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(8, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def torch_mlp_like(model):
    """The same MLP in torch, with `model`'s base weights (kernel transposed)."""
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    )
    with torch.no_grad():
        for module, name in TORCH_TO_KERAS.items():
            kernel, bias = (_np(w) for w in model.get_layer(name).weights)
            net.get_submodule(module).weight.copy_(torch.from_numpy(kernel.T.copy()))
            net.get_submodule(module).bias.copy_(torch.from_numpy(bias))
    return net


def torch_out(net):
    with torch.no_grad():
        return net(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_keras_adapter_loads_in_peft_with_the_same_outputs(tmp_path, use_rslora):
    base = keras_mlp()
    lora = kl.apply_lora(base, rank=4, alpha=6, use_rslora=use_rslora)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(rng.normal(scale=0.5, size=layer.lora_b.shape))
    want = _np(lora(X))
    assert np.abs(want - _np(base(X))).max() > 0.05  # the adapter matters

    directory = tmp_path / "peft_adapter"
    kl.save_adapter(lora, directory, format="peft", name_map={"fc1": "0", "fc2": "2"})
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
        4,
        6,
        use_rslora,
    )
    assert config["target_modules"] == ["0", "2"]

    peft_model = peft.PeftModel.from_pretrained(torch_mlp_like(base), str(directory))
    np.testing.assert_allclose(torch_out(peft_model), want, atol=1e-5)
    a = peft_model.base_model.model[0].lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(a, _np(dict(lora_layers(lora))["fc1"].lora_a).T)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_in_keras_with_the_same_outputs(tmp_path, use_rslora):
    base = keras_mlp()
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["0", "2"], use_rslora=use_rslora
    )
    peft_model = peft.get_peft_model(torch_mlp_like(base), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    want = torch_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "from_torch"))

    restored = kl.load_adapter(
        base, tmp_path / "from_torch", name_map={"0": "fc1", "2": "fc2"}
    )
    np.testing.assert_allclose(_np(restored(X)), want, atol=1e-5)
    layer = dict(lora_layers(restored))["fc1"]
    assert (layer.rank, layer.alpha, layer.use_rslora) == (4, 16.0, use_rslora)
    assert layer.scale == pytest.approx(16 / 2 if use_rslora else 16 / 4)


def test_peft_rank_and_alpha_patterns_load_into_a_copy(tmp_path):
    # Each layer gets its record's rank and alpha, on the copy route too.
    base = keras_mlp()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["0", "2"],
        rank_pattern={"2": 2},
        alpha_pattern={"2": 5},
    )
    peft_model = peft.get_peft_model(torch_mlp_like(base), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    want = torch_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "patterns"))

    restored = kl.load_adapter(
        base, tmp_path / "patterns", name_map={"0": "fc1", "2": "fc2"}
    )
    assert restored is not base and not lora_layers(base)
    layers = dict(lora_layers(restored))
    assert (layers["fc1"].rank, layers["fc1"].alpha) == (4, 8.0)
    assert (layers["fc2"].rank, layers["fc2"].alpha) == (2, 5.0)
    # float32 on both sides, three small matmuls: 1e-5 is a few ulps of 1.
    np.testing.assert_allclose(_np(restored(X)), want, atol=1e-5)


def test_per_layer_ranks_save_as_rank_and_alpha_patterns_peft_loads(tmp_path):
    base = keras_mlp()
    lora = kl.apply_lora(
        base,
        targets=["fc1", "fc2"],
        rank=4,
        alpha=8,
        rank_pattern={"fc2": 2},
        alpha_pattern={"fc2": 3},
    )
    rng = np.random.default_rng(2)
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(rng.normal(scale=0.5, size=layer.lora_b.shape))
    want = _np(lora(X))
    directory = tmp_path / "patterns"
    kl.save_adapter(lora, directory, format="peft", name_map={"fc1": "0", "fc2": "2"})
    config = json.loads((directory / "adapter_config.json").read_text())
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert ranks == {4, 2} and len(config["rank_pattern"]) == 1
    peft_model = peft.PeftModel.from_pretrained(torch_mlp_like(base), str(directory))
    assert peft_model.base_model.model[2].r["default"] == 2
    assert peft_model.base_model.model[2].lora_alpha["default"] == 3
    np.testing.assert_allclose(torch_out(peft_model), want, atol=1e-5)
    back = kl.load_adapter(base, directory, name_map={"0": "fc1", "2": "fc2"})
    np.testing.assert_allclose(_np(back(X)), want, atol=1e-5)


def test_round_trip_keras_peft_keras_with_a_callable_map(tmp_path):
    base = keras_mlp()
    lora = kl.apply_lora(base, rank=2, alpha=4)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    inverse = {v: k for k, v in TORCH_TO_KERAS.items()}
    kl.save_adapter(lora, tmp_path / "p", format="peft", name_map=inverse.get)
    target = kl.apply_lora(base, rank=2, alpha=4)  # shares base weights
    assert (
        kl.load_adapter(target, tmp_path / "p", name_map=TORCH_TO_KERAS.get) is target
    )
    np.testing.assert_allclose(_np(target(X)), _np(lora(X)), atol=1e-6)


def test_default_rule_maps_dots_to_slashes(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(x))

    net = Net()
    peft_model = peft.get_peft_model(
        net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["encoder.0", "head"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.25)
    want = torch_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "nested"))

    # Keras: a nested model "encoder" holding a Dense named "0": path "encoder/0".
    enc_in = keras.Input((6,))
    encoder = keras.Model(
        enc_in,
        keras.layers.Dense(8, activation="tanh", name="0")(enc_in),
        name="encoder",
    )
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(encoder(inputs)))
    linear = peft_model.base_model.model
    for layer, module in (
        (encoder.get_layer("0"), linear.encoder[0]),
        (model.get_layer("head"), linear.head),
    ):
        layer.set_weights(
            [
                module.base_layer.weight.detach().numpy().T,
                module.base_layer.bias.detach().numpy(),
            ]
        )
    restored = kl.load_adapter(model, tmp_path / "nested")
    assert [p for p, _ in lora_layers(restored)] == ["encoder/0", "head"]
    np.testing.assert_allclose(_np(restored(X)), want, atol=1e-5)

    # And back: Keras paths become the same PEFT module paths.
    kl.save_adapter(restored, tmp_path / "back", format="peft")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["encoder.0", "head"]


def test_unmapped_peft_module_lists_both_sides(tmp_path):
    peft_model = peft.get_peft_model(
        torch_mlp_like(keras_mlp()), peft.LoraConfig(r=2, target_modules=["0", "2"])
    )
    peft_model.save_pretrained(str(tmp_path / "p"))
    base = keras_mlp()
    with pytest.raises(ValueError, match=r"(?s)map to no Keras layer.*'0'.*'2'.*fc1"):
        kl.load_adapter(base, tmp_path / "p")
    with pytest.raises(ValueError, match=r"(?s)map to no Keras layer.*'2'"):
        kl.load_adapter(base, tmp_path / "p", name_map={"0": "fc1"})
    with pytest.warns(UserWarning, match="'2'"):
        restored = kl.load_adapter(
            base, tmp_path / "p", name_map={"0": "fc1"}, strict=False
        )
    assert [p for p, _ in lora_layers(restored)] == ["fc1"]


def write_peft_dir(directory, config_changes=(), tensors=None):
    """A valid two-module PEFT directory, with `config_changes` applied."""
    import safetensors.numpy

    directory.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"]}
    config.update(dict(config_changes))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = {
            "base_model.model.0.lora_A.weight": np.ones((2, 6), "float32"),
            "base_model.model.0.lora_B.weight": np.ones((8, 2), "float32"),
        }
    safetensors.numpy.save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "DoRA adapters .* without a magnitude"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        # bias and modules_to_save are read (tests/io/test_peft_modules_to_save.py)
        ({"bias": "lora"}, "`bias` must be one of"),
        ({"rank_pattern": {"0": 4}}, "rank_pattern"),
        ({"some_future_field": 3}, "some_future_field=3"),
        ({"r": 0}, "`r` must be a positive integer"),
        ({"r": 3}, "says r=3"),
        ({"lora_alpha": -1}, "`lora_alpha` must be a finite positive number"),
    ],
)
def test_refuses_what_it_cannot_represent(tmp_path, changes, message):
    directory = write_peft_dir(tmp_path / "p", changes)
    base = keras_mlp()
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        kl.load_adapter(base, directory, name_map={"0": "fc1"})


def test_accepts_neutral_unknown_fields_and_training_only_ones(tmp_path):
    directory = write_peft_dir(
        tmp_path / "p",
        {
            "some_future_field": None,
            "lora_dropout": 0.1,
            "init_lora_weights": "gaussian",
        },
    )
    restored = kl.load_adapter(keras_mlp(), directory, name_map={"0": "fc1"})
    np.testing.assert_array_equal(_np(dict(lora_layers(restored))["fc1"].lora_a), 1.0)


def test_pickle_only_and_broken_directories(tmp_path):
    directory = tmp_path / "bin_only"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        kl.load_adapter(keras_mlp(), directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        kl.load_adapter(keras_mlp(), directory)
    half = write_peft_dir(
        tmp_path / "half",
        tensors={"base_model.model.0.lora_A.weight": np.ones((2, 6), "float32")},
    )
    with pytest.raises(ValueError, match="incomplete"):
        kl.load_adapter(keras_mlp(), half, name_map={"0": "fc1"})
    weights = write_peft_dir(tmp_path / "trunc") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        kl.load_adapter(keras_mlp(), weights.parent, name_map={"0": "fc1"})


def test_shape_mismatch_from_peft_names_layer_and_shapes(tmp_path):
    directory = write_peft_dir(tmp_path / "p")
    # fc2 takes 8 inputs, the adapter was made for 6.
    with pytest.raises(ValueError, match=r"layer 'fc2' lora_a.*\(8, 2\).*\(6, 2\)"):
        kl.load_adapter(keras_mlp(), directory, name_map={"0": "fc2"})


def test_linear_adapter_into_a_non_dense_layer_is_refused(tmp_path):
    directory = write_peft_dir(tmp_path / "p")
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="fc1")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, x)
    with pytest.raises(ValueError, match="'norm' of type LayerNormalization"):
        kl.load_adapter(model, directory, name_map={"0": "norm"})


def test_peft_save_refusals(tmp_path):
    lora = kl.apply_lora(keras_mlp(), rank=2)
    # Ranks and alphas may differ (rank_pattern, alpha_pattern), the scale
    # rule may not: PEFT has one use_rslora.
    dict(lora_layers(lora))["fc1"].use_rslora = True
    with pytest.raises(ValueError, match="one scale rule"):
        kl.save_adapter(lora, tmp_path / "p", format="peft")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        kl.save_adapter(lora, tmp_path / "file", format="peft")
    lora = kl.apply_lora(keras_mlp(), rank=2)
    with pytest.raises(ValueError, match="two Keras layers"):
        kl.save_adapter(lora, tmp_path / "p", format="peft", name_map=lambda p: "0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def token_models():
    """Embedding -> Conv1D -> mean -> Dense, in Keras and (same weights) torch."""
    inputs = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="emb")(inputs)
    x = keras.layers.Conv1D(6, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.conv = torch.nn.Conv1d(8, 6, 3)
            self.fc = torch.nn.Linear(6, 2)

        def forward(self, ids):
            x = self.emb(ids).transpose(1, 2)  # (batch, channels, steps)
            return self.fc(torch.relu(self.conv(x)).mean(dim=2))

    net = Net()
    with torch.no_grad():
        (table,) = (_np(w) for w in model.get_layer("emb").weights)
        net.emb.weight.copy_(torch.from_numpy(table))
        kernel, bias = (_np(w) for w in model.get_layer("conv").weights)
        net.conv.weight.copy_(torch.from_numpy(kernel.transpose(2, 1, 0).copy()))
        net.conv.bias.copy_(torch.from_numpy(bias))
        kernel, bias = (_np(w) for w in model.get_layer("fc").weights)
        net.fc.weight.copy_(torch.from_numpy(kernel.T.copy()))
        net.fc.bias.copy_(torch.from_numpy(bias))
    ids = np.random.default_rng(2).integers(0, 20, size=(4, 7)).astype("int32")
    return model, net, ids, lambda out: out


def image_models():
    """A Conv2D (channels_last) and a torch Conv2d (NCHW) with the same weights."""
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        kernel, bias = (_np(w) for w in model.get_layer("conv").weights)
        net.conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        net.conv.bias.copy_(torch.from_numpy(bias))
    images = np.random.default_rng(2).normal(size=(2, 6, 6, 3)).astype("float32")

    class NCHW(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    return model, net, images, NCHW


def run_torch(net, x, wrap):
    with torch.no_grad():
        return wrap(net)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(
    "models", [token_models, image_models], ids=["emb-conv1d", "conv2d"]
)
def test_embedding_and_conv_adapters_to_peft(tmp_path, models):
    model, net, x, wrap = models()
    targets = ["emb", "conv"] if models is token_models else ["conv"]
    lora = kl.apply_lora(model, targets=targets, rank=2, alpha=3)
    rng = np.random.default_rng(4)
    for _, layer in lora_layers(lora):
        for v in (layer.lora_a, layer.lora_b):
            v.assign(rng.normal(scale=0.3, size=v.shape))
    want = _np(lora(x))
    assert np.abs(want - _np(model(x))).max() > 0.01
    kl.save_adapter(lora, tmp_path / "p", format="peft")
    peft_model = peft.PeftModel.from_pretrained(net, str(tmp_path / "p"))
    np.testing.assert_allclose(run_torch(peft_model, x, wrap), want, atol=1e-5)


@pytest.mark.parametrize(
    "models", [token_models, image_models], ids=["emb-conv1d", "conv2d"]
)
def test_embedding_and_conv_adapters_from_peft(tmp_path, models):
    model, net, x, wrap = models()
    targets = ["emb", "conv"] if models is token_models else ["conv"]
    peft_model = peft.get_peft_model(
        net, peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    want = run_torch(peft_model, x, wrap)
    peft_model.save_pretrained(str(tmp_path / "p"))
    restored = kl.load_adapter(model, tmp_path / "p")
    assert [p for p, _ in lora_layers(restored)] == targets
    np.testing.assert_allclose(_np(restored(x)), want, atol=1e-5)


def test_dilated_conv_is_refused_for_peft(tmp_path):
    inputs = keras.Input((9, 3))
    model = keras.Model(
        inputs, keras.layers.Conv1D(4, 3, dilation_rate=2, name="c")(inputs)
    )
    lora = kl.apply_lora(model, targets=["c"], rank=2)
    with pytest.raises(ValueError, match="dilated convolution"):
        kl.save_adapter(lora, tmp_path / "p", format="peft")


def test_bfloat16_peft_adapter_loads(tmp_path):
    """PEFT adapters are often saved in bfloat16, which numpy cannot hold."""
    import safetensors.torch

    base = keras_mlp()
    peft_model = peft.get_peft_model(
        torch_mlp_like(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # values that bfloat16 holds exactly
                value = torch.randn(param.shape, generator=gen) * 0.3
                param.copy_(value.to(torch.bfloat16).float())
    want = torch_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "p"))
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    safetensors.torch.save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(weights)
    )
    restored = kl.load_adapter(base, tmp_path / "p", name_map={"0": "fc1"})
    np.testing.assert_allclose(_np(restored(X)), want, atol=1e-5)
    # The byte-level reader used when numpy has no bfloat16 dtype registered.
    from keras_lora.io.safetensors_io import _read_bfloat16

    raw = _read_bfloat16(weights, list(tensors))
    for key, value in tensors.items():
        assert raw[key].dtype == np.float32
        np.testing.assert_array_equal(raw[key], value.float().numpy())


def test_interrupted_peft_save_keeps_the_previous_directory(tmp_path, monkeypatch):
    import safetensors.numpy

    lora = kl.apply_lora(keras_mlp(), rank=2)
    kl.save_adapter(lora, tmp_path / "p", format="peft")
    before = {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()}

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        kl.save_adapter(lora, tmp_path / "p", format="peft")
    assert {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["p"]


def einsum_models():
    """An EinsumDense with a 3-D kernel `(6, 2, 4)` and the torch Linear
    `6 -> 8` holding it flattened in kernel order, output viewed `(2, 4)`."""
    inputs = keras.Input((6,))
    proj = keras.layers.EinsumDense("ab,bcd->acd", (2, 4), bias_axes="cd", name="p")
    model = keras.Model(inputs, proj(inputs))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Linear(6, 8)

        def forward(self, x):
            return self.p(x).view(-1, 2, 4)

    net = Net()
    kernel, bias = (_np(w) for w in model.get_layer("p").weights)
    with torch.no_grad():
        net.p.weight.copy_(torch.from_numpy(kernel.reshape(6, 8).T.copy()))
        net.p.bias.copy_(torch.from_numpy(bias.reshape(8)))
    return model, net


def test_einsum_dense_is_a_linear_on_its_flattened_kernel(tmp_path):
    model, net = einsum_models()
    lora = kl.apply_lora(model, targets=["p"], rank=2, alpha=4)
    rng = np.random.default_rng(0)
    for w in (lora.get_layer("p").lora_a, lora.get_layer("p").lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    expected = _np(lora(X))
    assert np.abs(expected - _np(model(X))).max() > 0.05
    kl.save_adapter(lora, tmp_path / "out", format="peft")
    twin = peft.PeftModel.from_pretrained(net, tmp_path / "out")
    np.testing.assert_allclose(torch_out(twin), expected, atol=1e-5, rtol=0)

    model, net = einsum_models()
    twin = peft.get_peft_model(
        net,
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["p"], init_lora_weights=False
        ),
    )
    expected = torch_out(twin)
    twin.save_pretrained(tmp_path / "in")
    restored = kl.load_adapter(model, tmp_path / "in")
    assert restored.get_layer("p").factoring == "standard"
    np.testing.assert_allclose(_np(restored(X)), expected, atol=1e-5, rtol=0)
    # Keras core's factoring is another A and B: refused, nothing written.
    keras_factored = kl.apply_lora(model, targets=["p"], rank=2, factoring="keras")
    with pytest.raises(ValueError, match="factored 'keras'.*factoring='standard'"):
        kl.save_adapter(keras_factored, tmp_path / "k", format="peft")
    assert not (tmp_path / "k").exists()


def test_grouped_and_depthwise_conv_are_refused_for_peft(tmp_path):
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(inputs)
    model = keras.Model(inputs, keras.layers.DepthwiseConv2D(3, name="dw")(x))
    lora = kl.apply_lora(model, targets=["grouped"], rank=2)
    with pytest.raises(ValueError, match="'grouped' is a grouped convolution"):
        kl.save_adapter(lora, tmp_path / "p", format="peft")
    lora = kl.apply_lora(model, targets=["dw"], rank=2)
    with pytest.raises(ValueError, match="'dw' is a DepthwiseConv2D.*no PEFT"):
        kl.save_adapter(lora, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()
