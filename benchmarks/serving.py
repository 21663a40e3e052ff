"""Section: serving mixed-adapter batches (`mixed_adapter_model`).

Per model row (the MLP of the inference section, and the transformer row,
`models.causal_lm`), one LoRA model holds `max(adapters)` adapters of the
same rank. The rows, timed interleaved through Keras's compiled
`predict_on_batch` (XLA on TensorFlow and JAX, eager on torch):

- `single`: the LoRA model with one adapter active, the whole batch on it;
- `n/auto`, `n/concat`, `n/gather`, `n/grouped`: the served model of `n`
  adapters, each row of the batch on a random one of them, per strategy
  (`layers.mixed`; `"auto"`, the default, takes per backend the strategy
  of `layers.mixed.AUTO`, chosen from these rows);
- `n/<strategy>+cache`: the same with `cache=True` (the adapters' stacks
  kept in the served model, `keras_lora.model.stack_cache`), for the
  strategies of the config's `cached` list (MLP row). Each serves its own
  copy of the LoRA model (same weights): on JAX, Keras's compiled
  `predict` of any model hands every variable it reads back in a new
  array, which a cache sharing those variables cannot tell from a write,
  so interleaving with the other rows would time a rebuild per repeat.

Ratios are against `single`, median over median and minimum over minimum.

Only the MLP row, on one backend, with more repeats (the rows still
interleaved in one process):

    KERAS_BACKEND=jax python -m benchmarks.serving --repeats 20 --steps 3
"""

import argparse
import json
import os

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


def _time_row(lora, names, counts, x, batch, c, copy=None):
    rng = np.random.default_rng(1)
    lora.compile(jit_compile=jit_compile())
    calls = {"single": lambda: lora.predict_on_batch(x)}
    for n in counts:
        index = rng.integers(0, n, size=(batch,)).astype("int32")
        if not isinstance(x, dict):  # like `x`: torch takes no numpy/tensor mix
            index = keras.ops.convert_to_tensor(index)
        feed = {**x, "adapter_index": index} if isinstance(x, dict) else [x, index]
        rows = [(s, False) for s in c.get("strategies", STRATEGIES)]
        rows += [(s, True) for s in c.get("cached", ())]
        for strategy, cache in rows:
            own = copy() if cache and copy is not None else lora
            served = kl.mixed_adapter_model(
                own, names[:n], strategy=strategy, cache=cache
            )
            served.compile(jit_compile=jit_compile())
            label = f"{n}/{strategy}" + ("+cache" if cache else "")
            calls[label] = lambda s=served, f=feed: s.predict_on_batch(f)
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

    weights = plain.get_weights()

    def copy():
        model = models.mlp(m["input_dim"], m["width"], m["depth"], m["classes"])
        model.set_weights(weights)
        return _with_adapters(model, max(counts), c["rank"])[0]

    result["mlp"] = _time_row(lora, names, counts, x, m["batch"], c, copy)
    del lora, plain
    if not c.get("transformer"):
        return result
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
        if row not in result:
            continue
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
    strategy's (`"auto"`, and `"auto"` with `cache=True` where timed)
    median and minimum ratios (issue 24: 8 adapters on both rows, 64
    adapters on the MLP)."""
    out = []
    for row in ("mlp", "transformer"):
        if row not in result:
            continue
        for name, r in result[row]["ratios"].items():
            n, strategy = name.split("/")
            if strategy not in ("auto", "auto+cache"):
                continue
            key = {8: "serving/8", 64: "serving/64"}.get(int(n))
            if key is None or (key == "serving/64" and row != "mlp"):
                continue
            for stat in ("median", "min"):
                out.append((key, f"{row} {name} {stat}", r[stat]))
    return out


def main(argv=None):
    from benchmarks.config import FULL

    parser = argparse.ArgumentParser(
        description="The serving section's MLP row alone, on $KERAS_BACKEND."
    )
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument(
        "--cached", nargs="*", default=["auto"], help="strategies also timed cached"
    )
    parser.add_argument("--repeats", type=int, default=FULL["serving"]["repeats"])
    parser.add_argument("--steps", type=int, default=FULL["serving"]["steps"])
    parser.add_argument("--warmup", type=int, default=FULL["serving"]["warmup"])
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    config = dict(
        FULL["serving"],
        adapters=args.adapters,
        strategies=args.strategies,
        cached=args.cached,
        repeats=args.repeats,
        steps=args.steps,
        warmup=args.warmup,
        transformer=None,
    )
    result = run({"serving": config})
    print(f"backend {keras.backend.backend()}, load average {os.getloadavg()}")
    print("\n".join(report_lines(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
