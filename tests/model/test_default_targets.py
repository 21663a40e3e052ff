"""`apply_lora`'s default targets (issue 21, item 7).

On a KerasHub model `targets=None` adapts what KerasHub's own `enable_lora`
adapts (its backbone's `default_lora_layer_names()`: query and value, as
PEFT's default does); on a plain Keras model it keeps selecting every
`Dense` outside the output layers. `targets="all-linear"` is PEFT's: every
`Dense` and `EinsumDense` except the layers that produce the outputs. The
layer table of docs/kerashub.md is checked against the hub mapping.
"""

import pathlib

import keras
import keras_hub
import pytest
import tiny_kerashub
from kerashub_layer_table import END, START, table

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kerashub.md"


def adapted(model):
    return [path for path, _ in lora_layers(model)]


def enable_lora_paths(arch):
    """The paths of the layers KerasHub's `enable_lora(rank)` adapts."""
    backbone = tiny_kerashub.backbone(arch)
    backbone.enable_lora(2)
    return [
        path
        for path, layer in iter_layers(backbone)
        if getattr(layer, "lora_enabled", False)
    ]


@pytest.mark.parametrize("arch", ["llama3", "gpt2", "bert", "gemma"])
def test_default_on_a_backbone_is_kerashub_enable_lora_s(arch):
    model = kl.apply_lora(tiny_kerashub.backbone(arch), rank=2, in_place=True)
    paths = adapted(model)
    assert paths == enable_lora_paths(arch)
    assert {path.rsplit("/", 1)[-1] for path in paths} == {"query", "value"}


def test_default_on_a_llama3_task_is_query_and_value_of_every_block():
    backbone = tiny_kerashub.backbone("llama3")
    task = keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)
    kl.apply_lora(task, rank=2, in_place=True)
    names = [path.rsplit("/", 1)[-1] for path in adapted(task)]
    assert names == ["query", "value"] * backbone.num_layers
    assert all(path.startswith(f"{backbone.name}/") for path in adapted(task))


def test_default_on_a_model_holding_a_backbone():
    backbone = tiny_kerashub.backbone("gpt2")
    inputs = {
        name: keras.Input((None,), dtype="int32", name=name)
        for name in ("token_ids", "padding_mask")
    }
    features = backbone(inputs)
    outputs = keras.layers.Dense(3, name="head")(features)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(outputs))
    lora = kl.apply_lora(model, rank=2)
    names = {path.rsplit("/", 1)[-1] for path in adapted(lora)}
    assert names == {"query", "value"}  # not the Dense "head" of the plain rule


def test_plain_keras_default_is_unchanged():
    inputs = keras.Input((4, 6))
    x = keras.layers.Dense(5, name="hidden")(inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 3), name="mix")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    assert adapted(kl.apply_lora(model, rank=2)) == ["hidden"]


def test_all_linear_on_a_plain_model_leaves_the_output_layer_out():
    inputs = keras.Input((4, 6))
    x = keras.layers.Dense(5, name="hidden")(inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 3), name="mix")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    assert adapted(kl.apply_lora(model, "all-linear", rank=2)) == ["hidden", "mix"]


def test_all_linear_on_a_llama3_task_is_every_projection():
    task = keras_hub.models.Llama3CausalLM(
        tiny_kerashub.backbone("llama3"), preprocessor=None
    )
    kl.apply_lora(task, targets="all-linear", rank=2, in_place=True)
    names = [path.rsplit("/", 1)[-1] for path in adapted(task)]
    assert sorted(names) == sorted(
        [
            "query",
            "key",
            "value",
            "attention_output",
            "feedforward_gate_dense",
            "feedforward_intermediate_dense",
            "feedforward_output_dense",
        ]
    )  # no embedding, no head


def test_all_linear_on_a_classifier_leaves_its_logits_out():
    backbone = tiny_kerashub.backbone("bert")
    task = keras_hub.models.BertTextClassifier(backbone, 3, preprocessor=None)
    kl.apply_lora(task, targets="all-linear", rank=2, in_place=True)
    names = {path.rsplit("/", 1)[-1] for path in adapted(task)}
    assert "logits" not in names and "pooled_dense" in names
    assert {"query", "key", "value", "attention_output"} <= names


def test_all_linear_needs_a_graph_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(keras.ops.zeros((1, 3)))
    with pytest.raises(ValueError, match="all-linear.*subclassed"):
        kl.apply_lora(model, "all-linear")
    assert not lora_layers(model)


def test_layer_table_of_the_docs_is_the_hub_mapping_s():
    text = DOC.read_text()
    assert START in text and END in text
    page = text[text.index(START) : text.index(END) + len(END)]
    assert page == table(), (
        "docs/kerashub.md's layer table is out of date: regenerate it with "
        "`python tests/kerashub_layer_table.py`"
    )
