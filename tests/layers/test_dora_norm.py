"""DoRA's column norm without the kernel-sized `W + s·A·B` (`variants.dora_norm`).

Each layer type's norm is checked against `‖W + s·A·B‖` formed in float64
from the factors, with its own independent NumPy reference of how `A·B`
covers the kernel, and the merged kernel against the DoRA formula.

Tolerance: the new norm is float32 sums of at most 54 products per output
unit (fan-in), so each of `‖W_j‖²`, `(AᵀW)_j·B_j`, `B_jᵀ(AᵀA)B_j` is off by at
most ~54·u (u = 6e-8) relative to its sum of magnitudes. The tests assert
that their data has no cancellation (`κ = (‖W_j‖ + ‖s(AB)_j‖)² / ‖W_j +
s(AB)_j‖² < 4`), so the relative error of the norm is below
~2·54·u·κ/2 ≈ 1.3e-5; `RTOL = 2e-5`. Off-by-one mistakes in the layout
(a wrong axis, a transposed factor, a missing 2s) are off by 1e-1 or more.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_lora import LoRAConv, LoRADense, LoRAEinsumDense, LoRAEmbedding
from keras_lora.layers import variants

RTOL = 2e-5
RANK, ALPHA = 2, 3.0  # scale 1.5: a wrong power of the scale shows

# name: (make the base layer, its input shape, how to build the reference
# W + s·A·B from W, A, B, s in NumPy, LoRA class and options)
CASES = {
    "dense": (
        lambda: keras.layers.Dense(5),
        (None, 6),
        lambda w, a, b, s: w + s * a @ b,
        LoRADense,
        {},
    ),
    "einsum_query_standard": (
        lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4)),
        (None, 3, 6),
        lambda w, a, b, s: w + s * np.einsum("ir,rde->ide", a, b),
        LoRAEinsumDense,
        {"factoring": "standard"},
    ),
    "einsum_query_keras": (
        lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4)),
        (None, 3, 6),
        lambda w, a, b, s: w + s * np.einsum("idr,re->ide", a, b),
        LoRAEinsumDense,
        {"factoring": "keras"},
    ),
    "einsum_output_standard": (
        lambda: keras.layers.EinsumDense("abcd,cde->abe", (None, 6)),
        (None, 3, 2, 4),
        lambda w, a, b, s: w + s * np.einsum("cdr,re->cde", a, b),
        LoRAEinsumDense,
        {"factoring": "standard"},
    ),
    "einsum_output_keras": (
        lambda: keras.layers.EinsumDense("abcd,cde->abe", (None, 6)),
        (None, 3, 2, 4),
        lambda w, a, b, s: w + s * np.einsum("cdr,re->cde", a, b),
        LoRAEinsumDense,
        {"factoring": "keras"},
    ),
    # The kernel's last axis is contracted: Keras's factoring does not fit
    # the factored form, so the direct norm is taken (same answer).
    "einsum_transposed_keras": (
        lambda: keras.layers.EinsumDense("ab,cb->ac", (5,)),
        (None, 6),
        lambda w, a, b, s: w + s * a @ b,
        LoRAEinsumDense,
        {"factoring": "keras"},
    ),
    "einsum_transposed_standard": (
        lambda: keras.layers.EinsumDense("ab,cb->ac", (5,)),
        (None, 6),
        lambda w, a, b, s: w + s * (a @ b).T,
        LoRAEinsumDense,
        {"factoring": "standard"},
    ),
    "embedding": (
        lambda: keras.layers.Embedding(11, 6),
        (None, 4),
        lambda w, a, b, s: w + s * a @ b,
        LoRAEmbedding,
        {},
    ),
    "conv2d": (
        lambda: keras.layers.Conv2D(4, 3),
        (None, 6, 6, 3),
        lambda w, a, b, s: w + s * np.einsum("hwir,ro->hwio", a, b),
        LoRAConv,
        {},
    ),
}


def dora_layer(case, seed=0, **options):
    """A built DoRA layer of `case` with random nonzero W, A, B."""
    make, input_shape, _, cls, extra = CASES[case]
    base = make()
    base.build(input_shape)
    layer = cls(base, rank=RANK, alpha=ALPHA, use_dora=True, **extra, **options)
    rng = np.random.default_rng(seed)
    # `s·A·B` a sizeable fraction of `W` (≈ 1/4), as after training.
    for variable, std in (
        (base.weights[0], 0.5),
        (layer.lora_a, 0.25),
        (layer.lora_b, 0.25),
    ):
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    return layer


def reference_norm(case, layer, frozen):
    """`‖W + s·A·B‖` per output unit in float64, and its cancellation `κ`."""
    reference = CASES[case][2]
    w = to_numpy(frozen).astype(np.float64)
    a = to_numpy(layer.lora_a).astype(np.float64)
    b = to_numpy(layer.lora_b).astype(np.float64)
    update = reference(w, a, b, layer.scale) - w
    axes = layer._norm_axes()
    norm = np.sqrt(np.sum((w + update) ** 2, axis=axes))
    parts = np.sqrt(np.sum(w**2, axis=axes)) + np.sqrt(np.sum(update**2, axis=axes))
    return norm, (parts / norm) ** 2


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def test_norm_equals_the_norm_of_the_formed_kernel(case):
    layer = dora_layer(case)
    expected, kappa = reference_norm(case, layer, layer.layer.weights[0])
    assert kappa.max() < 4  # the data has no cancellation (see the docstring)
    got = variants.dora_norm(
        keras.ops.cast(layer.layer.weights[0], "float32"),
        keras.ops.cast(layer.lora_a, "float32"),
        keras.ops.cast(layer.lora_b, "float32"),
        layer.scale,
        layer.kernel_layout(),
        layer._norm_axes(),
    )
    assert tuple(got.shape) == tuple(layer.lora_magnitude.shape)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=RTOL)


def test_merged_kernel_is_the_dora_formula(case):
    layer = dora_layer(case)
    rng = np.random.default_rng(1)
    magnitude = rng.uniform(0.5, 2.0, layer.lora_magnitude.shape).astype("float32")
    layer.lora_magnitude.assign(magnitude)
    w = to_numpy(layer.layer.weights[0]).astype(np.float64)
    a = to_numpy(layer.lora_a).astype(np.float64)
    b = to_numpy(layer.lora_b).astype(np.float64)
    adapted = CASES[case][2](w, a, b, layer.scale)
    norm, _ = reference_norm(case, layer, layer.layer.weights[0])
    c = magnitude / norm
    for axis in sorted(layer._norm_axes()):
        c = np.expand_dims(c, axis)
    np.testing.assert_allclose(
        to_numpy(layer.merged_kernel()), c * adapted, rtol=RTOL, atol=1e-6
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_norm_follows_a_residual_kernel_that_is_reassigned(init):
    """PiSSA/OLoRA take the norm against the residual kernel; a residual
    assigned later (an adapter file being loaded) is the one used."""
    case = "dense"
    layer = dora_layer(case, init=init)
    adapter = layer.get_adapter("default")
    rng = np.random.default_rng(2)
    for _ in range(2):
        residual = rng.normal(0, 0.5, adapter.residual.shape).astype("float32")
        adapter.residual.assign(residual)
        expected, _ = reference_norm(case, layer, adapter.residual)
        factor = to_numpy(layer._dora_factor(adapter))
        np.testing.assert_allclose(
            factor, to_numpy(layer.lora_magnitude) / expected, rtol=RTOL
        )


def test_compiled_model_follows_new_base_weights_and_factors():
    """A compiled predict function sees a base kernel, A and B assigned after
    it was traced: nothing about the norm is baked into the trace."""
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(5, name="t")(inputs)
    model = keras.Model(inputs, outputs)
    layer = LoRADense(model.get_layer("t"), rank=RANK, alpha=ALPHA, use_dora=True)
    lora = keras.Sequential([keras.Input((6,)), layer])
    x = np.random.default_rng(3).normal(size=(4, 6)).astype("float32")
    lora.predict_on_batch(x)  # traces (and compiles) the predict function
    rng = np.random.default_rng(4)
    for _ in range(2):
        for variable in (layer.layer.kernel, layer.lora_a, layer.lora_b):
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
        w = to_numpy(layer.layer.kernel).astype(np.float64)
        adapted = w + layer.scale * to_numpy(layer.lora_a) @ to_numpy(layer.lora_b)
        kernel = (
            to_numpy(layer.lora_magnitude) * adapted / np.linalg.norm(adapted, axis=0)
        )
        expected = x @ kernel + to_numpy(layer.layer.bias)
        np.testing.assert_allclose(
            lora.predict_on_batch(x), expected, rtol=1e-4, atol=1e-5
        )
