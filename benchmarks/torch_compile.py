"""`torch.compile` of the whole training step on the torch backend, measured.

Keras compiles a torch model's step with `torch.compile` when it is
compiled with `jit_compile=True` (its default on torch is eager). Rows,
interleaved in one process, the MLP of `benchmarks.training` (4 x
Dense(1024), batch 256, rank 8 on the hidden layers, Adam):

- `keras_lora`, `floor`: as in section 1, eager (Keras's torch default);
- `keras_lora_compiled`, `floor_compiled`: the same, `jit_compile=True`;
- `peft`, `peft_compiled`: PEFT LoRA on the same MLP in plain PyTorch,
  eager and with its model under `torch.compile`.

Each compiled row's first two steps (the compilation) are timed apart.

    KERAS_BACKEND=torch python -m benchmarks.torch_compile [--quick] [--out F]
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

from benchmarks import peft_reference, training  # noqa: E402
from benchmarks.config import FULL, QUICK  # noqa: E402
from benchmarks.timing import ratio, time_interleaved  # noqa: E402
from keras_lora.atomic import atomic_output  # noqa: E402


def run(config):
    import keras
    import torch

    if keras.backend.backend() != "torch":
        raise SystemExit("benchmarks.torch_compile: run it with KERAS_BACKEND=torch")
    c = config["mlp"]
    x, y, make_model, hidden = training.mlp_setup(c)
    steps, first = {}, {}
    for jit in (False, True):
        rows = training.make_rows(make_model, hidden, c["rank"])
        rows = {name: rows[name] for name in ("keras_lora", "floor")}
        for name, step in training.train_steps(rows, x, y, jit=jit).items():
            key = f"{name}_compiled" if jit else name
            start = time.perf_counter()
            step(), step()
            first[key] = time.perf_counter() - start
            steps[key] = step
    peft_step, info = peft_reference.make_step(c, x, y)
    if peft_step is not None:
        steps["peft"] = peft_step
        compiled_step, _ = peft_reference.make_step(c, x, y, compile_model=True)
        start = time.perf_counter()
        compiled_step(), compiled_step()
        first["peft_compiled"] = time.perf_counter() - start
        steps["peft_compiled"] = compiled_step
    timings = time_interleaved(steps, c["repeats"], c["steps"], c["warmup"])
    med = {k: t["median_ms"] for k, t in timings.items()}
    low = {k: t["min_ms"] for k, t in timings.items()}
    pairs = [
        ("keras_lora_compiled", "keras_lora"),
        ("floor_compiled", "floor"),
        ("keras_lora", "floor"),
        ("keras_lora_compiled", "floor_compiled"),
        ("keras_lora", "peft"),
        ("keras_lora_compiled", "peft_compiled"),
        ("peft_compiled", "peft"),
    ]
    ratios = {
        f"{a}/{b}": [ratio(med[a], med[b]), ratio(low[a], low[b])]
        for a, b in pairs
        if a in med and b in med
    }
    return {
        "config": c,
        "torch": torch.__version__,
        "peft": info,
        "rows": timings,
        "first_two_steps_s": first,
        "ratios_median_min": ratios,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small MLP")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    result = run(QUICK if args.quick else FULL)
    for name, timing in result["rows"].items():
        median, low = timing["median_ms"], timing["min_ms"]
        print(f"{name:22s} median {median:8.2f} ms  min {low:8.2f}")
    for name, (median, low) in result["ratios_median_min"].items():
        print(f"{name:42s} {median:.2f} (min {low:.2f})")
    first = {k: round(v, 1) for k, v in result["first_two_steps_s"].items()}
    print("first two steps, s:", first)
    if args.out:
        with atomic_output(args.out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
