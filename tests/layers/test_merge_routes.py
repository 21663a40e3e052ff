"""Every merge route equals the unmerged forward, for each layer type and
variant: `merge_lora` (a copy of plain Keras layers), `export`'s merged
model (`format="keras"`, reloaded), `merge_lora(in_place=True)` (and its
exact undo), and the merged kernel itself, which every route takes from
the one `delta()` (the host merge of a plain adapter computes the same
`W + scale·A·B` in NumPy).

Tolerance: the unmerged path computes `x·W + s·(x·A)·B`, a merged one
`x·(W + s·A·B)`; in float32 the two differ by rounding only, at most a few
units of 6e-8 times the reduction length (≤ 54 here) on outputs of size
~1, so 1e-5 absolute/relative holds with margin, while a wrong factoring,
scale or DoRA norm is off by 1e-2 or more.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers import host_merge
from keras_lora.model.merge import is_merged

TOL = {"rtol": 1e-5, "atol": 1e-5}

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "alpha": 4},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
}


def dense_model():
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(5, name="target")(inputs))


def einsum_model():
    inputs = keras.Input((3, 6))
    layer = keras.layers.EinsumDense(
        "abc,cde->abde", (3, 2, 4), bias_axes="de", name="target"
    )
    return keras.Model(inputs, layer(inputs))


def embedding_model():
    inputs = keras.Input((3,), dtype="int32")
    return keras.Model(inputs, keras.layers.Embedding(10, 6, name="target")(inputs))


def conv_model():
    inputs = keras.Input((5, 5, 3))
    return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="target")(inputs))


# name: (model, options for apply_lora, input maker)
LAYERS = {
    "dense": (dense_model, {}, lambda rng: rng.normal(size=(4, 6))),
    "einsum_standard": (
        einsum_model,
        {"factoring": "standard"},
        lambda rng: rng.normal(size=(4, 3, 6)),
    ),
    "einsum_keras": (
        einsum_model,
        {"factoring": "keras"},
        lambda rng: rng.normal(size=(4, 3, 6)),
    ),
    "embedding": (embedding_model, {}, lambda rng: rng.integers(0, 10, (4, 3))),
    "conv": (conv_model, {}, lambda rng: rng.normal(size=(2, 5, 5, 3))),
}


def lora_model(layer_type, variant):
    make, layer_options, sample = LAYERS[layer_type]
    model = make()
    options = {**layer_options, **VARIANTS[variant]}
    lora = kl.apply_lora(model, targets=["target"], rank=2, **options)
    (layer,) = [lay for _, lay in kl.model.surgery.lora_layers(lora)]
    rng = np.random.default_rng(0)
    for variable in layer.trainable_weights:  # A, B (and DoRA's magnitude)
        value = to_numpy(variable)
        noise = rng.normal(0, 0.3, value.shape)
        variable.assign((value + noise).astype("float32"))
    x = sample(rng)
    x = x.astype("int32" if layer_type == "embedding" else "float32")
    return lora, layer, x


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer_type", list(LAYERS))
def test_every_merge_route_equals_the_unmerged_forward(layer_type, variant, tmp_path):
    lora, layer, x = lora_model(layer_type, variant)
    unmerged = to_numpy(lora(x))
    base = to_numpy(layer.layer(x))
    assert np.abs(unmerged - base).max() > 1e-2  # the adapter is applied

    # The one delta: the merged kernel is W + delta().
    kernel = to_numpy(layer.base_kernel)
    delta = to_numpy(layer.delta())
    merged_kernel = to_numpy(layer.merged_kernel())
    np.testing.assert_allclose(merged_kernel, kernel + delta, **TOL)

    # merge_lora: a copy made of plain Keras layers.
    copy = kl.merge_lora(lora)
    assert not kl.model.surgery.lora_layers(copy)
    plain = copy.get_layer("target")
    np.testing.assert_allclose(to_numpy(plain.weights[0]), merged_kernel, **TOL)
    np.testing.assert_allclose(to_numpy(copy(x)), unmerged, **TOL)

    # export's merged model, through a file.
    path = tmp_path / "merged.keras"
    kl.export(lora, path, format="keras")
    exported = keras.saving.load_model(path)
    assert not kl.model.surgery.lora_layers(exported)
    np.testing.assert_allclose(to_numpy(exported(x)), unmerged, **TOL)

    # In place, and back, exactly.
    kl.merge_lora(lora, in_place=True)
    assert is_merged(lora) and layer.merged
    np.testing.assert_allclose(to_numpy(lora(x)), unmerged, **TOL)
    kl.unmerge_lora(lora)
    assert not layer.merged
    np.testing.assert_array_equal(to_numpy(lora(x)), unmerged)


@pytest.mark.parametrize("layer_type", list(LAYERS))
def test_host_merge_is_the_same_delta(layer_type):
    """The memory-lean NumPy merge of a plain adapter equals `W + delta()`."""
    lora, layer, _ = lora_model(layer_type, "rslora")
    array = host_merge.merged_kernel_array(
        layer.base_kernel,
        layer.lora_a,
        layer.lora_b,
        layer.scale,
        layer.rank,
        layer.kernel_layout(),
    )
    expected = to_numpy(layer.base_kernel) + to_numpy(layer.delta())
    np.testing.assert_allclose(array, expected, **TOL)


def test_delta_of_a_named_adapter():
    """`delta(name)` is that adapter's update alone, active or not."""
    lora, layer, _ = lora_model("dense", "plain")
    alone = to_numpy(layer.delta())
    layer.add_adapter("other", rank=2)
    other = layer.get_adapter("other")
    other.b.assign(np.ones(other.b.shape, "float32"))
    np.testing.assert_array_equal(to_numpy(layer.delta("default")), alone)
    expected = to_numpy(other.a) @ to_numpy(other.b) * other.scale
    np.testing.assert_allclose(to_numpy(layer.delta("other")), expected, **TOL)
    with pytest.raises(ValueError, match="no adapter 'missing'"):
        layer.delta("missing")
