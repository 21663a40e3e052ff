"""LoRA on MoE expert weights: step time and peak memory of three ways to
train a small KerasHub `MixtralCausalLM` (built from config, no download).

Rows, each on a model built from the same seed:

- `attention`: rank-8 LoRA on `query` and `value` (KerasHub's default);
- `attention+experts`: the same plus rank-8 LoRA on every block's
  `experts` layer (`LoRAMoeExperts`: gate, up and down of every expert);
- `full`: no LoRA, every weight trains.

Adam, `train_on_batch` on one batch of next-token targets. Step times are
interleaved in one process (warm-ups first, then `repeats` rounds of
`steps` steps per row, the row order rotating), reported as the median and
minimum of the per-round means. Peak memory is a per-process figure, so
each row's also runs in a fresh child process: the RSS high-water mark
added by its training steps (model, optimizer and compiled step built
before the mark is reset).

`python -m benchmarks.moe --backend B --out FILE [--quick]`
"""

import argparse
import gc
import json
import os
import subprocess
import sys

MIB = 2**20
ROWS = ("attention", "attention+experts", "full")
FULL = {
    "model": {
        "vocabulary_size": 1024,
        "num_layers": 2,
        "num_query_heads": 4,
        "num_key_value_heads": 2,
        "hidden_dim": 256,
        "intermediate_dim": 512,
        "num_experts": 8,
        "top_k": 2,
    },
    "batch": 4,
    "sequence_length": 128,
    "rank": 8,
    "warmup": 3,
    "repeats": 7,
    "steps": 5,
    "memory_steps": 5,
}
QUICK = {
    **FULL,
    "model": {**FULL["model"], "hidden_dim": 32, "intermediate_dim": 64},
    "sequence_length": 16,
    "warmup": 1,
    "repeats": 2,
    "steps": 1,
    "memory_steps": 2,
}
PREFIX = "RESULT "


def build(row, c):
    """The compiled `MixtralCausalLM` of `row`, and its trainable size."""
    import keras
    import keras_hub

    import keras_lora as kl

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(**c["model"])
    model = keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)
    if row != "full":
        targets = ["query", "value"] + (["experts"] if "experts" in row else [])
        kl.apply_lora(model, targets=targets, rank=c["rank"], in_place=True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    return model, trainable


def batch(c):
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary, length = c["model"]["vocabulary_size"], c["sequence_length"]
    tokens = rng.integers(1, vocabulary, (c["batch"], length + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((c["batch"], length), "int32"),
    }
    return x, tokens[:, 1:].astype("int32")


def time_rows(c):
    """`{row: {"median_ms", "min_ms", "samples_ms", "trainable_params"}}`."""
    from benchmarks.timing import time_interleaved

    x, y = batch(c)
    models, functions, sizes = {}, {}, {}
    for row in ROWS:
        models[row], sizes[row] = build(row, c)
        functions[row] = lambda m=models[row]: m.train_on_batch(x, y)
    result = time_interleaved(functions, c["repeats"], c["steps"], c["warmup"])
    for row in ROWS:
        result[row]["trainable_params"] = sizes[row]
    return result


def memory_worker(row, c):
    """In a fresh process: the RSS the training steps of `row` add."""
    from benchmarks import rss

    model, trainable = build(row, c)
    x, y = batch(c)
    model.train_on_batch(x, y)  # compiles the step, builds the optimizer
    rss.settle(model.weights)
    gc.collect()
    rss.release_free_memory()
    with rss.PeakRSS() as peak:
        for _ in range(c["memory_steps"]):
            model.train_on_batch(x, y)
    return {
        "row": row,
        "rss_before_bytes": peak.start,
        "train_added_bytes": peak.added,
        "method": peak.method,
        "trainable_params": trainable,
    }


def memory_rows(backend, quick):
    """Each row's `memory_worker` in its own child process, one at a time."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for row in ROWS:
        command = [sys.executable, "-m", "benchmarks.moe", "--backend", backend]
        command += ["--memory-row", row] + (["--quick"] if quick else [])
        done = subprocess.run(
            command, env=env, cwd=root, capture_output=True, text=True, timeout=1800
        )
        lines = [s for s in done.stdout.splitlines() if s.startswith(PREFIX)]
        if not lines:
            raise RuntimeError(
                f"memory row {row!r} on {backend} failed (exit "
                f"{done.returncode}):\n{done.stderr[-3000:]}"
            )
        results[row] = json.loads(lines[-1][len(PREFIX) :])
    return results


def report_lines(times, memory):
    lines = [
        f"{'row':<20} {'trainable':>12} {'step min ms':>12} {'step median ms':>15} "
        f"{'RSS added MiB':>14}"
    ]
    for row in ROWS:
        t, m = times[row], memory.get(row, {})
        added = m.get("train_added_bytes")
        lines.append(
            f"{row:<20} {t['trainable_params']:>12,} {t['min_ms']:>12.1f} "
            f"{t['median_ms']:>15.1f} "
            f"{'-' if added is None else format(added / MIB, '.1f'):>14}"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.moe")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", help="a JSON file to write")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-row", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend not in ("tensorflow", "jax", "torch"):
        raise ValueError(f"Unknown --backend {args.backend!r}")
    os.environ["KERAS_BACKEND"] = args.backend
    c = QUICK if args.quick else FULL
    if args.memory_row:
        print(PREFIX + json.dumps(memory_worker(args.memory_row, c)), flush=True)
        return
    if not args.out:
        parser.error("--out is required")
    memory = memory_rows(args.backend, args.quick)
    times = time_rows(c)
    print(f"backend {args.backend}")
    print("\n".join(report_lines(times, memory)))
    with open(args.out, "w") as f:
        json.dump(
            {"backend": args.backend, "config": c, "times": times, "memory": memory},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
