"""The keras_lora adapter file: save_adapter / load_adapter."""

import inspect
import json
import os
import warnings

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import keras_lora as kl
from keras_lora.layers import lora_class_for
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers

X = np.random.default_rng(7).normal(size=(5, 6)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def nested_model(first="left"):
    """input -> encoder(Dense e1, Dense e2) -> left & right -> concat -> head.

    `first` is the branch concatenated first, which puts it first in
    `model.layers`: two models can have the same layer names and shapes but
    a different layer order.
    """
    enc_in = keras.Input((6,))
    e = keras.layers.Dense(8, activation="relu", name="e1")(enc_in)
    e = keras.layers.Dense(8, activation="relu", name="e2")(e)
    encoder = keras.Model(enc_in, e, name="encoder")
    inputs = keras.Input((6,))
    h = encoder(inputs)
    branches = {}
    for name in ("left", "right"):
        branches[name] = keras.layers.Dense(8, activation="tanh", name=name)(h)
    second = "right" if first == "left" else "left"
    x = keras.layers.Concatenate(name="cat")([branches[first], branches[second]])
    out = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, out, name="net")


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        for v in (layer.lora_a, layer.lora_b):
            v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))


def lora_values(model):
    return {
        p: (_np(layer.lora_a).copy(), _np(layer.lora_b).copy())
        for p, layer in lora_layers(model)
    }


@pytest.fixture
def trained(tmp_path):
    base = nested_model()
    lora = kl.apply_lora(base, rank=4, alpha=8)
    randomize(lora)
    path = tmp_path / "task.safetensors"
    kl.save_adapter(lora, path)
    return base, lora, path


def test_base_plus_adapter_gives_back_the_fine_tuned_model(trained):
    base, lora, path = trained
    base_out = _np(base(X))
    restored = kl.load_adapter(base, path)
    assert restored is not base
    assert [p for p, _ in lora_layers(restored)] == [p for p, _ in lora_layers(lora)]
    for (_, got), (_, want) in zip(
        lora_layers(restored), lora_layers(lora), strict=True
    ):
        assert (got.rank, got.alpha, got.scale) == (4, 8.0, 2.0)
        np.testing.assert_array_equal(_np(got.lora_a), _np(want.lora_a))
        np.testing.assert_array_equal(_np(got.lora_b), _np(want.lora_b))
    np.testing.assert_allclose(_np(restored(X)), _np(lora(X)), atol=1e-6)
    # The base model itself still computes what it did.
    np.testing.assert_array_equal(_np(base(X)), base_out)


def test_file_is_keyed_by_layer_path_with_json_metadata(trained):
    _, lora, path = trained
    with safetensors.safe_open(str(path), framework="np") as f:
        keys = sorted(f.keys())
        info = json.loads(f.metadata()["keras_lora"])
    paths = ["encoder/e1", "encoder/e2", "left", "right"]
    assert keys == sorted(f"{p}/{w}" for p in paths for w in ("lora_a", "lora_b"))
    assert info["rank"] == 4 and info["alpha"] == 8.0
    assert info["scale_rule"] == "alpha/rank" and info["use_rslora"] is False
    assert info["target_layer_types"] == ["Dense"]
    assert info["dtype"] == "float32"
    assert info["package_version"] == kl.__version__
    assert info["format_version"] == 1
    assert sorted(info["layers"]) == paths
    assert info["layers"]["encoder/e1"] == {
        "type": "LoRADense",
        "base_type": "Dense",
        "rank": 4,
        "alpha": 8.0,
        "use_rslora": False,
        "dtype": "float32",
    }


def test_file_size_is_adapter_bytes_plus_a_small_header(trained):
    _, lora, path = trained
    adapter_bytes = sum(a.nbytes + b.nbytes for a, b in lora_values(lora).values())
    size = os.path.getsize(path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    # Exactly: 8-byte length, JSON header, the adapter tensors. No base weights.
    assert size == 8 + header + adapter_bytes
    assert header < 4096


def test_keys_by_path_not_position(tmp_path):
    # Same names and shapes, different layer order: keying by position
    # (keras-hub#2701) would swap "left" and "right".
    a = kl.apply_lora(nested_model(first="left"), rank=2)
    randomize(a, seed=1)
    kl.save_adapter(a, tmp_path / "a.safetensors")
    other = nested_model(first="right")
    order = [p for p, _ in iter_layers(other)]
    assert order.index("right") < order.index("left")
    assert [p for p, _ in lora_layers(a)].index("left") == 2
    b = kl.load_adapter(other, tmp_path / "a.safetensors")
    want, got = lora_values(a), lora_values(b)
    for name in ("left", "right", "encoder/e1"):
        np.testing.assert_array_equal(got[name][0], want[name][0])
        np.testing.assert_array_equal(got[name][1], want[name][1])


def test_loads_into_an_existing_lora_model(trained):
    base, lora, path = trained
    fresh = kl.apply_lora(nested_model(), rank=4, alpha=8)
    for (_, src), (_, dst) in zip(lora_layers(lora), lora_layers(fresh), strict=True):
        dst.layer.set_weights(src.layer.get_weights())
    fresh.get_layer("head").set_weights(lora.get_layer("head").get_weights())
    returned = kl.load_adapter(fresh, path)
    assert returned is fresh
    np.testing.assert_allclose(_np(fresh(X)), _np(lora(X)), atol=1e-6)


def test_rslora_scale_round_trips(tmp_path):
    lora = kl.apply_lora(nested_model(), rank=4, alpha=8, use_rslora=True)
    randomize(lora)
    kl.save_adapter(lora, tmp_path / "r.safetensors")
    restored = kl.load_adapter(nested_model(), tmp_path / "r.safetensors")
    layer = dict(lora_layers(restored))["left"]
    assert layer.use_rslora and layer.scale == pytest.approx(8 / 2.0)
    with safetensors.safe_open(str(tmp_path / "r.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["keras_lora"])["scale_rule"] == (
            "alpha/sqrt(rank)"
        )


def test_other_alpha_in_an_existing_lora_model_is_replaced_with_a_warning(trained):
    _, _, path = trained
    target = kl.apply_lora(nested_model(), rank=4, alpha=1)
    with pytest.warns(UserWarning, match="alpha 1.0 -> 8.0"):
        kl.load_adapter(target, path)
    assert {layer.alpha for _, layer in lora_layers(target)} == {8.0}


def test_shape_mismatch_names_layer_and_both_shapes_and_loads_nothing(trained):
    _, _, path = trained
    target = kl.apply_lora(nested_model(), rank=2)
    randomize(target, seed=3)
    before = lora_values(target)
    with pytest.raises(
        ValueError, match=r"layer 'encoder/e1' lora_a.*\(6, 2\).*\(6, 4\)"
    ):
        kl.load_adapter(target, path)
    after = lora_values(target)
    for name in before:
        np.testing.assert_array_equal(after[name][0], before[name][0])
        np.testing.assert_array_equal(after[name][1], before[name][1])


def test_failed_load_into_plain_model_leaves_it_untouched(tmp_path):
    lora = kl.apply_lora(nested_model(), rank=2)
    kl.save_adapter(lora, tmp_path / "a.safetensors")
    # Same names, other widths.
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="left")(inputs)
    x = keras.layers.Dense(5, name="right")(x)
    other = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    flags = [
        (layer.trainable, [v.trainable for v in layer.weights])
        for layer in other.layers
    ]
    weights = [_np(w).copy() for w in other.weights]
    with pytest.raises(ValueError, match="Shape mismatch"):
        with pytest.warns(UserWarning, match="encoder/e1"):
            kl.load_adapter(other, tmp_path / "a.safetensors", strict=False)
    assert flags == [
        (layer.trainable, [v.trainable for v in layer.weights])
        for layer in other.layers
    ]
    for w, before in zip(other.weights, weights, strict=True):
        np.testing.assert_array_equal(_np(w), before)


def test_unknown_keys_error_when_strict_and_warn_otherwise(trained):
    _, lora, path = trained
    # A model without "right": the file's "right" matches no layer.
    inputs = keras.Input((6,))
    enc_in = keras.Input((6,))
    e = keras.layers.Dense(8, activation="relu", name="e1")(enc_in)
    e = keras.layers.Dense(8, activation="relu", name="e2")(e)
    h = keras.Model(enc_in, e, name="encoder")(inputs)
    x = keras.layers.Dense(8, activation="tanh", name="left")(h)
    smaller = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    with pytest.raises(ValueError, match=r"(?s)match no layer.*'right'"):
        kl.load_adapter(smaller, path)
    with pytest.warns(UserWarning, match="'right'"):
        restored = kl.load_adapter(smaller, path, strict=False)
    assert [p for p, _ in lora_layers(restored)] == ["encoder/e1", "encoder/e2", "left"]
    np.testing.assert_array_equal(
        _np(dict(lora_layers(restored))["left"].lora_b),
        _np(dict(lora_layers(lora))["left"].lora_b),
    )


def test_lora_layers_missing_from_the_file_error_when_strict(tmp_path):
    small = kl.apply_lora(nested_model(), targets=["left"], rank=4, alpha=8)
    kl.save_adapter(small, tmp_path / "left.safetensors")
    full = kl.apply_lora(nested_model(), rank=4, alpha=8)
    with pytest.raises(ValueError, match="(?s)has no adapter for.*'encoder/e1'"):
        kl.load_adapter(full, tmp_path / "left.safetensors")
    with pytest.warns(UserWarning, match="has no adapter for"):
        kl.load_adapter(full, tmp_path / "left.safetensors", strict=False)


def test_name_map_renames_stored_paths(trained):
    _, lora, path = trained
    renamed = nested_model()
    renamed.get_layer("left").name = "links"
    restored = kl.load_adapter(renamed, path, name_map={"left": "links"})
    np.testing.assert_array_equal(
        _np(dict(lora_layers(restored))["links"].lora_a),
        _np(dict(lora_layers(lora))["left"].lora_a),
    )


def test_layer_type_is_checked_and_entries_cannot_collide(trained):
    _, _, path = trained
    # "left" is an EinsumDense with the Dense's kernel shape: same shapes,
    # another layer type.
    enc_in = keras.Input((6,))
    e = keras.layers.Dense(8, activation="relu", name="e1")(enc_in)
    e = keras.layers.Dense(8, activation="relu", name="e2")(e)
    inputs = keras.Input((6,))
    h = keras.Model(enc_in, e, name="encoder")(inputs)
    left = keras.layers.EinsumDense("ab,bc->ac", output_shape=8, name="left")(h)
    right = keras.layers.Dense(8, name="right")(h)
    x = keras.layers.Concatenate()([left, right])
    other = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    if lora_class_for(other.get_layer("left")) is not None:
        with pytest.raises(ValueError, match="adapter for a Dense at 'left'"):
            kl.load_adapter(other, path)
    with pytest.raises(ValueError, match=r"same layer.*\['right'\]"):
        kl.load_adapter(nested_model(), path, name_map={"left": "right"})


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all " * 8, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"],
    ids=["empty", "text", "tiny-header"],
)
def test_non_safetensors_files_are_clear_value_errors(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    base = nested_model()
    with pytest.raises(ValueError, match="bad.safetensors"):
        kl.load_adapter(base, bad)


def test_truncated_file_is_a_value_error(trained):
    base, _, path = trained
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        kl.load_adapter(base, path)


def test_corrupted_tensor_bytes_fail_the_checksum(trained):
    base, _, path = trained
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        kl.load_adapter(base, path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.ones((2, 2), "float32")}, str(plain))
    with pytest.raises(ValueError, match="not a keras_lora adapter"):
        kl.load_adapter(nested_model(), plain)
    pt = tmp_path / "pt.safetensors"
    safetensors.numpy.save_file({"w": np.ones(2, "float32")}, str(pt), {"format": "pt"})
    with pytest.raises(ValueError, match="PEFT adapter directory"):
        kl.load_adapter(nested_model(), pt)


def test_missing_path_and_plain_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        kl.load_adapter(nested_model(), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        kl.load_adapter(nested_model(), tmp_path)


def test_interrupted_save_keeps_the_previous_file(trained, monkeypatch):
    _, lora, path = trained
    before = path.read_bytes()

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_midway)
    randomize(lora, seed=9)
    with pytest.raises(RuntimeError, match="disk full"):
        kl.save_adapter(lora, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_save_errors(tmp_path):
    base = nested_model()
    with pytest.raises(ValueError, match="no LoRA layers"):
        kl.save_adapter(base, tmp_path / "a.safetensors")
    lora = kl.apply_lora(base, rank=2)
    with pytest.raises(ValueError, match="`format` must be one of"):
        kl.save_adapter(lora, tmp_path / "a.safetensors", format="pickle")
    with pytest.raises(ValueError, match="is a directory"):
        kl.save_adapter(lora, tmp_path)
    with pytest.raises(ValueError, match="format='peft' only"):
        kl.save_adapter(lora, tmp_path / "a.safetensors", name_map={"a": "b"})
    with pytest.raises(TypeError, match="`path` must be a str"):
        kl.save_adapter(lora, 3)
    with pytest.raises(TypeError, match="`name_map` must be"):
        kl.load_adapter(base, tmp_path / "a.safetensors", name_map=["x"])
    with pytest.raises(TypeError, match="must be a keras.Model"):
        kl.save_adapter("model", tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_saving_warns_about_trainable_weights_outside_the_adapter(tmp_path):
    # A whole trainable layer, or a bias, is saved (tests/model/
    # test_train_extra.py); part of a layer that is not its bias is not.
    lora = kl.apply_lora(nested_model(), rank=2)
    dict(iter_layers(lora))["head"].kernel.trainable = True
    with pytest.warns(UserWarning, match="(?s)neither.*head/kernel"):
        kl.save_adapter(lora, tmp_path / "a.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kl.save_adapter(
            kl.apply_lora(nested_model(), rank=2, trainable=["head"]),
            tmp_path / "b.safetensors",
        )


HAS_VARIANTS = "use_dora" in inspect.signature(kl.LoRALayer.__init__).parameters


@pytest.mark.skipif(not HAS_VARIANTS, reason="needs DoRA/PiSSA/named adapters")
def test_adapter_files_hold_one_adapter_per_layer(tmp_path):
    # DoRA and PiSSA/OLoRA adapters are saved too: see tests/layers/test_variants.py.
    base = nested_model()
    lora = kl.apply_lora(base, rank=2)
    layer = dict(lora_layers(lora))["left"]
    layer.add_adapter("other", rank=4)
    with pytest.warns(
        UserWarning, match=r"(?s)active adapter only.*'left': \['other'\]"
    ):
        kl.save_adapter(lora, tmp_path / "a.safetensors")
    layer.set_active_adapters(["default", "other"])
    with pytest.raises(ValueError, match="several active adapters"):
        kl.save_adapter(lora, tmp_path / "a.safetensors")
    dora = kl.apply_lora(base, rank=2, use_dora=True)
    with pytest.raises(ValueError, match=r"is a plain\+DoRA LoRA layer"):
        kl.load_adapter(dora, tmp_path / "a.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_save_and_load_walk_the_model_once(trained, monkeypatch, tmp_path):
    import importlib

    _, lora, path = trained
    walked = []
    modules = [
        importlib.import_module(name)
        for name in ("keras_lora.io", "keras_lora.io.install", "keras_lora.model.walk")
    ]
    real = modules[0].iter_layers

    def counting(model, prefix=""):
        walked.append(model.name)
        return real(model, prefix)

    for module in modules:
        monkeypatch.setattr(module, "iter_layers", counting)
    kl.save_adapter(lora, tmp_path / "again.safetensors")
    assert walked == [lora.name]
    walked.clear()
    assert kl.load_adapter(lora, path) is lora
    assert walked == [lora.name]
    # Into a plain model: one walk of it, one of the LoRA model made from it.
    walked.clear()
    base = nested_model()
    restored = kl.load_adapter(base, path)
    assert walked == [base.name, restored.name]
