"""Adapter files whose metadata lies: refused before anything changes.

Every option an adapter file records (rank, alpha, scale rule, variant,
factoring) is checked before any weight is assigned or any layer created.
Each lie below sits in the *last* layer's entry (or in the PEFT config, for
every module), so a reader that assigned layer by layer would have changed
the first layers before it met the lie. The model must come out bitwise
the same: every weight, every `trainable` flag (model, layers, variables)
and its `get_config()`.
"""

import json
import math
import shutil

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.io import keras_lora_format
from keras_lora.model.walk import iter_layers


def state(model):
    """Everything a failed load must leave as it was."""
    config = json.dumps(model.get_config(), sort_keys=True, default=repr)
    flags = [model.trainable] + [layer.trainable for _, layer in iter_layers(model)]
    weights = [(w.path, w.trainable, to_numpy(w).copy()) for w in model.weights]
    return config, flags, weights


def assert_same_state(before, after):
    assert after[0] == before[0], "get_config() changed"
    assert after[1] == before[1], "trainable flags changed"
    assert len(after[2]) == len(before[2]), "weights added or removed"
    for (path, trainable, value), (path2, trainable2, value2) in zip(
        before[2], after[2], strict=True
    ):
        assert (path, trainable) == (path2, trainable2), path
        np.testing.assert_array_equal(value2, value, err_msg=path)


def rewrite(src, dst, change):
    """Copies a keras_lora file, `change(entry)` applied to its last layer's
    metadata entry, with a valid checksum (only the lie is wrong)."""
    with safetensors.safe_open(str(src), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["keras_lora"])
    last = list(info["layers"])[-1]
    change(info["layers"][last])
    info["sha256"] = keras_lora_format._digest(tensors)
    safetensors.numpy.save_file(
        tensors, str(dst), metadata={"keras_lora": json.dumps(info)}
    )
    return dst


def setter(**changes):
    return lambda entry: entry.update(changes)


# (id, change to the last layer's entry, error, message)
KERAS_LORA_LIES = [
    ("alpha<0", setter(alpha=-4.0), ValueError, r"'head'.*`alpha`.*alpha=-4"),
    ("alpha=NaN", setter(alpha=math.nan), ValueError, r"`alpha`.*finite.*nan"),
    ("alpha=inf", setter(alpha=math.inf), ValueError, r"`alpha`.*finite.*inf"),
    ("alpha='8'", setter(alpha="8"), TypeError, r"`alpha`.*'8'.*str"),
    ("alpha=true", setter(alpha=True), TypeError, r"`alpha`.*True"),
    (
        "use_rslora='false'",
        setter(use_rslora="false"),
        TypeError,
        r"`use_rslora` must be True or False.*'false'",
    ),
    ("use_rslora=0", setter(use_rslora=0), TypeError, r"`use_rslora`.*0"),
    ("use_dora='true'", setter(use_dora="true"), TypeError, r"`use_dora`.*'true'"),
    ("rank=0", setter(rank=0), ValueError, r"`rank` must be a positive.*rank=0"),
    ("rank=-4", setter(rank=-4), ValueError, r"`rank` must be a positive"),
    ("rank='4'", setter(rank="4"), TypeError, r"`rank`.*'4'"),
    ("rank=3", setter(rank=3), ValueError, r"records rank 3 but lora_a"),
    ("dropout=1.5", setter(dropout=1.5), ValueError, r"`dropout`.*\[0, 1\)"),
    ("init='svd'", setter(init="svd"), ValueError, r"`init` must be one of"),
    ("factoring", setter(factoring="diagonal"), ValueError, r"`factoring`"),
    ("base_sha256=5", setter(base_sha256=5), TypeError, r"`base_sha256`"),
    ("no alpha", lambda entry: entry.pop("alpha"), ValueError, r"corrupt metadata"),
]


@pytest.fixture
def adapter(tmp_path):
    lora = kl.apply_lora(mlp(), targets=["d1", "d2", "head"], rank=2)
    randomize_adapters(lora)
    return kl.save_adapter(lora, tmp_path / "a.safetensors")


def targets(kind):
    """A model to load into: plain, or with LoRA layers of its own."""
    if kind == "plain":
        return mlp()
    model = kl.apply_lora(mlp(), targets=["d1", "d2", "head"], rank=2)
    return randomize_adapters(model, seed=5)


@pytest.mark.parametrize("into", ["plain", "lora"])
@pytest.mark.parametrize(
    "change, error, match",
    [case[1:] for case in KERAS_LORA_LIES],
    ids=[case[0] for case in KERAS_LORA_LIES],
)
def test_lying_keras_lora_metadata_changes_nothing(
    adapter, tmp_path, into, change, error, match
):
    lie = rewrite(adapter, tmp_path / "lie.safetensors", change)
    model = targets(into)
    before = state(model)
    with pytest.raises(error, match=match):
        kl.load_adapter(model, lie)
    assert_same_state(before, state(model))


def test_the_untampered_file_loads(adapter):
    # The cases above fail for their lie alone.
    for into in ("plain", "lora"):
        assert kl.load_adapter(targets(into), adapter) is not None


def test_lying_format_version_is_refused(adapter, tmp_path):
    with safetensors.safe_open(str(adapter), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["keras_lora"])
    for version in ("1", 0, 99, True):
        info["format_version"] = version
        path = tmp_path / "v.safetensors"
        safetensors.numpy.save_file(
            tensors, str(path), metadata={"keras_lora": json.dumps(info)}
        )
        model = mlp()
        before = state(model)
        with pytest.raises(ValueError, match="format version"):
            kl.load_adapter(model, path)
        assert_same_state(before, state(model))


# (id, adapter_config.json changes, error, message)
PEFT_LIES = [
    ("lora_alpha<0", {"lora_alpha": -4}, ValueError, r"`lora_alpha`.*-4"),
    ("lora_alpha=NaN", {"lora_alpha": math.nan}, ValueError, r"`lora_alpha`.*nan"),
    ("lora_alpha='8'", {"lora_alpha": "8"}, TypeError, r"`lora_alpha`.*'8'"),
    ("use_rslora='false'", {"use_rslora": "false"}, TypeError, r"`use_rslora`"),
    ("use_dora='false'", {"use_dora": "false"}, TypeError, r"`use_dora`"),
    ("r=0", {"r": 0}, ValueError, r"`r` must be a positive integer.*r=0"),
    ("r='8'", {"r": "8"}, TypeError, r"`r`.*'8'"),
    ("r=2.0", {"r": 2.0}, TypeError, r"`r`.*2\.0"),
    ("lora_dropout=1.5", {"lora_dropout": 1.5}, ValueError, r"`lora_dropout`"),
]


@pytest.fixture
def peft_dir(tmp_path):
    lora = kl.apply_lora(mlp(), targets=["d1", "d2", "head"], rank=2)
    randomize_adapters(lora)
    return kl.save_adapter(lora, tmp_path / "peft", format="peft")


@pytest.mark.parametrize("into", ["plain", "lora"])
@pytest.mark.parametrize(
    "changes, error, match",
    [case[1:] for case in PEFT_LIES],
    ids=[case[0] for case in PEFT_LIES],
)
def test_lying_peft_config_changes_nothing(
    peft_dir, tmp_path, into, changes, error, match
):
    lie = tmp_path / "lie"
    shutil.copytree(peft_dir, lie)
    config = json.loads((lie / "adapter_config.json").read_text())
    config.update(changes)
    (lie / "adapter_config.json").write_text(json.dumps(config))
    model = targets(into)
    before = state(model)
    with pytest.raises(error, match=match):
        kl.load_adapter(model, lie)
    assert_same_state(before, state(model))


def test_the_untampered_peft_directory_loads(peft_dir):
    for into in ("plain", "lora"):
        assert kl.load_adapter(targets(into), peft_dir) is not None


def test_a_failure_after_apply_restores_the_plain_models_flags(adapter, tmp_path):
    # Widths that differ only in the last layer: the shape check runs on
    # the new LoRA model, after `apply_lora` froze the shared base layers.
    inputs = keras.Input((16,), name="x")
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="d2")(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="head")(x))
    before = state(model)
    with pytest.raises(ValueError, match=r"(?s)Shape mismatch.*'head' lora_b"):
        kl.load_adapter(model, adapter)
    assert_same_state(before, state(model))


def test_a_failed_load_as_a_named_adapter_changes_nothing(tmp_path, monkeypatch):
    # The shapes are checked before the new adapter is added to any layer.
    lora = kl.apply_lora(mlp(), targets=["d1", "d2", "head"], rank=2)
    path = kl.save_adapter(randomize_adapters(lora), tmp_path / "a.safetensors")
    inputs = keras.Input((16,), name="x")
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="d2")(x)
    other = keras.Model(inputs, keras.layers.Dense(5, name="head")(x))
    model = kl.apply_lora(other, targets=["d1", "d2", "head"], rank=2)
    before = state(model)
    added = []
    real = kl.LoRALayer.add_adapter

    def add_adapter(layer, *args, **kwargs):
        added.append(layer.name)
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(kl.LoRALayer, "add_adapter", add_adapter)
    with pytest.raises(ValueError, match=r"(?s)Shape mismatch.*'head' lora_b"):
        kl.load_adapter(model, path, adapter_name="task")
    assert added == []
    assert_same_state(before, state(model))
    assert list(kl.list_adapters(model)) == ["default"]
    # The file loads as a named adapter where it fits.
    fits = kl.apply_lora(mlp(), targets=["d1", "d2", "head"], rank=3)
    kl.load_adapter(fits, path, adapter_name="task")
    assert added == ["d1", "d2", "head"]
