"""One whole user journey per modality, on a tiny KerasHub *task*.

The families test (`test_kerashub_families.py`) converts bare backbones; users
run tasks. Each journey here builds one tiny task from config (no presets, no
downloads; tokenizers and image converters made in code), once per module,
and walks it through what a user does:

1. convert: `apply_lora(task, ..., in_place=True)` returns the same object,
   of the same class, with its preprocessor and backbone;
2. `fit` two steps: only `lora_a`/`lora_b` change, every other weight is
   bitwise the same;
3. the task's own inference (`predict` for the classifier, `generate` for
   generative tasks) runs after conversion and follows the trained adapter;
4. `save_adapter`, then a fresh task of the same config with
   `load_adapter(in_place=True)`: the same predictions / greedy tokens;
5. `merge_lora`: a plain task of the same class predicting / generating the
   same (greedy tokens equal, logits within float32 rounding);
6. export, where it applies (the ViT classifier: `kl.export` to a SavedModel
   serving the task's logits).

Adapters are given random weights before training (`randomize_adapters`) so
that the adapted outputs differ measurably from the base model's: the
round-trip and merge checks could not pass with an adapter that was dropped.

Left out, and why:
- Whisper: KerasHub 0.32 has `WhisperBackbone`, `WhisperTokenizer` and
  `WhisperAudioConverter` but no audio-to-text task (no `generate`); the
  audio journey uses `MoonshineAudioToText`, KerasHub's audio-to-text task.
- Export of the generative tasks: a SavedModel serves the task's forward
  call (logits), not `generate`; that path is tested on GPT2CausalLM in
  `tests/test_export.py`, so only the classifier, whose served output is
  what a user deploys, is exported here (it also keeps CI cost down: export
  from JAX and torch runs a TensorFlow subprocess).
"""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

models = keras_hub.models

RANK = 2


# Helpers -------------------------------------------------------------------


def weights_by_path(model):
    return {w.path: to_numpy(w).copy() for w in model.weights}


def changed_paths(model, before):
    return sorted(
        w.path for w in model.weights if not np.array_equal(to_numpy(w), before[w.path])
    )


def is_adapter(path):
    return path.split("/")[-1] in ("lora_a", "lora_b")


def base_weights(model):
    return {p: v for p, v in weights_by_path(model).items() if not is_adapter(p)}


def convert(task, targets):
    """Step 1: converts in place; checks it is the same task object."""
    preprocessor, backbone, cls = task.preprocessor, task.backbone, type(task)
    result = kl.apply_lora(task, targets=targets, rank=RANK, in_place=True)
    assert result is task and type(task) is cls
    assert task.preprocessor is preprocessor and task.backbone is backbone
    assert lora_layers(task), "no layer was converted"
    randomize_adapters(task, scale=0.3)
    return task


def fit_only_adapters(task, *args, **kwargs):
    """Step 2: `fit` changes every adapter weight and nothing else."""
    before = weights_by_path(task)
    history = task.fit(*args, epochs=1, verbose=0, **kwargs)
    assert all(np.isfinite(history.history["loss"]))
    changed = changed_paths(task, before)
    not_adapters = [p for p in changed if not is_adapter(p)]
    assert not not_adapters, f"fit changed base weights: {not_adapters}"
    # lora_a of every layer moves (lora_b is random, so its gradient is not 0).
    moved_a = {p.rsplit("/", 1)[0] for p in changed if p.endswith("lora_a")}
    assert len(moved_a) == len(lora_layers(task))


def reloaded(task, build, tmp_path):
    """Step 4: the adapter file, loaded in place into a fresh task."""
    path = tmp_path / "adapter.safetensors"
    kl.save_adapter(task, path)
    fresh = build()
    # The fresh task's base weights are those the adapter was trained on.
    trained = base_weights(task)
    fresh_base = base_weights(fresh)
    assert fresh_base.keys() == trained.keys()
    for p, v in fresh_base.items():
        np.testing.assert_array_equal(v, trained[p], err_msg=p)
    cls = type(fresh)
    assert kl.load_adapter(fresh, path, in_place=True) is fresh
    assert type(fresh) is cls
    # Layer paths start with the backbone's name, which Keras numbers.
    assert lora_paths(fresh) == lora_paths(task)
    return fresh


def lora_paths(model):
    return [p.split("/", 1)[-1] for p, _ in lora_layers(model)]


def merged(task):
    """Step 5: a plain task of the same class, no adapter left."""
    out = kl.merge_lora(task)
    assert type(out) is type(task) and out is not task
    assert not lora_layers(out)
    assert not [w.path for w in out.weights if is_adapter(w.path)]
    return out


# float32 merge tolerance: the merged kernel W + s·A·B is rounded once per
# element, then multiplied; the adapted layer computes x·W + s·(x·A)·B. With
# hidden sizes of 16 and |logits| of order 1, the two differ by a few ulps
# of the logits (~1e-7 each), summed over one or two blocks: 1e-5 leaves a
# margin of 10x and is still 100x below the adapter's effect, which every
# journey asserts to exceed 1e-3.
MERGE_ATOL = 1e-5
ADAPTER_EFFECT = 1e-3


# ViT image classification ---------------------------------------------------

IMAGE = 16
CLASSES = 3


def vit_classifier():
    keras.utils.set_random_seed(0)
    backbone = models.ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    converter = keras_hub.layers.ViTImageConverter(image_size=(IMAGE, IMAGE))
    preprocessor = models.ViTImageClassifierPreprocessor(image_converter=converter)
    return models.ViTImageClassifier(
        backbone=backbone, num_classes=CLASSES, preprocessor=preprocessor
    )


def vit_data():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, IMAGE, IMAGE, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1], "int32")
    return images, labels


@pytest.fixture(scope="module")
def vit_journey():
    task = vit_classifier()
    images, labels = vit_data()
    base = task.predict(images, verbose=0)
    convert(task, "all-linear")
    # "all-linear" leaves the classification head out and takes the rest.
    assert "output/lora_a" not in {w.path.split("/", 1)[-1] for w in task.weights}
    fit_only_adapters(task, images, labels, batch_size=2)  # 2 steps
    return task, images, base


def test_vit_converts_in_place_and_fits_only_adapters(vit_journey):
    task, images, base = vit_journey
    assert type(task) is models.ViTImageClassifier
    predicted = task.predict(images, verbose=0)
    assert predicted.shape == (len(images), CLASSES)
    assert np.max(np.abs(predicted - base)) > ADAPTER_EFFECT


def test_vit_adapter_file_gives_the_same_predictions(vit_journey, tmp_path):
    task, images, _ = vit_journey
    fresh = reloaded(task, vit_classifier, tmp_path)
    # Same weights, same program: the same bits.
    np.testing.assert_array_equal(
        fresh.predict(images, verbose=0), task.predict(images, verbose=0)
    )


def test_vit_merged_classifier_predicts_the_same(vit_journey):
    task, images, _ = vit_journey
    plain = merged(task)
    np.testing.assert_allclose(
        plain.predict(images, verbose=0),
        task.predict(images, verbose=0),
        atol=MERGE_ATOL,
    )


def test_vit_exports_a_saved_model_serving_the_adapted_logits(vit_journey, tmp_path):
    import tensorflow as tf

    task, images, _ = vit_journey
    assert kl.export(task, tmp_path / "vit") == tmp_path / "vit"
    loaded = tf.saved_model.load(str(tmp_path / "vit"))
    served = loaded.serve(images).numpy()
    # The SavedModel serves the backbone and head, not the preprocessor.
    expected = to_numpy(task(task.preprocessor(images)))
    np.testing.assert_allclose(served, expected, atol=MERGE_ATOL)
