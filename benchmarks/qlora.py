"""The `memory` section's quantized rows: LoRA training over float32, int8
and int4 bases at issue 19's size, and rematerialization's saving.

QLoRA rows: a KerasHub `Llama3CausalLM` built from config
(`models.llama_causal_lm`: 12 layers, hidden 2048, 0.70B parameters,
2,660 MiB of float32 kernels), quantized with Keras's own
`model.quantize(mode)` (int4: Keras's default, `block_size=128`), rank-8
adapters on `query` and `value` (`apply_lora(..., in_place=True)`), Adam,
`train_on_batch` on one batch of token ids. The anchor row is KerasHub's
own `backbone.enable_lora(rank=8, target_layer_names=["query", "value"])`
on the same int4 base. Each row runs in its own fresh process, one after
the other (peak RSS is a per-process figure, and the step times should
not share the machine with another row), and reports:

- the RSS before the first step (framework, model, optimizer built);
- the training peak (the kernel's `VmHWM`) over every step;
- the peak added by the steps, alone and over the float32 kernels'
  bytes (the issue's "1.21x over int4" figure);
- the step times: the first (it compiles) and the median and minimum of
  the later ones.

Remat rows: a smaller Llama at sequence 2,048 with and without
`keras_lora.model.remat.enable_remat`, each in a fresh process. On JAX
the compiled gradient's temporary bytes (`memory_analysis()`, exact); on
every backend the peak RSS added by the training steps.
"""

import gc
import statistics
import time
import warnings

MB = 2**20
MIB = 2**20
QLORA_ROWS = (
    ("float32", "keras_lora"),
    ("int8", "keras_lora"),
    ("int4", "keras_lora"),
    ("int4", "enable_lora"),
    ("nf4", "keras_lora"),  # kl.quantize_nf4: every kernel and embedding table
)


def row_name(mode, adapters):
    return f"{adapters} {mode}"


def jobs(c):
    """The `(task, args)` of the QLoRA rows, then of the two remat rows."""
    qlora_jobs = [
        ("qlora_train", dict(c["qlora"], mode=mode, adapters=adapters))
        for mode, adapters in QLORA_ROWS
    ]
    remat_jobs = [
        ("remat_memory", dict(c["remat"], remat=remat)) for remat in (False, True)
    ]
    return qlora_jobs + remat_jobs


def run(c, backend):
    """The QLoRA rows and the remat rows, each in a fresh process, one after
    the other (the rows time their steps)."""
    from benchmarks.isolated import run_isolated

    return results_of([run_isolated(backend, task, args) for task, args in jobs(c)])


def results_of(results):
    """The section's figures from the workers' `results`, in `jobs` order."""
    rows = {
        row_name(mode, adapters): r
        for (mode, adapters), r in zip(QLORA_ROWS, results, strict=False)
    }
    no_remat, remat = results[len(QLORA_ROWS) :]
    return {
        "rows": rows,
        "ratios": qlora_ratios(rows),
        "remat": {
            "off": no_remat,
            "on": remat,
            "ratio": remat_ratio(no_remat, remat),
        },
    }


def qlora_ratios(rows):
    """The issue's figures from the rows."""
    f32 = rows["keras_lora float32"]
    i8 = rows["keras_lora int8"]
    i4 = rows["keras_lora int4"]
    anchor = rows["enable_lora int4"]
    return {
        "int4_peak/float32_peak": i4["train_peak_bytes"] / f32["train_peak_bytes"],
        "int8_peak/float32_peak": i8["train_peak_bytes"] / f32["train_peak_bytes"],
        "int4_added/float_kernels": i4["added/float_kernels"],
        "int4_step/float32_step": _ratio(i4["step_median_s"], f32["step_median_s"]),
        "keras_lora/enable_lora_int4_peak": i4["train_peak_bytes"]
        / anchor["train_peak_bytes"],
    }


def remat_ratio(off, on):
    """Activation memory with remat / without: the compiled gradient's
    temporary bytes on JAX, else the peak RSS the steps add."""
    key = "temp_bytes" if off.get("temp_bytes") else "train_added_bytes"
    return {"figure": key, "value": on[key] / off[key]}


def _mb(n):
    return None if n is None else n / MB


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _quantize(model, mode):
    if mode == "nf4":
        import keras_lora as kl

        kl.quantize_nf4(model)
    elif mode != "float32":
        with warnings.catch_warnings():  # "Layer Add does not have `quantize`"
            warnings.simplefilter("ignore", UserWarning)
            model.quantize(mode)


def _compile(model):
    import keras

    from benchmarks.training import jit_compile

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=jit_compile(),
    )


def _framework_baseline():
    import keras

    from benchmarks import rss

    keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)  # the backend is up
    import keras_hub  # noqa: F401  (part of the framework baseline)

    gc.collect()
    return rss.current_rss()


def _train(model, batch, steps):
    """Runs `steps` training steps; RSS and times. The RSS before is taken
    with the model, the optimizer and the compiled step's inputs built."""
    from benchmarks import rss

    x, y, weights = batch
    rss.settle(model.weights)
    gc.collect()
    rss.release_free_memory()
    times = []
    with rss.PeakRSS() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(x, y, sample_weight=weights)  # returns numpy
            times.append(time.perf_counter() - start)
    later = times[1:]
    return {
        "rss_before_bytes": peak.start,
        "train_peak_bytes": peak.peak,
        "train_added_bytes": peak.added,
        "method": peak.method,
        "step_times_s": times,
        "first_step_s": times[0],
        "step_median_s": statistics.median(later) if later else None,
        "step_min_s": min(later) if later else None,
    }


def qlora_train_worker(c):
    """In a fresh process: one QLoRA row (see the module docstring)."""
    import keras_lora as kl
    from benchmarks import models

    baseline = _framework_baseline()
    model = models.llama_causal_lm(**c["model"])
    float_kernels = weight_bytes_by_kind(model)["kernels"]
    _quantize(model, c["mode"])
    if c["adapters"] == "keras_lora":
        kl.apply_lora(model, targets=c["targets"], rank=c["rank"], in_place=True)
    else:
        model.backbone.enable_lora(rank=c["rank"], target_layer_names=c["targets"])
    _compile(model)
    batch = models.causal_lm_batch(**c["model"])
    result = _train(model, batch, c["steps"])
    result.update(
        mode=c["mode"],
        adapters=c["adapters"],
        framework_baseline_bytes=baseline,
        float_kernel_bytes=float_kernels,
        bytes=weight_bytes_by_kind(model),
        trainable_params=int(sum(_size(w) for w in model.trainable_weights)),
    )
    result["added/float_kernels"] = result["train_added_bytes"] / float_kernels
    return result


def remat_memory_worker(c):
    """In a fresh process: a LoRA Llama with or without remat; the JAX
    gradient's temporary bytes and the training steps' peak RSS."""
    import keras_lora as kl
    from benchmarks import models

    _framework_baseline()
    model = models.llama_causal_lm(**c["model"])
    kl.apply_lora(model, targets=c["targets"], rank=c["rank"], in_place=True)
    if c["remat"]:
        from keras_lora.model.remat import enable_remat

        enable_remat(model)
    _compile(model)
    batch = models.causal_lm_batch(**c["model"])
    result = {"remat": c["remat"], "temp_bytes": _jax_gradient_temp_bytes(model, batch)}
    result.update(_train(model, batch, c["steps"]))
    return result


def _jax_gradient_temp_bytes(model, batch):
    """Temporary bytes of the compiled loss gradient (XLA's own count of
    activations and intermediates), or `None` off JAX."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    x, y, weights = batch
    loss_fn = model.loss

    def loss(trainable, non_trainable, x, y, weights):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits, sample_weight=weights)

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    compiled = (
        jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x, y, weights).compile()
    )
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def weight_bytes_by_kind(model):
    """Bytes of the model's (and, once compiled, its optimizer's)
    variables, by kind.

    `kernels`: the kernels and embedding tables of the layers
    `model.quantize` quantizes (int8 codes; int4 packs two per byte), or
    the same variables in float32; `scales`: quantization scales, zero
    points and group indices; `other_float`: norms, biases and float
    tables left alone; `adapters`; `optimizer`: Adam's moments.
    """
    import keras

    from benchmarks import models

    quantizable = (
        keras.layers.Dense,
        keras.layers.EinsumDense,
        keras.layers.Embedding,
    )
    kinds = dict.fromkeys(("kernels", "scales", "other_float", "adapters"), 0)
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
                "reverse_embeddings",
                "_reverse_embeddings",
                "nf4_codes",
                "nf4_reverse_codes",
            ):
                kinds["kernels"] += size
            elif isinstance(layer, quantizable) and (
                "scale" in name
                or "zero" in name
                or "g_idx" in name
                or name.startswith("nf4_")
            ):
                kinds["scales"] += size
            else:
                kinds["other_float"] += size
    optimizer = getattr(model, "optimizer", None)
    kinds["optimizer"] = models.weight_bytes(optimizer.variables) if optimizer else 0
    kinds["model_total"] = models.weight_bytes(model.weights)
    return kinds


def report_lines(r, c):
    """The section's quantized tables."""
    from benchmarks.tables import fmt, table

    model = c["qlora"]["model"]
    header = [
        "row",
        "RSS before MB",
        "train peak MB",
        "added MB",
        "added / float kernels",
        "1st step s",
        "step s (median / min)",
    ]
    rows = []
    for name, row in r["rows"].items():
        rows.append(
            [
                name,
                f"{row['rss_before_bytes'] / MB:,.0f}",
                f"{row['train_peak_bytes'] / MB:,.0f}",
                f"{row['train_added_bytes'] / MB:,.0f}",
                fmt(row["added/float_kernels"]),
                fmt(row["first_step_s"], 1),
                f"{fmt(row['step_median_s'], 2)} / {fmt(row['step_min_s'], 2)}",
            ]
        )
    f32 = r["rows"]["keras_lora float32"]
    rm = r["remat"]
    rc = c["remat"]["model"]
    remat_rows = [
        [
            key,
            fmt(_mb(rm[key]["temp_bytes"]), 0),
            f"{rm[key]['train_added_bytes'] / MB:,.0f}",
            fmt(rm[key]["step_median_s"], 2),
        ]
        for key in ("off", "on")
    ]
    return [
        f"Quantized bases: Llama3CausalLM {model['num_layers']} layers, hidden "
        f"{model['hidden_dim']}, intermediate {model['intermediate_dim']}, "
        f"vocabulary {model['vocabulary_size']}, {model['num_query_heads']}/"
        f"{model['num_key_value_heads']} heads, float32 kernels "
        f"{f32['float_kernel_bytes'] / MIB:,.0f} MiB; batch {model['batch']}, "
        f"sequence {model['sequence_length']}; rank {c['qlora']['rank']} on "
        f"{', '.join(c['qlora']['targets'])}, Adam; {c['qlora']['steps']} steps, "
        "each row in a fresh process",
        *table(header, rows),
        "ratios: " + ", ".join(f"{k} {fmt(v)}" for k, v in r["ratios"].items()),
        "",
        f"Rematerialization: Llama3CausalLM {rc['num_layers']} layers, hidden "
        f"{rc['hidden_dim']}, sequence {rc['sequence_length']}, batch "
        f"{rc['batch']}; with / without remat ({rm['ratio']['figure']}): "
        f"{fmt(rm['ratio']['value'])}",
        *table(["remat", "JAX grad temp MB", "steps add MB", "step s"], remat_rows),
        "",
    ]


def main(argv=None):
    """`python -m benchmarks.qlora --backend B --out FILE [--quick]`: the
    quantized rows and the remat rows alone (the `memory` section runs them
    too, after its other tables), printed and written as JSON."""
    import argparse
    import json

    from benchmarks.config import FULL, QUICK

    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True, help="a JSON file to write")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    c = (QUICK if args.quick else FULL)["memory"]
    if args.quick:  # a smoke run: the rows in one process
        from benchmarks.isolated import run_isolated

        result = results_of(run_isolated(args.backend, "in_one_process", jobs(c)))
    else:
        result = run(c, args.backend)
    print(f"backend {args.backend}")
    print("\n".join(report_lines(result, c)))
    with open(args.out, "w") as f:
        json.dump({"backend": args.backend, "config": c, "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
