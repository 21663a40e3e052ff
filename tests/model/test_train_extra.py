"""Layers and biases that train next to the adapters (PEFT's
`modules_to_save` and `bias`): `apply_lora(trainable=..., bias=...)`, and
their round trip through the keras_lora adapter file."""

import json
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import safetensors
import tiny_kerashub

import keras_lora as kl
from keras_lora.model.walk import iter_layers

X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")


def make_model(head="head"):
    """input -> d1 -> ln -> d2 -> head, the same weights every call."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.Dense(8, name="d2")(x)
    outputs = keras.layers.Dense(2, name=head)(x)
    return keras.Model(inputs, outputs, name="net")


def trained(model, steps=3):
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(X, Y, epochs=steps, batch_size=16, verbose=0)
    return model


def numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def trainable_paths(model):
    return sorted(v.path for v in model.trainable_weights)


def layer(model, path):
    return dict(iter_layers(model))[path]


EXPECTED = {
    "none": ["d1/lora_a", "d1/lora_b", "d2/lora_a", "d2/lora_b"],
    "lora_only": ["d1/bias", "d2/bias"],
    "all": ["d1/bias", "d2/bias", "head/bias", "ln/beta"],
}


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_selects_which_biases_train(bias):
    model = kl.apply_lora(
        make_model(), targets=["d1", "d2"], rank=2, bias=bias, in_place=True
    )
    extra = EXPECTED[bias] if bias != "none" else []
    assert trainable_paths(model) == sorted(EXPECTED["none"] + extra)
    kernels = {p: numpy(layer(model, p).kernel) for p in ("d1", "d2")}
    gamma = numpy(layer(model, "ln").gamma)
    biases = {p: numpy(layer(model, p).layer.bias) for p in ("d1", "d2")}
    trained(model)
    for path, kernel in kernels.items():  # kernels stay frozen
        np.testing.assert_array_equal(numpy(layer(model, path).kernel), kernel)
    np.testing.assert_array_equal(numpy(layer(model, "ln").gamma), gamma)
    for path, before in biases.items():
        moved = not np.array_equal(numpy(layer(model, path).layer.bias), before)
        assert moved == (bias != "none")


def test_lora_layer_trainable_flag_covers_its_bias():
    model = kl.apply_lora(
        make_model(), targets=["d1"], rank=2, bias="lora_only", in_place=True
    )
    d1 = layer(model, "d1")
    assert d1.train_bias
    d1.trainable = False
    assert "d1/bias" not in trainable_paths(model)
    assert not d1.layer.kernel.trainable
    d1.trainable = True
    assert "d1/bias" in trainable_paths(model)
    assert not d1.layer.kernel.trainable
    # The switch is part of the layer's config (a `.keras` file keeps it).
    again = type(d1).from_config(d1.get_config())
    again.build((None, 4))
    assert again.train_bias
    assert sorted(v.name for v in again.trainable_weights) == [
        "bias",
        "lora_a",
        "lora_b",
    ]


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_file_restores_layers_and_biases(tmp_path, bias):
    model = kl.apply_lora(
        make_model(),
        targets=["d1", "d2"],
        rank=2,
        bias=bias,
        trainable=["head"],
        in_place=True,
    )
    trained(model)
    expected = numpy(model(X))
    path = tmp_path / "a.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left unsaved
        kl.save_adapter(model, path)
    with safetensors.safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["keras_lora"])
        keys = set(f.keys())
    assert info["format_version"] == 4
    assert info["extra"]["head"] == {
        "kind": "module",
        "type": "Dense",
        "weights": ["kernel", "bias"],
    }
    assert {"head/kernel", "head/bias"} <= keys
    assert ("d1/bias" in keys) == (bias != "none")
    assert ("ln/beta" in keys) == (bias == "all")
    # A base model changed by the fit: only the file brings it back.
    base = make_model()
    assert np.abs(numpy(base(X)) - expected).max() > 1e-2
    loaded = kl.load_adapter(base, path, in_place=True)
    np.testing.assert_allclose(numpy(loaded(X)), expected, atol=1e-6, rtol=0)
    assert trainable_paths(loaded) == trainable_paths(model)
    # Into a model with LoRA layers already (none of them training a bias).
    lora = kl.apply_lora(make_model(), targets=["d1", "d2"], rank=2, in_place=True)
    kl.load_adapter(lora, path)
    np.testing.assert_allclose(numpy(lora(X)), expected, atol=1e-6, rtol=0)
    assert trainable_paths(lora) == trainable_paths(model)


def test_copy_trains_and_loads_a_copied_head(tmp_path):
    base = make_model()
    before = numpy(base(X))
    model = trained(kl.apply_lora(base, targets=["d1"], rank=2, trainable=["head"]))
    np.testing.assert_array_equal(numpy(base(X)), before)  # the head was copied
    kl.save_adapter(model, tmp_path / "a.safetensors")
    loaded = kl.load_adapter(base, tmp_path / "a.safetensors")
    np.testing.assert_allclose(numpy(loaded(X)), numpy(model(X)), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(numpy(base(X)), before)
    assert layer(loaded, "head") is not layer(base, "head")


def test_biases_in_a_copy_are_refused(tmp_path):
    base = make_model()
    with pytest.raises(ValueError, match="(?s)bias='all'.*in_place=True"):
        kl.apply_lora(base, targets=["d1"], rank=2, bias="all")
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(base))
    model = kl.apply_lora(
        make_model(), targets=["d1"], rank=2, bias="all", in_place=True
    )
    kl.save_adapter(model, tmp_path / "a.safetensors")
    before = trainable_paths(base)
    with pytest.raises(ValueError, match="(?s)trained biases.*in_place=True"):
        kl.load_adapter(base, tmp_path / "a.safetensors")
    assert trainable_paths(base) == before
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(base))


def test_bad_arguments_leave_the_model_unchanged():
    model = make_model()
    before = trainable_paths(model)
    for bias, error in (("some", ValueError), ("None", ValueError), (1, TypeError)):
        with pytest.raises(error, match="`bias` must be one of"):
            kl.apply_lora(model, targets=["d1"], bias=bias, in_place=True)
    with pytest.raises(ValueError, match="`trainable` entry 'nope' matches no"):
        kl.apply_lora(model, targets=["d1"], trainable=["nope"], in_place=True)
    with pytest.raises(ValueError, match="both LoRA targets and in `trainable`"):
        kl.apply_lora(model, targets=["d1"], trainable=["d1"], in_place=True)
    assert trainable_paths(model) == before
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(model))


def test_files_without_extras_are_unchanged(tmp_path):
    model = kl.apply_lora(make_model(), targets=["d1"], rank=2)
    kl.save_adapter(model, tmp_path / "a.safetensors")
    with safetensors.safe_open(str(tmp_path / "a.safetensors"), "np") as f:
        info = json.loads(f.metadata()["keras_lora"])
        keys = set(f.keys())
    assert info["format_version"] == 1 and "extra" not in info
    assert keys == {"d1/lora_a", "d1/lora_b"}
    loaded = kl.load_adapter(make_model(), tmp_path / "a.safetensors")
    assert trainable_paths(loaded) == ["d1/lora_a", "d1/lora_b"]


def test_extra_weights_that_do_not_fit_are_refused(tmp_path):
    model = kl.apply_lora(
        make_model(), targets=["d1"], rank=2, trainable=["head"], in_place=True
    )
    kl.save_adapter(model, tmp_path / "a.safetensors")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    other = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    with pytest.raises(ValueError, match=r"(?s)head.*kernel.*\(8, 3\).*\(8, 2\)"):
        kl.load_adapter(other, tmp_path / "a.safetensors", in_place=True)
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(other))
    # A file with extras loads as the model's own weights, not a named adapter.
    with pytest.raises(ValueError, match="without `adapter_name`"):
        kl.load_adapter(model, tmp_path / "a.safetensors", adapter_name="two")


def test_extras_for_layers_the_model_lacks_follow_strict(tmp_path):
    model = kl.apply_lora(
        make_model(), targets=["d1"], rank=2, trainable=["head"], in_place=True
    )
    kl.save_adapter(model, tmp_path / "a.safetensors")
    other = make_model(head="top")
    with pytest.raises(ValueError, match="(?s)trained layers or biases.*'head'"):
        kl.load_adapter(other, tmp_path / "a.safetensors", in_place=True)
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(other))
    with pytest.warns(UserWarning, match="'head'"):
        kl.load_adapter(other, tmp_path / "a.safetensors", in_place=True, strict=False)
    assert trainable_paths(other) == ["d1/lora_a", "d1/lora_b"]


def test_train_is_the_same_as_trainable():
    # The PEFT-gap issue spells it `train=`: the same layers train whole.
    spelled = kl.apply_lora(make_model(), targets=["d1"], rank=2, train=["head"])
    named = kl.apply_lora(make_model(), targets=["d1"], rank=2, trainable=["head"])
    assert trainable_paths(spelled) == trainable_paths(named)
    assert "head/kernel" in trainable_paths(spelled)
    model = make_model()
    with pytest.raises(ValueError, match="`train` and `trainable`"):
        kl.apply_lora(model, targets=["d1"], train=["head"], trainable=["head"])
    assert not any(isinstance(lay, kl.LoRALayer) for _, lay in iter_layers(model))


def test_keras_file_keeps_which_variables_train(tmp_path):
    # bias="all" on a KerasHub task: LayerNormalization's beta trains, its
    # gamma does not; a `.keras` round trip keeps that (keras_lora's record
    # of the task), instead of thawing the whole layer.
    backbone = tiny_kerashub.backbone("gpt2")
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    kl.apply_lora(lm, targets=["query", "value"], rank=2, bias="all", in_place=True)
    want = trainable_paths(lm)
    assert any(p.endswith("/beta") for p in want)
    assert not any(p.endswith("/gamma") for p in want)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    assert trainable_paths(keras.models.load_model(path)) == want
