"""`apply_lora(..., in_place=True)` on plain Keras models, and its promise:
on any failure, nothing changes."""

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy
from test_nested_reach import (
    SEQ,
    SubclassedClassifier,
    token_data,
    transformer_classifier,
)

import keras_lora as kl
from keras_lora.model import in_place
from keras_lora.model.containers import LoRAContainer
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers


def snapshot(model):
    """Everything a failed conversion must leave as it was."""
    return {
        "layers": [(p, id(layer), type(layer)) for p, layer in iter_layers(model)],
        "graph": [id(op) for op in getattr(model, "_operations", [])],
        "weights": [to_numpy(w).copy() for w in model.weights],
        "variable_flags": [w.trainable for w in model.weights],
        "layer_flags": [layer.trainable for _, layer in iter_layers(model)],
        "config": model.get_config(),
    }


def assert_unchanged(model, before, x, out):
    after = snapshot(model)
    assert after["layers"] == before["layers"]
    assert after["graph"] == before["graph"]
    for old, new in zip(before["weights"], after["weights"], strict=True):
        np.testing.assert_array_equal(old, new)
    assert after["variable_flags"] == before["variable_flags"]
    assert after["layer_flags"] == before["layer_flags"]
    assert after["config"] == before["config"]
    np.testing.assert_array_equal(to_numpy(model(x)), out)


def test_functional_in_place_round_trip_and_merge(tmp_path):
    model = mlp()
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    assert kl.apply_lora(model, rank=2, in_place=True) is model
    assert type(model) is keras.src.models.Functional
    assert [p for p, _ in lora_layers(model)] == ["d1", "d2"]
    assert [type(op).__name__ for op in model.layers[1:]] == [
        "LoRADense",
        "LoRADense",
        "Dense",
    ]
    out = to_numpy(randomize_adapters(model)(x))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [p for p, _ in lora_layers(loaded)] == ["d1", "d2"]
    np.testing.assert_array_equal(to_numpy(loaded(x)), out)
    merged = kl.merge_lora(model)
    assert not lora_layers(merged)
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5)


def test_nested_block_in_place_is_held_by_a_container(tmp_path):
    model = transformer_classifier()
    block = model.get_layer("block_0")
    x, y = token_data(8)
    kl.apply_lora(model, targets=["query", "value", "ffn_1"], rank=2, in_place=True)
    holder = model.get_layer("block_0")
    assert isinstance(holder, LoRAContainer) and holder.layer is block
    assert isinstance(block.mha._query_dense, kl.LoRAEinsumDense)
    assert isinstance(block.ffn_1, kl.LoRADense)
    out = to_numpy(randomize_adapters(model)(x))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), out)
    assert [p for p, _ in lora_layers(loaded)] == [p for p, _ in lora_layers(model)]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = {id(w): to_numpy(w).copy() for w in model.weights}
    model.train_on_batch(x, np.zeros((8, 2), "float32"))
    changed = [
        w.path for w in model.weights if not np.array_equal(to_numpy(w), before[id(w)])
    ]
    assert changed and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in changed)


def test_sequential_in_place():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="a"),
            keras.layers.Dense(3, name="b"),
        ]
    )
    x = np.ones((2, 6), "float32")
    kl.apply_lora(model, targets=["a"], rank=2, in_place=True)
    assert isinstance(model.layers[0], kl.LoRADense)
    before = to_numpy(model(x))
    randomize_adapters(model)
    assert np.abs(to_numpy(model(x)) - before).max() > 1e-4  # in the call path
    assert type(keras.Sequential.from_config(model.get_config()).layers[0]) is type(
        model.layers[0]
    )


def test_subclassed_in_place_keeps_the_object_and_trainable_layers():
    model = SubclassedClassifier()
    x = np.random.default_rng(0).normal(size=(4, SEQ, 4)).astype("float32")
    before = to_numpy(model(x))
    head = model.head
    kl.apply_lora(
        model, targets=["dense_1", "query"], rank=2, trainable=["head"], in_place=True
    )
    assert isinstance(model.dense_1, kl.LoRADense) and model.head is head
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    trainable = sorted(w.path for w in model.trainable_weights)
    assert trainable == sorted(
        ["dense_1/lora_a", "dense_1/lora_b", "query/lora_a", "query/lora_b"]
        + [w.path for w in head.weights]
    )


def test_failure_restores_everything(monkeypatch):
    model = transformer_classifier()
    model.get_layer("embedding").trainable = False  # a flag that must survive
    x, _ = token_data(4)
    out = to_numpy(model(x))
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure after every swap")

    monkeypatch.setattr(in_place, "freeze_except", broken)
    with pytest.raises(RuntimeError, match="injected"):
        kl.apply_lora(model, targets=["query", "value", "head"], rank=2, in_place=True)
    assert_unchanged(model, before, x, out)
    assert not lora_layers(model)


def test_failure_midway_through_the_swaps_restores_everything(monkeypatch):
    model = transformer_classifier()
    x, _ = token_data(4)
    out = to_numpy(model(x))
    before = snapshot(model)
    real_swap, calls = in_place.swap, []

    def swap_then_fail(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at the third swap")
        return real_swap(*args)

    monkeypatch.setattr(in_place, "swap", swap_then_fail)
    with pytest.raises(RuntimeError, match="third swap"):
        kl.apply_lora(
            model, targets=["query", "value", "ffn_1", "head"], rank=2, in_place=True
        )
    assert_unchanged(model, before, x, out)


class HiddenSublayer(keras.layers.Layer):
    """Holds its Dense in a nested structure: tracked, but in no attribute
    (or list, tuple or dict attribute) that a swap could change."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.parts = {"inner": [keras.layers.Dense(4, name="hidden_dense")]}

    def call(self, x):
        return self.parts["inner"][0](x)


def test_unreachable_sublayer_is_named_and_nothing_changes():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, HiddenSublayer(name="holder")(inputs))
    x = np.ones((2, 3), "float32")
    out = to_numpy(model(x))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'holder/hidden_dense'.*not held in an"):
        kl.apply_lora(model, targets=["hidden_dense"], in_place=True)
    assert_unchanged(model, before, x, out)


def test_in_place_flag_must_be_a_bool():
    model = mlp()
    with pytest.raises(TypeError, match="in_place"):
        kl.apply_lora(model, in_place="yes")
    assert not lora_layers(model)
