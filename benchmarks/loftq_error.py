"""LoftQ's error against plain quantization (`apply_lora(init="loftq")`).

For a `N(0, 1)` 256 x 256 kernel `W` (seed 0) and rank 8, per mode
(Keras's int8 and int4, keras_lora's NF4 with blocks of 64), prints
`‖W − (Q + s·A·B)‖_F / ‖W − Q₀‖_F` after 1 and 5 LoftQ iterations: `Q` the
base LoftQ stores, `A`, `B` its adapter, `Q₀` the plain quantization of
`W`. Below 1: the adapter makes up for part of the quantization error.

    python -m benchmarks.loftq_error
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lora.model.loftq import LOFTQ_MODES, error_ratio  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args(argv)
    kernel = np.random.default_rng(0).standard_normal((args.size, args.size))
    header = ["mode"] + [f"{n} iter" for n in args.iters]
    print(
        f"backend {keras.backend.backend()}, W ~ N(0, 1) {args.size}x{args.size}, "
        f"rank {args.rank}: ‖W − (Q + s·A·B)‖ / ‖W − Q₀‖"
    )
    print(" | ".join(header))
    for mode in LOFTQ_MODES:
        ratios = [error_ratio(kernel, args.rank, mode, n) for n in args.iters]
        print(" | ".join([mode] + [f"{r:.4f}" for r in ratios]))


if __name__ == "__main__":
    main()
