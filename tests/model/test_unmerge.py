"""merge_lora(model, in_place=True) and unmerge_lora: exact, and safe."""

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model import merge
from keras_lora.model.surgery import lora_layers

X = np.random.default_rng(6).normal(size=(8, 16)).astype("float32")


@pytest.mark.parametrize(
    "options", [{}, {"use_dora": True, "init": "pissa"}], ids=["plain", "pissa_dora"]
)
def test_merge_in_place_then_unmerge_is_exact(options):
    base = mlp()
    base_kernels = [to_numpy(w) for w in base.weights]
    lora = randomize_adapters(kl.apply_lora(base, rank=2, **options))
    weights = [to_numpy(w) for w in lora.weights]
    unmerged = to_numpy(lora(X))
    unmerged_predict = lora.predict(X, verbose=0)
    assert kl.merge_lora(lora, in_place=True) is lora
    merged = to_numpy(lora(X))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    np.testing.assert_allclose(lora.predict(X, verbose=0), unmerged, atol=1e-5)
    np.testing.assert_allclose(merged, to_numpy(kl.merge_lora(lora)(X)), atol=1e-6)
    # The base model (sharing the kernels) is untouched while merged.
    for w, value in zip(base.weights, base_kernels, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)
    with pytest.raises(ValueError, match="unmerge_lora"):
        kl.set_adapter(lora, "default")
    with pytest.raises(ValueError, match="unmerge_lora"):
        kl.merge_lora(lora, in_place=True)
    kl.unmerge_lora(lora)
    np.testing.assert_array_equal(to_numpy(lora(X)), unmerged)
    np.testing.assert_array_equal(lora.predict(X, verbose=0), unmerged_predict)
    for w, value in zip(lora.weights, weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)
    with pytest.raises(ValueError, match="not merged in place"):
        kl.unmerge_lora(lora)


def test_merge_in_place_in_bfloat16_unmerges_without_drift():
    keras.config.set_dtype_policy("bfloat16")
    base = mlp()
    lora = randomize_adapters(kl.apply_lora(base, rank=2))
    kernels = [to_numpy(layer.layer.kernel).copy() for _, layer in lora_layers(lora)]
    before = to_numpy(lora(X))
    for _ in range(5):
        kl.merge_lora(lora, in_place=True)
        kl.unmerge_lora(lora)
    np.testing.assert_array_equal(to_numpy(lora(X)), before)
    for (_, layer), kernel in zip(lora_layers(lora), kernels, strict=True):
        np.testing.assert_array_equal(to_numpy(layer.layer.kernel), kernel)


def test_merge_one_adapter_in_place():
    lora = randomize_adapters(kl.apply_lora(mlp(), rank=2))
    kl.add_adapter(lora, "other", rank=2)
    kl.set_adapter(lora, "other")
    want = to_numpy(kl.merge_lora(lora, adapter="default")(X))
    kl.merge_lora(lora, in_place=True, adapter="default")
    np.testing.assert_allclose(to_numpy(lora(X)), want, atol=1e-5)
    kl.unmerge_lora(lora)
    assert kl.active_adapters(lora) == ["other"]


def test_non_finite_merge_raises_names_layer_and_adapter_and_changes_nothing():
    lora = randomize_adapters(kl.apply_lora(mlp(), rank=2))
    layer = dict(lora_layers(lora))["d2"]
    layer.lora_b.assign(np.full(layer.lora_b.shape, np.inf, "float32"))
    before = to_numpy(dict(lora_layers(lora))["d1"](X))
    with pytest.raises(
        ValueError, match=r"'d2' \(adapters \['default'\]\).*NaN or Inf"
    ):
        kl.merge_lora(lora, in_place=True)
    assert not merge.is_merged(lora)
    np.testing.assert_array_equal(to_numpy(dict(lora_layers(lora))["d1"](X)), before)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kl.merge_lora(lora)
    kl.merge_lora(lora, in_place=True, check_finite=False)
    assert merge.is_merged(lora)


def test_int8_base_merges_in_place_like_merge_lora_and_unmerges_exactly():
    base = mlp()
    base.get_layer("d1").quantize("int8")
    lora = randomize_adapters(kl.apply_lora(base, rank=2, targets=["d1"]))
    before = to_numpy(lora(X))
    copy = to_numpy(kl.merge_lora(lora)(X))
    kl.merge_lora(lora, in_place=True)
    np.testing.assert_allclose(to_numpy(lora(X)), copy, atol=1e-5)
    kl.unmerge_lora(lora)
    np.testing.assert_array_equal(to_numpy(lora(X)), before)


def test_reversible_is_the_merge_that_in_place_named_and_in_place_warns():
    lora = randomize_adapters(kl.apply_lora(mlp(), rank=2))
    unmerged = to_numpy(lora(X))
    copy = to_numpy(kl.merge_lora(lora)(X))
    assert kl.merge_lora(lora, reversible=True) is lora
    assert merge.is_merged(lora)
    np.testing.assert_allclose(to_numpy(lora(X)), copy, atol=1e-6)
    kl.unmerge_lora(lora)
    np.testing.assert_array_equal(to_numpy(lora(X)), unmerged)
    with pytest.warns(DeprecationWarning, match="`in_place` is deprecated"):
        assert kl.merge_lora(lora, in_place=True) is lora
    assert merge.is_merged(lora)
    kl.unmerge_lora(lora)
    with pytest.warns(DeprecationWarning):  # in_place=False asks for a copy
        plain = kl.merge_lora(lora, in_place=False)
    assert plain is not lora and not lora_layers(plain)
