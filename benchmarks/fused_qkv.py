"""One `x·[A_q | A_k | A_v]` product for three adapters that read the same
input, against one `x·A` per adapter: measured, not built.

Issue 24 asked to try it: q, k and v read the same `x`, so their three
rank-8 first products (and, backward, their three `dA` and three `dx`
products) could be one rank-24 product each. This times the three
projections of an attention block, forward and backward (gradients for
`x`, every `A` and every `B`; the kernels frozen), rows interleaved:

- `base`: `x·W_q`, `x·W_k`, `x·W_v`, no adapter (what any LoRA adds to);
- `separate`: each plus `hot_path.low_rank(x, A, B, scale)`, which is what
  `LoRADense` and `LoRAEinsumDense` compute today;
- `fused`: each plus its slice of `(x·[A_q | A_k | A_v])·scale`, times its
  `B`, the first product and its gradient written once for the three
  (`dA = (dUᵀ·x)ᵀ`, the layout `low_rank` uses).

JAX and TensorFlow run under XLA (`jax.jit`, `tf.function(jit_compile=True)`),
torch eagerly, as the training benchmark does.

    KERAS_BACKEND=torch python -m benchmarks.fused_qkv [--quick] [--out F]
"""

import argparse
import functools
import json
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import ratio, time_interleaved  # noqa: E402
from keras_lora.atomic import atomic_output  # noqa: E402
from keras_lora.layers import hot_path  # noqa: E402

RANK, SCALE = 8, 2.0
ROWS = ("base", "separate", "fused")


def _arrays(tokens, width, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, std=1.0):
        return (std * rng.standard_normal(shape)).astype("float32")

    return {
        "x": normal(tokens, width),
        "w": [normal(width, width, std=0.03) for _ in range(3)],
        "a": [normal(width, RANK, std=0.03) for _ in range(3)],
        "b": [normal(RANK, width, std=0.03) for _ in range(3)],
        "g": [normal(tokens, width) for _ in range(3)],
    }


def _outputs(name, x, w, a, b, first, concat):
    """The three projections of row `name`; `first(x, A)` is `x·A·scale`
    with `low_rank`'s gradient layout, `concat` joins along the rank axis."""
    base = [x @ k for k in w]
    if name == "base":
        return base
    if name == "separate":
        pairs = zip(a, b, strict=True)
        return [
            y + hot_path.low_rank(x, ai, bi, SCALE)
            for y, (ai, bi) in zip(base, pairs, strict=True)
        ]
    u = first(x, concat(a))
    return [
        y + u[:, i * RANK : (i + 1) * RANK] @ bi
        for i, (y, bi) in enumerate(zip(base, b, strict=True))
    ]


def _jax_steps(arrays):
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def first(x, a):
        return x @ a * SCALE

    def first_forward(x, a):
        return x @ a * SCALE, (x, a)

    def first_backward(residuals, du):
        x, a = residuals
        du = du * SCALE
        return du @ a.T, jax.lax.optimization_barrier(du.T @ x).T

    first.defvjp(first_forward, first_backward)
    concat = functools.partial(jnp.concatenate, axis=1)

    def make(name):
        def loss(x, a, b, w, g):
            ys = _outputs(name, x, w, a, b, first, concat)
            return sum(jnp.sum(jnp.tanh(y) * gi) for y, gi in zip(ys, g, strict=True))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return lambda: jax.block_until_ready(grad(*args))

    args = [jnp.asarray(arrays["x"])]
    args += [[jnp.asarray(v) for v in arrays[k]] for k in ("a", "b", "w", "g")]
    return {name: make(name) for name in ROWS}


def _tensorflow_steps(arrays):
    import tensorflow as tf

    @tf.custom_gradient
    def first(x, a):
        def grad(du):
            du = du * SCALE
            dx = tf.matmul(du, a, transpose_b=True)
            return dx, tf.transpose(tf.matmul(du, x, transpose_a=True))

        return tf.matmul(x, a) * SCALE, grad

    concat = functools.partial(tf.concat, axis=1)
    x = tf.constant(arrays["x"])
    w, g = [[tf.constant(v) for v in arrays[k]] for k in ("w", "g")]
    a, b = [[tf.Variable(v) for v in arrays[k]] for k in ("a", "b")]

    def make(name):
        @tf.function(jit_compile=True)
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                ys = _outputs(name, x, w, a, b, first, concat)
                loss = sum(
                    tf.reduce_sum(tf.tanh(y) * gi) for y, gi in zip(ys, g, strict=True)
                )
            return tape.gradient(loss, [x, *a, *b], unconnected_gradients="zero")

        return lambda: [t.numpy() for t in step()]

    return {name: make(name) for name in ROWS}


def _torch_steps(arrays):
    import torch

    class First(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a):
            ctx.save_for_backward(x, a)
            return (x @ a) * SCALE

        @staticmethod
        def backward(ctx, du):
            x, a = ctx.saved_tensors
            du = du * SCALE
            return du @ a.T, (du.T @ x).T

    concat = functools.partial(torch.cat, dim=1)
    x0 = torch.from_numpy(arrays["x"])
    w, g = [[torch.from_numpy(v) for v in arrays[k]] for k in ("w", "g")]
    a, b = [[torch.from_numpy(v).requires_grad_() for v in arrays[k]] for k in "ab"]

    def make(name):
        def step():
            x = x0.clone().requires_grad_()
            ys = _outputs(name, x, w, a, b, First.apply, concat)
            sum(
                (torch.tanh(y) * gi).sum() for y, gi in zip(ys, g, strict=True)
            ).backward()
            grads = [x.grad] + [p.grad for p in (*a, *b)]
            for p in (*a, *b):
                p.grad = None
            return grads

        return step

    return {name: make(name) for name in ROWS}


STEPS = {"jax": _jax_steps, "tensorflow": _tensorflow_steps, "torch": _torch_steps}


def gradients(tokens, width):
    """`{row: [dx, dA_q, dA_k, dA_v, dB_q, dB_k, dB_v]}` as NumPy arrays, for
    the rows with adapters: the two forms must agree."""
    steps = STEPS[keras.backend.backend()](_arrays(tokens, width))
    flat = {name: keras.tree.flatten(steps[name]()) for name in ("separate", "fused")}
    return {name: [np.asarray(t) for t in grads] for name, grads in flat.items()}


def run(quick=False):
    backend = keras.backend.backend()
    make = STEPS[backend]
    sizes = [(64, 128)] if quick else [(256, 1024), (2048, 1024)]
    repeats, steps, warmup = (3, 2, 1) if quick else (30, 5, 3)
    result = {"backend": backend, "rank": RANK, "sizes": {}}
    for tokens, width in sizes:
        timings = time_interleaved(make(_arrays(tokens, width)), repeats, steps, warmup)
        entry = {"rows": timings}
        for row in ("separate", "fused"):
            entry[f"{row}/base"] = [
                ratio(timings[row][key], timings["base"][key])
                for key in ("median_ms", "min_ms")
            ]
        result["sizes"][f"{tokens}x{width}"] = entry
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(quick=args.quick)
    for size, r in result["sizes"].items():
        rows = ", ".join(
            f"{k} {v['median_ms']:.2f} ({v['min_ms']:.2f}) ms"
            for k, v in r["rows"].items()
        )
        ratios = ", ".join(
            f"{k} {r[k][0]:.3f} ({r[k][1]:.3f})"
            for k in ("separate/base", "fused/base")
        )
        print(f"{result['backend']} {size}: {rows}; {ratios}")
    if args.out:
        with atomic_output(args.out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
