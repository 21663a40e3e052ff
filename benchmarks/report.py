"""Plain-text report, JSON and the summary table across backends."""

import json
import os

from benchmarks import machine, targets
from benchmarks.tables import fmt as _fmt
from benchmarks.tables import table as _table

MB = 2**20
ROW_LABELS = {
    "full": "full fine-tuning",
    "core_lora": "Keras core enable_lora",
    "keras_lora": "keras_lora",
    "floor": "floor (first bias only)",
    "peft": "PEFT LoRA, plain PyTorch",
    "dora": "keras_lora DoRA",
}


def _training_lines(title, data):
    c = data["config"]
    full = data["rows"]["full"]["median_ms"]
    rows = [
        [
            ROW_LABELS.get(name, name),
            _fmt(t["median_ms"]),
            _fmt(t["min_ms"]),
            f"{t['trainable_params']:,}",
            _fmt(t["median_ms"] / full),
        ]
        for name, t in data["rows"].items()
    ]
    lines = [
        f"{title} (batch {c['batch']}, rank {c['rank']}, Adam, "
        f"jit_compile={data['jit_compile']}; median of {c['repeats']} x "
        f"{c['steps']} steps, rows interleaved)",
        *_table(["row", "ms/step", "min", "trainable", "/ full"], rows),
        "ratios: " + ", ".join(f"{k} {_fmt(v)}" for k, v in data["ratios"].items()),
    ]
    if "ratios_min" in data:
        lines.append(
            "ratios of minimums: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in data["ratios_min"].items())
        )
    if "peft" in data and "skipped" in data["peft"]:
        lines.append(f"PEFT reference skipped: {data['peft']['skipped']}")
    return lines


def backend_text(results):
    s = results["sections"]
    lines = [
        f"keras_lora benchmarks, backend {results['backend']}"
        + (
            " (QUICK: sizes too small for meaningful timings)"
            if results["quick"]
            else ""
        ),
        f"machine: {machine.one_line(results['machine'])}; "
        f"load average at start {results['machine']['load_average_at_start']}",
        "",
    ]
    if "training" in s:
        c = s["training"]["config"]
        title = (
            f"1. Training step: {c['depth']} x Dense({c['width']}, relu) + "
            f"Dense({c['classes']}) head"
        )
        lines += _training_lines(title, s["training"]) + [""]
        if "no_jit" in s["training"]:
            lines += _training_lines(title, s["training"]["no_jit"]) + [""]
    if "transformer" in s:
        from benchmarks import transformer

        lines += transformer.report_lines(s["transformer"])
    if "block" in s:
        c = s["block"]["config"]
        title = (
            f"1b. Training step: Dense-only block, seq {c['seq_len']}, d_model "
            f"{c['d_model']}, FFN {c['d_ff']}, adapters on q/k/v/o"
        )
        lines += _training_lines(title, s["block"]) + [""]
    if "inference" in s:
        c = s["inference"]["config"]
        rows = []
        for batch, d in s["inference"]["batches"].items():
            r = d["rows"]
            rows.append(
                [
                    batch,
                    _fmt(r["plain"]["median_ms"], 3),
                    _fmt(r["unmerged"]["median_ms"], 3),
                    _fmt(r["merged"]["median_ms"], 3),
                    _fmt(d["ratios"]["unmerged/plain"]),
                    _fmt(d["ratios"]["merged/plain"]),
                ]
            )
        lines += [
            f"2. Inference latency, predict_on_batch, {c['depth']} x "
            f"Dense({c['width']}), rank {c['rank']} (ms, median of "
            f"{c['repeats']} x {c['steps']} calls)",
            *_table(
                [
                    "batch",
                    "plain",
                    "unmerged",
                    "merged",
                    "unmerged/plain",
                    "merged/plain",
                ],
                rows,
            ),
            "",
        ]
    if "eager" in s:
        e = s["eager"]
        lines += [
            "2b. Eager batch-1 forward (thread CPU time), model(x), "
            f"{e['config']['depth']} x Dense({e['config']['width']}), rank "
            f"{e['config']['rank']}: LoRA/plain {_fmt(e['ratio_median'])} "
            f"(median), {_fmt(e['ratio_min'])} (min)",
            "",
        ]
    if "memory" in s:
        from benchmarks import memory

        lines += memory.report_lines(s["memory"])
    if "merge" in s:
        m = s["merge"]
        rows = [
            [
                f"{p['params']:,}",
                p["layers"],
                _fmt(p["merge_s"], 3),
                _fmt(p["numpy_s"], 3),
                _fmt(p["merge/numpy"]),
                _fmt(p["merge_ns_per_param"], 2),
                _fmt(p.get("first_merge/numpy_kept")),
                _fmt(p.get("merge_peak/merged_bytes")),
            ]
            for p in m["points"]
        ]
        lines += [
            f"4. merge_lora scaling, Dense({m['config']['width']}) layers, rank "
            f"{m['config']['rank']}",
            *_table(
                [
                    "params",
                    "layers",
                    "merge s",
                    "numpy s",
                    "merge/numpy",
                    "ns/param",
                    "1st merge/numpy kept",
                    "peak/merged bytes",
                ],
                rows,
            ),
            "",
        ]
    if "hotswap" in s:
        from benchmarks import hotswap

        lines += hotswap.report_lines(s["hotswap"])
    if "serving" in s:
        from benchmarks import serving

        lines += serving.report_lines(s["serving"])
    lines += ["Targets (ratios from this run; reported, never asserted)"]
    rows = [
        [
            t["description"],
            t["where"],
            f"<= {t['limit']:g}",
            _fmt(t["value"]),
            t["status"],
        ]
        for t in results["targets"]
    ]
    lines += _table(["figure", "where", "target", "measured", "status"], rows)
    return "\n".join(lines) + "\n"


def summary_markdown(all_results):
    """One markdown table across backends: step times, ratios and targets."""
    lines = [
        "| backend | full ms | core LoRA ms | keras_lora ms | floor ms | PEFT ms "
        "| keras_lora / core | keras_lora / floor | keras_lora / PEFT "
        "| merged / plain (b1, b256) | unmerged / plain (b1, b256) "
        "| apply_lora added | merge / numpy |",
        "|---" * 13 + "|",
    ]
    for r in all_results:
        lines.append(_summary_row(r))
    return "\n".join(lines) + "\n"


def _summary_row(r):
    s = r["sections"]
    rows = s.get("training", {}).get("rows", {})
    ratios = s.get("training", {}).get("ratios", {})
    batches = s.get("inference", {}).get("batches", {}).values()

    def ms(row):
        return _fmt(rows[row]["median_ms"], 1) if row in rows else "n/a"

    def per_batch(key):
        return ", ".join(_fmt(d["ratios"][key]) for d in batches) or "n/a"

    mem = s.get("memory", {}).get("apply_lora_added/model_bytes")
    merge = s.get("merge", {}).get("max_merge/numpy")
    return (
        f"| {r['backend']} | {ms('full')} | {ms('core_lora')} | "
        f"{ms('keras_lora')} | {ms('floor')} | {ms('peft')} | "
        f"{_fmt(ratios.get('keras_lora/core_lora'))} | "
        f"{_fmt(ratios.get('keras_lora/floor'))} | "
        f"{_fmt(ratios.get('keras_lora/peft'))} | {per_batch('merged/plain')} | "
        f"{per_batch('unmerged/plain')} | "
        f"{'n/a' if mem is None else f'{100 * mem:.2f}%'} | {_fmt(merge)} |"
    )


def finish(results):
    """Adds the target checks to `results` and returns its report text."""
    results["targets"] = targets.check(results)
    return backend_text(results)


def write(out_dir, stem, results, text):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.txt"), "w") as f:
        f.write(text)
