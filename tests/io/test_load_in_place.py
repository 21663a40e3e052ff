"""`load_adapter(model, path, in_place=True)`: a plain KerasHub task or
backbone converted and loaded in one call, like PEFT's
`PeftModel.from_pretrained(base, path)` (issue 21, item 6); on any failure
the model is exactly as before."""

import keras
import numpy as np
import pytest
import tiny_kerashub
from test_hf_peft_kerashub import (
    TOLERANCE,
    hf_logits,
    keras_logits,
    keras_task,
    peft_twin,
    twin_dir,  # noqa: F401  (a fixture)
)

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers
from keras_lora_cli import main

keras_hub = pytest.importorskip("keras_hub")

TOKENS = {
    "token_ids": np.array([[1, 5, 9, 3, 7, 2, 11, 4]], "int32"),
    "padding_mask": np.ones((1, 8), "int32"),
}


def logits(model):
    return np.array(keras.ops.convert_to_numpy(model(TOKENS)))


def gpt2_task(num_heads=2, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=num_heads,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=32,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


@pytest.fixture
def trained(tmp_path):
    """A GPT2 task with random query/value adapters, its logits and file."""
    task = gpt2_task()
    kl.apply_lora(task, targets=["query", "value"], rank=2, alpha=4, in_place=True)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(task):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    path = tmp_path / "task.safetensors"
    kl.save_adapter(task, path)
    return task, logits(task), path


def snapshot(model):
    """Everything a failed load must leave as it was."""
    return {
        "layers": [(p, id(layer), type(layer)) for p, layer in iter_layers(model)],
        "trainable": [(p, layer.trainable) for p, layer in iter_layers(model)],
        "variables": [
            (v.path, v.trainable, np.array(keras.ops.convert_to_numpy(v)))
            for v in model.variables
        ],
        "attributes": sorted(vars(model)),
        "optimizer": id(model.optimizer),
        "config": model.get_config(),
        "logits": logits(model),
    }


def assert_same(before, after):
    for key in ("layers", "trainable", "attributes", "optimizer", "config"):
        assert before[key] == after[key], key
    assert len(before["variables"]) == len(after["variables"])
    for (p, t, v), (q, u, w) in zip(
        before["variables"], after["variables"], strict=True
    ):
        assert (p, t) == (q, u)
        np.testing.assert_array_equal(v, w)
    np.testing.assert_array_equal(before["logits"], after["logits"])


def test_one_call_converts_the_task_and_loads(trained):
    task, expected, path = trained
    fresh = gpt2_task()
    assert not np.allclose(logits(fresh), expected, atol=1e-3)  # adapters matter
    assert kl.load_adapter(fresh, path, in_place=True) is fresh
    assert type(fresh) is keras_hub.models.GPT2CausalLM
    names = [p.rsplit("/", 1)[-1] for p, _ in lora_layers(fresh)]
    assert names == ["query", "value"] * 2  # exactly the layers of the file
    np.testing.assert_allclose(logits(fresh), expected, atol=1e-5)  # float32 sums
    assert [w.path for w in fresh.trainable_weights] == [
        w.path for w in task.trainable_weights
    ]


def test_generate_after_the_one_call(tmp_path):
    task = tiny_kerashub.gpt2_causal_lm()
    kl.apply_lora(task, targets=["query", "value"], rank=2, in_place=True)
    for _, layer in lora_layers(task):
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.5, "float32"))
    task.compile(sampler="greedy")
    want = task.generate(["the cat"], max_length=8)
    fresh = tiny_kerashub.gpt2_causal_lm()
    fresh.compile(sampler="greedy")
    kl.save_adapter(task, tmp_path / "a.safetensors")
    kl.load_adapter(fresh, tmp_path / "a.safetensors", in_place=True)
    assert fresh.generate(["the cat"], max_length=8) == want


def test_default_refuses_a_task_and_says_in_place(trained):
    _, _, path = trained
    fresh = gpt2_task()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"in_place=True"):
        kl.load_adapter(fresh, path)
    assert_same(before, snapshot(fresh))


def test_shape_mismatch_undoes_the_conversion(trained):
    _, _, path = trained
    other = gpt2_task(num_heads=4)  # query kernels (16, 4, 4), not (16, 2, 8)
    other.compile(optimizer="adam", loss="mse")
    before = snapshot(other)
    with pytest.raises(ValueError, match="Shape mismatch"):
        kl.load_adapter(other, path, in_place=True)
    assert_same(before, snapshot(other))
    assert not lora_layers(other)
    # Nothing is left behind that breaks the next conversion.
    kl.apply_lora(other, targets=["query"], rank=2, in_place=True)
    assert len(lora_layers(other)) == 2


def test_bad_file_leaves_the_task_alone(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64)
    task = gpt2_task()
    before = snapshot(task)
    with pytest.raises(ValueError):
        kl.load_adapter(task, path, in_place=True)
    assert_same(before, snapshot(task))


def test_in_place_must_be_a_bool(trained):
    _, _, path = trained
    with pytest.raises(TypeError, match="in_place"):
        kl.load_adapter(gpt2_task(), path, in_place="yes")


def test_plain_model_in_place_is_the_model_itself(tmp_path):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, name="fc")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    lora = kl.apply_lora(model, rank=2)
    lora_layers(lora)[0][1].lora_b.assign(np.ones((2, 8), "float32"))
    kl.save_adapter(lora, tmp_path / "a.safetensors")
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    assert kl.load_adapter(model, tmp_path / "a.safetensors", in_place=True) is model
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)),
        keras.ops.convert_to_numpy(lora(x)),
        atol=1e-6,
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_directory_in_one_call(arch, twin_dir, tmp_path):  # noqa: F811
    path = twin_dir(arch)
    twin = peft_twin(path)
    expected = hf_logits(twin).numpy()
    twin.save_pretrained(tmp_path / "adapter")
    task = keras_task(path)
    linear = {
        layer.name
        for _, layer in iter_layers(task)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    }
    assert kl.load_adapter(task, tmp_path / "adapter", in_place=True) is task
    names = {p.rsplit("/", 1)[-1] for p, _ in lora_layers(task)}
    assert names == linear  # the twin adapts every linear module but the head
    np.testing.assert_allclose(keras_logits(task), expected, atol=TOLERANCE, rtol=0)


def test_cli_apply_in_place(trained, tmp_path, capsys):
    _, expected, path = trained
    gpt2_task().save(tmp_path / "base.keras")
    argv = ["apply", tmp_path / "base.keras", path, tmp_path / "out.keras"]
    assert main([str(a) for a in argv]) == 3
    err = capsys.readouterr().err
    assert "--in-place" in err and len(err.strip().splitlines()) == 1
    assert main([str(a) for a in [*argv, "--in-place"]]) == 0
    out = keras.saving.load_model(tmp_path / "out.keras")
    assert type(out) is keras_hub.models.GPT2CausalLM
    np.testing.assert_allclose(logits(out), expected, atol=1e-5)


def test_ranks_per_layer_load_in_one_call(twin_dir, tmp_path):  # noqa: F811
    # Each layer gets its own record's rank and alpha (a copy: test_peft_interop).
    path = twin_dir("llama")
    twin = peft_twin(
        path,
        rank=3,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "down_proj": 5},
        alpha_pattern={"down_proj": 7},
    )
    expected = hf_logits(twin).numpy()
    twin.save_pretrained(tmp_path / "adapter")
    task = keras_task(path)
    kl.load_adapter(task, tmp_path / "adapter", in_place=True)
    ranks = {p.rsplit("/", 1)[-1]: layer.rank for p, layer in lora_layers(task)}
    assert ranks == {"query": 3, "value": 2, "feedforward_output_dense": 5}
    np.testing.assert_allclose(keras_logits(task), expected, atol=TOLERANCE, rtol=0)


def keras_model_of(path):
    """The twin as a plain Functional model (copyable), for the copy path."""
    task = keras_task(path)
    return keras.Model(task.inputs, task.outputs)
