"""Section: serving mixed-adapter batches (`mixed_adapter_model`).

Per model row (the MLP of the inference section, and the transformer row,
`models.causal_lm`), one LoRA model holds `max(adapters)` adapters of the
same rank. The rows, timed interleaved through Keras's compiled
`predict_on_batch` (XLA on TensorFlow and JAX, eager on torch):

- `single`: the LoRA model with one adapter active, the whole batch on it;
- `n/auto`, `n/concat`, `n/gather`, `n/grouped`: the served model of `n`
  adapters, each row of the batch on a random one of them, per strategy
  (`layers.mixed`; `"auto"`, the default, takes per backend the strategy
  of `layers.mixed.AUTO`, chosen from these rows).

Ratios are against `single`, median over median and minimum over minimum.
"""

import keras
import numpy as np

import keras_lora as kl
from benchmarks import models
from benchmarks.timing import ratio, time_interleaved
from benchmarks.training import jit_compile
from keras_lora.layers import LoRALayer
from keras_lora.model.walk import iter_layers

STRATEGIES = ("auto", "concat", "gather", "grouped")


def _with_adapters(model, count, rank, targets=None, in_place=False):
    lora = kl.apply_lora(model, rank=rank, targets=targets, in_place=in_place)
    names = ["default"] + [f"tenant_{i}" for i in range(1, count)]
    for name in names[1:]:
        kl.add_adapter(lora, name, rank=rank)
    rng = np.random.default_rng(0)
    for _, layer in iter_layers(lora):
        if isinstance(layer, LoRALayer):
            for name in layer.adapter_names:
                b = layer.get_adapter(name).b
                b.assign(0.01 * rng.standard_normal(tuple(b.shape)).astype(b.dtype))
    return lora, names


def _time_row(lora, names, counts, x, batch, c):
    rng = np.random.default_rng(1)
    lora.compile(jit_compile=jit_compile())
    calls = {"single": lambda: lora.predict_on_batch(x)}
    for n in counts:
        index = rng.integers(0, n, size=(batch,)).astype("int32")
        if not isinstance(x, dict):  # like `x`: torch takes no numpy/tensor mix
            index = keras.ops.convert_to_tensor(index)
        for strategy in STRATEGIES:
            served = kl.mixed_adapter_model(lora, names[:n], strategy=strategy)
            served.compile(jit_compile=jit_compile())
            feed = {**x, "adapter_index": index} if isinstance(x, dict) else [x, index]
            calls[f"{n}/{strategy}"] = lambda s=served, f=feed: s.predict_on_batch(f)
    timings = time_interleaved(calls, c["repeats"], c["steps"], c["warmup"])
    single = timings["single"]
    ratios = {
        name: {
            "median": ratio(t["median_ms"], single["median_ms"]),
            "min": ratio(t["min_ms"], single["min_ms"]),
        }
        for name, t in timings.items()
        if name != "single"
    }
    return {"rows": timings, "ratios": ratios}


def run(config):
    c = config["serving"]
    counts = c["adapters"]
    result = {"config": c}
    m = c["mlp"]
    plain = models.mlp(m["input_dim"], m["width"], m["depth"], m["classes"])
    lora, names = _with_adapters(plain, max(counts), c["rank"])
    x = np.random.default_rng(2).standard_normal((m["batch"], m["input_dim"]))
    x = keras.ops.convert_to_tensor(x.astype("float32"))
    result["mlp"] = _time_row(lora, names, counts, x, m["batch"], c)
    del lora, plain
    t = c["transformer"]
    lm = models.causal_lm(**t)
    lora, names = _with_adapters(lm.backbone, max(counts), c["rank"], in_place=True)
    x, _, _ = models.causal_lm_batch(**t)
    result["transformer"] = _time_row(lm, names, counts, x, t["batch"], c)
    return result


def _label(result, row):
    if row == "mlp":
        m = result["config"]["mlp"]
        return f"MLP {m['depth']} x Dense({m['width']}), batch {m['batch']}"
    t = result["config"]["transformer"]
    return (
        f"GPT2 causal LM {t['num_layers']} layers, hidden {t['hidden_dim']}, "
        f"seq {t['sequence_length']}, batch {t['batch']}"
    )


def report_lines(result):
    """The section's lines in the text report."""
    c = result["config"]
    lines = [
        f"5. Serving mixed-adapter batches, rank {c['rank']}, predict_on_batch "
        f"(ms; ratio to the single-adapter model, median and min of "
        f"{c['repeats']} x {c['steps']} calls)"
    ]
    for row in ("mlp", "transformer"):
        data = result[row]
        single = data["rows"]["single"]
        lines.append(
            f"  {_label(result, row)}: single {single['median_ms']:.3f} "
            f"(min {single['min_ms']:.3f})"
        )
        for name, r in data["ratios"].items():
            t = data["rows"][name]
            lines.append(
                f"    {name:>12}: {t['median_ms']:9.3f} ms  x{r['median']:.2f} "
                f"(min x{r['min']:.2f})"
            )
    return lines + [""]


def figures(result):
    """`[(target key, where, value)]` for `targets.py`: the default
    strategy's (`"auto"`) median and minimum ratios (issue 24: 8 adapters
    on both rows, 64 adapters on the MLP)."""
    out = []
    for row in ("mlp", "transformer"):
        for name, r in result[row]["ratios"].items():
            n, strategy = name.split("/")
            if strategy != "auto":
                continue
            key = {8: "serving/8", 64: "serving/64"}.get(int(n))
            if key is None or (key == "serving/64" and row != "mlp"):
                continue
            for stat in ("median", "min"):
                out.append((key, f"{row} {name} {stat}", r[stat]))
    return out
