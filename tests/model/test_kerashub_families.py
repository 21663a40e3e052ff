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

import keras
import kerashub_families
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

# name -> reason, for the families that fail a check for a diagnosed
# limitation (strict: the test fails once the limitation is lifted).
XFAIL = {}


def outputs(model, x):
    return [to_numpy(t) for t in keras.tree.flatten(model(x, training=False))]


def max_diff(a, b):
    return max(
        float(np.abs(u.astype("float64") - v).max(initial=0.0))
        for u, v in zip(a, b, strict=True)
    )


def check_family(name):
    model, x = kerashub_families.build(name)
    cls = type(model)
    before = outputs(model, x)

    # Class kept, outputs equal at init.
    result = kl.apply_lora(
        model, targets=kerashub_families.TARGETS[name], rank=2, in_place=True
    )
    assert result is model and type(model) is cls
    adapted = lora_layers(model)
    assert adapted
    for old, new in zip(before, outputs(model, x), strict=True):
        np.testing.assert_array_equal(old, new)  # B = 0: exactly the same

    # One training step moves the adapters and nothing else.
    weights = {id(w): to_numpy(w).copy() for w in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", run_eagerly=True)
    y = keras.tree.map_structure(
        lambda t: np.ones(t.shape, "float32"), model(x, training=False)
    )
    model.train_on_batch(x, y)
    changed = [
        w.path for w in model.weights if not np.array_equal(to_numpy(w), weights[id(w)])
    ]
    assert changed
    assert all(p.split("/")[-1] in ("lora_a", "lora_b") for p in changed), changed

    # Merge exactly, keeping the class.
    rng = np.random.default_rng(1)
    for _, layer in adapted:
        b = layer.lora_b
        b.assign(0.1 * rng.normal(size=b.shape).astype(b.dtype))
    lora_out = outputs(model, x)
    # The adapters matter: they move the outputs by more than 1e-3 of their
    # size (tiny random backbones: MobileNet's features are ~1e-4).
    size = max(float(np.abs(t.astype("float64")).max(initial=0.0)) for t in lora_out)
    assert max_diff(lora_out, before) > 1e-3 * size
    merged = kl.merge_lora(model)
    assert type(merged) is cls
    assert not any(
        type(layer).__module__.startswith("keras_lora")
        for _, layer in iter_layers(merged)
    )
    # Float32 (eps 1.2e-7): a merged kernel sums W x + B A x in another
    # order, a few ulps per layer over a few layers, so 1e-5 of the output's
    # size; a lost adapter moves it by more than 1e-3 of it (checked above).
    assert max_diff(outputs(merged, x), lora_out) <= 1e-5 * size
    return len(adapted)


PARAMS = [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
    if n in XFAIL
    else n
    for n in kerashub_families.FAMILIES
]


@pytest.mark.parametrize("name", PARAMS)
def test_family(name):
    check_family(name)


@pytest.mark.parametrize("name", kerashub_families.ALL_LINEAR_EMPTY)
def test_all_linear_reaches_the_blocks(name):
    # A layer producing an output (ViT's and DeiT's encoder holds every
    # block; BART's last blocks) is no head: "all-linear" selects what
    # `linear_layers` selects (these backbones have no head).
    model, _ = kerashub_families.build(name)
    linear = kerashub_families.linear_layers
    expected = [p for p, layer in iter_layers(model) if linear(layer)]
    kl.apply_lora(model, targets="all-linear", rank=2, in_place=True)
    assert [p for p, _ in lora_layers(model)] == expected
