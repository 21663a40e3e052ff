"""Section 2: inference latency of plain Dense, LoRA unmerged, LoRA merged.

Each model runs through Keras's compiled `predict_on_batch` (XLA on
TensorFlow and JAX, eager on torch), the three rows interleaved, at every
batch size of the config.
"""

import keras
import numpy as np

import keras_lora as kl
from benchmarks import models
from benchmarks.timing import ratio, time_interleaved
from benchmarks.training import jit_compile


def randomize_adapters(model, seed=0):
    """Gives every `lora_b` non-zero values, as after fine-tuning, so the
    merged kernel differs from the base one."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, kl.LoRALayer):
            b = layer.lora_b
            b.assign(0.01 * rng.standard_normal(tuple(b.shape)).astype(b.dtype))


def run(config):
    c = config["inference"]
    plain = models.mlp(c["input_dim"], c["width"], c["depth"], c["classes"])
    lora = kl.apply_lora(plain, rank=c["rank"])
    randomize_adapters(lora)
    merged = kl.merge_lora(lora)
    rows = {"plain": plain, "unmerged": lora, "merged": merged}
    for model in rows.values():
        model.compile(jit_compile=jit_compile())

    rng = np.random.default_rng(2)
    result = {"config": c, "batches": {}}
    for batch in c["batches"]:
        x = keras.ops.convert_to_tensor(
            rng.standard_normal((batch, c["input_dim"]), dtype=np.float32)
        )
        calls = {name: _predict(model, x) for name, model in rows.items()}
        timings = time_interleaved(calls, c["repeats"], c["steps"], c["warmup"])
        median = {name: t["median_ms"] for name, t in timings.items()}
        result["batches"][str(batch)] = {
            "rows": timings,
            "ratios": {
                "merged/plain": ratio(median["merged"], median["plain"]),
                "unmerged/plain": ratio(median["unmerged"], median["plain"]),
            },
        }
    return result


def _predict(model, x):
    return lambda: model.predict_on_batch(x)
