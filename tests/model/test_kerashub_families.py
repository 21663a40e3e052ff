"""LoRA in place on KerasHub backbones of many families (issue 22).

Each family's tiny backbone (`tests/kerashub_families.py`, built offline
from config) gets adapters on its default targets ("all-linear" for
transformers, the convolutions for CNNs), in place, and must:

- keep the object and its class;
- give exactly the same outputs right after conversion (B = 0), called
  with `training=False` (some backbones run BatchNormalization in training
  mode on a plain call);
- after one SGD step through `train_on_batch`, have changed the adapters
  and no other weight, bitwise (BatchNormalization statistics included);
- merge exactly: with random non-zero B, `merge_lora` returns a model of
  the same class, with no keras_lora layer inside, whose outputs equal the
  LoRA model's within float32 rounding.

`docs/families.md` tabulates the results, refusals included.
"""

import functools

import kerashub_families
import kerashub_reach_table
import pytest

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

# name -> reason, for the families that fail a check for a diagnosed
# limitation (strict: the test fails once the limitation is lifted).
XFAIL = {}


PARAMS = [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
    if n in XFAIL
    else n
    for n in kerashub_families.FAMILIES
]


@pytest.mark.parametrize("name", PARAMS)
def test_family(name):
    found = kerashub_families.check(name)
    # docs/kerashub.md's reach table holds the row these checks give.
    assert kerashub_reach_table.family_row(name, found) in page_table()[0]


@functools.cache
def page_table():
    return kerashub_reach_table.page_table()


def test_every_backbone_class_has_a_row():
    # A KerasHub release that adds a backbone adds a row, or this fails.
    rows, sentence = page_table()
    assert sentence == kerashub_reach_table.summary(rows)
    classes = {row.split("`")[1] for row in rows}
    assert classes == set(kerashub_reach_table.backbone_classes())
    built = {row.split("`")[1] for row in rows if "| — |" not in row}
    for name in set(kerashub_reach_table.NOT_BUILT) - built:
        assert kerashub_reach_table.missing_row(name) in rows


@pytest.mark.parametrize("name", kerashub_families.OUTPUT_HOLDS_BLOCKS)
def test_all_linear_reaches_the_blocks(name):
    # A layer producing an output (ViT's and DeiT's encoder holds every
    # block; BART's last blocks) is no head: "all-linear" selects what
    # `linear_layers` selects (these backbones have no head).
    model, _ = kerashub_families.build(name)
    linear = kerashub_families.linear_layers
    expected = [p for p, layer in iter_layers(model) if linear(layer)]
    kl.apply_lora(model, targets="all-linear", rank=2, in_place=True)
    assert [p for p, _ in lora_layers(model)] == expected
