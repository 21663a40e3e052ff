import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

X = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")


def types(model):
    return {
        layer.name: type(layer).__name__
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    }


def state(model):
    """Everything apply_lora must leave alone on a failure."""
    return (
        [(layer.name, layer.trainable) for layer in model.layers],
        [(w.path, w.trainable, to_numpy(w).tobytes()) for w in model.weights],
    )


def test_default_targets_every_dense_but_the_output_and_output_unchanged():
    model = mlp()
    before = model.predict(X, verbose=0)
    lora_model = kl.apply_lora(model, rank=4)
    assert types(lora_model) == {"d1": "LoRADense", "d2": "LoRADense", "head": "Dense"}
    np.testing.assert_array_equal(lora_model.predict(X, verbose=0), before)
    np.testing.assert_array_equal(model.predict(X, verbose=0), before)
    assert types(model) == {"d1": "Dense", "d2": "Dense", "head": "Dense"}
    trainable = {w.path for w in lora_model.trainable_weights}
    assert {w.name for w in lora_model.trainable_weights} == {"lora_a", "lora_b"}
    assert len(trainable) == 4


def test_base_weights_are_shared_not_copied():
    model = mlp()
    lora_model = kl.apply_lora(model, rank=4)
    assert lora_model.get_layer("d1").layer.kernel is model.get_layer("d1").kernel
    assert lora_model.get_layer("head") is model.get_layer("head")


def test_training_lowers_loss_and_leaves_base_bitwise_unchanged():
    model = mlp()
    rng = np.random.default_rng(1)
    y = rng.normal(size=(64, 3)).astype("float32")
    lora_model = kl.apply_lora(model, rank=4, alpha=8)
    lora_model.trainable = False
    lora_model.trainable = True  # unfreezes the head, never a LoRA base kernel
    bases = [w for _, layer in lora_layers(lora_model) for w in layer.layer.weights]
    before = [to_numpy(w).copy() for w in bases]
    trainable = {id(w) for w in lora_model.trainable_weights}
    assert not any(id(w) in trainable for w in bases)
    lora_model.compile(keras.optimizers.Adam(0.01), "mse")
    history = lora_model.fit(X, y, epochs=10, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.9 * history.history["loss"][0]
    for value, variable in zip(before, bases, strict=True):
        np.testing.assert_array_equal(value, to_numpy(variable))


def test_sequential_and_nested_functional():
    seq = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, name="s1"), keras.layers.Dense(2)]
    )
    assert types(kl.apply_lora(seq, rank=2))["s1"] == "LoRADense"

    inner = mlp(name="inner")
    inputs = keras.Input((16,))
    outer = keras.Model(inputs, keras.layers.Dense(1, name="out")(inner(inputs)))
    before = outer.predict(X, verbose=0)
    lora_outer = kl.apply_lora(outer, rank=2)
    lora_inner = lora_outer.get_layer("inner")
    assert lora_inner is not inner
    # Output layers of a nested model are not outputs of the outer model.
    assert types(lora_inner) == {
        "d1": "LoRADense",
        "d2": "LoRADense",
        "head": "LoRADense",
    }
    assert types(inner) == {"d1": "Dense", "d2": "Dense", "head": "Dense"}
    np.testing.assert_array_equal(lora_outer.predict(X, verbose=0), before)
    by_path = kl.apply_lora(outer, targets=["inner/d2"], rank=2)
    assert types(by_path.get_layer("inner"))["d2"] == "LoRADense"
    assert types(by_path.get_layer("inner"))["d1"] == "Dense"


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["d2"], {"d2"}),
        ("d[12]", {"d1", "d2"}),
        (lambda layer: layer.units == 3, {"head"}),
        (["head"], {"head"}),
    ],
    ids=["names", "regex", "callable", "output-by-name"],
)
def test_target_forms(targets, expected):
    lora_model = kl.apply_lora(mlp(), targets=targets, rank=2)
    assert {p for p, _ in lora_layers(lora_model)} == expected


def test_exclude_and_trainable_head():
    model = mlp()
    rng = np.random.default_rng(2)
    y = rng.normal(size=(64, 3)).astype("float32")
    head_before = to_numpy(model.get_layer("head").kernel).copy()
    lora_model = kl.apply_lora(model, rank=2, exclude=["d1"], trainable=["head"])
    assert types(lora_model)["d1"] == "Dense"
    names = sorted(w.path.split("/")[-1] for w in lora_model.trainable_weights)
    assert names == ["bias", "kernel", "lora_a", "lora_b"]
    lora_model.compile(keras.optimizers.Adam(0.01), "mse")
    lora_model.fit(X, y, epochs=3, verbose=0)
    assert not np.array_equal(
        to_numpy(lora_model.get_layer("head").kernel), head_before
    )
    np.testing.assert_array_equal(to_numpy(model.get_layer("head").kernel), head_before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"targets": ["d1", "dense_typo"]},
            ValueError,
            r"'dense_typo' matches no layer.*'d1'",
        ),
        ({"targets": "nothing.*"}, ValueError, "matches no layer"),
        ({"targets": lambda layer: False}, ValueError, "matches no layer"),
        ({"targets": 3}, TypeError, "`targets` must be None, a list"),
        ({"targets": [3]}, TypeError, "entries must be layer names"),
        ({"targets": "("}, ValueError, "not a valid regex"),
        ({"exclude": ["nope"]}, ValueError, "`exclude` entry 'nope'"),
        ({"trainable": ["nope"]}, ValueError, "`trainable` entry 'nope'"),
        ({"targets": ["d1"], "trainable": ["d1"]}, ValueError, "both LoRA targets"),
        ({"rank": 0}, ValueError, "rank=0"),
        ({"alpha": -1}, ValueError, "alpha=-1"),
        ({"not_an_arg": 1}, ValueError, "not_an_arg"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = mlp()
    before = state(model)
    with pytest.raises(error, match=match):
        kl.apply_lora(model, **kwargs)
    assert state(model) == before


def test_refuses_non_models_unbuilt_models_and_lora_models():
    with pytest.raises(TypeError, match="must be a keras.Model"):
        kl.apply_lora(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="is not built"):
        kl.apply_lora(keras.Sequential([keras.layers.Dense(2)]))
    lora_model = kl.apply_lora(mlp(), rank=2)
    with pytest.raises(ValueError, match=r"already has LoRA layers: \['d1', 'd2'\]"):
        kl.apply_lora(lora_model)


def test_non_dense_target_is_refused():
    inputs = keras.Input((16,))
    x = keras.layers.LayerNormalization(name="norm")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="'norm' of type LayerNormalization"):
        kl.apply_lora(model, targets=["norm"])


def test_merge_equals_unmerged_and_leaves_input_alone():
    lora_model = randomize_adapters(kl.apply_lora(mlp(), rank=4, alpha=8))
    weights = [to_numpy(w).copy() for w in lora_model.weights]
    merged = kl.merge_lora(lora_model)
    assert types(merged) == {"d1": "Dense", "d2": "Dense", "head": "Dense"}
    assert lora_layers(merged) == []
    out = lora_model.predict(X, verbose=0)
    assert np.abs(out).max() > 0.1
    np.testing.assert_allclose(merged.predict(X, verbose=0), out, atol=1e-5, rtol=1e-5)
    for before, after in zip(weights, lora_model.weights, strict=True):
        np.testing.assert_array_equal(before, to_numpy(after))
    # The merged model is independent of the LoRA model's variables.
    assert merged.get_layer("head").kernel is not lora_model.get_layer("head").kernel


def test_merged_model_loads_where_keras_lora_is_never_imported(tmp_path):
    lora_model = randomize_adapters(kl.apply_lora(mlp(), rank=4))
    path = os.path.join(tmp_path, "merged.keras")
    kl.merge_lora(lora_model).save(path)
    np.save(os.path.join(tmp_path, "x.npy"), X)
    code = (
        "import sys, numpy as np, keras\n"
        "m = keras.saving.load_model('merged.keras')\n"
        "np.save('y.npy', m.predict(np.load('x.npy'), verbose=0))\n"
        "assert 'keras_lora' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), lora_model.predict(X, verbose=0), atol=1e-5
    )


def test_merge_refuses_plain_models_and_non_finite_adapters():
    with pytest.raises(ValueError, match="has no LoRA layers"):
        kl.merge_lora(mlp())
    lora_model = kl.apply_lora(mlp(), rank=2)
    lora_model.get_layer("d2").lora_b.assign(np.full((2, 32), np.nan, "float32"))
    with pytest.raises(ValueError, match="'d2' gives NaN or Inf"):
        kl.merge_lora(lora_model)
    merged = kl.merge_lora(lora_model, check_finite=False)
    assert np.isnan(to_numpy(merged.get_layer("d2").kernel)).all()


def test_trainable_summary():
    lora_model = kl.apply_lora(mlp(), rank=4)
    lines = []
    summary = kl.trainable_summary(lora_model, print_fn=lines.append)
    trainable = 4 * (16 + 32) + 4 * (32 + 32)
    total = trainable + (16 * 32 + 32) + (32 * 32 + 32) + (32 * 3 + 3)
    assert (summary.trainable, summary.total) == (trainable, total)
    assert summary.percent == pytest.approx(100 * trainable / total)
    assert lines == [
        f"trainable params: {trainable:,} || all params: {total:,} "
        f"|| trainable%: {100 * trainable / total:.4f}"
    ]
    with pytest.raises(TypeError, match="must be a Keras model"):
        kl.trainable_summary("model")
