"""LoRA on the experts of tiny KerasHub MoE causal LMs, built offline.

`targets=["experts"]` selects every block's experts layer by name; the
router (a `Dense`) stays frozen. Checked: logits equal at init, one
training step moves the adapters only (base 3-D weights bitwise), the
merge into the 3-D weights, the `.keras` round trip (task class kept) and
the keras_lora adapter file; the PEFT format is refused with the reason.

Tolerance of the merge: the merged model computes `x·(W_e + s·A_e·B_e)`
where the LoRA model computes `x·W_e + s·(x·A_e)·B_e`; the float32 sums
differ in order only, so the logits (of order 1) agree to about 1e-6 and
1e-5 is asserted, while the trained adapters move them by more than 1e-3.
"""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers import LoRAMoeExperts
from keras_lora.model.walk import iter_layers

VOCAB, SEQ = 64, 8
_COMMON = {
    "vocabulary_size": VOCAB,
    "num_layers": 1,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 16,
}
# family -> (task class, backbone class, arguments); 4 experts, top 2.
FAMILIES = {
    "mixtral": (
        "MixtralCausalLM",
        "MixtralBackbone",
        {"intermediate_dim": 32, "num_experts": 4, "top_k": 2},
    ),
    "qwen_moe": (
        "QwenMoeCausalLM",
        "QwenMoeBackbone",
        {
            "intermediate_dim": 32,
            "moe_intermediate_dim": 24,
            "shared_expert_intermediate_dim": 32,
            "num_experts": 4,
            "top_k": 2,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeCausalLM",
        "Qwen3MoeBackbone",
        {
            "intermediate_dim": 32,
            "moe_intermediate_dim": 24,
            "num_experts": 4,
            "top_k": 2,
            "head_dim": 8,
        },
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeCausalLM",
        "Qwen3_5MoeBackbone",
        {
            "head_dim": 8,
            "moe_intermediate_dim": 24,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "top_k": 2,
            "layer_types": ["full_attention"],
        },
    ),
    "gpt_oss": (
        "GptOssCausalLM",
        "GptOssBackbone",
        {"intermediate_dim": 32, "num_experts": 4, "top_k": 2, "head_dim": 8},
    ),
}


def causal_lm(family, seed=0):
    task, backbone, kwargs = FAMILIES[family]
    keras.backend.clear_session()  # the same layer names (paths) every time
    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, backbone)(**_COMMON, **kwargs)
    return getattr(keras_hub.models, task)(backbone=backbone, preprocessor=None)


def inputs(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, VOCAB, size=(batch, SEQ)).astype("int32"),
        "padding_mask": np.ones((batch, SEQ), "int32"),
    }


def experts_layers(model):
    found = iter_layers(model)
    return [(p, lay) for p, lay in found if isinstance(lay, LoRAMoeExperts)]


def logits(model, x):
    # A call, not `predict`: on JAX, `predict` of a merged task deletes the
    # LoRA task's token embedding array (seen with attention-only LoRA too).
    return to_numpy(model(x))


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in experts_layers(model):
        layer.lora_b.assign(rng.normal(0, 0.2, layer.lora_b.shape).astype("float32"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_at_init_merge_and_keras_file(family, tmp_path):
    task = causal_lm(family)
    x = inputs()
    before = logits(task, x)
    kl.apply_lora(task, targets=["experts"], rank=2, in_place=True)
    assert type(task).__name__ == FAMILIES[family][0]
    found = experts_layers(task)
    assert [p.rsplit("/", 1)[-1] for p, _ in found] == ["experts"]
    # The adapters alone train: one A and one B per experts layer.
    assert sorted(w.name for w in task.trainable_weights) == ["lora_a", "lora_b"]
    np.testing.assert_array_equal(logits(task, x), before)

    randomize(task)
    out = logits(task, x)
    assert np.abs(out - before).max() > 1e-3
    merged = kl.merge_lora(task)
    assert type(merged) is type(task)
    assert not any(isinstance(lay, LoRAMoeExperts) for _, lay in iter_layers(merged))
    np.testing.assert_allclose(logits(merged, x), out, rtol=1e-5, atol=1e-5)

    task.save(tmp_path / "task.keras")
    reloaded = keras.saving.load_model(tmp_path / "task.keras")
    assert type(reloaded) is type(task)
    assert len(experts_layers(reloaded)) == 1
    np.testing.assert_array_equal(logits(reloaded, x), out)


def test_mixtral_training_step_moves_only_the_adapters():
    task = causal_lm("mixtral")
    kl.apply_lora(task, targets=["experts"], rank=2, in_place=True)
    ((_, lora),) = experts_layers(task)
    router = task.backbone.get_layer("transformer_layer_0")
    base = [to_numpy(w).copy() for w in lora.layer.weights]
    frozen = {w.path: to_numpy(w).copy() for w in task.weights if "lora_" not in w.path}
    assert router is not None and frozen
    x = inputs(batch=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    task.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss)
    history = task.fit(
        x, x["token_ids"], sample_weight=x["padding_mask"], epochs=3, verbose=0
    )
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert np.abs(to_numpy(lora.lora_b)).max() > 0
    for w, value in zip(lora.layer.weights, base, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)
    # Every other weight (the router included) is bitwise what it was.
    for w in task.weights:
        if "lora_" not in w.path:
            np.testing.assert_array_equal(to_numpy(w), frozen[w.path], err_msg=w.path)


def test_adapter_file_round_trip_and_peft_refusal(tmp_path):
    task = causal_lm("mixtral")
    x = inputs()
    kl.apply_lora(task, targets=["experts"], rank=2, in_place=True)
    randomize(task)
    out = logits(task, x)
    kl.save_adapter(task, tmp_path / "adapter.safetensors")

    fresh = causal_lm("mixtral")  # the same base weights (same seed)
    kl.load_adapter(fresh, tmp_path / "adapter.safetensors", in_place=True)
    assert len(experts_layers(fresh)) == 1
    np.testing.assert_array_equal(logits(fresh, x), out)

    # Named by `name_map`: without it, KerasHub's Mixtral converter (which
    # stacks per-expert tensors) fails keras_lora's correspondence first,
    # for attention-only LoRA too.
    with pytest.raises(ValueError, match="MixtralMoeExperts.*no PEFT"):
        kl.save_adapter(
            task, tmp_path / "peft", format="peft", name_map={"experts": "m.experts"}
        )
    assert not (tmp_path / "peft").exists()


def test_attention_and_experts_together():
    task = causal_lm("mixtral")
    x = inputs()
    before = logits(task, x)
    kl.apply_lora(task, targets=["query", "value", "experts"], rank=2, in_place=True)
    types = sorted({type(lay).__name__ for _, lay in kl.model.walk.lora_layers(task)})
    assert types == ["LoRAEinsumDense", "LoRAMoeExperts"]
    np.testing.assert_array_equal(logits(task, x), before)


def test_reversible_merge_hotswap_and_named_adapters(tmp_path):
    task = causal_lm("qwen3_moe")
    x = inputs()
    kl.apply_lora(task, targets=["experts"], rank=2, in_place=True)
    randomize(task)
    out = logits(task, x)
    ((_, lora),) = experts_layers(task)
    kernels = [to_numpy(w).copy() for w in lora.layer.weights]

    kl.merge_lora(task, reversible=True)  # the merged weights alone
    np.testing.assert_allclose(logits(task, x), out, rtol=1e-5, atol=1e-5)
    kl.unmerge_lora(task)
    np.testing.assert_array_equal(logits(task, x), out)
    for w, value in zip(lora.layer.weights, kernels, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)

    # "cat" of the default adapter and a fresh one (B = 0) is the default.
    kl.add_adapter(task, "zero", rank=3)
    kl.combine_adapters(task, {"default": 1.0, "zero": 1.0}, "both")
    kl.set_adapter(task, "both")
    np.testing.assert_allclose(logits(task, x), out, rtol=1e-5, atol=1e-5)
    kl.set_adapter(task, "default")

    # A hot-swap into a prepared model (another base copy, same seed).
    kl.save_adapter(task, tmp_path / "a.safetensors", adapter="default")
    served = causal_lm("qwen3_moe")
    kl.apply_lora(served, targets=["experts"], rank=1, in_place=True)
    kl.prepare_hotswap(served, max_rank=4)
    kl.hotswap_adapter(served, tmp_path / "a.safetensors")
    np.testing.assert_allclose(logits(served, x), out, rtol=1e-5, atol=1e-5)

    # LoRA+ counts the experts' lora_b as a B factor.
    optimizer = kl.loraplus_optimizer(keras.optimizers.SGD(0.1), ratio=16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    task.compile(optimizer=optimizer, loss=loss)
    b_before = to_numpy(lora.lora_b).copy()
    a_before = to_numpy(lora.lora_a).copy()
    task.fit(x, x["token_ids"], epochs=1, verbose=0)
    assert np.abs(to_numpy(lora.lora_b) - b_before).max() > 0
    assert np.abs(to_numpy(lora.lora_a) - a_before).max() > 0


def test_bfloat16_model():
    """A bfloat16 model: exact at init (the adapters, float32, are read in
    bfloat16 and B = 0); merged logits within bfloat16 rounding of the LoRA
    logits (spacing 2^-7 near 1: 1e-3 was measured, 2e-2 asserted)."""
    task, backbone, kwargs = FAMILIES["mixtral"]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    backbone = getattr(keras_hub.models, backbone)(
        **_COMMON, **kwargs, dtype="bfloat16"
    )
    model = getattr(keras_hub.models, task)(backbone=backbone, preprocessor=None)
    x = inputs()
    before = logits(model, x)
    kl.apply_lora(model, targets=["experts"], rank=2, in_place=True)
    ((_, lora),) = experts_layers(model)
    assert lora.lora_a.dtype == "float32" and lora.layer.weights[0].dtype == "bfloat16"
    np.testing.assert_array_equal(logits(model, x), before)
    randomize(model)
    out = logits(model, x).astype("float32")
    merged = logits(kl.merge_lora(model), x).astype("float32")
    assert np.abs(out - before.astype("float32")).max() > 1e-2
    np.testing.assert_allclose(merged, out, atol=2e-2)


def test_cli_inspect_counts_expert_adapters_exactly(tmp_path, capsys):
    # `keras-lora inspect` on a KerasHub backbone file: the expert rows'
    # predicted adapter sizes are E·r·(Σ in + Σ out), as trained.
    from keras_lora_cli import main

    task = causal_lm("gpt_oss")
    task.backbone.save(tmp_path / "backbone.keras")
    argv = ["inspect", str(tmp_path / "backbone.keras"), "--targets", "experts"]
    assert main([*argv, "--rank", "2"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.endswith("yes")]
    # GPT-OSS experts: gate_up (4, 16, 64) and down (4, 32, 16); rank 2.
    assert "GptOssExperts" in row and "1,024" in row
    assert "trainable params: 1,024" in out
