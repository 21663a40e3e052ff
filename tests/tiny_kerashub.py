"""Tiny KerasHub models built offline from config, for tests.

Every builder makes a model of a few thousand weights: hidden size 16,
2 heads (1 key/value head where the architecture has grouped-query
attention), 1 transformer block (2 in the GPT2 task), a vocabulary of 64.
Nothing is downloaded.
"""

import keras
import keras_hub
import numpy as np

VOCAB = 64
SEQ = 8

_COMMON = {"vocabulary_size": VOCAB, "num_layers": 1, "hidden_dim": 16}
_MHA = {"num_heads": 2, "intermediate_dim": 32, "dropout": 0.0}
_GQA = {"num_query_heads": 2, "num_key_value_heads": 1, "intermediate_dim": 32}

# name -> (backbone class name, constructor arguments)
BACKBONES = {
    "gpt2": ("GPT2Backbone", {**_MHA, "max_sequence_length": 32}),
    "bert": ("BertBackbone", {**_MHA, "max_sequence_length": 32}),
    "roberta": ("RobertaBackbone", {**_MHA, "max_sequence_length": 32}),
    "distil_bert": ("DistilBertBackbone", {**_MHA, "max_sequence_length": 32}),
    "opt": ("OPTBackbone", {**_MHA, "max_sequence_length": 32}),
    "falcon": (
        "FalconBackbone",
        {"num_attention_heads": 2, "intermediate_dim": 32},
    ),
    "llama": ("LlamaBackbone", _GQA),
    "llama3": ("Llama3Backbone", _GQA),
    "mistral": ("MistralBackbone", {**_GQA, "sliding_window": 8}),
    "qwen": ("QwenBackbone", _GQA),
    "qwen3": ("Qwen3Backbone", {**_GQA, "head_dim": 8}),
    "gemma": ("GemmaBackbone", {**_GQA, "head_dim": 8}),
    "gemma3": (
        "Gemma3Backbone",
        {**_GQA, "head_dim": 8, "image_size": 16, "vision_encoder": None},
    ),
    "phi3": ("Phi3Backbone", {**_GQA, "max_sequence_length": 32}),
}


def backbone(name, seed=0):
    """A tiny KerasHub backbone of the architecture `name` (see
    `BACKBONES`), with weights drawn from `seed`."""
    class_name, kwargs = BACKBONES[name]
    keras.utils.set_random_seed(seed)
    return getattr(keras_hub.models, class_name)(**_COMMON, **kwargs)


def backbone_inputs(model, batch=2, seq=SEQ, seed=0):
    """Numpy inputs for `model`: token ids, a padding mask (the last token
    of the second row padded) and, where needed, segment ids."""
    rng = np.random.default_rng(seed)
    inputs = {
        "token_ids": rng.integers(1, VOCAB, size=(batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    inputs["padding_mask"][-1, -1] = 0
    names = {getattr(t, "name", "").split(":")[0] for t in model.inputs}
    if any("segment_ids" in n for n in names):
        inputs["segment_ids"] = np.zeros((batch, seq), "int32")
    return inputs


# A byte-level BPE vocabulary: the characters of the training text, a few
# merges, and GPT2's end token.
_CHARS = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "."]
_MERGES = ["t h", "Ġ t", "h e", "Ġ a", "i n", "th e", "Ġt he"]


def gpt2_tokenizer():
    """A GPT2 byte-pair tokenizer made in code (no download)."""
    tokens = list(_CHARS)
    for merge in _MERGES:
        token = merge.replace(" ", "")
        if token not in tokens:
            tokens.append(token)
    tokens.append("<|endoftext|>")
    vocabulary = {token: i for i, token in enumerate(tokens)}
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=_MERGES)


def gpt2_causal_lm(seed=0, sequence_length=SEQ):
    """A tiny `GPT2CausalLM` with its preprocessor, built offline."""
    tokenizer = gpt2_tokenizer()
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=32,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


TEXT = ["the cat sat.", "a hat in the sun.", "the end.", "in a tin."]
