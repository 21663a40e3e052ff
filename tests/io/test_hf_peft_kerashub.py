"""Adapters between KerasHub models and PEFT on their `transformers` twins.

Each architecture is a tiny random `transformers` causal LM saved with
`save_pretrained` and loaded into KerasHub with `Backbone.from_preset`
(KerasHub's own converter, offline). The `transformers`/PEFT side runs under
torch in this process; the Keras side on the process's backend.

Tolerance: logits agree to 1e-4 in float32 (what the issue asks). Measured
differences are about 1e-6: the two frameworks sum in different orders.
Every adapter changes the logits by far more (checked), so a wrong mapping
cannot pass.
"""

import json

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.config import pattern_value
from keras_lora.io.hub_mapping import hub_correspondence
from keras_lora.model.walk import iter_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

TOLERANCE = 1e-4
# An adapter must move the logits by far more than TOLERANCE.
MIN_CHANGE = 0.05
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4]], dtype="int32")
COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=64,
)


def _configs():
    t = transformers
    return {
        "llama": lambda: t.LlamaConfig(**COMMON, tie_word_embeddings=False),
        # KerasHub's Mistral converter casts every weight to float16, so the
        # twin's weights are made float16-exact below.
        "mistral": lambda: t.MistralConfig(**COMMON, head_dim=8),
        "qwen2": lambda: t.Qwen2Config(**COMMON),
        # KerasHub's Qwen3 decoder leaves its q/k norms at epsilon 1e-5
        # whatever the config says; 1e-5 keeps the twins equal.
        "qwen3": lambda: t.Qwen3Config(**COMMON, head_dim=8, rms_norm_eps=1e-5),
        "gemma": lambda: t.GemmaConfig(**COMMON, head_dim=8),
        "gemma3_text": lambda: t.Gemma3TextConfig(
            **COMMON, head_dim=8, sliding_window=16, query_pre_attn_scalar=8
        ),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
    }


ARCHITECTURES = list(_configs())
TASKS = {
    "Llama3Backbone": "Llama3CausalLM",
    "MistralBackbone": "MistralCausalLM",
    "QwenBackbone": "QwenCausalLM",
    "Qwen3Backbone": "Qwen3CausalLM",
    "GemmaBackbone": "GemmaCausalLM",
    "Gemma3Backbone": "Gemma3CausalLM",
    "GPT2Backbone": "GPT2CausalLM",
}


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory):
    """`twin_dir(arch)`: a saved tiny random `transformers` model."""
    made = {}

    def make(arch):
        if arch not in made:
            torch.manual_seed(0)
            config = _configs()[arch]()
            model = transformers.AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())
            path = tmp_path_factory.mktemp(arch)
            model.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def hf_model(path, base=False):
    cls = transformers.AutoModel if base else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def keras_task(path):
    backbone = keras_hub.models.Backbone.from_preset(str(path))
    task = getattr(keras_hub.models, TASKS[type(backbone).__name__])
    return task(backbone=backbone, preprocessor=None)


def keras_logits(model):
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
    return keras.ops.convert_to_numpy(model(inputs))


def hf_logits(model):
    with torch.no_grad():
        output = model(torch.tensor(TOKENS, dtype=torch.long))
    logits = getattr(output, "logits", None)
    return output.last_hidden_state if logits is None else logits


def numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def projections(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def switch_adapter(model, targets, name, rank, alpha=None):
    """Gives `targets` a new adapter `name` of `rank` and makes it their active one."""
    kl.add_adapter(model, name, rank=rank, alpha=alpha, targets=targets)
    for _, layer in iter_layers(model):
        if isinstance(layer, kl.LoRALayer) and name in layer.adapter_names:
            layer.set_active_adapters([name])


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, layer in iter_layers(model):
        if isinstance(layer, kl.LoRALayer):
            for variable in (layer.lora_a, layer.lora_b):
                values = rng.standard_normal(tuple(variable.shape)) * 0.3
                variable.assign(values.astype("float32"))


def peft_twin(path, rank=3, alpha=5, target_modules=None, **options):
    """The twin with a PEFT adapter on `target_modules` (default: every
    Linear/Conv1D but the head); A and B random."""
    model = hf_model(path)
    names = target_modules or {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))
        and n != "lm_head"
    }
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(names),
        init_lora_weights=False,  # random A and B: a wrong load shows
        **options,
    )
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_correspondence_names_the_twins_modules(arch, twin_dir):
    path = twin_dir(arch)
    task = keras_task(path)
    hf = hf_model(path)
    correspondence = hub_correspondence(task)
    assert correspondence.hf_class == type(hf).__name__  # the task's twin
    base_class = type(hf.base_model).__name__
    on_base = hub_correspondence(task, hf_class=base_class)
    head_modules = dict(hf.named_modules())
    base_modules = dict(hf.base_model.named_modules())
    assert correspondence.base_prefix == type(hf).base_model_prefix
    maps = correspondence.maps()
    # The embedding plus q, k, v, o and the FFN projections of each layer
    # (three; GPT2 has two, and its q, k, v all come from c_attn).
    assert len(maps) == 1 + (6 if arch == "gpt2" else 7) * 2
    for kernel_map in maps:
        module = head_modules[correspondence.module(kernel_map)]
        assert base_modules[on_base.module(kernel_map)] is module
        if kernel_map.kind == "Embedding":
            assert isinstance(module, torch.nn.Embedding)
            continue
        weight = tuple(module.weight.shape)
        if kernel_map.fan_in_fan_out:
            assert isinstance(module, transformers.pytorch_utils.Conv1D)
            weight = weight[::-1]
        else:
            assert isinstance(module, torch.nn.Linear)
        assert weight == (kernel_map.out_features, kernel_map.in_features)


def test_no_correspondence_without_kerashub_backbone():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert hub_correspondence(model) is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keras_adapter_loads_into_peft(arch, twin_dir, tmp_path):
    path = twin_dir(arch)
    task = keras_task(path)
    before = keras_logits(task)
    kl.apply_lora(task, targets=projections, rank=4, alpha=8, in_place=True)
    randomize(task)
    expected = keras_logits(task)
    assert np.abs(expected - before).max() > MIN_CHANGE
    kl.save_adapter(task, tmp_path / "adapter", format="peft")
    hf = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter")
    got = hf_logits(hf.eval()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peft_adapter_loads_into_keras(arch, twin_dir, tmp_path):
    path = twin_dir(arch)
    twin = peft_twin(path)
    expected = hf_logits(twin).numpy()
    twin.save_pretrained(tmp_path / "adapter")
    task = keras_task(path)
    before = keras_logits(task)
    assert np.abs(expected - before).max() > MIN_CHANGE
    kl.apply_lora(task, targets=projections, rank=3, in_place=True)
    assert kl.load_adapter(task, tmp_path / "adapter") is task
    np.testing.assert_allclose(keras_logits(task), expected, atol=TOLERANCE, rtol=0)


def test_gpt2_fused_c_attn_with_ranks_per_projection(twin_dir, tmp_path):
    path = twin_dir("gpt2")
    task = keras_task(path)
    qkv = ["query", "key", "value"]
    kl.apply_lora(task, targets=qkv, rank=2, alpha=4, in_place=True)
    switch_adapter(task, ["key"], "k", rank=3, alpha=6)
    switch_adapter(task, ["value"], "v", rank=4, alpha=1)
    randomize(task, seed=1)
    expected = keras_logits(task)
    with pytest.warns(UserWarning, match="active adapter only"):
        kl.save_adapter(task, tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    c_attn = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert sorted(config["target_modules"]) == c_attn
    # One module of rank 2 + 3 + 4, its scale 1 (each part's is folded in B).
    assert config["r"] == 9 and config["lora_alpha"] == 9
    assert config["fan_in_fan_out"] is True
    hf = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter")
    got = hf_logits(hf.eval()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_gpt2_c_attn_from_peft_shares_a_and_reads_patterns(twin_dir, tmp_path):
    path = twin_dir("gpt2")
    twin = peft_twin(
        path,
        rank=2,
        alpha=4,
        rank_pattern={"c_attn": 5},
        alpha_pattern={"h.1.attn.c_attn": 3},
    )
    expected = hf_logits(twin).numpy()
    twin.save_pretrained(tmp_path / "adapter")
    task = keras_task(path)
    kl.apply_lora(task, targets=projections, rank=2, in_place=True)
    switch_adapter(task, ["query", "key", "value"], "c_attn", rank=5)
    kl.load_adapter(task, tmp_path / "adapter")
    np.testing.assert_allclose(keras_logits(task), expected, atol=TOLERANCE, rtol=0)

    def lora(path):
        (layer,) = [lay for p, lay in iter_layers(task) if p.endswith(path)]
        return layer

    attention = "transformer_layer_1/self_attention"
    a = [numpy(lora(f"{attention}/{n}").lora_a) for n in ("query", "key", "value")]
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[0], a[2])
    assert lora(f"{attention}/query").alpha == 3
    assert lora("transformer_layer_0/self_attention/key").alpha == 4


def test_backbone_adapter_targets_the_causal_lm_or_hf_class(twin_dir, tmp_path):
    path = twin_dir("llama")
    backbone = keras_hub.models.Backbone.from_preset(str(path))
    kl.apply_lora(backbone, targets=projections, rank=4, in_place=True)
    randomize(backbone)
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
    hidden = keras.ops.convert_to_numpy(backbone(inputs))
    logits = keras_logits(keras_hub.models.Llama3CausalLM(backbone, preprocessor=None))

    def config(name):
        return json.loads((tmp_path / name / "adapter_config.json").read_text())

    # A causal-LM backbone's file is for the causal LM by default, as PEFT
    # records it: keys `base_model.model.model.layers...`.
    kl.save_adapter(backbone, tmp_path / "lm", format="peft")
    assert config("lm")["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    assert "model.layers.0.self_attn.q_proj" in config("lm")["target_modules"]
    base = hf_logits(hf_model(path)).numpy()
    hf = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "lm")
    got = hf_logits(hf.eval()).numpy()
    assert np.abs(got - base).max() > MIN_CHANGE  # the adapter has its effect
    np.testing.assert_allclose(got, logits, atol=TOLERANCE, rtol=0)

    kl.save_adapter(backbone, tmp_path / "base", format="peft", hf_class="LlamaModel")
    assert config("base")["auto_mapping"]["base_model_class"] == "LlamaModel"
    assert "layers.0.self_attn.q_proj" in config("base")["target_modules"]
    base = hf_logits(hf_model(path, base=True)).numpy()
    hf = peft.PeftModel.from_pretrained(hf_model(path, base=True), tmp_path / "base")
    got = hf_logits(hf.eval()).numpy()
    assert np.abs(got - base).max() > MIN_CHANGE
    np.testing.assert_allclose(got, hidden, atol=TOLERANCE, rtol=0)

    # Either file loads back into the backbone, to the same outputs.
    for name in ("lm", "base"):
        fresh = keras_hub.models.Backbone.from_preset(str(path))
        kl.apply_lora(fresh, targets=projections, rank=4, in_place=True)
        kl.load_adapter(fresh, tmp_path / name)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(fresh(inputs)), hidden, atol=1e-6, rtol=0
        )


def test_unknown_hf_class_names_the_accepted_ones(twin_dir, tmp_path):
    backbone = keras_hub.models.Backbone.from_preset(str(twin_dir("llama")))
    kl.apply_lora(backbone, targets=["query"], rank=2, in_place=True)
    pattern = r"(?s)`hf_class`.*'LlamaModel'.*'LlamaForCausalLM'.*hf_class='BertModel'"
    with pytest.raises(ValueError, match=pattern):
        kl.save_adapter(backbone, tmp_path / "a", format="peft", hf_class="BertModel")
    with pytest.raises(TypeError, match="hf_class"):
        kl.save_adapter(backbone, tmp_path / "a", format="peft", hf_class=3)
    with pytest.raises(ValueError, match="format='peft' only"):
        kl.save_adapter(backbone, tmp_path / "a.safetensors", hf_class="LlamaModel")
    assert not list(tmp_path.iterdir())


def vit_twin(tmp_path):
    """A tiny random `ViTForImageClassification`, saved. KerasHub's ViT
    normalizes with epsilon 1e-6, whatever the config says; so does this."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
        layer_norm_eps=1e-6,
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")


def vit_hf_logits(model):
    with torch.no_grad():
        pixels = torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())
        return model(pixels).logits.numpy()


def test_vit_adapter_both_ways(tmp_path):
    path = vit_twin(tmp_path)

    def hf_vit():
        cls = transformers.ViTForImageClassification
        return cls.from_pretrained(path, dtype=torch.float32).eval()

    def keras_vit():
        return keras_hub.models.ViTImageClassifier.from_preset(str(path))

    base = vit_hf_logits(hf_vit())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras_vit()(IMAGES)), base, atol=TOLERANCE, rtol=0
    )
    # Keras -> PEFT: the names of the installed transformers' ViT.
    task = keras_vit()
    kl.apply_lora(task, targets=projections, rank=4, alpha=8, in_place=True)
    randomize(task)
    expected = keras.ops.convert_to_numpy(task(IMAGES))
    kl.save_adapter(task, tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    hf = hf_vit()
    modules = {name for name, _ in hf.named_modules()}
    assert set(config["target_modules"]) <= modules
    assert config["auto_mapping"]["base_model_class"] == "ViTForImageClassification"
    got = vit_hf_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "out").eval())
    assert np.abs(got - base).max() > MIN_CHANGE
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)

    # PEFT -> Keras: attention and MLP projections of every block, and the
    # classifier (KerasHub's converter ports the head too).
    twin = peft.get_peft_model(
        hf_vit(),
        peft.LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
            + ["classifier"],
            init_lora_weights=False,
        ),
    ).eval()
    expected = vit_hf_logits(twin)
    assert np.abs(expected - base).max() > MIN_CHANGE
    twin.save_pretrained(tmp_path / "in")
    task = keras_vit()
    kl.apply_lora(task, targets=projections, rank=3, alpha=5, in_place=True)
    kl.load_adapter(task, tmp_path / "in")
    got = keras.ops.convert_to_numpy(task(IMAGES))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_unmapped_peft_modules_are_listed(twin_dir, tmp_path):
    twin = peft_twin(twin_dir("gpt2"))
    twin.save_pretrained(tmp_path / "adapter")
    task = keras_task(twin_dir("llama"))
    kl.apply_lora(task, targets=projections, rank=3, in_place=True)
    before = [numpy(v) for v in task.weights]
    with pytest.raises(
        ValueError, match=r"(?s)name_map.*'transformer\.h\.0\.attn\.c_attn'"
    ):
        kl.load_adapter(task, tmp_path / "adapter")
    for value, variable in zip(before, task.weights, strict=True):
        np.testing.assert_array_equal(value, numpy(variable))


def test_tied_embedding_is_refused(twin_dir, tmp_path):
    task = keras_task(twin_dir("gemma"))
    kl.apply_lora(task, targets=["token_embedding"], rank=2, in_place=True)
    with pytest.raises(ValueError, match="tied"):
        kl.save_adapter(task, tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "module",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.mlp.up_proj",
        "h.1.attn.c_attn",
    ],
)
def test_pattern_rule_is_peft_s(module):
    from peft.utils.other import get_pattern_key

    pattern = {"q_proj": 1, r"layers\.1\.mlp\.up_proj": 2, "h.1.attn.c_attn": 3}
    expected = pattern.get(get_pattern_key(list(pattern), module), 0)
    assert pattern_value(pattern, module, 0) == expected


def test_untied_embedding_adapter_both_ways(twin_dir, tmp_path):
    path = twin_dir("llama")  # untied: lm_head is its own weight
    task = keras_task(path)
    kl.apply_lora(task, targets=["token_embedding", "query"], rank=2, in_place=True)
    randomize(task)
    expected = keras_logits(task)
    kl.save_adapter(task, tmp_path / "out", format="peft")
    hf = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "out")
    np.testing.assert_allclose(
        hf_logits(hf.eval()).numpy(), expected, atol=TOLERANCE, rtol=0
    )
    twin = peft_twin(path, target_modules=["embed_tokens", "v_proj"])
    expected = hf_logits(twin).numpy()
    # PEFT would also save the whole base embedding (`base_layer.weight`).
    twin.save_pretrained(tmp_path / "in", save_embedding_layers=False)
    task = keras_task(path)
    kl.apply_lora(task, targets=["token_embedding", "value"], rank=3, in_place=True)
    kl.load_adapter(task, tmp_path / "in")
    np.testing.assert_allclose(keras_logits(task), expected, atol=TOLERANCE, rtol=0)


def test_layer_outside_the_converter_is_named_in_the_error(twin_dir, tmp_path):
    backbone = keras_hub.models.Backbone.from_preset(str(twin_dir("gpt2")))
    inputs = {
        "token_ids": keras.Input((None,), dtype="int32"),
        "padding_mask": keras.Input((None,), dtype="int32"),
    }
    head = keras.layers.Dense(3, name="head")(backbone(inputs))
    model = keras.Model(inputs, head)
    kl.apply_lora(model, targets=["head", "query"], rank=2, in_place=True)
    with pytest.raises(ValueError, match=r"(?s)\['head'\].*name_map"):
        kl.save_adapter(model, tmp_path / "adapter", format="peft")
    assert not (tmp_path / "adapter").exists()


def test_architecture_without_converter_lists_modules(tmp_path):
    # KerasHub has no `transformers` converter for OPT: no correspondence.
    config = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    twin = peft.get_peft_model(
        transformers.OPTForCausalLM(config),
        peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    twin.save_pretrained(tmp_path / "adapter")
    backbone = keras_hub.models.OPTBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )
    assert hub_correspondence(backbone) is None
    kl.apply_lora(backbone, targets=["query"], rank=2, in_place=True)
    with pytest.raises(
        ValueError,
        match=r"(?s)'model\.decoder\.layers\.0\.self_attn\.q_proj'.*name_map",
    ):
        kl.load_adapter(backbone, tmp_path / "adapter")


def test_llama_backbone_class_maps_through_the_llama3_converter(twin_dir, tmp_path):
    # KerasHub converts `model_type: llama` to Llama3Backbone only; a
    # LlamaBackbone (Llama 2) with the same weights maps the same way.
    path = twin_dir("llama")
    llama3 = keras_hub.models.Backbone.from_preset(str(path))
    fields = (
        "vocabulary_size",
        "num_layers",
        "num_query_heads",
        "hidden_dim",
        "intermediate_dim",
        "num_key_value_heads",
        "rope_max_wavelength",
        "layer_norm_epsilon",
        "tie_word_embeddings",
    )
    config = {k: v for k, v in llama3.get_config().items() if k in fields}
    backbone = keras_hub.models.LlamaBackbone(**config)
    backbone.set_weights(llama3.get_weights())
    task = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    kl.apply_lora(task, targets=projections, rank=4, in_place=True)
    randomize(task)
    expected = keras_logits(task)
    kl.save_adapter(task, tmp_path / "adapter", format="peft")
    hf = peft.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter")
    got = hf_logits(hf.eval()).numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_bert_backbone_both_ways(tmp_path):
    # KerasHub's BERT uses the tanh approximation of GELU; so does this twin.
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_act="gelu_pytorch_tanh",
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    inputs = {
        "token_ids": TOKENS,
        "segment_ids": np.zeros_like(TOKENS),
        "padding_mask": np.ones_like(TOKENS),
    }

    def keras_output(model):
        return keras.ops.convert_to_numpy(model(inputs)["sequence_output"])

    def encoder(layer):
        return projections(layer) and layer.name != "pooled_dense"

    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "bert"))
    kl.apply_lora(backbone, targets=encoder, rank=4, in_place=True)
    randomize(backbone)
    expected = keras_output(backbone)
    kl.save_adapter(backbone, tmp_path / "out", format="peft")
    twin = hf_model(tmp_path / "bert", base=True)
    got = hf_logits(peft.PeftModel.from_pretrained(twin, tmp_path / "out").eval())
    np.testing.assert_allclose(got.numpy(), expected, atol=TOLERANCE, rtol=0)

    twin = peft.get_peft_model(
        hf_model(tmp_path / "bert", base=True),
        peft.LoraConfig(
            r=3,
            target_modules=r".*encoder.*\.(query|value|dense)",
            init_lora_weights=False,
        ),
    ).eval()
    expected = hf_logits(twin).numpy()
    twin.save_pretrained(tmp_path / "in")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "bert"))
    names = ["query", "value", "attention_output"]
    names += ["feedforward_intermediate_dense", "feedforward_output_dense"]
    kl.apply_lora(backbone, targets=names, rank=3, in_place=True)
    kl.load_adapter(backbone, tmp_path / "in")
    np.testing.assert_allclose(keras_output(backbone), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "hook, fan_in_fan_out",
    [
        (None, True),  # stored as is: (in, out)
        (lambda w, shape: np.transpose(w), False),  # torch Linear: (out, in)
        (lambda w, shape: np.transpose(w.astype(np.float16)), False),  # a cast
    ],
)
def test_hook_that_moves_entries_is_read(hook, fan_in_fan_out):
    from keras_lora.io.hub_mapping import _analyse

    found = _analyse("w.weight", hook, 6 * 5, (6, 5), (0,), (1,), "Linear")
    assert found.fan_in_fan_out is fan_in_fan_out
    np.testing.assert_array_equal(found.in_index, np.arange(6))
    np.testing.assert_array_equal(found.out_index, np.arange(5))


SHUFFLE = np.random.default_rng(0).permutation(30)


@pytest.mark.parametrize(
    "hook",
    [
        lambda w, shape: np.transpose(w) * 2,  # computes
        # shuffles entries across inputs and outputs
        lambda w, shape: np.reshape(w.reshape(-1)[SHUFFLE], shape),
        lambda w, shape: np.transpose(w)[::-1] + np.transpose(w),  # computes
    ],
)
def test_hook_that_computes_or_mixes_is_not_read(hook):
    from keras_lora.io.hub_mapping import _analyse

    assert _analyse("w.weight", hook, 6 * 5, (6, 5), (0,), (1,), "Linear") is None


def test_rank_and_alpha_patterns_with_name_map(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["0", "2"],
        rank_pattern={"2": 4},
        alpha_pattern={"0": 3},
        init_lora_weights=False,
    )
    twin = peft.get_peft_model(net, config).eval()
    x = np.random.default_rng(0).standard_normal((2, 6)).astype("float32")
    with torch.no_grad():
        expected = twin(torch.tensor(x)).numpy()
    twin.save_pretrained(tmp_path / "adapter")
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc2")(hidden))
    for name, index in (("fc1", 0), ("fc2", 2)):
        layer = net[index].base_layer
        model.get_layer(name).set_weights(
            [layer.weight.detach().numpy().T, layer.bias.detach().numpy()]
        )
    lora = kl.apply_lora(model, targets=["fc1", "fc2"], rank=2)
    switch_adapter(lora, ["fc2"], "four", rank=4)
    kl.load_adapter(lora, tmp_path / "adapter", name_map={"0": "fc1", "2": "fc2"})
    got = keras.ops.convert_to_numpy(lora(x))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
