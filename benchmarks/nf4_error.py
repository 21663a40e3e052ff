"""Quantization error of NF4 (`kl.quantize_nf4`) against Keras's int4.

`‖W − dequant(Q(W))‖ / ‖W‖` of one kernel, quantized by each method, for
several kinds of weights; and the bits each method stores per weight
(every quantized variable, the bias excluded). NF4 is QLoRA's 4-bit
NormalFloat, block size 64 (with and without double quantization); Keras's
int4 at the same block size (`Int4QuantizationConfig(block_size=64)`,
asymmetric: a scale and a zero point per block) and per channel; and the
QLoRA paper's Int4 baseline, symmetric absmax int4 in the same blocks of 64
(NumPy, the same 4.5 bits per weight as NF4).

The weights:
- `normal`: `N(0, 0.02)`, 1024 x 1024 (NF4's design case);
- `student_t3`: Student-t with 3 degrees of freedom (heavy tails), scaled
  to std 0.02, 1024 x 1024;
- `glorot_uniform`: Keras's default `Dense` initializer, 1024 x 1024;
- `llama3_*`: the kernels of a KerasHub `Llama3Backbone` built from config
  (2 layers, hidden 256, intermediate 512), at its random initialization:
  no trained weights are downloaded (its initializer is a truncated
  normal), so this is a "real-looking" architecture, not trained weights.

    python -m benchmarks.nf4_error --out benchmarks/results/nf4_error.json

`--memory FILE` also runs `benchmarks.qlora`'s rows float32, int4 and nf4
(keras_lora adapters), each in a fresh process, on a small KerasHub
Llama3 (`SMALL_LLAMA`), and writes them to FILE.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora as kl  # noqa: E402
from keras_lora.layers import quantized  # noqa: E402

BLOCK = 64


def weights(seed=0):
    rng = np.random.default_rng(seed)
    shape = (1024, 1024)
    t = rng.standard_t(3, size=shape)
    kinds = {
        "normal": rng.normal(0, 0.02, shape),
        "student_t3": t / t.std() * 0.02,
        "glorot_uniform": keras.initializers.GlorotUniform(seed)(shape),
    }
    kinds.update(_llama3_kernels())
    return {k: np.asarray(v, "float32") for k, v in kinds.items()}


def _llama3_kernels():
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=1024,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=256,
        intermediate_dim=512,
    )
    block = backbone.transformer_layers[0]
    attention = block._self_attention_layer
    kernels = {
        "llama3_query": attention._query_dense.kernel,
        "llama3_ffw_gate": block._feedforward_gate_dense.kernel,
    }
    # As `Dense` kernels (inputs, outputs): the blocks run over the outputs.
    return {k: np.reshape(v, (v.shape[0], -1)) for k, v in kernels.items()}


def dense_with(kernel):
    layer = keras.layers.Dense(kernel.shape[1], use_bias=False)
    layer.build((None, kernel.shape[0]))
    layer.kernel.assign(kernel)
    return layer


def error(kernel, layer):
    deq = keras.ops.convert_to_numpy(quantized.dequantized_kernel(layer))
    return float(np.linalg.norm(kernel - deq) / np.linalg.norm(kernel))


def bits_per_weight(layer, size):
    stored = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize * 8
        for v in layer.weights
        if v.name != "bias"
    )
    return stored / size


def measure(kernel):
    rows = {}
    for name, double_quant in (("nf4", False), ("nf4_double_quant", True)):
        inputs = keras.Input((kernel.shape[0],))
        layer = dense_with(kernel)
        model = keras.Model(inputs, layer(inputs))
        kl.quantize_nf4(model, block_size=BLOCK, double_quant=double_quant)
        rows[name] = (error(kernel, layer), bits_per_weight(layer, kernel.size))
    # The paper's Int4 baseline: symmetric absmax int4 in the same blocks
    # (NumPy; codes in [-7, 7], one float32 absmax per block): 4.5 bits.
    blocks = kernel.reshape(-1, BLOCK).astype("float64")
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    step = np.where(absmax > 0, absmax, 1) / 7
    deq = (np.clip(np.round(blocks / step), -7, 7) * step).reshape(kernel.shape)
    rows["int4_symmetric_block64"] = (
        float(np.linalg.norm(kernel - deq) / np.linalg.norm(kernel)),
        4 + 32 / BLOCK,
    )
    for name, block in (("int4_block64", BLOCK), ("int4_per_channel", -1)):
        layer = dense_with(kernel)
        config = keras.quantizers.Int4QuantizationConfig(block_size=block)
        layer.quantize("int4", config=config)
        rows[name] = (error(kernel, layer), bits_per_weight(layer, kernel.size))
    return {
        name: {"relative_error": e, "bits_per_weight": round(b, 4)}
        for name, (e, b) in rows.items()
    } | {
        "ratio_nf4_to_int4_block64": rows["nf4"][0] / rows["int4_block64"][0],
        "ratio_nf4_double_quant_to_int4_block64": (
            rows["nf4_double_quant"][0] / rows["int4_block64"][0]
        ),
        "ratio_nf4_to_int4_symmetric_block64": (
            rows["nf4"][0] / rows["int4_symmetric_block64"][0]
        ),
    }


# A small Llama3CausalLM for the memory rows: 4 layers, hidden 512.
SMALL_LLAMA = {
    "num_layers": 4,
    "hidden_dim": 512,
    "intermediate_dim": 1408,
    "vocabulary_size": 4096,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "sequence_length": 128,
    "batch": 1,
}


def memory_rows(path):
    from benchmarks.isolated import run_isolated

    c = {"model": SMALL_LLAMA, "targets": ["query", "value"], "rank": 8, "steps": 4}
    rows = {}
    for mode in ("float32", "int4", "nf4"):
        args = dict(c, mode=mode, adapters="keras_lora")
        rows[mode] = run_isolated(keras.backend.backend(), "qlora_train", args)
        row = rows[mode]
        print(
            f"{mode:8s} before {row['rss_before_bytes'] / 2**20:,.0f} MiB "
            f"peak {row['train_peak_bytes'] / 2**20:,.0f} MiB "
            f"added {row['train_added_bytes'] / 2**20:,.0f} MiB "
            f"kernels {row['bytes']['kernels'] / 2**20:,.1f} MiB "
            f"step {row['step_median_s']:.2f} s"
        )
    with open(path, "w") as f:
        json.dump({"backend": keras.backend.backend(), "config": c, "rows": rows}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory", default=None, help="a JSON file to write")
    args = parser.parse_args()
    if args.memory:
        memory_rows(args.memory)
        return
    results = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "block_size": BLOCK,
        "weights": {},
    }
    for kind, kernel in weights().items():
        results["weights"][kind] = {"shape": list(kernel.shape)} | measure(kernel)
        row = results["weights"][kind]
        print(
            f"{kind:16s} nf4 {row['nf4']['relative_error']:.4f} "
            f"int4/64 {row['int4_block64']['relative_error']:.4f} "
            f"ratio {row['ratio_nf4_to_int4_block64']:.3f} "
            f"vs symmetric int4 {row['ratio_nf4_to_int4_symmetric_block64']:.3f}"
        )
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
