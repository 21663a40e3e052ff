"""Section `qlora`: LoRA training over a float32, an int8 and an int4 base.

The model is the transformer row (`models.causal_lm`, a KerasHub
`GPT2CausalLM`), quantized with Keras's own `model.quantize(mode)` (int4:
Keras's default, sub-channel with `block_size=128`), then given rank-8
adapters on `query` and `value` in place and trained with Adam on one
batch of token ids.

- Memory: each mode runs in its own fresh process (peak RSS is a
  per-process figure), which reports the RSS after importing the
  frameworks, after building (and quantizing) the model, what the first
  training step keeps (the compiled step, Adam's state) and the peak
  above the RSS between later steps (activations, gradients,
  temporaries), next to the exact bytes of the model's variables by
  kind: quantized kernels, quantization scales, float embeddings, other
  float weights, adapters and Adam's state.
- Step time: the three modes interleaved in one process
  (`timing.time_interleaved`), so that one mode never runs on a quieter
  machine than the next.
"""

import gc
import warnings

from benchmarks.isolated import run_isolated_together

MB = 2**20
MODES = ("float32", "int8", "int4")


def run(config, backend):
    c = config["qlora"]
    memory = run_isolated_together(
        backend, [("qlora_memory", dict(c, mode=mode)) for mode in MODES]
    )
    memory = dict(zip(MODES, memory, strict=True))
    timing = _time_modes(c)
    float_kernels = memory["float32"]["bytes"]["kernels"]
    return {
        "config": c,
        "memory": memory,
        "timing": timing,
        # int4 should hold the quantized kernels in about 1/8 of float32's.
        "kernel_bytes/float32": {
            mode: memory[mode]["bytes"]["kernels"] / float_kernels for mode in MODES
        },
        "peak/float32": {
            mode: memory[mode]["train_peak_bytes"]
            / memory["float32"]["train_peak_bytes"]
            for mode in MODES
        },
    }


def build(c, mode):
    """The causal LM in `mode`, with adapters, compiled; and one batch."""
    import keras

    import keras_lora as kl
    from benchmarks import models
    from benchmarks.training import jit_compile

    model = models.causal_lm(**c["model"])
    if mode != "float32":
        with warnings.catch_warnings():  # "Layer Add does not have `quantize`"
            warnings.simplefilter("ignore", UserWarning)
            model.quantize(mode)
    kl.apply_lora(model, targets=c["targets"], rank=c["rank"], in_place=True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=jit_compile(),
    )
    return model, models.causal_lm_batch(**c["model"])


def qlora_memory_worker(c):
    """In a fresh process: RSS at each stage and the peak while training."""
    import keras

    from benchmarks import rss

    keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)  # the backend is up
    import keras_hub  # noqa: F401  (part of the framework baseline)

    gc.collect()
    baseline = rss.current_rss()
    model, (x, y, weights) = build(c, c["mode"])
    rss.settle(model.weights)
    gc.collect()
    rss.release_free_memory()
    built = rss.current_rss()
    with rss.PeakRSS() as peak:
        with rss.PeakRSS() as first:  # compiles the step (XLA), then runs it
            model.train_on_batch(x, y, sample_weight=weights)
        with rss.PeakRSS() as steady:  # the same step, compiled
            for _ in range(c["memory_steps"] - 1):
                model.train_on_batch(x, y, sample_weight=weights)
    peak.peak = max(first.peak, steady.peak)  # VmHWM was reset in between
    by_kind = weight_bytes_by_kind(model)
    return {
        "mode": c["mode"],
        "framework_baseline_bytes": baseline,
        "model_rss_bytes": built - baseline,
        "train_start_bytes": peak.start,
        "train_peak_bytes": peak.peak,
        "train_added_bytes": peak.peak - peak.start,
        # Kept after the first step: compiled program, optimizer state.
        "first_step_kept_bytes": steady.start - first.start,
        "first_step_added_bytes": first.added,
        # Above the RSS between steps, while a compiled step runs:
        # activations, gradients and temporaries.
        "steady_step_added_bytes": steady.added,
        "process_peak_bytes": rss.peak_rss(),
        "method": peak.method,
        "bytes": by_kind,
    }


def weight_bytes_by_kind(model):
    """Bytes of the model's and its optimizer's variables, by kind.

    `kernels`: the kernels and embedding tables of the layers
    `model.quantize` quantizes (int8 codes; int4 packs two per byte), or
    the same variables in float32; `scales`: quantization scales, zero
    points and group indices; `embeddings`: float embedding tables (the
    position embedding); `other_float`: biases, layer norms, float
    kernels left alone; `adapters`; `optimizer`: Adam's moments.
    """
    import keras

    from benchmarks import models

    quantizable = (
        keras.layers.Dense,
        keras.layers.EinsumDense,
        keras.layers.Embedding,
    )
    kinds = dict.fromkeys(
        ("kernels", "scales", "embeddings", "other_float", "adapters"), 0
    )
    seen = set()
    for layer in model._flatten_layers(include_self=False):
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            size = models.weight_bytes([variable])
            name = variable.name
            if name.startswith("lora_"):
                kinds["adapters"] += size
            elif isinstance(layer, quantizable) and name in (
                "kernel",
                "_kernel",
                "embeddings",
                "_embeddings",
            ):
                kinds["kernels"] += size
            elif "scale" in name or "zero" in name or "g_idx" in name:
                kinds["scales"] += size
            elif "embedding" in name:
                kinds["embeddings"] += size
            else:
                kinds["other_float"] += size
    kinds["optimizer"] = models.weight_bytes(model.optimizer.variables)
    kinds["model_total"] = models.weight_bytes(model.weights)
    return kinds


def _time_modes(c):
    from benchmarks import timing

    rows = {}
    for mode in MODES:
        model, (x, y, weights) = build(c, mode)
        rows[mode] = lambda m=model, x=x, y=y, w=weights: m.train_on_batch(
            x, y, sample_weight=w
        )
    return timing.time_interleaved(
        rows, repeats=c["repeats"], steps=c["steps"], warmup=c["warmup"]
    )


def report_lines(r):
    """The section's tables: memory by stage and kind, and step time."""
    from benchmarks.report import _fmt, _table

    m, t = r["memory"], r["timing"]
    model = r["config"]["model"]
    header = [
        "base",
        "framework MB",
        "model RSS MB",
        "kept by 1st step MB",
        "step working set MB",
        "train peak MB",
        "process peak MB",
        "step ms (median / min)",
    ]
    rows = [
        [
            mode,
            f"{m[mode]['framework_baseline_bytes'] / MB:,.0f}",
            f"{m[mode]['model_rss_bytes'] / MB:,.1f}",
            f"{m[mode]['first_step_kept_bytes'] / MB:,.1f}",
            f"{m[mode]['steady_step_added_bytes'] / MB:,.1f}",
            f"{m[mode]['train_peak_bytes'] / MB:,.0f}",
            f"{m[mode]['process_peak_bytes'] / MB:,.0f}",
            f"{_fmt(t[mode]['median_ms'], 1)} / {_fmt(t[mode]['min_ms'], 1)}",
        ]
        for mode in MODES
    ]
    kinds = ["kernels", "scales", "embeddings", "other_float", "adapters"]
    byte_rows = [
        [mode]
        + [f"{m[mode]['bytes'][k] / MB:,.2f}" for k in kinds + ["optimizer"]]
        + [_fmt(r["kernel_bytes/float32"][mode], 3)]
        for mode in MODES
    ]
    return [
        f"qlora. GPT2CausalLM {model['num_layers']} layers, hidden "
        f"{model['hidden_dim']}, seq {model['sequence_length']}, batch "
        f"{model['batch']}, vocabulary {model['vocabulary_size']}; LoRA rank "
        f"{r['config']['rank']} on {', '.join(r['config']['targets'])}, Adam",
        *_table(header, rows),
        "",
        "Variable bytes (MB) by kind; kernels / float32 = quantized kernels' "
        "bytes over the same kernels in float32",
        *_table(
            ["base", *kinds, "Adam state", "kernels / float32"],
            byte_rows,
        ),
        "",
    ]
