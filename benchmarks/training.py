"""Section 1: training step time, four rows interleaved in one process.

Rows, all on the same architecture, Adam, one compiled `train_on_batch` per
step (`jit_compile=True` on TensorFlow and JAX; the torch backend runs
eagerly, as Keras does by default there):

- `full`: every weight trains.
- `core_lora`: Keras core `Dense.enable_lora(rank)` on the target layers;
  every other weight, and the targets' biases, frozen.
- `keras_lora`: `keras_lora.apply_lora(model, targets, rank)`.
- `floor`: every weight frozen except the first layer's bias: a forward
  pass plus an input-gradient backward through every layer, the least any
  LoRA method can cost.
- `dora` (MLP only): `keras_lora.apply_lora(..., use_dora=True)`.
- `peft` (torch backend only): PEFT LoRA on the same MLP in plain PyTorch.

On TensorFlow the MLP rows run twice: with XLA (`jit_compile=True`) and
as a plain `tf.function` (`jit_compile=False`, under `"no_jit"`).
"""

import keras
import numpy as np

import keras_lora as kl
from benchmarks import models
from benchmarks.timing import ratio, time_interleaved

ROWS = ("full", "core_lora", "keras_lora", "floor", "dora")


def jit_compile():
    """XLA where Keras supports it; the torch backend's default is eager."""
    return keras.backend.backend() != "torch"


def make_rows(make_model, targets, rank, dora=False):
    """Returns `{row: model}`, each a fresh copy of `make_model()`."""
    rows = {"full": make_model()}

    core = make_model()
    for layer in core.layers:
        layer.trainable = False
    for layer in models.dense_layers(core, targets):
        layer.trainable = True
        layer.enable_lora(rank)
        if layer.bias is not None:
            layer.bias.trainable = False
    rows["core_lora"] = core

    rows["keras_lora"] = kl.apply_lora(make_model(), targets=targets, rank=rank)

    floor = make_model()
    for layer in floor.layers:
        layer.trainable = False
    first = models.dense_layers(floor)[0]
    first.trainable = True
    first.kernel.trainable = False
    rows["floor"] = floor
    if dora:
        rows["dora"] = kl.apply_lora(
            make_model(), targets=targets, rank=rank, use_dora=True
        )
    return rows


def trainable_counts(rows):
    return {
        name: kl.trainable_summary(model, print_fn=None).trainable
        for name, model in rows.items()
    }


def train_steps(rows, x, y, jit=None):
    """Compiles every model and returns `{row: step}` (one `train_on_batch`)."""
    x = keras.ops.convert_to_tensor(x)
    y = keras.ops.convert_to_tensor(y)
    steps = {}
    for name, model in rows.items():
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile() if jit is None else jit,
        )
        steps[name] = _step(model, x, y)
    return steps


def _step(model, x, y):
    return lambda: model.train_on_batch(x, y)


def mlp_setup(c):
    """`(x, y, make_model, hidden)` of the MLP config `c`: a batch, labels,
    a function that builds the float MLP, and its hidden layers' names."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c["batch"], c["input_dim"]), dtype=np.float32)
    y = rng.integers(0, c["classes"], size=(c["batch"],))

    def make_model():
        return models.mlp(c["input_dim"], c["width"], c["depth"], c["classes"])

    return x, y, make_model, [f"dense_{i}" for i in range(c["depth"])]


def run_mlp(config):
    """The 4 x Dense(1024) MLP (section 1), plus PEFT on the torch backend."""
    c = config["mlp"]
    x, y, make_model, hidden = mlp_setup(c)
    rows = make_rows(make_model, hidden, c["rank"], dora=True)
    steps = train_steps(rows, x, y)
    counts = trainable_counts(rows)
    peft_info = None
    if keras.backend.backend() == "torch":
        from benchmarks import peft_reference

        peft_step, peft_info = peft_reference.make_step(c, x, y)
        if peft_step is not None:
            steps["peft"] = peft_step
            counts["peft"] = peft_info["trainable"]
    timings = time_interleaved(steps, c["repeats"], c["steps"], c["warmup"])
    result = _result(c, timings, counts, peft_info)
    if keras.backend.backend() == "tensorflow":
        rows = make_rows(make_model, hidden, c["rank"], dora=True)
        steps = train_steps(rows, x, y, jit=False)
        timings = time_interleaved(steps, c["repeats"], c["steps"], c["warmup"])
        result["no_jit"] = _result(c, timings, counts, None, jit=False)
    return result


def run_block(config):
    """The Dense-only transformer-ish block, adapters on the attention
    projections."""
    c = config["block"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((c["batch"], c["seq_len"], c["d_model"]), np.float32)
    y = rng.integers(0, c["classes"], size=(c["batch"],))

    def make_model():
        return models.dense_block(c["seq_len"], c["d_model"], c["d_ff"], c["classes"])

    targets = ["query", "key", "value", "attention_output"]
    rows = make_rows(make_model, targets, c["rank"])
    steps = train_steps(rows, x, y)
    timings = time_interleaved(steps, c["repeats"], c["steps"], c["warmup"])
    return _result(c, timings, trainable_counts(rows), None)


def _result(config, timings, counts, peft_info, jit=None):
    median = {name: t["median_ms"] for name, t in timings.items()}
    low = {name: t["min_ms"] for name, t in timings.items()}
    result = {
        "config": config,
        "jit_compile": jit_compile() if jit is None else jit,
        "rows": {
            name: dict(timings[name], trainable_params=counts[name]) for name in timings
        },
        "ratios": {
            "keras_lora/core_lora": ratio(median["keras_lora"], median["core_lora"]),
            "keras_lora/floor": ratio(median["keras_lora"], median["floor"]),
            "keras_lora/full": ratio(median["keras_lora"], median["full"]),
            "core_lora/full": ratio(median["core_lora"], median["full"]),
        },
        "ratios_min": {
            "keras_lora/core_lora": ratio(low["keras_lora"], low["core_lora"]),
            "keras_lora/floor": ratio(low["keras_lora"], low["floor"]),
        },
    }
    if "dora" in median:
        result["ratios"]["dora/keras_lora"] = ratio(
            median["dora"], median["keras_lora"]
        )
        result["ratios_min"]["dora/keras_lora"] = ratio(low["dora"], low["keras_lora"])
    if "peft" in median:
        result["ratios"]["keras_lora/peft"] = ratio(
            median["keras_lora"], median["peft"]
        )
        result["ratios_min"]["keras_lora/peft"] = ratio(low["keras_lora"], low["peft"])
    if peft_info is not None:
        result["peft"] = peft_info
    return result
