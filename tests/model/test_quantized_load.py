"""A quantized KerasHub task with adapters saved to `.keras` loads without
the float model ever existing, and a file whose quantized weights do not
match the config is refused.

Keras builds a layer whose dtype policy is quantized with its quantized
variables directly (`Dense.build` calls `quantized_build` and skips the
float kernel), and a KerasHub backbone's config maps each quantized layer's
path to its policy (`DTypePolicyMap`). So `keras.saving.load_model` builds
int8 codes and small scales, never a float kernel: checked here by
recording every weight created during the load.
"""

import io
import zipfile

import h5py
import keras
import keras_hub
import numpy as np
import pytest
import tiny_kerashub
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model import quantized_bases
from keras_lora.model.quantized_bases import check_quantized_weights
from keras_lora.model.walk import lora_layers

BLOCKS = [-1, 8]
BLOCK_IDS = ["per_channel", "b8"]
# The weights a float model has in place of the quantized ones.
FLOAT_KERNELS = ("kernel", "embeddings", "reverse_embeddings")


def quantized_lora_lm(block):
    backbone = tiny_kerashub.backbone("llama3")
    lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)
    config = keras.quantizers.Int4QuantizationConfig(block_size=block)
    lm.quantize("int4", config=config)
    kl.apply_lora(lm, targets=["query", "value"], rank=2, in_place=True)
    randomize_adapters(lm, scale=0.3)
    return lm


class RecordWeights:
    """Records `(name, dtype, shape)` of every weight made while installed."""

    def __init__(self, monkeypatch):
        self.made = []
        original = keras.layers.Layer.add_weight

        def add_weight(layer, *args, **kwargs):
            variable = original(layer, *args, **kwargs)
            self.made.append((variable.name, variable.dtype, tuple(variable.shape)))
            return variable

        monkeypatch.setattr(keras.layers.Layer, "add_weight", add_weight)

    def float_kernels(self):
        return [
            made
            for made in self.made
            if made[0] in FLOAT_KERNELS and "float" in made[1] and len(made[2]) >= 2
        ]


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_a_saved_int4_lora_task_loads_quantized_without_float_kernels(
    block, tmp_path, monkeypatch
):
    lm = quantized_lora_lm(block)
    inputs = tiny_kerashub.backbone_inputs(lm.backbone)
    want = to_numpy(lm(inputs))
    path = str(tmp_path / "int4_lora.keras")
    lm.save(path)

    recorder = RecordWeights(monkeypatch)
    tiny_kerashub.backbone("llama3")  # the recorder sees a float model's kernels
    assert recorder.float_kernels()
    recorder.made.clear()
    loaded = keras.saving.load_model(path)
    assert recorder.made  # the load made its weights through add_weight
    assert recorder.float_kernels() == []

    assert type(loaded) is type(lm)
    assert [p for p, _ in lora_layers(loaded)] == [p for p, _ in lora_layers(lm)]
    modes = {
        layer.quantization_mode
        for layer in loaded.backbone._flatten_layers()
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    }
    assert modes == {"int4"}
    codes = [w for w in loaded.weights if w.name == "kernel"]
    assert codes and all(w.dtype == "int8" for w in codes)
    np.testing.assert_array_equal(to_numpy(loaded(inputs)), want)
    # A task converted in place comes back with its plain int4 layers on the
    # lean product, as `apply_lora` left them.
    plain = [
        layer
        for layer in loaded.backbone._flatten_layers()
        if layer.name in ("key", "attention_output", "token_embedding")
    ]
    assert len(plain) == 3 and all(quantized_bases.is_lean(lay) for lay in plain)


def rewrite_weights(src, dst, edit):
    """Copies the `.keras` file `src` to `dst`, `edit(h5_file)` applied to
    its weights."""
    with zipfile.ZipFile(src) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO(files["model.weights.h5"])
    with h5py.File(buffer, "r+") as weights:
        edit(weights)
    files["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def query_weights(weights):
    """The h5 group of the first block's `query` base layer's variables."""
    found = []
    weights.visit(
        lambda name: found.append(name) if "_query_dense/layer/vars" in name else None
    )
    return weights[found[0]]


def test_scales_of_another_shape_are_refused_by_keras(tmp_path):
    lm = quantized_lora_lm(8)
    path, bad = tmp_path / "ok.keras", tmp_path / "bad.keras"
    lm.save(str(path))

    def cut_scales(weights):
        group = query_weights(weights)
        scale = group["1"][...]  # kernel_scale, (groups, units)
        del group["1"]
        group["1"] = scale[:, :-1]

    rewrite_weights(path, bad, cut_scales)
    # Keras's own check, a clear error (not a warning) for a shape mismatch.
    with pytest.raises(ValueError, match=r"shape of the target variable.*kernel_scale"):
        keras.saving.load_model(str(bad))


def test_row_groups_that_do_not_match_the_config_are_refused(tmp_path):
    lm = quantized_lora_lm(8)
    inputs = tiny_kerashub.backbone_inputs(lm.backbone)
    path, bad = tmp_path / "ok.keras", tmp_path / "bad.keras"
    lm.save(str(path))

    def shuffle_groups(weights):
        group = query_weights(weights)
        g_idx = group["3"][...]  # stored as floats: [0]*8 + [1]*8
        group["3"][...] = g_idx[::-1]

    rewrite_weights(path, bad, shuffle_groups)
    # Keras loads it silently, a different model...
    loaded = keras.saving.load_model(str(bad))
    assert not np.array_equal(to_numpy(loaded(inputs)), to_numpy(lm(inputs)))

    # ...which keras_lora refuses, changing nothing.
    def overrides():
        return [vars(lay).get("quantized_call") for lay in loaded._flatten_layers()]

    before = overrides()
    with pytest.raises(ValueError, match=r"query.*block_size=8.*`g_idx`"):
        kl.lean_quantized(loaded)
    with pytest.raises(ValueError, match=r"query.*block_size=8.*`g_idx`"):
        check_quantized_weights(loaded)
    assert overrides() == before


def test_apply_lora_refuses_mismatched_row_groups_before_changing_anything():
    backbone = tiny_kerashub.backbone("llama3")
    lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)
    lm.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8))
    value = lm.backbone.get_layer("transformer_layer_0")._self_attention_layer
    value = value._value_dense
    value.g_idx.assign(to_numpy(value.g_idx)[::-1].copy())
    with pytest.raises(ValueError, match=r"value.*`g_idx` that do not match"):
        kl.apply_lora(lm, targets=["query", "value"], rank=2, in_place=True)
    assert lora_layers(lm) == []
    assert not any("quantized_call" in vars(lay) for lay in lm._flatten_layers())


def test_non_finite_scales_are_refused():
    lm = quantized_lora_lm(-1)
    key = lm.backbone.get_layer("transformer_layer_0")._self_attention_layer._key_dense
    scale = to_numpy(key.kernel_scale).copy()
    scale[0] = np.inf
    key.kernel_scale.assign(scale)
    with pytest.raises(ValueError, match=r"key.*non-finite values in `kernel_scale`"):
        kl.lean_quantized(lm)
