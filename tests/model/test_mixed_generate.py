"""`mixed_adapter_model(task, names).generate(prompts, adapter_names=...)`:
a KerasHub causal LM generating with one adapter per row, in one compiled
loop (issue 21, item 9).

Row `i` must be what the task generates, on the same batch, with only
adapter `adapter_names[i]` active (adapters disabled for the base), with
the greedy sampler. The adapters are large enough that each one changes
the text (checked), so a row routed to the wrong adapter cannot pass.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_kerashub
from keras import ops

import keras_lora as kl
from keras_lora.layers import LoRALayer
from keras_lora.model.walk import iter_layers

PROMPTS = ["the cat", "a hat", "the end", "in a tin"]
NAMES = ["default", "a", "b"]
MAX_LENGTH = 8


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, layer in iter_layers(model):
        if isinstance(layer, LoRALayer):
            for name in layer.adapter_names:
                adapter = layer.get_adapter(name)
                for w in (adapter.a, adapter.b):
                    w.assign(rng.normal(0, 1.0, w.shape).astype(w.dtype))


@pytest.fixture(scope="module")
def task():
    task = tiny_kerashub.gpt2_causal_lm(sequence_length=MAX_LENGTH)
    kl.apply_lora(task, rank=2, in_place=True)  # query and value
    kl.add_adapter(task, "a", rank=3, alpha=6.0)
    kl.add_adapter(task, "b", rank=2, use_dora=True)
    randomize(task)
    task.compile(sampler="greedy")
    return task


def reference(task, adapter):
    """Every row generated with only `adapter` active (None: the base)."""
    active = kl.active_adapters(task)
    try:
        if adapter is None:
            with kl.disable_adapters(task):
                return task.generate(PROMPTS, max_length=MAX_LENGTH)
        kl.set_adapter(task, adapter)
        return task.generate(PROMPTS, max_length=MAX_LENGTH)
    finally:
        kl.set_adapter(task, active)


@pytest.mark.parametrize("strategy", ["auto", "concat", "gather", "grouped"])
def test_each_row_generates_with_its_own_adapter(task, monkeypatch, strategy):
    references = {name: reference(task, name) for name in [*NAMES, None]}
    # Every adapter changes what is generated: a wrong routing shows.
    texts = [tuple(references[name]) for name in references]
    assert len(set(texts)) == len(texts)

    traces = []
    own = keras_hub.models.GPT2CausalLM.generate_step

    def counted(self, *args, **kwargs):
        traces.append(1)
        return own(self, *args, **kwargs)

    monkeypatch.setattr(keras_hub.models.GPT2CausalLM, "generate_step", counted)
    served = kl.mixed_adapter_model(task, NAMES, strategy=strategy)
    for mix in (["a", None, "default", "b"], ["b", "b", "__base__", "a"]):
        got = served.generate(PROMPTS, adapter_names=mix, max_length=MAX_LENGTH)
        key = [None if name == "__base__" else name for name in mix]
        assert list(got) == [references[n][i] for i, n in enumerate(key)]
    if keras.backend.backend() in ("jax", "tensorflow"):
        # One compiled loop: traced once, the second mix reuses it.
        assert len(traces) == 1
    else:  # KerasHub's generate loop runs eagerly on torch
        assert len(traces) == 2
    # The task's own generate is untouched.
    assert "generate_step" not in vars(task)
    assert list(task.generate(PROMPTS, max_length=MAX_LENGTH)) == list(
        references["default"]
    )


def test_token_inputs_without_preprocessor(task):
    lm = keras_hub.models.GPT2CausalLM(task.backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    token_ids = np.array([[5, 6, 0, 0, 0, 0], [7, 8, 9, 0, 0, 0]], "int32")
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    served = kl.mixed_adapter_model(lm, NAMES)
    got = served.generate(inputs, adapter_names=["b", "a"], stop_token_ids=None)
    for row, name in enumerate(["b", "a"]):
        kl.set_adapter(lm, name)
        want = lm.generate(inputs, stop_token_ids=None)
        np.testing.assert_array_equal(
            ops.convert_to_numpy(got["token_ids"])[row],
            ops.convert_to_numpy(want["token_ids"])[row],
        )
    kl.set_adapter(lm, "default")


def test_llama3_rows():
    keras.utils.set_random_seed(0)
    lm = keras_hub.models.Llama3CausalLM(
        tiny_kerashub.backbone("llama3"), preprocessor=None
    )
    kl.apply_lora(lm, rank=2, in_place=True)
    kl.add_adapter(lm, "a", rank=4)
    randomize(lm, seed=1)
    lm.compile(sampler="greedy")
    token_ids = np.zeros((3, 8), "int32")
    token_ids[:, :3] = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    mask = token_ids > 0
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    mix = ["a", None, "default"]
    got = kl.mixed_adapter_model(lm, ["default", "a"]).generate(
        inputs, adapter_names=mix, stop_token_ids=None
    )
    rows = {}
    for name in ("default", "a", None):
        if name is None:
            with kl.disable_adapters(lm):
                rows[name] = lm.generate(inputs, stop_token_ids=None)["token_ids"]
        else:
            kl.set_adapter(lm, name)
            rows[name] = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    rows = {k: ops.convert_to_numpy(v) for k, v in rows.items()}
    assert not np.array_equal(rows["a"], rows["default"])
    assert not np.array_equal(rows["a"], rows[None])
    want = np.stack([rows[name][i] for i, name in enumerate(mix)])
    np.testing.assert_array_equal(ops.convert_to_numpy(got["token_ids"]), want)


def test_bad_adapter_names(task):
    served = kl.mixed_adapter_model(task, NAMES)
    own = task.generate_function
    with pytest.raises(ValueError, match="does not serve: \\['c'\\]"):
        served.generate(PROMPTS, adapter_names=["a", "c", "b", "a"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        served.generate(PROMPTS, adapter_names="a")
    with pytest.raises(ValueError, match="3 names, but the batch has 4 rows"):
        served.generate(PROMPTS, adapter_names=["a", "b", "a"])
    assert "generate_step" not in vars(task) and task.generate_function is own


def test_generate_needs_a_causal_lm():
    model = kl.apply_lora(tiny_kerashub.backbone("gpt2"), rank=2, in_place=True)
    served = kl.mixed_adapter_model(model, ["default"])
    with pytest.raises(TypeError, match="CausalLM"):
        served.generate(["the"], adapter_names=["default"])


def test_beam_search_is_refused(task):
    served = kl.mixed_adapter_model(task, NAMES)
    sampler = task.sampler
    task.compile(sampler="beam")
    try:
        with pytest.raises(ValueError, match="BeamSampler"):
            served.generate(PROMPTS, adapter_names=["a"] * 4)
    finally:
        task.compile(sampler=sampler)
