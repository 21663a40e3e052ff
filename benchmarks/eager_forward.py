"""Eager batch-1 forward: a 4×Dense(256) LoRA model against the plain model.

What it measures is the Python work per call that LoRA adds (the adapter
bookkeeping, the scale, the extra ops), which dominates an eager forward at
batch 1. Run `python -m benchmarks.eager_forward` (torch by default, as the
target is set there: at most 1.20× the plain model), or with `--backend`.
The two models are called alternately, `repeats` rounds of `steps` calls
each; the report gives each model's min and median per-call time and their
ratios.
"""

import argparse
import json
import os
import sys


def build(width=256, depth=4, rank=8):
    """The plain model and its LoRA copy (adapters on every Dense)."""
    import keras

    import keras_lora as kl

    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    plain = keras.Model(inputs, x)
    lora = kl.apply_lora(plain, rank=rank)
    return plain, lora


def sizes(quick):
    """`run`'s arguments for a full or a `--quick` run."""
    if quick:
        return {"repeats": 3, "steps": 5, "warmup": 2, "width": 32}
    return {}


def run(repeats=30, steps=50, warmup=20, width=256, depth=4, rank=8):
    """Returns `{"plain": {...}, "lora": {...}, "ratio_min", "ratio_median"}`."""
    import keras
    import numpy as np

    from benchmarks.timing import ratio, time_interleaved

    plain, lora = build(width, depth, rank)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(1, width)).astype("float32")
    )
    timings = time_interleaved(
        {"plain": lambda: plain(x), "lora": lambda: lora(x)},
        repeats=repeats,
        steps=steps,
        warmup=warmup,
    )
    return {
        "backend": keras.backend.backend(),
        "config": {"width": width, "depth": depth, "rank": rank, "batch": 1},
        "plain": timings["plain"],
        "lora": timings["lora"],
        "ratio_min": ratio(timings["lora"]["min_ms"], timings["plain"]["min_ms"]),
        "ratio_median": ratio(
            timings["lora"]["median_ms"], timings["plain"]["median_ms"]
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eager_forward")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
        raise ValueError("Keras is already imported with another backend.")
    os.environ["KERAS_BACKEND"] = args.backend
    result = run(repeats=args.repeats, steps=args.steps)
    for name in ("plain", "lora"):
        r = result[name]
        print(f"{name:6s} min {r['min_ms']:.4f} ms  median {r['median_ms']:.4f} ms")
    print(f"ratio  min {result['ratio_min']:.3f}  median {result['ratio_median']:.3f}")
    print(json.dumps({k: result[k] for k in ("ratio_min", "ratio_median")}))


if __name__ == "__main__":
    main()
