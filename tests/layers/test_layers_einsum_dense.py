import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers.einsum_dense import lora_equations


def mse(model, x, y):
    """The loss, computed eagerly: no extra compiled `evaluate` step."""
    return float(np.mean((to_numpy(model(x)) - y) ** 2))


# (equation, output_shape, bias_axes, input_shape without batch,
#  standard factoring's (A, B) shapes at rank 3, or None where it has none)
EQUATIONS = [
    ("ab,bc->ac", 6, "c", (5,), ((5, 3), (3, 6))),  # a plain matmul
    ("abc,cde->abde", (4, 2, 3), "de", (4, 5), ((5, 3), (3, 2, 3))),  # MHA query
    ("abcd,cde->abe", (4, 6), "e", (4, 2, 3), ((2, 3, 3), (3, 6))),  # MHA output
    ("...b,bc->...c", 6, None, (3, 5), ((5, 3), (3, 6))),  # ellipsis
    ("abc,cd->adb", (6, 4), "d", (4, 5), ((5, 3), (3, 6))),  # last axis not last
    ("abc,dc->abd", (4, 6), "d", (4, 5), ((5, 3), (3, 6))),  # kernel (out, in)
    ("abc,bc->abc", (4, 5), None, (4, 5), None),  # kernel axis shared with input
]
IDS = [e[0] for e in EQUATIONS]


def einsum_layer(equation, output_shape, bias_axes, input_shape):
    layer = keras.layers.EinsumDense(
        equation, output_shape=output_shape, bias_axes=bias_axes, name="proj"
    )
    layer.build((2,) + input_shape)
    if layer.bias is not None:  # a non-zero bias, so it is checked too
        layer.bias.assign(
            np.linspace(-1, 1, int(np.prod(layer.bias.shape))).reshape(layer.bias.shape)
        )
    return layer


def randomize(lora, seed=0):
    rng = np.random.default_rng(seed)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))


def expected_shapes(factoring, kernel, standard):
    if factoring == "keras" or standard is None:
        return kernel[:-1] + (3,), (3, kernel[-1])
    return standard


@pytest.mark.parametrize("factoring", [None, "standard", "keras"])
@pytest.mark.parametrize(
    "equation,output_shape,bias_axes,input_shape,standard", EQUATIONS, ids=IDS
)
def test_unmerged_path_equals_merged_kernel(
    equation, output_shape, bias_axes, input_shape, standard, factoring
):
    base = einsum_layer(equation, output_shape, bias_axes, input_shape)
    x = np.random.default_rng(1).normal(size=(2,) + input_shape).astype("float32")
    if factoring == "standard" and standard is None:
        with pytest.raises(ValueError, match="no standard factoring"):
            kl.LoRAEinsumDense(base, rank=3, factoring=factoring)
        return
    lora = kl.LoRAEinsumDense(base, rank=3, alpha=6, factoring=factoring)
    kernel = tuple(base.kernel.shape)
    a_shape, b_shape = expected_shapes(factoring, kernel, standard)
    assert tuple(lora.lora_a.shape) == a_shape
    assert tuple(lora.lora_b.shape) == b_shape
    assert lora.factoring == (factoring or ("standard" if standard else "keras"))
    # Fresh: B is zero, so exactly the base's output.
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))

    randomize(lora)
    expected = to_numpy(keras.ops.einsum(equation, x, lora.merged_kernel()))
    if base.bias is not None:
        expected = expected + to_numpy(base.bias)
    got = to_numpy(lora(x))
    assert np.abs(got - to_numpy(base(x))).max() > 0.1  # the update is there
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    merged = lora.merged_layer()
    assert type(merged) is keras.layers.EinsumDense and merged.name == "proj"
    np.testing.assert_allclose(to_numpy(merged(x)), got, rtol=1e-5, atol=1e-5)


def test_standard_factoring_is_lora_on_the_flattened_matrix():
    """Query kernel (dim, heads, head_dim): `A·B` is the `(dim, heads*head_dim)`
    matrix product, with no sharing across heads (PEFT's LoRA)."""
    base = einsum_layer("abc,cde->abde", (4, 2, 3), "de", (4, 5))
    lora = kl.LoRAEinsumDense(base, rank=3, alpha=3)
    randomize(lora)
    a, b = to_numpy(lora.lora_a), to_numpy(lora.lora_b)
    expected = (a @ b.reshape(3, 6)).reshape(5, 2, 3)
    np.testing.assert_allclose(to_numpy(lora.delta()), expected, rtol=1e-6, atol=1e-6)


def test_lora_equations_common_case_is_einsum_then_matmul():
    assert lora_equations("abc,cde->abde")[2] is True
    first, second, is_matmul = lora_equations("abc,bc->abc")
    assert not is_matmul and first.startswith("abc,b")


def test_factoring_is_validated_and_kept_in_the_config():
    base = einsum_layer("abc,cde->abde", (4, 2, 3), "de", (4, 5))
    with pytest.raises(ValueError, match="factoring"):
        kl.LoRAEinsumDense(base, rank=2, factoring="peft")
    lora = kl.LoRAEinsumDense(base, rank=2, factoring="keras")
    config = lora.get_config()
    assert config["factoring"] == "keras"
    assert kl.LoRAEinsumDense.from_config(config).factoring == "keras"
    assert kl.LoRAEinsumDense(base, rank=2).get_config()["factoring"] == "standard"


def test_a_config_without_factoring_means_keras():
    """Configs written before `factoring` existed hold Keras's factoring."""
    base = einsum_layer("abc,cde->abde", (4, 2, 3), "de", (4, 5))
    config = kl.LoRAEinsumDense(base, rank=2, factoring="keras").get_config()
    del config["factoring"]
    restored = kl.LoRAEinsumDense.from_config(config)
    assert restored.factoring == "keras"
    assert tuple(restored.lora_a.shape) == (5, 2, 2)


def test_trainable_weights_are_exactly_the_adapters_and_base_stays_frozen():
    base = einsum_layer("abc,cde->abde", (4, 2, 3), "de", (4, 5))
    lora = kl.LoRAEinsumDense(base, rank=2)
    assert {w.name for w in lora.trainable_weights} == {"lora_a", "lora_b"}
    lora.trainable = True
    assert not base.trainable and not base.kernel.trainable
    assert len(lora.trainable_weights) == 2


def test_refuses_other_layers_and_bad_rank():
    with pytest.raises(TypeError, match="LoRAEinsumDense wraps"):
        kl.LoRAEinsumDense(keras.layers.Dense(3), rank=2)
    with pytest.raises(ValueError, match="rank"):
        kl.LoRAEinsumDense(einsum_layer("ab,bc->ac", 6, "c", (5,)), rank=0)


def test_mha_query_value_fit_round_trip_and_merge(tmp_path):
    """Adapters on MultiHeadAttention's query and value, end to end."""
    inputs = keras.Input((6, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, 6, 8)).astype("float32")
    target = rng.normal(size=(64, 1)).astype("float32")
    before = to_numpy(model(data))

    lora_model = kl.apply_lora(model, targets=["query", "value"], rank=2, alpha=4)
    paths = sorted(p for p, _ in kl.model.surgery.lora_layers(lora_model))
    assert paths == ["mha/query", "mha/value"]
    np.testing.assert_array_equal(to_numpy(lora_model(data)), before)
    names = sorted(w.path for w in lora_model.trainable_weights)
    assert len(names) == 4 and all("lora_" in n for n in names)

    mha = lora_model.get_layer("mha").layer  # inside its LoRAContainer
    kernel = to_numpy(mha._query_dense.layer.kernel).copy()
    lora_model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    first = mse(lora_model, data, target)
    lora_model.fit(data, target, epochs=5, batch_size=16, verbose=0)
    assert mse(lora_model, data, target) < first
    np.testing.assert_array_equal(to_numpy(mha._query_dense.layer.kernel), kernel)
    np.testing.assert_array_equal(to_numpy(model(data)), before)  # original intact

    out_lora = to_numpy(lora_model(data))
    merged = kl.merge_lora(lora_model)
    assert not kl.model.surgery.lora_layers(merged)
    assert type(merged.get_layer("mha")._query_dense) is keras.layers.EinsumDense
    np.testing.assert_allclose(to_numpy(merged(data)), out_lora, atol=1e-5)

    path = tmp_path / "mha.keras"
    lora_model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(reloaded(data)), out_lora)
    query = reloaded.get_layer("mha").layer._query_dense
    assert isinstance(query, kl.LoRAEinsumDense)
    assert (query.rank, query.alpha) == (2, 4.0)

    # The adapter file alone, onto the base model, restores the outputs.
    kl.save_adapter(lora_model, tmp_path / "adapter.safetensors")
    restored = kl.load_adapter(model, tmp_path / "adapter.safetensors")
    np.testing.assert_array_equal(to_numpy(restored(data)), out_lora)
