"""PEFT's `modules_to_save` and `bias` both ways with real `peft`: a Keras
model's trained head and biases load into its torch twin and give its
outputs, and a PEFT adapter with them loads into the Keras twin."""

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.io.describe import describe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

sys.path.insert(0, str(Path(__file__).parent))
import test_hf_peft_kerashub as twins  # noqa: E402

# float32 twins computing in another order (torch against each backend):
# the base twins agree to about 1e-6; 1e-4 is the interop tests' bound.
TOLERANCE = twins.TOLERANCE
# The trained weights must move the outputs by far more than TOLERANCE.
MIN_CHANGE = 0.05
X = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.d1 = torch.nn.Linear(4, 8)
        self.ln = torch.nn.LayerNorm(8, eps=1e-3)
        self.d2 = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.d2(self.ln(self.d1(x))))


def torch_net():
    torch.manual_seed(0)
    return TorchNet().eval()


def keras_net():
    """The Keras twin of `torch_net()`: same layer names, same weights."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    x = keras.layers.LayerNormalization(name="ln", epsilon=1e-3)(x)
    x = keras.layers.Dense(8, name="d2")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    state = {k: v.detach().numpy() for k, v in torch_net().state_dict().items()}
    for name in ("d1", "d2", "head"):
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        model.get_layer(name).set_weights([weight.T, bias])
    model.get_layer("ln").set_weights([state["ln.weight"], state["ln.bias"]])
    return model


def run_torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def perturb_keras(model, scale=0.3):
    """Moves every trainable weight (as training would)."""
    rng = np.random.default_rng(1)
    for variable in model.trainable_weights:
        value = keras.ops.convert_to_numpy(variable)
        noise = rng.normal(size=value.shape).astype(value.dtype) * scale
        variable.assign(value + noise)


def perturb_torch(model, scale=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()


def trainable_paths(model):
    return sorted(v.path for v in model.trainable_weights)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_head_and_biases_to_peft_by_name(tmp_path, bias):
    model = kl.apply_lora(
        keras_net(),
        targets=["d1", "d2"],
        rank=2,
        bias=bias,
        trainable=["head"],
        in_place=True,
    )
    # One real training step, then larger moves so that each part counts.
    model.compile(optimizer="sgd", loss="mse")
    model.fit(X, np.ones((5, 2), "float32"), epochs=1, verbose=0)
    perturb_keras(model)
    expected = keras.ops.convert_to_numpy(model(X))
    kl.save_adapter(model, tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    assert config["bias"] == bias
    base = run_torch(torch_net(), X)
    assert np.abs(expected - base).max() > MIN_CHANGE
    loaded = peft.PeftModel.from_pretrained(torch_net(), tmp_path / "out").eval()
    np.testing.assert_allclose(run_torch(loaded, X), expected, atol=TOLERANCE, rtol=0)
    # PEFT trains what keras_lora trained: A, B, the head, the biases.
    peft_trained = peft.PeftModel.from_pretrained(
        torch_net(), tmp_path / "out", is_trainable=True
    )
    names = {n for n, p in peft_trained.named_parameters() if p.requires_grad}
    assert "base_model.model.d1.base_layer.bias" in names
    assert "base_model.model.head.modules_to_save.default.weight" in names
    assert ("base_model.model.ln.bias" in names) == (bias == "all")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_head_and_biases_load_by_name(tmp_path, bias):
    twin = peft.get_peft_model(
        torch_net(),
        peft.LoraConfig(
            r=2,
            target_modules=["d1", "d2"],
            modules_to_save=["head"],
            bias=bias,
            init_lora_weights=False,
        ),
    )
    perturb_torch(twin)
    expected = run_torch(twin, X)
    twin.save_pretrained(tmp_path / "in")
    # `keras-lora inspect` lists the adapters; the head and biases are none.
    _, rows = describe(tmp_path / "in")
    assert len(rows) == 2
    model = kl.load_adapter(keras_net(), tmp_path / "in", in_place=True)
    got = keras.ops.convert_to_numpy(model(X))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    extra = ["d1/bias", "d2/bias", "head/bias", "head/kernel"]
    if bias == "all":
        extra.append("ln/beta")
    lora = ["d1/lora_a", "d1/lora_b", "d2/lora_a", "d2/lora_b"]
    assert trainable_paths(model) == sorted(lora + extra)
    # Saved again, the same adapter: PEFT's extra copies of the head's bias
    # (bias="all") are not written back.
    kl.save_adapter(model, tmp_path / "again", format="peft")
    again = peft.PeftModel.from_pretrained(torch_net(), tmp_path / "again").eval()
    np.testing.assert_allclose(run_torch(again, X), expected, atol=TOLERANCE, rtol=0)


def saved_twin(arch, folder):
    """A tiny random `transformers` causal LM of `arch`, saved (as the
    interop tests' `twin_dir` makes it: float16-exact weights)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(twins._configs()[arch]())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    model.save_pretrained(folder)
    return folder


def test_vit_classifier_head_both_ways(tmp_path):
    """KerasHub's ViT converter ports the classifier: `modules_to_save`
    names it as `transformers` does, and biases of the projections train."""
    path = twins.vit_twin(tmp_path)

    def hf_vit():
        cls = transformers.ViTForImageClassification
        return cls.from_pretrained(path, dtype=torch.float32).eval()

    def keras_vit():
        return keras_hub.models.ViTImageClassifier.from_preset(str(path))

    base = twins.vit_hf_logits(hf_vit())
    task = keras_vit()
    kl.apply_lora(
        task,
        targets=twins.projections,
        exclude=["predictions"],
        trainable=["predictions"],
        bias="lora_only",
        rank=4,
        in_place=True,
    )
    perturb_keras(task, 0.1)
    expected = keras.ops.convert_to_numpy(task(twins.IMAGES))
    assert np.abs(expected - base).max() > MIN_CHANGE
    kl.save_adapter(task, tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert config["bias"] == "lora_only"
    loaded = peft.PeftModel.from_pretrained(hf_vit(), tmp_path / "out").eval()
    got = twins.vit_hf_logits(loaded)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)

    twin = peft.get_peft_model(
        hf_vit(),
        peft.LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
            modules_to_save=["classifier"],
            bias="all",
            init_lora_weights=False,
        ),
    )
    expected = twins.vit_hf_logits(perturb_torch(twin, 0.1))
    twin.save_pretrained(tmp_path / "in")
    task = kl.load_adapter(keras_vit(), tmp_path / "in", in_place=True)
    got = keras.ops.convert_to_numpy(task(twins.IMAGES))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    trained = trainable_paths(task)
    assert any(p.endswith("predictions/kernel") for p in trained)
    assert any(p.endswith("/beta") for p in trained)  # LayerNorm biases


def test_untied_lm_head_both_ways(tmp_path):
    """Llama with its own `lm_head`: in KerasHub, the reverse embeddings of
    the token embedding layer, which trains whole."""
    path = saved_twin("llama", tmp_path / "llama")
    twin = twins.peft_twin(path, modules_to_save=["lm_head"])
    expected = twins.hf_logits(perturb_torch(twin, 0.1)).numpy()
    twin.save_pretrained(tmp_path / "in")
    task = kl.load_adapter(twins.keras_task(path), tmp_path / "in", in_place=True)
    np.testing.assert_allclose(
        twins.keras_logits(task), expected, atol=TOLERANCE, rtol=0
    )
    # The Keras layer trains whole: both of its weights are saved back.
    kl.save_adapter(task, tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    loaded = peft.PeftModel.from_pretrained(twins.hf_model(path), tmp_path / "out")
    got = twins.hf_logits(loaded.eval()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_gpt2_fused_bias_both_ways(tmp_path):
    """GPT2's `c_attn` bias feeds the query, key and value biases: it is
    put together from all three (KerasHub's hooks, inverted)."""
    path = saved_twin("gpt2", tmp_path / "gpt2")
    task = twins.keras_task(path)
    kl.apply_lora(
        task, targets=twins.projections, rank=2, bias="lora_only", in_place=True
    )
    perturb_keras(task, 0.1)
    expected = twins.keras_logits(task)
    kl.save_adapter(task, tmp_path / "out", format="peft")
    loaded = peft.PeftModel.from_pretrained(twins.hf_model(path), tmp_path / "out")
    got = twins.hf_logits(loaded.eval()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    twin = twins.peft_twin(path, bias="lora_only")
    expected = twins.hf_logits(perturb_torch(twin, 0.1)).numpy()
    twin.save_pretrained(tmp_path / "in")
    task = kl.load_adapter(twins.keras_task(path), tmp_path / "in", in_place=True)
    np.testing.assert_allclose(
        twins.keras_logits(task), expected, atol=TOLERANCE, rtol=0
    )


def test_bad_config_values_name_the_field(tmp_path):
    twin = peft.get_peft_model(
        torch_net(), peft.LoraConfig(r=2, target_modules=["d1"], bias="lora_only")
    )
    twin.save_pretrained(tmp_path / "in")
    config_path = tmp_path / "in" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for field, value, error in (
        ("bias", "some", ValueError),
        ("modules_to_save", "head", TypeError),
    ):
        config_path.write_text(json.dumps({**config, field: value}))
        with pytest.raises(error, match=f"`{field}`"):
            kl.load_adapter(keras_net(), tmp_path / "in", in_place=True)


def test_unsaved_module_key_is_reported(tmp_path):
    """A full weight of a module not in `modules_to_save` is no part of the
    adapter: strict loading refuses it, naming the key."""
    twin = peft.get_peft_model(
        torch_net(),
        peft.LoraConfig(r=2, target_modules=["d1"], modules_to_save=["head"]),
    )
    twin.save_pretrained(tmp_path / "in")
    config_path = tmp_path / "in" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "modules_to_save": None}))
    with pytest.raises(ValueError, match="base_model.model.head.weight"):
        kl.load_adapter(keras_net(), tmp_path / "in", in_place=True)
    model = keras_net()
    with pytest.warns(UserWarning, match="base_model.model.head.weight"):
        kl.load_adapter(model, tmp_path / "in", in_place=True, strict=False)


def test_head_the_converter_does_not_port_is_named(tmp_path):
    """KerasHub's BERT converter ports no classifier head: saving one to
    PEFT without `name_map` names it, and writes nothing."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "b")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "b"))
    task = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    head = task.output_dense.name
    kl.apply_lora(
        task, targets=["query", "value"], trainable=[head], rank=2, in_place=True
    )
    perturb_keras(task)  # the head trained: a fresh head differs
    with pytest.raises(ValueError, match=f"(?s)no counterpart.*'{head}/kernel'"):
        kl.save_adapter(task, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()
    kl.save_adapter(task, tmp_path / "a.safetensors")  # the keras_lora format
    loaded = kl.load_adapter(
        keras_hub.models.BertTextClassifier(
            backbone=keras_hub.models.Backbone.from_preset(str(tmp_path / "b")),
            num_classes=3,
            preprocessor=None,
        ),
        tmp_path / "a.safetensors",
        in_place=True,
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.output_dense.kernel),
        keras.ops.convert_to_numpy(task.output_dense.kernel),
    )


def test_batch_norm_module_by_name_map(tmp_path):
    """A `BatchNormalization` in `modules_to_save`: its moving statistics
    are torch's running ones, its step counter has no Keras weight."""

    def torch_twin():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 8),
            torch.nn.BatchNorm1d(8, eps=1e-3),
            torch.nn.Linear(8, 2),
        )
        with torch.no_grad():
            net[1].running_mean.uniform_(-1, 1)
            net[1].running_var.uniform_(0.5, 2)
        return net.eval()

    state = {k: v.detach().numpy() for k, v in torch_twin().state_dict().items()}

    def keras_twin():
        inputs = keras.Input((4,))
        x = keras.layers.Dense(8, name="fc")(inputs)
        x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x)
        model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
        for index, name in ((0, "fc"), (2, "out")):
            weight, bias = state[f"{index}.weight"], state[f"{index}.bias"]
            model.get_layer(name).set_weights([weight.T, bias])
        model.get_layer("bn").set_weights(
            [state[f"1.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
        )
        return model

    names = {"0": "fc", "1": "bn", "2": "out"}
    back = {v: k for k, v in names.items()}
    twin = peft.get_peft_model(
        torch_twin(), peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"])
    )
    perturb_torch(twin)
    with torch.no_grad():
        twin.base_model.model[1].modules_to_save["default"].running_mean.add_(0.5)
    expected = run_torch(twin.eval(), X)
    twin.save_pretrained(tmp_path / "in")
    model = kl.load_adapter(
        keras_twin(), tmp_path / "in", name_map=names, in_place=True
    )
    got = keras.ops.convert_to_numpy(model(X, training=False))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    kl.save_adapter(model, tmp_path / "out", format="peft", name_map=back)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["1"]
    loaded = peft.PeftModel.from_pretrained(torch_twin(), tmp_path / "out").eval()
    np.testing.assert_allclose(run_torch(loaded, X), expected, atol=TOLERANCE, rtol=0)
