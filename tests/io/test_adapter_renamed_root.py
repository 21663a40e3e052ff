"""An adapter file saved from one KerasHub task loads into a second one built
in the same process, whose backbone Keras named with a counter
(`gpt2_backbone_1`), or whose unnamed nested layers it numbered on
(`mha_2` for `mha`); an ambiguous or partial rename is still refused."""

import dataclasses

import keras
import numpy as np

import keras_lora as kl
from keras_lora.io.names import follow_renamed_root, follow_renumbered_layers
from keras_lora.model.surgery import lora_layers
from tests.tiny_kerashub import gpt2_causal_lm

TARGETS = ["query", "value"]


def _trained_task(seed):
    task = gpt2_causal_lm(seed=seed)
    kl.apply_lora(task, targets=TARGETS, rank=2, in_place=True)
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(task):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    return task


def _logits(task):
    x = {
        "token_ids": np.arange(1, 9, dtype="int32")[None],
        "padding_mask": np.ones((1, 8), "int32"),
    }
    return keras.ops.convert_to_numpy(task.backbone(x))


def test_file_from_first_task_loads_into_second_with_counter_name(tmp_path):
    first = _trained_task(seed=0)
    second = _trained_task(seed=0)
    for _, layer in lora_layers(second):
        layer.lora_b.assign(np.zeros(layer.lora_b.shape, "float32"))
    assert first.backbone.name != second.backbone.name  # the counter differs
    kl.save_adapter(first, tmp_path / "a.safetensors")
    kl.load_adapter(second, tmp_path / "a.safetensors")
    np.testing.assert_array_equal(_logits(second), _logits(first))


@dataclasses.dataclass
class _Record:
    path: str


LAYERS = [
    (p, None)
    for p in (
        "gpt2_backbone_1",
        "gpt2_backbone_1/block/query",
        "gpt2_backbone_1/block/value",
        "gpt2_backbone_2",
        "gpt2_backbone_2/block/query",
        "my_backbone",
        "my_backbone/block/query",
        "my_backbone/block/value",
    )
]


def _moved(paths, layers=LAYERS):
    return [r.path for r in follow_renamed_root([_Record(p) for p in paths], layers)]


def test_only_a_complete_unambiguous_counter_rename_is_followed():
    complete = ["gpt2_backbone/block/query", "gpt2_backbone/block/value"]
    assert _moved(complete) == [
        "gpt2_backbone_1/block/query",
        "gpt2_backbone_1/block/value",
    ]
    # Two twins hold the query only: ambiguous, left alone.
    assert _moved(["gpt2_backbone/block/query"]) == ["gpt2_backbone/block/query"]
    # Another stem is another model, not a counter rename.
    assert _moved(["your_backbone/block/query", "your_backbone/block/value"]) == [
        "your_backbone/block/query",
        "your_backbone/block/value",
    ]
    # A path no twin holds: nothing moves.
    assert _moved(["gpt2_backbone/block/key"]) == ["gpt2_backbone/block/key"]


DEEP = [
    (p, None)
    for p in (
        "model",
        "model/encoder",
        "model/encoder/mha_2",
        "model/encoder/mha_2/query",
        "model/encoder/mha_3",
        "model/encoder/mha_3/query",
        "model/encoder/mlp_7",
    )
]


def _renumbered(paths, layers=DEEP):
    records = [_Record(p) for p in paths]
    return [r.path for r in follow_renumbered_layers(records, layers)]


def test_counters_below_the_top_are_followed_in_their_order():
    # The first model of a session numbered its unnamed attention layers
    # from 0; the second, built on, from 2: the same order, other numbers.
    assert _renumbered(["model/encoder/mha/query", "model/encoder/mha_1/query"]) == [
        "model/encoder/mha_2/query",
        "model/encoder/mha_3/query",
    ]
    # A file from a second model of its session names `mha_2`, which this
    # model also has, but as its first attention: order decides, not names.
    assert _renumbered(["model/encoder/mha_2/query", "model/encoder/mha_1/query"]) == [
        "model/encoder/mha_3/query",
        "model/encoder/mha_2/query",
    ]


def test_uncertain_renumbering_leaves_every_record_alone():
    # One record for a group of two layers: which one is unknowable.
    assert _renumbered(["model/encoder/mha/query", "model/encoder/mlp/dense"]) == [
        "model/encoder/mha/query",
        "model/encoder/mlp/dense",
    ]
    # Three records for a group of two layers.
    three = [
        "model/encoder/mha/query",
        "model/encoder/mha_1/query",
        "model/encoder/mha_9/query",
    ]
    assert _renumbered(three) == three
    # Paths the model has are left as they are.
    assert _renumbered(["model/encoder/mha_3/query"]) == ["model/encoder/mha_3/query"]
