"""Hot-swapping adapters into a compiled model: retraces and the cost of a swap.

An MLP (`config["hotswap"]`: `depth` x Dense(`width`), a head, LoRA on
every Dense) is prepared with `kl.prepare_hotswap(model, max_rank)` and
compiled. Adapter files of every rank in `ranks` and alpha in `alphas`
(rsLoRA on every other file) are written once. Then:

- **retraces**: `swaps` swaps cycle through the files; after each, one
  `predict` and one `train_on_batch` run. A layer in front of the model
  counts how often its `call` runs as Python during those calls: once per
  trace under `jax.jit`/`tf.function`, so the target is 0. On torch, where
  Keras runs steps eagerly by default, the model is compiled with
  `jit_compile=True` (`torch.compile`) and the figure is the number of
  graphs dynamo adds.
- **swap time**: one `hotswap_adapter(model, path)` (read, check, pad,
  assign) against a raw `variable.assign` of the same padded arrays and
  scales, computed beforehand, one variable at a time; and against the
  swap's own assignment of them (`assign_all`: one transfer on JAX), so
  the rest is the file's reading and checking. The files cycle, so from
  the second round on each swap is of a file read and checked before and
  unchanged since (`hotswap_adapter` remembers those, keyed by the file's
  `os.stat` identity, `io/hotswap.py`): that is the target's row. The row
  `first read` is the same swap with that memory cleared each time, as for
  a new or rewritten file: read, checksum, validation, assign. Interleaved
  rows, min and median.
"""

import collections
import os
import tempfile

TRACES = collections.Counter()


def run(config):
    """Returns `{"retraces", "swaps", "rows", "ratio_min", "ratio_median", ...}`."""
    import keras
    import numpy as np

    import keras_lora as kl
    from benchmarks.timing import ratio, time_interleaved
    from keras_lora.io import hotswap as io_hotswap
    from keras_lora.io import keras_lora_format
    from keras_lora.model.walk import iter_layers

    c = config["hotswap"]
    base, counter = _model(c)
    model = kl.apply_lora(base, rank=c["ranks"][0])
    kl.prepare_hotswap(model, c["max_rank"])
    torch = keras.backend.backend() == "torch"
    # On torch, Keras's steps run eagerly unless compiled with torch.compile.
    jit_compile = True if torch else "auto"  # False on JAX would run eagerly
    model.compile(
        optimizer=keras.optimizers.SGD(1e-4), loss="mse", jit_compile=jit_compile
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(c["batch"], c["width"])).astype("float32")
    y = rng.normal(size=(c["batch"], c["classes"])).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _adapter_files(base, c, tmp)
        retraces = 0
        # Steps 0 and 1 compile (Keras's torch train step compiles again on
        # its second call); after that every swap is counted.
        for step in range(c["swaps"] + 2):
            if step > 1:
                kl.hotswap_adapter(model, paths[step % len(paths)])
            before = _traces(counter, torch)
            model.predict(x, batch_size=c["batch"], verbose=0)
            model.train_on_batch(x, y)
            if step > 1:
                retraces += _traces(counter, torch) - before
        # The raw floor: the same padded arrays and scales, already in memory.
        layers = list(iter_layers(model))
        plans = []
        for path in paths:
            records = keras_lora_format.read(path, None, model, layers, True)
            targets = io_hotswap._prepared_adapters(model, layers, "default")
            plan, _, _ = io_hotswap._plan(
                model, dict(layers), targets, records, path, "default"
            )
            plans.append(plan)
        cycle = {"swap": 0, "raw": 0, "own": 0, "first": 0}

        def swap():
            kl.hotswap_adapter(model, paths[cycle["swap"] % len(paths)])
            cycle["swap"] += 1

        def first():  # as if each file were new: read and checked again
            # With its own empty memory of checked files, put back after:
            # emptying the swap row's memory would make that row's next
            # calls first reads too (they were, before: its median was
            # 3.7x raw assign on torch against 1.3x on minimums).
            kept = model.__dict__.pop("_keras_lora_hotswap", None)
            try:
                kl.hotswap_adapter(model, paths[cycle["first"] % len(paths)])
            finally:
                if kept is not None:
                    model.__dict__["_keras_lora_hotswap"] = kept
            cycle["first"] += 1

        def raw():
            for variable, value in plans[cycle["raw"] % len(plans)]:
                variable.assign(value)
            cycle["raw"] += 1

        def own():  # the swap's own assignment (one transfer on JAX)
            io_hotswap.assign_all(plans[cycle["own"] % len(plans)])
            cycle["own"] += 1

        rows = time_interleaved(
            {
                "hotswap_adapter": swap,
                "raw assign": raw,
                "swap's assign": own,
                "first read": first,
            },
            c["repeats"],
            c["steps"],
            c["warmup"],
        )
    nbytes = sum(np.asarray(v).nbytes for _, v in plans[0])
    return {
        "config": c,
        "retraces": retraces,
        "retrace_counter": "torch.compile graphs" if torch else "traces",
        "swaps": c["swaps"],
        "files": len(paths),
        "assigned_bytes": int(nbytes),
        "variables": len(plans[0]),
        "rows": rows,
        "ratio_min": ratio(
            rows["hotswap_adapter"]["min_ms"], rows["raw assign"]["min_ms"]
        ),
        "ratio_median": ratio(
            rows["hotswap_adapter"]["median_ms"], rows["raw assign"]["median_ms"]
        ),
        "first_ratio_min": ratio(
            rows["first read"]["min_ms"], rows["raw assign"]["min_ms"]
        ),
        "first_ratio_median": ratio(
            rows["first read"]["median_ms"], rows["raw assign"]["median_ms"]
        ),
        "own_ratio_min": ratio(
            rows["hotswap_adapter"]["min_ms"], rows["swap's assign"]["min_ms"]
        ),
    }


def report_lines(h):
    """The text report's lines for this section's results `h`."""
    c = h["config"]
    rows = h["rows"]
    own = rows["swap's assign"]
    retraces = f"{h['retraces']} ({h['retrace_counter']})"
    return [
        f"5. Hot-swap: {c['depth']} x Dense({c['width']}) + head, LoRA on every "
        f"Dense, prepare_hotswap(max_rank={c['max_rank']}), ranks {c['ranks']} x "
        f"alphas {c['alphas']} ({h['files']} files)",
        f"retraces over {h['swaps']} swaps (predict + train_on_batch after each): "
        f"{retraces}",
        f"one swap ({h['variables']} variables, {h['assigned_bytes']:,} bytes): "
        f"hotswap_adapter {rows['hotswap_adapter']['median_ms']:.3f} ms median "
        f"({rows['hotswap_adapter']['min_ms']:.3f} min), raw assign "
        f"{rows['raw assign']['median_ms']:.3f} ms median "
        f"({rows['raw assign']['min_ms']:.3f} min); ratio "
        f"{h['ratio_median']:.2f} median, {h['ratio_min']:.2f} min",
        f"the swap's own assignment alone: {own['median_ms']:.3f} "
        f"ms median ({own['min_ms']:.3f} min) (swap / own assignment "
        f"{h['own_ratio_min']:.2f}, min)",
    ] + _first_read_lines(h)


def _first_read_lines(h):
    """The `first read` row's line (results of older runs have none)."""
    first = h["rows"].get("first read")
    if first is None:
        return [""]
    return [
        f"first read of a file (read, checksum, validation, assign): "
        f"{first['median_ms']:.3f} ms median ({first['min_ms']:.3f} min); "
        f"ratio to raw assign {h['first_ratio_median']:.2f} median, "
        f"{h['first_ratio_min']:.2f} min",
        "",
    ]


class _TraceCounter:
    """Made on first use: a Keras layer class, so Keras imports lazily."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import keras

            class TraceCounter(keras.layers.Layer):
                def call(self, x):
                    TRACES[id(self)] += 1
                    return x

            cls.cls = TraceCounter
        return cls.cls


def _traces(counter, torch):
    """How often the model was traced so far: `torch.compile`'s graphs on
    torch (compiled with `jit_compile=True`), else how often the counter
    layer's Python ran (once per trace under `jax.jit`/`tf.function`)."""
    if torch:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]
    return TRACES[id(counter)]


def _model(c):
    import keras

    counter = _TraceCounter.get()(name="trace_counter")
    inputs = keras.Input((c["width"],))
    x = counter(inputs)
    for i in range(c["depth"]):
        x = keras.layers.Dense(c["width"], activation="relu", name=f"dense_{i}")(x)
    out = keras.layers.Dense(c["classes"], name="head")(x)
    return keras.Model(inputs, out), counter


def _adapter_files(base, c, directory):
    import numpy as np

    import keras_lora as kl

    rng = np.random.default_rng(1)
    paths = []
    for rank in c["ranks"]:
        for alpha in c["alphas"]:
            rslora = len(paths) % 2 == 1
            lora = kl.apply_lora(base, rank=rank, alpha=alpha, use_rslora=rslora)
            for _, layer in iter_lora(lora):
                for v in (layer.lora_a, layer.lora_b):
                    v.assign(rng.normal(0, 0.02, v.shape).astype("float32"))
            path = os.path.join(directory, f"r{rank}_a{alpha:g}.safetensors")
            kl.save_adapter(lora, path)
            paths.append(path)
    return paths


def iter_lora(model):
    from keras_lora.model.surgery import lora_layers

    return lora_layers(model)
