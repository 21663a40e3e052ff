"""Eager batch-1 forward: a 4×Dense(256) LoRA model against the plain model.

What it measures is the Python work per call that LoRA adds (the adapter
bookkeeping, the scale, the extra ops), which dominates an eager forward at
batch 1. Run `python -m benchmarks.eager_forward` (torch by default, as the
target is set there: at most 1.20× the plain model), or with `--backend`.
The two models are called alternately, `repeats` rounds of `steps` calls
each; the report gives each model's min and median per-call time and their
ratios, in the calling thread's CPU time (robust on a shared machine) and
in wall-clock time.
"""

import argparse
import json
import os
import sys
import time


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
    """Returns `{"plain": {...}, "lora": {...}, "ratio_min", "ratio_median"}`
    from the calling thread's CPU time, and the same from wall-clock time
    under `"wall"`.

    A batch-1 eager forward is Python and small ops on one thread, so the
    thread's CPU time measures its cost without the time spent waiting
    for a core on a loaded machine (which wall-clock time includes).
    """
    import keras
    import numpy as np

    from benchmarks.timing import ratio, summarize

    plain, lora = build(width, depth, rank)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).normal(size=(1, width)).astype("float32")
    )
    calls = {"plain": lambda: plain(x), "lora": lambda: lora(x)}
    for call in calls.values():
        for _ in range(warmup):
            call()
    cpu = {name: [] for name in calls}
    wall = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        for name in names[repeat % 2 :] + names[: repeat % 2]:
            call = calls[name]
            start_cpu, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(steps):
                call()
            cpu[name].append(1e3 * (time.thread_time() - start_cpu) / steps)
            wall[name].append(1e3 * (time.perf_counter() - start_wall) / steps)

    def report(samples):
        rows = {name: summarize(values) for name, values in samples.items()}
        rows["ratio_min"] = ratio(rows["lora"]["min_ms"], rows["plain"]["min_ms"])
        rows["ratio_median"] = ratio(
            rows["lora"]["median_ms"], rows["plain"]["median_ms"]
        )
        return rows

    result = report(cpu)
    result["wall"] = report(wall)
    result["backend"] = keras.backend.backend()
    result["clock"] = "thread CPU time"
    result["config"] = {
        "width": width,
        "depth": depth,
        "rank": rank,
        "batch": 1,
        "repeats": repeats,
        "steps": steps,
    }
    return result


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
    for label, rows in (("CPU", result), ("wall", result["wall"])):
        for name in ("plain", "lora"):
            r = rows[name]
            print(
                f"{label:4s} {name:6s} min {r['min_ms']:.4f} ms  "
                f"median {r['median_ms']:.4f} ms"
            )
        print(
            f"{label:4s} ratio  min {rows['ratio_min']:.3f}  "
            f"median {rows['ratio_median']:.3f}"
        )
    print(json.dumps({k: result[k] for k in ("ratio_min", "ratio_median")}))


if __name__ == "__main__":
    main()
