"""Sizes and repeat counts: the full run, and a `--quick` run for CI.

Quick mode runs every section's code path (subprocesses included) on small
models with few repeats; its timings are not meaningful.
"""

import copy

# The sections, in the order they run.
SECTIONS = (
    "training",
    "transformer",
    "block",
    "inference",
    "eager",
    "memory",
    "merge",
    "hotswap",
    "serving",
)

# The transformer row: a GPT2-style KerasHub causal LM (models.causal_lm),
# used by the transformer and serving sections.
CAUSAL_LM = {
    "num_layers": 4,
    "hidden_dim": 256,
    "num_heads": 4,
    "intermediate_dim": 1024,
    "vocabulary_size": 4096,
    "sequence_length": 128,
    "batch": 8,
}
CAUSAL_LM_QUICK = dict(
    CAUSAL_LM,
    num_layers=1,
    hidden_dim=64,
    num_heads=2,
    intermediate_dim=128,
    vocabulary_size=256,
    sequence_length=16,
    batch=2,
)

# Issue 19's model (models.llama_causal_lm): a KerasHub Llama3CausalLM,
# 0.70B parameters, 2,660 MiB of float32 kernels; batch 1, sequence 128.
LLAMA_0_7B = {
    "num_layers": 12,
    "hidden_dim": 2048,
    "intermediate_dim": 5632,
    "vocabulary_size": 32000,
    "num_query_heads": 16,
    "num_key_value_heads": 8,
    "sequence_length": 128,
    "batch": 1,
}
# Rematerialization's row: a smaller Llama at sequence 2,048, where
# activations dominate (the vocabulary is kept small so that the logits,
# which no transformer block holds, do not).
LLAMA_LONG = {
    "num_layers": 4,
    "hidden_dim": 512,
    "intermediate_dim": 1408,
    "vocabulary_size": 4096,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "sequence_length": 2048,
    "batch": 1,
}
LLAMA_QUICK = dict(
    LLAMA_0_7B,
    num_layers=1,
    hidden_dim=64,
    intermediate_dim=128,
    vocabulary_size=256,
    num_query_heads=4,
    num_key_value_heads=2,
    sequence_length=16,
)

FULL = {
    "mlp": {
        "input_dim": 1024,
        "width": 1024,
        "depth": 4,
        "classes": 10,
        "batch": 256,
        "rank": 8,
        "warmup": 3,
        "repeats": 12,
        "steps": 5,
    },
    "block": {
        "seq_len": 128,
        "d_model": 256,
        "d_ff": 1024,
        "classes": 10,
        "batch": 16,
        "rank": 8,
        "warmup": 3,
        "repeats": 10,
        "steps": 5,
    },
    "inference": {
        "input_dim": 1024,
        "width": 1024,
        "depth": 4,
        "classes": 10,
        "rank": 8,
        "batches": [1, 256],
        "warmup": 5,
        "repeats": 40,  # at 12, batch 1 was noise-bound (merged / plain: 1.06-1.27)
        "steps": 10,
    },
    "memory": {
        # 8 x Dense(4096): 134M parameters, 537 MB of float32 weights.
        "train": {
            "width": 4096,
            "depth": 8,
            "classes": 10,
            "batch": 64,
            "steps": 3,
            "rank": 8,
        },
        # 16 x Dense(4096): 268M parameters, 1.07 GB of float32 weights.
        "apply_lora": {"width": 4096, "depth": 16, "classes": 10, "rank": 8},
        # Quantized bases (benchmarks/qlora.py): 1 step that compiles, then
        # 3 timed (a median on a shared 2-core machine).
        "qlora": {
            "model": dict(LLAMA_0_7B),
            "targets": ["query", "value"],
            "rank": 8,
            "steps": 4,
        },
        "remat": {
            "model": dict(LLAMA_LONG),
            "targets": ["query", "value"],
            "rank": 8,
            "steps": 3,
        },
    },
    "merge": {
        "width": 2048,
        "rank": 8,
        "sizes": [10_000_000, 100_000_000, 1_000_000_000],
        "merge_repeats": 3,
        "process_per_size": True,
    },
    "hotswap": {
        "width": 1024,
        "depth": 4,
        "classes": 10,
        "batch": 256,
        "max_rank": 8,
        "ranks": [2, 4, 8],
        "alphas": [4.0, 8.0, 16.0],
        "swaps": 100,
        "warmup": 3,
        "repeats": 12,
        "steps": 10,
    },
    # Mixed-adapter batches (benchmarks/serving.py): 8 and 64 adapters in one
    # batch against the single-adapter model. The transformer row is
    # models.CAUSAL_LM at batch 16 (batch 256 x seq 128 is 21 GB of logits).
    "serving": {
        "rank": 8,
        "adapters": [8, 64],
        "mlp": {
            "input_dim": 1024,
            "width": 1024,
            "depth": 4,
            "classes": 10,
            "batch": 256,
        },
        "transformer": dict(CAUSAL_LM, batch=16),
        "warmup": 3,
        "repeats": 10,
        "steps": 3,
    },
    # The transformer row: models.CAUSAL_LM, adapters on query and value.
    "transformer": {
        "model": dict(CAUSAL_LM),
        "rank": 8,
        "warmup": 2,
        "repeats": 8,
        "steps": 3,
    },
}

QUICK = {
    "mlp": dict(
        FULL["mlp"], input_dim=256, width=256, batch=64, warmup=1, repeats=3, steps=2
    ),
    "block": dict(
        FULL["block"],
        seq_len=16,
        d_model=32,
        d_ff=64,
        batch=4,
        warmup=1,
        repeats=2,
        steps=2,
    ),
    "inference": dict(
        FULL["inference"],
        input_dim=256,
        width=256,
        batches=[1, 64],
        warmup=1,
        repeats=3,
        steps=3,
    ),
    "memory": {
        "train": dict(FULL["memory"]["train"], width=512, depth=2, batch=16, steps=2),
        "apply_lora": dict(FULL["memory"]["apply_lora"], width=512, depth=4),
        "qlora": dict(FULL["memory"]["qlora"], model=dict(LLAMA_QUICK), steps=2),
        "remat": dict(
            FULL["memory"]["remat"],
            model=dict(LLAMA_QUICK, sequence_length=64),
            steps=2,
        ),
    },
    "merge": dict(
        FULL["merge"],
        width=512,
        sizes=[262_144, 1_048_576, 4_194_304],
        merge_repeats=3,
        process_per_size=False,
    ),
    "hotswap": dict(
        FULL["hotswap"], width=128, batch=32, swaps=4, warmup=1, repeats=3, steps=3
    ),
    # One adapter count: each count compiles a served model per strategy.
    "serving": dict(
        FULL["serving"],
        adapters=[4],
        mlp=dict(FULL["serving"]["mlp"], input_dim=64, width=64, batch=16),
        transformer=dict(CAUSAL_LM_QUICK, batch=4),
        warmup=1,
        repeats=2,
        steps=2,
    ),
    "transformer": dict(
        FULL["transformer"],
        model=dict(CAUSAL_LM_QUICK),
        warmup=1,
        repeats=2,
        steps=2,
    ),
}


def get(quick):
    return copy.deepcopy(QUICK if quick else FULL)
