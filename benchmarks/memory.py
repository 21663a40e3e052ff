"""Section 3: memory.

- Peak RSS of a short training run, full fine-tuning vs LoRA, each in its own
  process, on a model big enough that weights, gradients and Adam's two
  moments dominate (8 x Dense(4096) in the full run).
- Peak RSS added by `apply_lora` on a model of at least 1 GB of float32
  weights: base weights are shared, so only the adapters should appear.
  The one-time cost of a process's first `apply_lora` (on a tiny model) is
  reported apart.
- Bytes of the adapters versus the base model.
- Quantized bases (QLoRA) at issue 19's size, KerasHub's own
  `enable_lora` as the anchor, and rematerialization at sequence 2,048:
  `benchmarks/qlora.py`.
"""

import gc

from benchmarks.isolated import run_isolated_together

MB = 2**20


def run(config, backend, quick=False, started=None):
    """The section's figures. In quick mode, `started` is the smoke child of
    `start_quick` (started here if `None`)."""
    from benchmarks import qlora
    from benchmarks.isolated import collect_isolated

    c = config["memory"]
    if quick:  # a smoke run: every worker in one process, figures meaningless
        if started is None:
            started = start_quick(config, backend)
        results = collect_isolated(started)[0]
        (full, lora, apply), quantized = results[:3], qlora.results_of(results[3:])
    else:  # peak RSS is per process and times nothing: the three run at once
        full, lora, apply = run_isolated_together(backend, _jobs(c))
        quantized = qlora.run(c, backend)
    train = {"full": full, "lora": lora}
    return {
        "config": c,
        "train": train,
        "train_peak_lora/full": lora["peak_bytes"] / full["peak_bytes"],
        "train_added_lora/full": lora["added_bytes"] / full["added_bytes"],
        "apply_lora": apply,
        "apply_lora_added/model_bytes": apply["added_bytes"] / apply["model_bytes"],
        "adapter/base_bytes": apply["adapter_bytes"] / apply["model_bytes"],
        "quantized": quantized,
    }


def _jobs(c):
    """The `(task, args)` of the training and `apply_lora` rows."""
    return [
        ("train_memory", dict(c["train"], kind="full")),
        ("train_memory", dict(c["train"], kind="lora")),
        ("apply_lora_memory", c["apply_lora"]),
    ]


def start_quick(config, backend):
    """Starts the quick (smoke) run's child: every worker of the section, one
    after the other in one process (`isolated.in_one_process_worker`).
    `suite.run` starts it before the first section, so that it runs beside
    the sections before this one (a smoke run times nothing that matters);
    `run(..., started=)` collects it."""
    from benchmarks import qlora
    from benchmarks.isolated import start_isolated

    c = config["memory"]
    return start_isolated(backend, [("in_one_process", _jobs(c) + qlora.jobs(c))])


def train_memory_worker(args):
    """In a fresh process: build the model, train a few steps, report RSS."""
    import keras
    import numpy as np

    import keras_lora as kl
    from benchmarks import models, rss
    from benchmarks.training import jit_compile

    model = models.mlp(args["width"], args["width"], args["depth"], args["classes"])
    if args["kind"] == "lora":
        model = kl.apply_lora(model, rank=args["rank"])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile(),
    )
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(
        rng.standard_normal((args["batch"], args["width"]), dtype=np.float32)
    )
    y = keras.ops.convert_to_tensor(rng.integers(0, args["classes"], args["batch"]))
    rss.settle(model.weights)
    gc.collect()
    with rss.PeakRSS() as peak:
        for _ in range(args["steps"]):
            model.train_on_batch(x, y)
    return {
        "kind": args["kind"],
        "params": kl.trainable_summary(model, print_fn=None).total,
        "trainable_params": kl.trainable_summary(model, print_fn=None).trainable,
        "model_bytes": models.weight_bytes(model.weights),
        "rss_before_bytes": peak.start,
        "peak_bytes": peak.peak,
        "added_bytes": peak.added,
        "method": peak.method,
    }


def apply_lora_memory_worker(args):
    """In a fresh process: peak RSS added by `apply_lora` on a big model."""
    import keras_lora as kl
    from benchmarks import models, rss

    # The first `apply_lora` in a process pays one-time costs that do not
    # grow with the model (JAX compiles its initializers, Keras traces):
    # measured here on a tiny model, and reported apart.
    with rss.PeakRSS() as first_use:
        kl.apply_lora(models.mlp(64, 64, 2, args["classes"]), rank=args["rank"])
    model = models.mlp(args["width"], args["width"], args["depth"], args["classes"])
    model_bytes = models.weight_bytes(model.weights)
    rss.settle(model.weights)  # its own construction is not apply_lora's
    gc.collect()
    with rss.PeakRSS() as peak:
        lora = kl.apply_lora(model, rank=args["rank"])
    adapter_bytes = models.weight_bytes(lora.trainable_weights)
    return {
        "params": kl.trainable_summary(model, print_fn=None).total,
        "model_bytes": model_bytes,
        "adapter_bytes": adapter_bytes,
        "rss_before_bytes": peak.start,
        "peak_bytes": peak.peak,
        "added_bytes": peak.added,
        "method": peak.method,
        "first_use_added_bytes": first_use.added,
    }


def report_lines(m):
    """The section's tables: LoRA vs full training, apply_lora, and the
    quantized rows (`qlora.report_lines`)."""
    from benchmarks import qlora
    from benchmarks.tables import fmt, table

    tc, ac = m["config"]["train"], m["config"]["apply_lora"]
    rows = [
        [
            kind,
            f"{t['params']:,}",
            f"{t['trainable_params']:,}",
            f"{t['rss_before_bytes'] / MB:,.0f}",
            f"{t['peak_bytes'] / MB:,.0f}",
            f"{t['added_bytes'] / MB:,.0f}",
        ]
        for kind, t in m["train"].items()
    ]
    a = m["apply_lora"]
    lines = [
        f"3. Memory: training {tc['steps']} steps of {tc['depth']} x "
        f"Dense({tc['width']}), batch {tc['batch']}, Adam, each in its own "
        "process (RSS, MB)",
        *table(["run", "params", "trainable", "before", "peak", "added"], rows),
        f"peak LoRA / full: {fmt(m['train_peak_lora/full'])}; memory added "
        f"by training LoRA / full: {fmt(m['train_added_lora/full'])}",
        f"apply_lora on {ac['depth']} x Dense({ac['width']}) "
        f"({a['params']:,} params, {a['model_bytes'] / MB:,.0f} MB float32): "
        f"peak RSS added {a['added_bytes'] / MB:,.1f} MB = "
        f"{100 * m['apply_lora_added/model_bytes']:.2f}% of the model "
        f"({a['method']}); one-time cost of the process's first apply_lora "
        f"(tiny model): {a['first_use_added_bytes'] / MB:,.1f} MB",
        f"adapter bytes {a['adapter_bytes'] / MB:,.2f} MB vs base "
        f"{a['model_bytes'] / MB:,.0f} MB = {100 * m['adapter/base_bytes']:.3f}%",
        "",
    ]
    if "quantized" in m:
        lines += qlora.report_lines(m["quantized"], m["config"])
    return lines
