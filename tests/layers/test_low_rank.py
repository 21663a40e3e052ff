"""`hot_path.low_rank`: the adapter product `scale·(x·A)·B` with its
backward pass written out per backend (`dA` as `(dUᵀ·x)ᵀ`).

Its gradients must be the gradients of the formula: checked against NumPy
in float64 for 2-D and 3-D inputs, a scale of one and of two, a scale
tensor, and through `LoRADense` and `LoRAEinsumDense` in a training step.
"""

import keras
import numpy as np
import pytest
from conftest import backend

import keras_lora as kl
from keras_lora.layers import hot_path

# float32 products of length <= 64 against float64: a few ulps of the sums.
RTOL, ATOL = 1e-5, 1e-5


def _arrays(x_shape, fan_in=12, rank=3, out=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=x_shape + (fan_in,)).astype("float32")
    a = rng.normal(size=(fan_in, rank)).astype("float32")
    b = rng.normal(size=(rank, out)).astype("float32")
    g = rng.normal(size=x_shape + (out,)).astype("float32")
    return x, a, b, g


def _reference(x, a, b, g, scale):
    """Forward and `(dx, dA, dB)` of `sum(g * scale·(x·A)·B)`, float64."""
    x, a, b, g = (t.astype("float64") for t in (x, a, b, g))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    u = scale * x2 @ a
    du = scale * g2 @ b.T
    forward = (u @ b).reshape(g.shape)
    return forward, (du @ a.T).reshape(x.shape), x2.T @ du, u.T @ g2


def _grads(x, a, b, g, scale):
    """Backend autodiff of `sum(g * low_rank(x, a, b, scale))`."""
    name = backend()
    if name == "jax":
        import jax

        def loss(x, a, b):
            return (hot_path.low_rank(x, a, b, scale) * g).sum()

        y = hot_path.low_rank(x, a, b, scale)
        return y, jax.grad(loss, argnums=(0, 1, 2))(x, a, b)
    if name == "tensorflow":
        import tensorflow as tf

        x, a, b = (tf.constant(t) for t in (x, a, b))
        with tf.GradientTape() as tape:
            tape.watch([x, a, b])
            y = hot_path.low_rank(x, a, b, scale)
            loss = tf.reduce_sum(y * g)
        return y, tape.gradient(loss, [x, a, b])
    import torch

    x, a, b = (torch.tensor(t, requires_grad=True) for t in (x, a, b))
    y = hot_path.low_rank(x, a, b, scale)
    (y * torch.tensor(g)).sum().backward()
    return y.detach(), (x.grad, a.grad, b.grad)


@pytest.mark.parametrize(
    "x_shape, scale",
    [((6,), 1.0), ((6,), 2.0), ((2, 5), 0.5)],
    ids=["2d-scale-1", "2d-scale-2", "3d-scale-half"],
)
def test_gradients_match_the_formula(x_shape, scale):
    x, a, b, g = _arrays(x_shape)
    y, grads = _grads(x, a, b, g, scale)
    expected = _reference(x, a, b, g, scale)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y), expected[0], rtol=RTOL, atol=ATOL
    )
    for got, want in zip(grads, expected[1:], strict=True):
        assert tuple(got.shape) == want.shape
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got), want, rtol=RTOL, atol=ATOL
        )


def test_scale_tensor_is_not_differentiated_and_scales():
    # A hot-swappable adapter's scale is a variable read as a tensor.
    x, a, b, g = _arrays((4,))
    scale = keras.ops.convert_to_tensor(np.float32(3.0))
    y, grads = _grads(x, a, b, g, scale)
    expected = _reference(x, a, b, g, 3.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(y), expected[0], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(grads[1]), expected[2], rtol=RTOL, atol=ATOL
    )


def test_forward_is_bitwise_the_plain_products():
    x, a, b, _ = _arrays((3, 4))
    x, a, b = (keras.ops.convert_to_tensor(t) for t in (x, a, b))
    got = keras.ops.convert_to_numpy(hot_path.low_rank(x, a, b, 2.0))
    want = keras.ops.convert_to_numpy(keras.ops.matmul(keras.ops.matmul(x, a) * 2.0, b))
    np.testing.assert_array_equal(got, want)


def _layer_step(layer, x):
    """One SGD step on `mean(layer(x)**2)`; returns the adapters after it."""
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    y = np.zeros_like(keras.ops.convert_to_numpy(model(x)))
    model.train_on_batch(x, y)
    return [keras.ops.convert_to_numpy(v) for v in (layer.lora_a, layer.lora_b)]


def _numpy_step(kernel, a, b, scale, x, einsum=None):
    """The same SGD step computed in NumPy (float64) for a 2-D kernel."""
    x2 = x.reshape(-1, x.shape[-1]).astype("float64")
    a, b, kernel = a.astype("float64"), b.astype("float64"), kernel.astype("float64")
    y = x2 @ kernel + scale * (x2 @ a) @ b
    g = 2.0 * y / y.size
    du = scale * g @ b.T
    return a - 0.1 * x2.T @ du, b - 0.1 * (scale * x2 @ a).T @ g


@pytest.mark.parametrize("kind", ["dense", "einsum_dense"])
def test_training_step_matches_numpy(kind):
    rng = np.random.default_rng(1)
    if kind == "dense":
        base = keras.layers.Dense(6, use_bias=False)
        base.build((None, 5))
        x = rng.normal(size=(4, 5)).astype("float32")
        lora = kl.LoRADense(base, rank=2, alpha=4)
    else:
        base = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 6))
        base.build((None, 3, 5))
        x = rng.normal(size=(4, 3, 5)).astype("float32")
        lora = kl.LoRAEinsumDense(base, rank=2, alpha=4)
    lora.lora_b.assign(rng.normal(size=(2, 6)).astype("float32"))
    kernel = keras.ops.convert_to_numpy(base.kernel)
    a0, b0 = (keras.ops.convert_to_numpy(v) for v in (lora.lora_a, lora.lora_b))
    want = _numpy_step(kernel, a0, b0, 2.0, x)
    got = _layer_step(lora, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
