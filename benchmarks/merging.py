"""Section 4: `merge_lora` time against model size, versus NumPy.

Each size gets a model of `Dense(width)` layers (all adapted), adapters set
to non-zero values; `merge_lora` is timed end to end (new model included),
after a warm-up merge of a tiny model, as the median of up to
`merge_repeats` runs (fewer once 5 s are spent); the same for NumPy.
For context, NumPy is timed once more keeping every sum, as a merge
keeps its kernels (the reference above reuses one freed buffer, so it
never pays for fresh memory), next to the first merge.
The first merge of each size is also measured for peak RSS: the merged
model's own weights are 1.0 of its bytes, so anything above 1.0 is an extra
copy (freed memory is handed back to the system first, so the merge cannot
hide in it).
The NumPy reference computes `W + s * A @ B` for every layer on the same
arrays, already in host memory. In the full run every size has its own
process, so one size's memory never inflates the next; quick mode runs its
small sizes in the calling process.
"""

import gc
import statistics
import time

from benchmarks import rss
from benchmarks.isolated import run_isolated


def run(config, backend):
    c = config["merge"]
    if c["process_per_size"]:
        points = [
            run_isolated(backend, "merge_scaling", dict(c, sizes=[size]))[0]
            for size in c["sizes"]
        ]
    else:  # quick mode: small sizes, no process of their own
        points = merge_scaling_worker(c)
    first, last = points[0], points[-1]
    return {
        "config": c,
        "points": points,
        "max_merge/numpy": max(p["merge/numpy"] for p in points),
        "max_merge_peak/merged_bytes": max(
            p["merge_peak/merged_bytes"] for p in points
        ),
        # 1.0 when time grows exactly linearly with the parameters merged.
        "per_param_growth": (last["merge_s"] / last["params"])
        / (first["merge_s"] / first["params"]),
    }


def merge_scaling_worker(args):
    import keras_lora as kl

    # Warm-up: first-call costs (imports, tracing) belong to no size.
    kl.merge_lora(_lora_model(64, 2, args["rank"]))
    return [_measure(size, args) for size in args["sizes"]]


def _lora_model(width, depth, rank):
    import keras

    import keras_lora as kl
    from benchmarks import inference

    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        # A constant fill: every page is written, as with a random one,
        # without the time a random fill of 1B parameters takes to build.
        x = keras.layers.Dense(
            width,
            kernel_initializer=keras.initializers.Constant(0.01),
            name=f"dense_{i}",
        )(x)
    lora = kl.apply_lora(keras.Model(inputs, x), targets=".*", rank=rank)
    inference.randomize_adapters(lora)
    return lora


def _measure(target_params, args):
    import keras

    import keras_lora as kl
    from benchmarks import models

    width = args["width"]
    depth = max(1, round(target_params / (width * width)))
    lora = _lora_model(width, depth, args["rank"])
    rss.settle(lora.weights)
    gc.collect()
    rss.release_free_memory()

    with rss.PeakRSS() as peak:
        start = time.perf_counter()
        merged = kl.merge_lora(lora)
        first_s = time.perf_counter() - start
    merged_bytes = models.weight_bytes(merged.weights)
    del merged
    gc.collect()

    merge_runs = [first_s]
    while len(merge_runs) < args["merge_repeats"] and sum(merge_runs) < 5.0:
        start = time.perf_counter()
        merged = kl.merge_lora(lora)
        merge_runs.append(time.perf_counter() - start)
        del merged
        gc.collect()
    merge_s = statistics.median(merge_runs)

    numpy_s = []
    while len(numpy_s) < args["merge_repeats"] and sum(numpy_s) < 5.0:
        total = 0.0
        for layer in lora.layers:
            if not isinstance(layer, kl.LoRALayer):
                continue
            w = keras.ops.convert_to_numpy(layer.base_kernel)
            a = keras.ops.convert_to_numpy(layer.lora_a)
            b = keras.ops.convert_to_numpy(layer.lora_b)
            start = time.perf_counter()
            result = w + layer.scale * (a @ b)
            total += time.perf_counter() - start
            del result, w
        numpy_s.append(total)
    # Context: the same NumPy sums, each kept as a merge must keep its
    # kernels (fresh memory, first-touch page faults), timed once, right
    # after the reference above dropped every result.
    rss.release_free_memory()
    kept, numpy_kept_s = [], 0.0
    for layer in lora.layers:
        if isinstance(layer, kl.LoRALayer):
            w = keras.ops.convert_to_numpy(layer.base_kernel)
            a = keras.ops.convert_to_numpy(layer.lora_a)
            b = keras.ops.convert_to_numpy(layer.lora_b)
            start = time.perf_counter()
            kept.append(w + layer.scale * (a @ b))
            numpy_kept_s += time.perf_counter() - start
            del w
    del kept
    params = depth * width * width
    reference_s = statistics.median(numpy_s)
    return {
        "target_params": target_params,
        "params": params,
        "layers": depth,
        "merge_s": merge_s,
        "merge_runs": len(merge_runs),
        "numpy_s": reference_s,
        "merge/numpy": merge_s / reference_s,
        "merge_ns_per_param": 1e9 * merge_s / params,
        "first_merge_s": first_s,
        "numpy_kept_s": numpy_kept_s,
        "first_merge/numpy_kept": first_s / numpy_kept_s,
        "merge_peak_added_bytes": peak.added,
        "merged_model_bytes": merged_bytes,
        # 1.0: the merged model's weights and nothing more.
        "merge_peak/merged_bytes": peak.added / merged_bytes,
    }
