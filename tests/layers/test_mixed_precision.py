"""Mixed precision for every LoRA layer type.

tests/layers/test_layers_dense.py trains a `LoRADense` under both mixed policies;
this file does the same for `LoRAEinsumDense`, `LoRAEmbedding` and
`LoRAConv`, and checks for all four types that merging gives a kernel in
the base's variable dtype.

The casting order (also in the README):
- forward: each adapter (stored float32) is cast to the compute dtype, then
  `x·A`, `·scale`, `·B` and the add to the base output run in the compute
  dtype; the base layer computes as it always does;
- merge: the base kernel is cast to float32, `scale·A·B` is computed in
  float32 and added, and the sum is cast once to the base kernel's variable
  dtype.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl

POLICIES = ["mixed_float16", "mixed_bfloat16"]
RNG = np.random.default_rng(11)
N = 64


def einsum_model():
    inputs = keras.Input((5, 8))
    x = keras.layers.EinsumDense("abc,cd->abd", (5, 8), activation="tanh", name="t")(
        inputs
    )
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def embedding_model():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="t")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def conv_model():
    inputs = keras.Input((8, 3))
    x = keras.layers.Conv1D(8, 3, activation="tanh", name="t")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


def dense_model():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(8, activation="tanh", name="t")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(x))


DATA = {
    "einsum": RNG.normal(size=(N, 5, 8)).astype("float32"),
    "embedding": RNG.integers(0, 20, size=(N, 5)).astype("int32"),
    "conv": RNG.normal(size=(N, 8, 3)).astype("float32"),
    "dense": RNG.normal(size=(N, 8)).astype("float32"),
}
MODELS = {
    "einsum": einsum_model,
    "embedding": embedding_model,
    "conv": conv_model,
    "dense": dense_model,
}
TYPES = {
    "einsum": kl.LoRAEinsumDense,
    "embedding": kl.LoRAEmbedding,
    "conv": kl.LoRAConv,
    "dense": kl.LoRADense,
}


def lora_of(kind, policy):
    keras.config.set_dtype_policy(policy)
    base = MODELS[kind]()
    lora = kl.apply_lora(base, targets=["t"], rank=4)
    layer = lora.get_layer("t")
    assert isinstance(layer, TYPES[kind])
    return base, lora, layer


def targets_for(kind):
    # A target the base cannot fit exactly: the adapter has work to do.
    x = DATA[kind].astype("float32")
    return np.tanh(x.reshape(N, -1)[:, :3].sum(axis=1, keepdims=True))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["einsum", "embedding", "conv"])
def test_adapters_float32_compute_follows_policy_and_adam_trains(kind, policy):
    _, lora, layer = lora_of(kind, policy)
    compute = policy.split("_")[1]
    assert layer.dtype_policy.name == policy
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
    out = layer(DATA[kind][:4])
    assert keras.backend.standardize_dtype(out.dtype) == compute
    before = [to_numpy(layer.lora_a).copy(), to_numpy(layer.lora_b).copy()]
    lora.compile(keras.optimizers.Adam(0.02), "mse")
    history = lora.fit(
        DATA[kind], targets_for(kind), epochs=4, batch_size=32, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    # Adam's small updates reach float32 adapters (keras-hub#2629: with
    # bf16 adapters they rounded away to nothing).
    for old, new in zip(before, (layer.lora_a, layer.lora_b), strict=True):
        assert not np.array_equal(old, to_numpy(new))
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"


@pytest.mark.parametrize(
    "policy, tolerance",
    [("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1), ("bfloat16", 1e-1)],
)
@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding", "conv"])
def test_merge_gives_a_kernel_in_the_base_variable_dtype(kind, policy, tolerance):
    base, lora, layer = lora_of(kind, policy)
    attr = layer.kernel_attr
    base_dtype = getattr(base.get_layer("t"), attr).dtype
    # Mixed policies store float32 variables; "bfloat16" stores bfloat16.
    assert base_dtype == ("bfloat16" if policy == "bfloat16" else "float32")
    assert layer.lora_a.dtype == layer.lora_b.dtype == "float32"
    for w in (layer.lora_a, layer.lora_b):
        w.assign(RNG.normal(0, 0.2, w.shape).astype("float32"))
    merged = kl.merge_lora(lora)
    kernel = getattr(merged.get_layer("t"), attr)
    assert kernel.dtype == base_dtype
    assert merged.get_layer("t").dtype_policy.name == policy
    # Merged in float32, then rounded once to the variable dtype.
    expected = to_numpy(getattr(layer.layer, attr)).astype("float32") + to_numpy(
        layer.delta()
    )
    np.testing.assert_allclose(
        to_numpy(kernel).astype("float32"), expected, rtol=1e-2, atol=1e-2
    )
    x = DATA[kind][:8]
    np.testing.assert_allclose(
        to_numpy(merged(x)).astype("float32"),
        to_numpy(lora(x)).astype("float32"),
        rtol=tolerance,
        atol=tolerance,
    )


@pytest.mark.parametrize(
    "policy, tolerance", [("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1)]
)
@pytest.mark.parametrize("kind", ["dense", "einsum", "conv", "embedding"])
def test_a_mixed_batch_of_concatenated_adapters_runs_under_the_policy(
    kind, policy, tolerance
):
    """`"concat"` scales each adapter's columns by a constant made in the
    compute dtype (it was a NumPy bfloat16 array, which torch rejects)."""
    _, lora, layer = lora_of(kind, policy)
    kl.add_adapter(lora, "second", rank=2, alpha=4)
    for name in layer.adapter_names:
        b = layer.get_adapter(name).b
        b.assign(0.3 * RNG.normal(size=b.shape).astype("float32"))
    served = kl.mixed_adapter_model(lora, ["default", "second"], strategy="concat")
    x, index = DATA[kind][:4], np.array([0, 1, 1, 0], "int32")
    y = to_numpy(served.predict_on_batch([x, index])).astype("float32")
    for name, k in (("default", 0), ("second", 1)):
        kl.set_adapter(lora, name)
        alone = to_numpy(lora.predict_on_batch(x)).astype("float32")
        rows = index == k
        np.testing.assert_allclose(y[rows], alone[rows], rtol=tolerance, atol=tolerance)
