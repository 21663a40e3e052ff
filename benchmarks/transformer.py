"""Section "transformer": the training step of a KerasHub GPT-2 causal LM.

`models.causal_lm(**CAUSAL_LM)`: 4 decoder blocks, hidden 256, 4 heads,
sequence 128, batch 8, vocabulary 4096, built from config (no download).
Adapters at rank 8 on the attention's `query` and `value` projections
(`EinsumDense`), Adam, one compiled `train_on_batch` per step
(`jit_compile=True` on TensorFlow and JAX, eager on torch). Rows,
interleaved in one process:

- `keras_lora`: `apply_lora(model, targets=["query", "value"], rank=8,
  in_place=True)`.
- `enable_lora`: KerasHub's `backbone.enable_lora(rank=8)`, which adapts
  the same two projections with Keras core's LoRA.
- `full`: every weight trains.
- `floor`: every weight frozen except the `beta` of the first block's
  self-attention layer norm, the first op of the first block (GPT-2 is
  pre-norm). Its gradient needs the input gradient of every block above it
  and no weight gradient, so it is a forward pass plus the backward
  through all four blocks: what LoRA on the first block's `query`/`value`
  needs too, and nothing else. (The token or position embedding would add
  an embedding-sized gradient; the last block would skip the backward.)
- `dora`: keras_lora with `use_dora=True`.
"""

import keras
import numpy as np

import keras_lora as kl
from benchmarks import models
from benchmarks.timing import ratio, time_interleaved
from benchmarks.training import jit_compile

ROWS = ("keras_lora", "enable_lora", "full", "floor", "dora")
TARGETS = ["query", "value"]


def make_rows(config, rank):
    """`{row: model}`, each a fresh `causal_lm(**config)` (same weights)."""

    def fresh():
        return models.causal_lm(**config)

    rows = {}
    rows["keras_lora"] = kl.apply_lora(
        fresh(), targets=TARGETS, rank=rank, in_place=True
    )
    core = fresh()
    core.backbone.enable_lora(rank)
    rows["enable_lora"] = core
    rows["full"] = fresh()
    floor = fresh()
    floor.trainable = True
    for layer in floor._flatten_layers(include_self=False):
        layer.trainable = False
    norm = floor.backbone.get_layer("transformer_layer_0")._self_attention_layer_norm
    norm.trainable = True
    norm.gamma.trainable = False
    rows["floor"] = floor
    rows["dora"] = kl.apply_lora(
        fresh(), targets=TARGETS, rank=rank, in_place=True, use_dora=True
    )
    return rows


def run(config):
    c = config["transformer"]
    model_config = c["model"]
    x, y, weights = models.causal_lm_batch(**model_config)
    rows = make_rows(model_config, c["rank"])
    x = {k: keras.ops.convert_to_tensor(v) for k, v in x.items()}
    y = keras.ops.convert_to_tensor(y)
    weights = keras.ops.convert_to_tensor(weights)
    steps, counts = {}, {}
    for name, model in rows.items():
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
            jit_compile=jit_compile(),
        )
        steps[name] = _step(model, x, y, weights)
        counts[name] = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    timings = time_interleaved(steps, c["repeats"], c["steps"], c["warmup"])
    return _result(c, timings, counts)


def _step(model, x, y, weights):
    return lambda: model.train_on_batch(x, y, sample_weight=weights)


def _result(config, timings, counts):
    median = {name: t["median_ms"] for name, t in timings.items()}
    low = {name: t["min_ms"] for name, t in timings.items()}

    def both(a, b):
        return {"median": ratio(median[a], median[b]), "min": ratio(low[a], low[b])}

    pairs = {
        "keras_lora/enable_lora": ("keras_lora", "enable_lora"),
        "keras_lora/floor": ("keras_lora", "floor"),
        # The least any LoRA method can cost, over KerasHub's LoRA: the
        # best keras_lora / enable_lora can be.
        "floor/enable_lora": ("floor", "enable_lora"),
        "dora/keras_lora": ("dora", "keras_lora"),
        "keras_lora/full": ("keras_lora", "full"),
        "enable_lora/full": ("enable_lora", "full"),
    }
    ratios = {key: both(a, b) for key, (a, b) in pairs.items()}
    return {
        "config": config,
        "jit_compile": jit_compile(),
        "rows": {
            name: dict(timings[name], trainable_params=counts[name]) for name in timings
        },
        "ratios": {key: r["median"] for key, r in ratios.items()},
        "ratios_min": {key: r["min"] for key, r in ratios.items()},
    }


def report_lines(data):
    """The section's lines in the plain-text report."""
    c, m = data["config"], data["config"]["model"]
    rows = [
        [
            name,
            f"{t['median_ms']:.2f}",
            f"{t['min_ms']:.2f}",
            f"{t['trainable_params']:,}",
        ]
        for name, t in data["rows"].items()
    ]
    widths = [max(len(str(r[i])) for r in rows + [ROW_HEADER]) for i in range(4)]

    def line(cells):
        return "  ".join(
            str(x).ljust(w) if i == 0 else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(cells, widths, strict=True))
        )

    ratios = ", ".join(
        f"{key} {_fmt(data['ratios'][key])} (min {_fmt(data['ratios_min'][key])})"
        for key in data["ratios"]
    )
    return [
        f"1c. Training step: KerasHub GPT2CausalLM, {m['num_layers']} blocks, "
        f"hidden {m['hidden_dim']}, seq {m['sequence_length']}, batch "
        f"{m['batch']}, vocabulary {m['vocabulary_size']}; rank {c['rank']} on "
        f"query/value, Adam, jit_compile={data['jit_compile']} (median and min "
        f"of {c['repeats']} x {c['steps']} steps, rows interleaved)",
        line(ROW_HEADER),
        line(["-" * w for w in widths]),
        *[line(r) for r in rows],
        "ratios (median, min): " + ratios,
        "",
    ]


ROW_HEADER = ["row", "ms/step", "min", "trainable"]


def _fmt(value):
    return "n/a" if value is None else f"{value:.2f}"
