"""The whole journey on a KerasHub task, converted in place.

A tiny `GPT2CausalLM` built offline (its tokenizer made in code): convert,
fit on raw strings, generate, `.keras` round trip (same class, adapters,
exact outputs, training that resumes), merge to a plain task of the same
class. Each test builds its own tiny model.
"""

import keras
import numpy as np
import pytest
import tiny_kerashub
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.layers import LoRALayer
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers

TARGETS = ["query", "value", "feedforward_intermediate_dense"]
PROMPT = ["the cat"]


def token_batch():
    ids = np.array([[5, 6, 7, 8, 1, 2, 3, 4], [9, 10, 11, 12, 13, 0, 0, 0]])
    mask = (ids > 0).astype("int32")
    mask[:, 0] = 1
    return {"token_ids": ids.astype("int32"), "padding_mask": mask}


def converted_lm():
    lm = tiny_kerashub.gpt2_causal_lm()
    lm.compile(sampler="greedy")  # the task's own compile, with its defaults
    kl.apply_lora(lm, targets=TARGETS, rank=2, in_place=True)
    return lm


def weights_by_id(model):
    return {id(w): to_numpy(w).copy() for w in model.weights}


def changed_paths(model, before):
    return sorted(
        w.path for w in model.weights if not np.array_equal(to_numpy(w), before[id(w)])
    )


def only_adapters(paths):
    return bool(paths) and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in paths)


def test_convert_keeps_the_task():
    lm = tiny_kerashub.gpt2_causal_lm()
    lm.compile(sampler="greedy")
    preprocessor, backbone = lm.preprocessor, lm.backbone
    x = token_batch()
    before = to_numpy(lm(x))
    generated = lm.generate(PROMPT, max_length=8)

    assert kl.apply_lora(lm, targets=TARGETS, rank=2, in_place=True) is lm

    assert type(lm) is keras_hub_class("GPT2CausalLM")
    assert lm.preprocessor is preprocessor and lm.backbone is backbone
    assert type(lm.sampler).__name__ == "GreedySampler"  # compile settings kept
    assert len(lora_layers(lm)) == 3 * 2  # two blocks
    np.testing.assert_array_equal(to_numpy(lm(x)), before)
    assert lm.generate(PROMPT, max_length=8) == generated


def keras_hub_sampler(name):
    import keras_hub

    return keras_hub.samplers.get(name)


def keras_hub_class(name):
    import keras_hub

    return getattr(keras_hub.models, name)


def test_fit_on_strings_trains_only_adapters_and_generate_follows():
    lm = converted_lm()
    before = weights_by_id(lm)
    history = lm.fit(tiny_kerashub.TEXT, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = changed_paths(lm, before)
    assert only_adapters(changed) and len(changed) == 2 * len(lora_layers(lm))
    out = lm.generate(PROMPT, max_length=8)
    assert isinstance(out, list) and out[0].startswith("the cat")


def test_compiled_and_trained_task_trains_its_adapters_after_conversion():
    lm = tiny_kerashub.gpt2_causal_lm()
    lm.compile(optimizer=keras.optimizers.SGD(0.1), sampler="greedy")
    lm.fit(tiny_kerashub.TEXT, batch_size=2, epochs=1, verbose=0)  # optimizer built
    kl.apply_lora(lm, targets=TARGETS, rank=2, in_place=True)
    assert isinstance(lm.optimizer, keras.optimizers.SGD)
    before = weights_by_id(lm)
    lm.fit(tiny_kerashub.TEXT, batch_size=2, epochs=1, verbose=0)
    assert only_adapters(changed_paths(lm, before))


def test_keras_round_trip_same_class_adapters_and_resumed_training(tmp_path):
    lm = randomize_adapters(converted_lm())
    lm.fit(tiny_kerashub.TEXT, batch_size=2, epochs=1, verbose=0)
    x = token_batch()
    out = to_numpy(lm(x))
    generated = lm.generate(PROMPT, max_length=8)
    lm.save(tmp_path / "lm.keras")

    loaded = keras.saving.load_model(tmp_path / "lm.keras")

    assert type(loaded) is type(lm)
    assert loaded.preprocessor is not None
    assert [p for p, _ in lora_layers(loaded)] == [p for p, _ in lora_layers(lm)]
    for (_, a), (_, b) in zip(lora_layers(loaded), lora_layers(lm), strict=True):
        assert type(a) is type(b) and a.get_config() == b.get_config()
    np.testing.assert_array_equal(to_numpy(loaded(x)), out)
    # KerasHub does not save the sampler; set it without re-compiling.
    loaded.sampler = keras_hub_sampler("greedy")
    assert loaded.generate(PROMPT, max_length=8) == generated
    trainable = sorted(w.path for w in loaded.trainable_weights)
    assert trainable == sorted(w.path for w in lm.trainable_weights)

    # The optimizer's state comes back too (KerasHub's own `compile` is not
    # re-run on load; keras_lora builds the task's optimizer before it loads).
    assert int(loaded.optimizer.iterations) == int(lm.optimizer.iterations) == 2
    for a, b in zip(loaded.optimizer.variables, lm.optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    before = weights_by_id(loaded)
    loaded.fit(tiny_kerashub.TEXT, batch_size=2, epochs=1, verbose=0)
    assert only_adapters(changed_paths(loaded, before))
    # Saved again after resuming, it loads again with its adapters.
    loaded.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    assert len(lora_layers(again)) == len(lora_layers(lm))
    np.testing.assert_array_equal(to_numpy(again(x)), to_numpy(loaded(x)))


def test_merge_gives_a_plain_task_of_the_same_class():
    lm = randomize_adapters(converted_lm())
    x = token_batch()
    out = to_numpy(lm(x))
    generated = lm.generate(PROMPT, max_length=8)

    merged = kl.merge_lora(lm)

    assert type(merged) is type(lm) and merged is not lm
    assert not any(
        type(layer).__module__.startswith("keras_lora")
        for _, layer in iter_layers(merged)
    )
    # W + s·A·B summed in another order: float32 rounding, far below the
    # adapters' effect on the logits.
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)
    merged.compile(sampler="greedy")
    assert merged.generate(PROMPT, max_length=8) == generated
    assert len(lora_layers(lm)) == 6  # the converted task is left as it was
    np.testing.assert_array_equal(to_numpy(lm(x)), out)


def test_default_copy_of_a_task_asks_for_in_place():
    lm = tiny_kerashub.gpt2_causal_lm()
    with pytest.raises(ValueError, match="in_place=True"):
        kl.apply_lora(lm, targets=TARGETS, rank=2)
    assert not any(isinstance(layer, LoRALayer) for _, layer in iter_layers(lm))


def test_bare_backbone_refuses_keras_save_without_writing_adapters(tmp_path):
    backbone = tiny_kerashub.backbone("gpt2")
    kl.apply_lora(backbone, targets=["query", "value"], rank=2, in_place=True)
    with pytest.raises(ValueError, match="converted to LoRA in place"):
        backbone.save(tmp_path / "b.keras")
    assert not (tmp_path / "b.keras").exists()  # no empty or partial file
    merged = kl.merge_lora(backbone)
    assert type(merged) is type(backbone) and not lora_layers(merged)
