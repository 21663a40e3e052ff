"""QDoRA's memory: DoRA over int8, int4 and NF4 bases next to plain QLoRA.

One `Dense(4096)` on 4096 inputs (a 64 MiB float32 kernel), quantized with
Keras's `layer.quantize(mode)` (int8; int4: Keras's default block size,
and per-channel, `int4/-1`) or
`keras_lora.quantize_nf4` (block 64), rank-8 adapters with and without
`use_dora=True`, batch 8. Per row:

- resident bytes: every variable of the model (base codes and scales,
  adapters, DoRA's magnitude), before any optimizer;
- on JAX, the compiled loss gradient's temporary bytes
  (`memory_analysis().temp_size_in_bytes`, XLA's own count);
- the median time of a jitted gradient (JAX) or of an eager forward and
  backward (TensorFlow, torch), a rough figure on a shared machine.

The float32 rows (LoRA, DoRA) are the reference. `python -m
benchmarks.qdora [--units N]` prints the table.
"""

import argparse
import statistics
import time

MIB = 2**20
MODES = ("float32", "int8", "int4/-1", "int4", "nf4")


def build(mode, dora, units, rank=8):
    import keras

    import keras_lora as kl

    inputs = keras.Input((units,))
    outputs = keras.layers.Dense(units, name="t")(inputs)
    model = keras.Model(inputs, outputs)
    if mode == "nf4":
        model = kl.quantize_nf4(model)
    elif mode == "int4/-1":  # one scale per output unit
        config = keras.quantizers.Int4QuantizationConfig(block_size=-1)
        model.get_layer("t").quantize("int4", config=config)
    elif mode != "float32":
        model.get_layer("t").quantize(mode)
    return kl.apply_lora(model, rank=rank, use_dora=dora, targets=["t"])


def resident_bytes(model):
    import keras

    total = 0
    for v in model.weights:
        size = 1
        for d in v.shape:
            size *= int(d)
        itemsize = {"int8": 1, "uint8": 1, "int32": 4, "float32": 4}.get(
            keras.backend.standardize_dtype(v.dtype), 4
        )
        total += size * itemsize
    return total


def gradient(model, x):
    """`(temp_bytes or None, median seconds)` of d loss / d adapters."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss(trainable, non_trainable, x):
            y, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return (y * y).mean()

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        compiled = jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x).compile()
        temp = int(compiled.memory_analysis().temp_size_in_bytes)

        def step():
            jax.block_until_ready(compiled(trainable, non_trainable, x))

    elif backend == "tensorflow":
        import tensorflow as tf

        temp = None

        def step():
            with tf.GradientTape() as tape:
                y = model(x, training=True)
                loss = tf.reduce_mean(y * y)
            tape.gradient(loss, model.trainable_variables)

    else:
        temp = None

        def step():
            y = model(x, training=True)
            (y * y).mean().backward()

    step()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return temp, statistics.median(times)


def run(units):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(8, units)).astype("float32")
    rows = []
    for mode in MODES:
        for dora in (False, True):
            model = build(mode, dora, units)
            temp, seconds = gradient(model, x)
            rows.append((mode, dora, resident_bytes(model), temp, seconds))
    return rows


def main(argv=None):
    import keras

    parser = argparse.ArgumentParser(prog="python -m benchmarks.qdora")
    parser.add_argument("--units", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = run(args.units)
    print(f"backend {keras.backend.backend()}, Dense {args.units}x{args.units}")
    print("| base | adapter | resident MiB | grad temp MiB (JAX) | step ms |")
    print("|---|---|---|---|---|")
    for mode, dora, resident, temp, seconds in rows:
        temp = "-" if temp is None else f"{temp / MIB:.2f}"
        print(
            f"| {mode} | {'DoRA' if dora else 'LoRA'} | {resident / MIB:.2f} "
            f"| {temp} | {seconds * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
