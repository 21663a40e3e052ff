"""`load_adapter` reads KerasHub's `save_lora_weights` files (`*.lora.h5`).

A tiny GPT2 backbone, built from config, gets KerasHub's own LoRA
(`backbone.enable_lora(rank)`) and writes its factors with
`backbone.save_lora_weights`. Loaded into keras_lora, the model must
compute what KerasHub's LoRA model computes.
"""

import os

import h5py
import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

RANK = 4
INPUTS = {
    "token_ids": np.array([[1, 5, 9, 3, 7, 2, 0, 0], [4, 4, 8, 1, 6, 3, 2, 9]]),
    "padding_mask": np.array([[1] * 6 + [0] * 2, [1] * 8]),
}


def gpt2():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )


@pytest.fixture
def hub_file(tmp_path):
    """`(base weights, KerasHub LoRA outputs, path of its .lora.h5 file)`."""
    keras.utils.set_random_seed(0)
    hub = gpt2()
    weights = hub.get_weights()
    hub.enable_lora(RANK)
    rng = np.random.default_rng(0)
    for variable in hub.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    path = tmp_path / "gpt2.lora.h5"
    hub.save_lora_weights(str(path))
    return weights, to_numpy(hub(INPUTS)), path


def same_base(weights):
    backbone = gpt2()
    backbone.set_weights(weights)
    return backbone


def test_loads_into_a_functional_model_of_the_same_layers(hub_file):
    weights, expected, path = hub_file
    backbone = same_base(weights)
    model = keras.Model(backbone.inputs, backbone.outputs)
    plain = to_numpy(model(INPUTS))
    restored = kl.load_adapter(model, path)
    assert sorted(p for p, _ in lora_layers(restored)) == [
        f"transformer_layer_{i}/self_attention/{name}"
        for i in (0, 1)
        for name in ("query", "value")
    ]
    for _, layer in lora_layers(restored):
        assert (layer.rank, layer.scale, layer.factoring) == (RANK, 1.0, "keras")
    np.testing.assert_allclose(to_numpy(restored(INPUTS)), expected, atol=1e-5)
    assert not np.allclose(expected, plain, atol=1e-3)


def test_loads_into_a_backbone_converted_in_place(hub_file):
    weights, expected, path = hub_file
    backbone = same_base(weights)
    converted = kl.apply_lora(
        backbone, ["query", "value"], rank=RANK, in_place=True, factoring="keras"
    )
    assert kl.load_adapter(converted, path) is backbone
    assert isinstance(backbone, keras_hub.models.GPT2Backbone)
    np.testing.assert_allclose(to_numpy(backbone(INPUTS)), expected, atol=1e-5)


def test_standard_factored_layers_refuse_it_and_change_nothing(hub_file):
    weights, _, path = hub_file
    backbone = kl.apply_lora(
        same_base(weights), ["query", "value"], rank=RANK, in_place=True
    )
    before = [to_numpy(w).copy() for w in backbone.weights]
    with pytest.raises(ValueError, match="factored 'keras'.*'standard'"):
        kl.load_adapter(backbone, path)
    for w, value in zip(backbone.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_name_map_places_a_stored_layer(hub_file):
    weights, _, path = hub_file
    backbone = same_base(weights)
    model = keras.Model(backbone.inputs, backbone.outputs)
    # Swap the two blocks' queries: the shapes fit, the numbering is overridden.
    name_map = {
        "lora/11": "transformer_layer_1/self_attention/query",
        "lora/21": "transformer_layer_0/self_attention/query",
    }
    restored = kl.load_adapter(model, path, name_map=name_map)
    layers = dict(lora_layers(restored))
    with h5py.File(path, "r") as f:
        stored = f["lora/11/vars/lora_kernel_a"][()]
    np.testing.assert_array_equal(
        to_numpy(layers["transformer_layer_1/self_attention/query"].lora_a), stored
    )


def _h5(path, build):
    with h5py.File(path, "w") as f:
        build(f)
    return path


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda f: f.create_group("other"), ValueError, "no 'lora' group"),
        (
            lambda f: f.create_dataset("lora/vars/rank", data=0),
            ValueError,
            r"`rank` must be a positive integer.*rank=0",
        ),
        (
            lambda f: f.create_dataset("lora/vars/rank", data=2.5),
            TypeError,
            r"`rank`.*2\.5",
        ),
        (
            lambda f: f.create_dataset("lora/vars/rank", data=b"4"),
            ValueError,
            "not numeric",
        ),
        (
            lambda f: (
                f.create_dataset("lora/vars/rank", data=4),
                f.create_dataset("lora/x/vars/lora_kernel_a", data=np.ones((2, 4))),
            ),
            ValueError,
            "no layer number",
        ),
        (
            lambda f: (
                f.create_dataset("lora/vars/rank", data=4),
                f.create_dataset("lora/9/vars/lora_kernel_a", data=np.ones((16, 2))),
                f.create_dataset("lora/9/vars/lora_kernel_b", data=np.ones((2, 8))),
            ),
            ValueError,
            r"records rank 4 but lora_a has shape \(16, 2\)",
        ),
    ],
    ids=["no lora", "rank 0", "rank float", "rank bytes", "bad group", "rank lies"],
)
def test_broken_files_are_refused_and_change_nothing(tmp_path, build, error, match):
    path = _h5(tmp_path / "bad.lora.h5", build)
    backbone = gpt2()
    model = keras.Model(backbone.inputs, backbone.outputs)
    before = [to_numpy(w).copy() for w in model.weights]
    flags = [layer.trainable for layer in model._flatten_layers()]
    with pytest.raises(error, match=match):
        kl.load_adapter(model, path)
    assert flags == [layer.trainable for layer in model._flatten_layers()]
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_a_non_hdf5_h5_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.lora.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        kl.load_adapter(
            keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), path
        )


def test_a_plain_backbone_gets_the_in_place_call_to_make(hub_file):
    weights, expected, path = hub_file
    backbone = same_base(weights)
    before = [to_numpy(w).copy() for w in backbone.weights]
    with pytest.raises(ValueError, match="GPT2Backbone.*in_place=True") as info:
        kl.load_adapter(backbone, path)
    for w, value in zip(backbone.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)
    assert not lora_layers(backbone)
    # The call the message suggests works as it is written.
    call = str(info.value).split("`")[-2]
    eval(call, {"kl": kl, "model": backbone})  # noqa: S307
    kl.load_adapter(backbone, path)
    np.testing.assert_allclose(to_numpy(backbone(INPUTS)), expected, atol=1e-5)


def test_a_plain_backbone_loads_in_one_call_in_place(hub_file):
    # issue 21, item 6: KerasHub's own file into a plain backbone, one call.
    weights, expected, path = hub_file
    backbone = same_base(weights)
    assert kl.load_adapter(backbone, path, in_place=True) is backbone
    assert type(backbone) is keras_hub.models.GPT2Backbone
    names = {p.rsplit("/", 1)[-1] for p, _ in lora_layers(backbone)}
    assert names == {"query", "value"}
    np.testing.assert_allclose(to_numpy(backbone(INPUTS)), expected, atol=1e-5)


def test_loads_into_a_task_by_its_backbones_numbers(hub_file):
    # The file numbers the backbone's layers; a task holds more layers (the
    # backbone itself first), which must not shift the numbers.
    weights, expected, path = hub_file
    task = keras_hub.models.GPT2CausalLM(backbone=same_base(weights), preprocessor=None)
    kl.apply_lora(task, ["query", "value"], rank=RANK, in_place=True, factoring="keras")
    assert kl.load_adapter(task, path) is task
    np.testing.assert_allclose(to_numpy(task.backbone(INPUTS)), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gemma3"])
def test_other_architectures_load_to_kerashubs_outputs(tmp_path, name):
    # An encoder with two outputs, and Gemma3's own blocks with grouped-query
    # attention: each numbers its layers differently.
    import tiny_kerashub

    hub = tiny_kerashub.backbone(name)
    weights = hub.get_weights()
    inputs = tiny_kerashub.backbone_inputs(hub)
    hub.enable_lora(RANK)
    rng = np.random.default_rng(1)
    for variable in hub.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    hub.save_lora_weights(str(tmp_path / "x.lora.h5"))
    backbone = tiny_kerashub.backbone(name)
    backbone.set_weights(weights)
    kl.apply_lora(
        backbone, ["query", "value"], rank=RANK, in_place=True, factoring="keras"
    )
    kl.load_adapter(backbone, tmp_path / "x.lora.h5")
    for got, want in zip(
        keras.tree.flatten(backbone(inputs)),
        keras.tree.flatten(hub(inputs)),
        strict=True,
    ):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-5)
