"""Fine-tune a KerasHub causal LM with LoRA, end to end, offline.

1. Build a tiny `GPT2CausalLM`: its byte-pair tokenizer is made here from a
   vocabulary dict and a merges list, and its backbone from config (no
   download, no preset).
2. Convert it in place with `kl.apply_lora(..., in_place=True)`: it stays a
   `GPT2CausalLM`, with its preprocessor, `fit` on raw strings and
   `generate`.
3. Fine-tune on a few sentences, generate, save the adapter (a small
   safetensors file) and load it into a freshly built task.
4. Export a merged TensorFlow SavedModel and check that it serves the LoRA
   model's logits.

Runs on any backend (`KERAS_BACKEND=tensorflow|jax|torch`); the export
needs `tensorflow` installed. About a minute on 2 CPU cores.
"""

import os
import tempfile

import keras
import keras_hub
import numpy as np

import keras_lora as kl

TEXT = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog sat in the sun.",
    "the sun is on the mat.",
]
# Byte-level BPE: "Ġ" marks a leading space. Every character of TEXT, a few
# merges, and GPT2's end token.
MERGES = ["t h", "h e", "th e", "Ġ t", "a t", "Ġ s", "Ġ a", "o n", "Ġ on"]


def make_tokenizer():
    """A `GPT2Tokenizer` from a vocabulary dict and a merges list."""
    tokens = sorted(set("".join(TEXT).replace(" ", "Ġ")))
    tokens += [merge.replace(" ", "") for merge in MERGES]
    tokens.append("<|endoftext|>")
    vocabulary = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=MERGES)


def make_causal_lm(tokenizer, seed):
    """A tiny `GPT2CausalLM` (2 layers, hidden size 32) with `tokenizer`."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        dropout=0.0,
        max_sequence_length=32,
        name="gpt2_backbone",  # adapter files are keyed by layer paths
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=16
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def logits(causal_lm, batch):
    return keras.ops.convert_to_numpy(causal_lm(batch))


def main():
    tokenizer = make_tokenizer()
    causal_lm = make_causal_lm(tokenizer, seed=0)
    # A "pretrained" base: a few full fine-tuning steps stand in for a preset.
    causal_lm.compile(optimizer=keras.optimizers.Adam(3e-3))
    causal_lm.fit(TEXT, epochs=5, batch_size=2, verbose=0)
    base_weights = causal_lm.backbone.get_weights()  # what a preset would hold

    # Attention projections and the feed-forward layers get rank-4 adapters.
    targets = [
        "query",
        "value",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
    ]
    lora_lm = kl.apply_lora(causal_lm, targets=targets, rank=4, in_place=True)
    assert lora_lm is causal_lm and isinstance(lora_lm, keras_hub.models.GPT2CausalLM)
    kl.trainable_summary(lora_lm)

    features = lora_lm.preprocessor(TEXT)[0]  # token ids and padding mask
    batch = {k: keras.ops.convert_to_numpy(v) for k, v in features.items()}
    before = lora_lm.evaluate(TEXT, batch_size=2, verbose=0, return_dict=True)["loss"]
    lora_lm.compile(optimizer=keras.optimizers.Adam(3e-3))  # after apply_lora
    lora_lm.fit(TEXT, epochs=10, batch_size=2, verbose=0)
    after = lora_lm.evaluate(TEXT, batch_size=2, verbose=0, return_dict=True)["loss"]
    print(f"loss on the sentences: {before:.3f} before, {after:.3f} after")
    assert after < before
    print("generate('the cat'):", repr(lora_lm.generate("the cat", max_length=12)))

    with tempfile.TemporaryDirectory() as work:
        adapter = os.path.join(work, "gpt2_lora.safetensors")
        kl.save_adapter(lora_lm, adapter)
        print(f"adapter file: {os.path.getsize(adapter):,} bytes")

        # A freshly built task with the same base weights, plus the file.
        fresh = make_causal_lm(tokenizer, seed=1)
        fresh.backbone.set_weights(base_weights)
        kl.apply_lora(fresh, targets=targets, rank=4, in_place=True)
        kl.load_adapter(fresh, adapter)  # loads into its LoRA layers
        diff = np.max(np.abs(logits(fresh, batch) - logits(lora_lm, batch)))
        print(f"reloaded adapter, max |logit difference|: {diff:.2e}")
        assert diff <= 1e-6

        saved = kl.export(lora_lm, os.path.join(work, "saved_model"))
        import tensorflow as tf

        served = tf.saved_model.load(str(saved))
        diff = np.max(np.abs(served.serve(batch).numpy() - logits(lora_lm, batch)))
        print(f"SavedModel serves the LoRA logits, max |difference|: {diff:.2e}")
        assert diff < 1e-4  # float32 rounding of the merged kernels


if __name__ == "__main__":
    main()
