"""The issue's targets, checked against one backend's results.

Targets are reported, never asserted: a miss is a line in the report.
"""

# (figure, limit, description); each figure is looked up by `_figures`.
TARGETS = (
    ("keras_lora/core_lora", 0.70, "train step: keras_lora / Keras core enable_lora"),
    ("keras_lora/floor", 1.10, "train step: keras_lora / floor"),
    ("keras_lora/peft", 1.10, "train step: keras_lora (torch backend) / PEFT"),
    ("dora/keras_lora", 1.20, "train step: DoRA / LoRA (keras_lora)"),
    ("keras_lora/enable_lora", 0.80, "train step: keras_lora / KerasHub enable_lora"),
    ("merged/plain", 1.03, "inference: merged / plain"),
    ("unmerged/plain", 1.10, "inference: unmerged rank 8 / plain"),
    (
        "apply_lora_added/model_bytes",
        0.10,
        "apply_lora peak memory added / model bytes",
    ),
    ("merge/numpy", 2.0, "merge_lora time / NumPy W + s*A@B (largest ratio)"),
    ("per_param_growth", 1.5, "merge time per parameter, largest / smallest size"),
    ("hotswap/retraces", 0, "retraces over the hot-swaps (predict + train step)"),
    ("hotswap/raw_assign", 2.0, "one hotswap_adapter / raw assign of the same bytes"),
    ("serving/8", 1.15, "serving: 8 adapters mixed in a batch / single adapter"),
    ("serving/64", 1.30, "serving: 64 adapters mixed in a batch / single (MLP)"),
    ("int4_peak/float32_peak", 0.45, "QLoRA train peak RSS: int4 / float32 base"),
    ("int8_peak/float32_peak", 0.60, "QLoRA train peak RSS: int8 / float32 base"),
    (
        "int4_added/float_kernels",
        0.15,
        "QLoRA int4: peak added by the steps / float32 kernel bytes",
    ),
    ("int4_step/float32_step", 1.5, "QLoRA step time (median): int4 / float32 base"),
    (
        "keras_lora/enable_lora_int4_peak",
        0.6,
        "QLoRA int4 train peak: keras_lora / KerasHub enable_lora",
    ),
    ("remat/no_remat", 0.35, "activation memory at sequence 2,048: remat / none"),
)


def check(results):
    """Returns one row per target that this run measured."""
    figures = _figures(results["sections"])
    rows = []
    for key, limit, description in TARGETS:
        for label, value in figures.get(key, []):
            rows.append(
                {
                    "figure": key,
                    "where": label,
                    "description": description,
                    "limit": limit,
                    "value": value,
                    "status": "n/a"
                    if value is None
                    else ("pass" if value <= limit else "MISS"),
                }
            )
    return rows


def _figures(sections):
    figures = {}

    def add(key, label, value):
        figures.setdefault(key, []).append((label, value))

    if "training" in sections:
        ratios = sections["training"]["ratios"]
        for key in (
            "keras_lora/core_lora",
            "keras_lora/floor",
            "keras_lora/peft",
            "dora/keras_lora",
        ):
            if key in ratios:
                add(key, "MLP", ratios[key])
        no_jit = sections["training"].get("no_jit")
        if no_jit is not None:
            add(
                "keras_lora/floor",
                "MLP, jit_compile=False",
                no_jit["ratios"].get("keras_lora/floor"),
            )
            add(
                "dora/keras_lora",
                "MLP, jit_compile=False",
                no_jit["ratios"].get("dora/keras_lora"),
            )
    if "transformer" in sections:
        ratios = sections["transformer"]["ratios"]
        for key in ("keras_lora/enable_lora", "keras_lora/floor", "dora/keras_lora"):
            add(key, "GPT-2", ratios[key])
    if "inference" in sections:
        for batch, data in sections["inference"]["batches"].items():
            for key, value in data["ratios"].items():
                add(key, f"batch {batch}", value)
    if "memory" in sections:
        memory = sections["memory"]
        mb = memory["apply_lora"]["model_bytes"] / 2**20
        add(
            "apply_lora_added/model_bytes",
            f"{mb:,.0f} MB model",
            memory["apply_lora_added/model_bytes"],
        )
        quantized = memory.get("quantized")
        if quantized is not None:
            size = _llama_label(memory["config"]["qlora"]["model"])
            for key, value in quantized["ratios"].items():
                add(key, size, value)
            remat = quantized["remat"]["ratio"]
            add(
                "remat/no_remat",
                f"{_llama_label(memory['config']['remat']['model'])}, "
                f"{remat['figure']}",
                remat["value"],
            )
    if "merge" in sections:
        merge = sections["merge"]
        add("merge/numpy", "all sizes", merge["max_merge/numpy"])
        add("per_param_growth", "smallest to largest", merge["per_param_growth"])
    if "hotswap" in sections:
        hotswap = sections["hotswap"]
        add("hotswap/retraces", f"{hotswap['swaps']} swaps", hotswap["retraces"])
        add("hotswap/raw_assign", "min", hotswap["ratio_min"])
        add("hotswap/raw_assign", "median", hotswap["ratio_median"])
    if "serving" in sections:
        from benchmarks import serving

        for key, where, value in serving.figures(sections["serving"]):
            add(key, where, value)
    return figures


def _llama_label(model):
    return (
        f"Llama {model['num_layers']} x {model['hidden_dim']}, "
        f"seq {model['sequence_length']}"
    )
