"""One whole user journey per modality, on a tiny KerasHub *task*.

The families test (`test_kerashub_families.py`) converts bare backbones; users
run tasks. Each journey here builds one tiny task from config (no presets, no
downloads; tokenizers and image converters made in code), once per module,
and walks it through what a user does:

1. convert: `apply_lora(task, ..., in_place=True)` returns the same object,
   of the same class, with its preprocessor and backbone;
2. `fit` two steps: only `lora_a`/`lora_b` change, every other weight is
   bitwise the same;
3. the task's own inference (`predict` for the classifier, `generate` for
   generative tasks) runs after conversion and follows the trained adapter;
4. `save_adapter`, then a fresh task of the same config with
   `load_adapter(in_place=True)`: the same predictions / greedy tokens;
5. `merge_lora`: a plain task of the same class predicting / generating the
   same (greedy tokens equal, logits within float32 rounding);
6. export, where it applies (the ViT classifier: `kl.export` to a SavedModel
   serving the task's logits).

Adapters are given random weights before training (`randomize_adapters`) so
that the adapted outputs differ measurably from the base model's: the
round-trip and merge checks could not pass with an adapter that was dropped.

Left out, and why (see also docs/families.md, "Task journeys"):
- StableDiffusion3TextToImage has no step 2: KerasHub 0.32's `fit` raises
  NotImplementedError for it. Its journey converts the MMDiT (its
  attention and MLP projections), generates seeded images (2 steps, 16 px),
  loads the adapter into a fresh task and merges; no export (the task's
  output is `generate`'s denoising loop, not a forward call).
- Training through a SentencePiece preprocessor (Moonshine, PaliGemma):
  in `fit`'s parallel tf.data map, tensorflow-text's SentencepieceTokenizeOp
  raises "Resource ...SentencepieceResource does not exist" (tensorflow-text
  2.21.1, as in tensorflow/text#374), and on JAX and torch KerasHub's
  MoonshineAudioConverter calls keras.ops on the symbolic tf.Tensor there.
  Those tasks take inputs their preprocessors made eagerly, with
  `preprocessor=None`. BART keeps its preprocessor for `predict` and
  `generate` (strings in, strings out) but trains on what it makes of the
  strings, eagerly: `fit` on raw strings works, but tracing the byte-pair
  tokenizer into tf.data costs ~12 s per `fit` on 2 cores, and it is
  tested on GPT2CausalLM in `test_kerashub_task.py`.
- `merge_lora` rebuilds the task from its config, which does not hold
  KerasHub's sampler: the merged tasks are compiled with `sampler="greedy"`
  again before their tokens are compared.
- Whisper: KerasHub 0.32 has `WhisperBackbone`, `WhisperTokenizer` and
  `WhisperAudioConverter` but no audio-to-text task (no `generate`); the
  audio journey uses `MoonshineAudioToText`, KerasHub's audio-to-text task.
- Export of the generative tasks: a SavedModel serves the task's forward
  call (logits), not `generate`; that path is tested on GPT2CausalLM in
  `tests/test_export.py`, so only the classifier, whose served output is
  what a user deploys, is exported here (it also keeps CI cost down: export
  from JAX and torch runs a TensorFlow subprocess).
"""

import re

import keras
import keras_hub
import numpy as np
import pytest
import tiny_kerashub
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

models = keras_hub.models

RANK = 2


# Helpers -------------------------------------------------------------------


def values(weights):
    return [to_numpy(w).copy() for w in weights]


def is_adapter(weight):
    return weight.path.split("/")[-1] in ("lora_a", "lora_b")


def base_weights(model):
    return [w for w in model.weights if not is_adapter(w)]


def convert(task, targets):
    """Step 1: converts in place; checks it is the same task object."""
    preprocessor, backbone, cls = task.preprocessor, task.backbone, type(task)
    result = kl.apply_lora(task, targets=targets, rank=RANK, in_place=True)
    assert result is task and type(task) is cls
    assert task.preprocessor is preprocessor and task.backbone is backbone
    assert lora_layers(task), "no layer was converted"
    randomize_adapters(task, scale=0.3)
    return task


def fit_only_adapters(task, *args, **kwargs):
    """Step 2: `fit` changes every adapter weight and nothing else."""
    before = values(task.weights)
    history = task.fit(*args, epochs=1, verbose=0, **kwargs)
    assert all(np.isfinite(history.history["loss"]))
    changed = [
        w
        for w, old in zip(task.weights, before, strict=True)
        if not np.array_equal(to_numpy(w), old)
    ]
    not_adapters = [w.path for w in changed if not is_adapter(w)]
    assert not not_adapters, f"fit changed base weights: {not_adapters}"
    # lora_a of every layer moves (lora_b is random, so its gradient is not 0).
    moved = {id(w) for w in changed}
    assert all(id(layer.lora_a) in moved for _, layer in lora_layers(task))


def reloaded(task, build, tmp_path):
    """Step 4: the adapter file, loaded in place into a fresh task."""
    path = tmp_path / "adapter.safetensors"
    kl.save_adapter(task, path)
    fresh = build()
    # The fresh task's base weights are those the adapter was trained on.
    trained, fresh_base = base_weights(task), base_weights(fresh)
    # (in order: paths differ where Keras numbers the layers it names).
    assert [w.shape for w in fresh_base] == [w.shape for w in trained]
    for w, v in zip(fresh_base, values(trained), strict=True):
        np.testing.assert_array_equal(to_numpy(w), v, err_msg=w.path)
    cls = type(fresh)
    assert kl.load_adapter(fresh, path, in_place=True) is fresh
    assert type(fresh) is cls
    # The same layers, up to the counters Keras puts in the names it makes
    # (the fresh task is built in the same session: `pali_gemma_vit_1`).
    assert uncounted(lora_layers(fresh)) == uncounted(lora_layers(task))
    return fresh


def uncounted(layers):
    return [re.sub(r"_\d+(?=/|$)", "", path) for path, _ in layers]


def renumbered_below_the_top(fresh, task):
    """Whether the two tasks' LoRA layer paths differ below their top-level
    layer: the fresh task's nested layers got other Keras counters."""
    ours = [p.split("/", 1)[-1] for p, _ in lora_layers(task)]
    theirs = [p.split("/", 1)[-1] for p, _ in lora_layers(fresh)]
    return ours != theirs


def merged(task):
    """Step 5: a plain task of the same class, no adapter left."""
    out = kl.merge_lora(task)
    assert type(out) is type(task) and out is not task
    assert not lora_layers(out)
    assert not [w.path for w in out.weights if is_adapter(w)]
    return out


# float32 merge tolerance: the merged kernel W + s·A·B is rounded once per
# element, then multiplied; the adapted layer computes x·W + s·(x·A)·B. With
# hidden sizes of 16 and |logits| of order 1, the two differ by a few ulps
# of the logits (~1e-7 each), summed over one or two blocks: 1e-5 leaves a
# margin of 10x and is still 100x below the adapter's effect, which every
# journey asserts to exceed 1e-3.
MERGE_ATOL = 1e-5
ADAPTER_EFFECT = 1e-3


# ViT image classification ---------------------------------------------------

IMAGE = 16
CLASSES = 3


def vit_classifier():
    keras.utils.set_random_seed(0)
    backbone = models.ViTBackbone(
        image_shape=(IMAGE, IMAGE, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    converter = keras_hub.layers.ViTImageConverter(image_size=(IMAGE, IMAGE))
    preprocessor = models.ViTImageClassifierPreprocessor(image_converter=converter)
    return models.ViTImageClassifier(
        backbone=backbone, num_classes=CLASSES, preprocessor=preprocessor
    )


def vit_data():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, IMAGE, IMAGE, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1], "int32")
    return images, labels


@pytest.fixture(scope="module")
def vit_journey():
    task = vit_classifier()
    images, labels = vit_data()
    base = task.predict(images, verbose=0)
    convert(task, "all-linear")
    # "all-linear" leaves the classification head out and takes the rest.
    assert "output" not in [layer.name for _, layer in lora_layers(task)]
    fit_only_adapters(task, images, labels, batch_size=2)  # 2 steps
    return task, images, base


def test_vit_converts_in_place_and_fits_only_adapters(vit_journey):
    task, images, base = vit_journey
    assert type(task) is models.ViTImageClassifier
    predicted = task.predict(images, verbose=0)
    assert predicted.shape == (len(images), CLASSES)
    assert np.max(np.abs(predicted - base)) > ADAPTER_EFFECT


def test_vit_adapter_file_gives_the_same_predictions(vit_journey, tmp_path):
    task, images, _ = vit_journey
    fresh = reloaded(task, vit_classifier, tmp_path)
    # Same weights, same program: the same bits.
    np.testing.assert_array_equal(
        fresh.predict(images, verbose=0), task.predict(images, verbose=0)
    )


def test_vit_merged_classifier_predicts_the_same(vit_journey):
    task, images, _ = vit_journey
    plain = merged(task)
    np.testing.assert_allclose(
        plain.predict(images, verbose=0),
        task.predict(images, verbose=0),
        atol=MERGE_ATOL,
    )


def test_vit_exports_a_saved_model_serving_the_adapted_logits(vit_journey, tmp_path):
    import tensorflow as tf

    task, images, _ = vit_journey
    assert kl.export(task, tmp_path / "vit") == tmp_path / "vit"
    loaded = tf.saved_model.load(str(tmp_path / "vit"))
    served = loaded.serve(images).numpy()
    # The SavedModel serves the backbone and head, not the preprocessor.
    expected = to_numpy(task(task.preprocessor(images)))
    np.testing.assert_allclose(served, expected, atol=MERGE_ATOL)


# Generative tasks -------------------------------------------------------------

TEXT = ["the cat sat", "a hat in the sun", "the end", "in a tin"]


def sentencepiece_proto(vocabulary_size, bos="<s>", eos="</s>"):
    """A SentencePiece word vocabulary of `TEXT`, trained in code, with
    padding 0, unknown 1, start `bos` 2 and end `eos` 3."""
    import io

    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_writer=out,
        vocab_size=vocabulary_size,
        model_type="WORD",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece=bos,
        eos_piece=eos,
        minloglevel=2,
    )
    return out.getvalue()


def logits(task, inputs):
    """The task's logits for one batch, through its compiled predict function
    (and its preprocessor, where it has one): on JAX several times faster
    than an eager call, which compiles op by op."""
    return to_numpy(task.predict_on_batch(inputs))


def generative_journey(
    build, fit_args, logits_inputs, generate, targets, preprocessed=False
):
    """Steps 1-3 of a generative task: the base task's logits, then the
    converted, trained task. Returns a dict of them.
    `preprocessed`: `fit_args` were made by the task's preprocessor, which
    is set aside during `fit` (`task.preprocessor = None`, KerasHub's switch
    for preprocessed inputs)."""
    task = build()
    base_logits = logits(task, logits_inputs)
    convert(task, targets)
    preprocessor = task.preprocessor
    if preprocessed:
        task.preprocessor = None
    try:
        fit_only_adapters(task, *fit_args[0], **fit_args[1])
    finally:
        task.preprocessor = preprocessor
    return {
        "task": task,
        "build": build,
        "inputs": logits_inputs,
        "generate": generate,
        "base_logits": base_logits,
    }


def check_generates_after_training(journey):
    """Step 3: greedy generation still runs, and the adapter is in it."""
    task, generate = journey["task"], journey["generate"]
    assert type(task.sampler).__name__ == "GreedySampler"
    adapted = logits(task, journey["inputs"])
    assert np.max(np.abs(adapted - journey["base_logits"])) > ADAPTER_EFFECT
    tokens = generate(task)
    np.testing.assert_array_equal(generate(task), tokens)  # greedy: deterministic
    return tokens


def check_adapter_file(journey, tmp_path):
    """Step 4: the adapter loaded into a fresh task: the same greedy tokens,
    the same logits (same weights, same program: the same bits)."""
    task, inputs, generate = journey["task"], journey["inputs"], journey["generate"]
    fresh = reloaded(task, journey["build"], tmp_path)
    np.testing.assert_array_equal(logits(fresh, inputs), logits(task, inputs))
    np.testing.assert_array_equal(generate(fresh), generate(task))
    return fresh


def check_merged(journey):
    """Step 5: the merged task generates the same greedy tokens, and its
    logits are the adapted task's within float32 rounding (`MERGE_ATOL`)."""
    task, inputs, generate = journey["task"], journey["inputs"], journey["generate"]
    plain = merged(task)
    np.testing.assert_allclose(
        logits(plain, inputs), logits(task, inputs), atol=MERGE_ATOL
    )
    # The merged copy is rebuilt from the task's config, which in KerasHub
    # does not hold the sampler (as after a `.keras` load): set it again.
    plain.compile(sampler="greedy")
    np.testing.assert_array_equal(generate(plain), generate(task))


# Audio to text: MoonshineAudioToText -----------------------------------------

AUDIO_SAMPLES = 3200  # 0.2 s at 16 kHz: 7 encoder frames
DECODER_LENGTH = 6


def moonshine_preprocessor():
    tokenizer = models.MoonshineTokenizer(proto=sentencepiece_proto(13))
    converter = keras_hub.layers.MoonshineAudioConverter()
    return models.MoonshineAudioToTextPreprocessor(
        converter, tokenizer, decoder_sequence_length=DECODER_LENGTH
    )


def moonshine_task():
    # preprocessor=None: inside `fit`'s tf.data pipeline KerasHub's
    # MoonshineAudioConverter fails on JAX and torch (it calls keras.ops on
    # the symbolic tf.Tensor); the inputs are preprocessed eagerly instead.
    keras.utils.set_random_seed(0)
    backbone = models.MoonshineBackbone(
        vocabulary_size=13,
        filter_dim=16,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        encoder_num_heads=2,
        decoder_num_heads=2,
        max_position_embeddings=64,
    )
    task = models.MoonshineAudioToText(backbone=backbone, preprocessor=None)
    task.compile(sampler="greedy")
    return task


@pytest.fixture(scope="module")
def moonshine_journey():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.normal(size=(4, AUDIO_SAMPLES))).astype("float32")
    preprocessor = moonshine_preprocessor()
    x, y, sample_weight = preprocessor({"audio": audio, "text": TEXT})
    x = {k: to_numpy(v) for k, v in x.items()}
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    # Generation prompt: the start token alone, the rest to fill.
    prompt = {
        "encoder_input_values": x["encoder_input_values"][:2],
        "encoder_padding_mask": x["encoder_padding_mask"][:2],
        "decoder_token_ids": np.zeros((2, DECODER_LENGTH), "int32"),
        "decoder_padding_mask": np.zeros((2, DECODER_LENGTH), "int32"),
    }
    prompt["decoder_token_ids"][:, 0] = preprocessor.tokenizer.start_token_id
    prompt["decoder_padding_mask"][:, 0] = 1

    def generate(task):
        out = task.generate(dict(prompt), stop_token_ids=None)
        return np.asarray(out["decoder_token_ids"])

    fit_args = ((x, y), {"sample_weight": sample_weight, "batch_size": 2})
    journey = generative_journey(
        moonshine_task,
        fit_args,
        {k: v[:2] for k, v in x.items()},
        generate,
        "all-linear",
    )
    journey["prompt"] = prompt
    return journey


def test_moonshine_converts_fits_and_generates(moonshine_journey):
    assert type(moonshine_journey["task"]) is models.MoonshineAudioToText
    tokens = check_generates_after_training(moonshine_journey)
    prompt = moonshine_journey["prompt"]["decoder_token_ids"]
    np.testing.assert_array_equal(tokens[:, 0], prompt[:, 0])
    assert tokens.shape == (2, DECODER_LENGTH)


def test_moonshine_adapter_file_gives_the_same_generation(moonshine_journey, tmp_path):
    fresh = check_adapter_file(moonshine_journey, tmp_path)
    # Built in the same session, the fresh task has other Keras counters in
    # the names of layers KerasHub leaves unnamed, below the top (Moonshine's
    # attention and MLP layers: moonshine_multi_head_attention_2 for _0);
    # the load followed them (keras_lora/io/names.py).
    assert renumbered_below_the_top(fresh, moonshine_journey["task"])


def test_moonshine_merged_task_generates_the_same(moonshine_journey):
    check_merged(moonshine_journey)


# Image and text to text: PaliGemmaCausalLM -----------------------------------

PG_LENGTH = 8  # text tokens; the 4 image tokens ((16 / 8) ** 2) come first


def paligemma_preprocessor():
    tokenizer = models.PaliGemmaTokenizer(
        proto=sentencepiece_proto(13, bos="<bos>", eos="<eos>")
    )
    converter = keras_hub.layers.PaliGemmaImageConverter(
        image_size=(IMAGE, IMAGE), scale=1 / 127.5, offset=-1.0
    )
    return models.PaliGemmaCausalLMPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=PG_LENGTH
    )


def paligemma_task():
    # preprocessor=None: in `fit`'s tf.data pipeline the SentencePiece
    # tokenizer fails (tensorflow-text: "Resource ...SentencepieceOp does not
    # exist"); the inputs are preprocessed eagerly instead.
    keras.utils.set_random_seed(0)
    backbone = models.PaliGemmaBackbone(
        vocabulary_size=13,
        image_size=IMAGE,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        vit_patch_size=8,
        vit_num_heads=2,
        vit_hidden_dim=16,
        vit_num_layers=1,
        vit_intermediate_dim=32,
    )
    task = models.PaliGemmaCausalLM(preprocessor=None, backbone=backbone)
    task.compile(sampler="greedy")
    return task


@pytest.fixture(scope="module")
def paligemma_journey():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(4, IMAGE, IMAGE, 3)).astype("float32")
    prompts = ["the", "a", "the", "in"]
    responses = ["cat sat", "hat", "end", "tin"]
    preprocessor = paligemma_preprocessor()
    x, y, sample_weight = preprocessor(
        {"images": images, "prompts": prompts, "responses": responses}
    )
    x = {k: to_numpy(v) for k, v in x.items()}
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    # KerasHub's own generation preprocessing: image, start token, prompt.
    prompt = preprocessor.generate_preprocess(
        {"images": images[:2], "prompts": prompts[:2]}
    )
    prompt = {k: to_numpy(v) for k, v in prompt.items()}

    def generate(task):
        out = task.generate(dict(prompt), stop_token_ids=None)
        return np.asarray(out["token_ids"])

    fit_args = ((x, y), {"sample_weight": sample_weight, "batch_size": 2})
    inputs = {k: v[:2] for k, v in x.items()}
    journey = generative_journey(
        paligemma_task, fit_args, inputs, generate, "all-linear"
    )
    journey["prompt"] = prompt
    return journey


def test_paligemma_converts_fits_and_generates_from_an_image(paligemma_journey):
    task = paligemma_journey["task"]
    assert type(task) is models.PaliGemmaCausalLM
    # "all-linear" reaches both the vision encoder and the text decoder.
    paths = [p for p, _ in lora_layers(task)]
    assert any("vit" in p for p in paths) and any("decoder" in p for p in paths)
    tokens = check_generates_after_training(paligemma_journey)
    prompt = paligemma_journey["prompt"]
    kept = prompt["padding_mask"].astype(bool)
    np.testing.assert_array_equal(tokens[kept], prompt["token_ids"][kept])
    assert tokens.shape == (2, PG_LENGTH)


def test_paligemma_adapter_file_gives_the_same_generation(paligemma_journey, tmp_path):
    fresh = check_adapter_file(paligemma_journey, tmp_path)
    # Built in the same session, the fresh task has other Keras counters in
    # the names of layers KerasHub leaves unnamed, below the top (PaliGemma's
    # vision encoder: pali_gemma_vit_1); the load followed them
    # (keras_lora/io/names.py).
    assert renumbered_below_the_top(fresh, paligemma_journey["task"])


def test_paligemma_merged_task_generates_the_same(paligemma_journey):
    check_merged(paligemma_journey)


# Text to text: BartSeq2SeqLM, with its preprocessor -------------------------


def bart_task():
    """A tiny `BartSeq2SeqLM` with a byte-pair tokenizer made in code: this
    journey runs on raw strings, through KerasHub's own preprocessing."""
    tokens = ["<s>", "<pad>", "</s>", *tiny_kerashub._CHARS]
    for merge in tiny_kerashub._MERGES:
        if merge.replace(" ", "") not in tokens:
            tokens.append(merge.replace(" ", ""))
    tokenizer = models.BartTokenizer(
        vocabulary={t: i for i, t in enumerate(tokens)},
        merges=tiny_kerashub._MERGES,
    )
    preprocessor = models.BartSeq2SeqLMPreprocessor(
        tokenizer=tokenizer, encoder_sequence_length=8, decoder_sequence_length=8
    )
    keras.utils.set_random_seed(0)
    backbone = models.BartBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=32,
    )
    task = models.BartSeq2SeqLM(backbone=backbone, preprocessor=preprocessor)
    task.compile(sampler="greedy")
    return task


@pytest.fixture(scope="module")
def bart_journey():
    sources = ["the cat sat.", "a hat in the sun.", "the end.", "in a tin."]
    targets = ["sat.", "sun.", "end.", "tin."]
    prompts = ["the cat", "a hat"]

    def generate(task):
        # Greedy token ids, no stop token (every row to its full length): the
        # preprocessor's own generation inputs, then `generate` with
        # `task.preprocessor = None` (KerasHub's switch for preprocessed
        # inputs); the text alone would hide special tokens, which detokenize
        # to nothing in a tiny random model.
        preprocessor = task.preprocessor
        x = preprocessor.generate_preprocess(prompts, sequence_length=8)
        task.preprocessor = None
        try:
            out = task.generate(dict(x), stop_token_ids=None)
        finally:
            task.preprocessor = preprocessor
        return np.asarray(out["decoder_token_ids"])

    # Trained on what its preprocessor makes of the strings, eagerly: `fit`
    # on raw strings maps the byte-pair tokenizer in tf.data, which costs
    # ~12 s per `fit` on 2 cores (that path is tested on GPT2CausalLM in
    # test_kerashub_task.py).
    x, y, sample_weight = bart_task().preprocessor(
        {"encoder_text": sources, "decoder_text": targets}
    )
    x = {k: to_numpy(v) for k, v in x.items()}
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    fit_args = ((x, y), {"sample_weight": sample_weight, "batch_size": 2})
    inputs = {"encoder_text": sources[:2], "decoder_text": targets[:2]}
    return generative_journey(
        bart_task, fit_args, inputs, generate, "all-linear", preprocessed=True
    )


def test_bart_converts_fits_and_generates_text(bart_journey):
    task = bart_journey["task"]
    assert type(task) is models.BartSeq2SeqLM
    # Since "all-linear" takes the last blocks too (a 1-layer BART's encoder
    # and decoder blocks produce the backbone's outputs), both are adapted.
    paths = [p for p, _ in lora_layers(task)]
    assert any("encoder" in p for p in paths) and any("decoder" in p for p in paths)
    tokens = check_generates_after_training(bart_journey)
    assert tokens.shape == (2, 8)
    # Strings in, strings out, through the task's preprocessor.
    text = task.generate(["the cat", "a hat"], max_length=8)
    assert isinstance(text, list) and all(isinstance(t, str) for t in text)


def test_bart_adapter_file_gives_the_same_generation(bart_journey, tmp_path):
    check_adapter_file(bart_journey, tmp_path)


def test_bart_merged_task_generates_the_same(bart_journey):
    check_merged(bart_journey)


# Text to image: StableDiffusion3TextToImage, LoRA on the MMDiT --------------

SD3_TARGETS = ["attention_qkv", "attention_proj", "dense1", "dense2"]


def sd3_task():
    """A tiny `StableDiffusion3TextToImage` (16 px, one MMDiT block, 1-block
    CLIP encoders, a 2-level VAE of 32 filters: its GroupNorm needs 32),
    CLIP byte-pair tokenizers made in code."""
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    tokens = ["a", "i", "p", "l", "n", "e</w>", "o", "r", "t</w>", "ai", "pl"]
    tokens += ["ne</w>", "po", "rt</w>", "air", "pla", "port</w>", "plane</w>"]
    tokens += ["<|endoftext|>", "<|startoftext|>"]
    vocabulary = {t: i for i, t in enumerate(tokens)}
    merges = ["a i", "p l", "n e</w>", "p o", "r t</w>", "ai r", "pl a"]
    merges += ["po rt</w>", "pla ne</w>"]

    def clip(**kwargs):
        tokenizer = models.CLIPTokenizer(vocabulary, merges, **kwargs)
        return models.CLIPPreprocessor(tokenizer, sequence_length=8)

    preprocessor = models.StableDiffusion3TextToImagePreprocessor(
        clip(pad_with_end_token=True), clip()
    )

    def encoder(activation, name):
        return models.CLIPTextEncoder(
            len(tokens), 16, 16, 1, 2, 32, activation, -1,
            max_sequence_length=8, name=name,
        )  # fmt: skip

    keras.utils.set_random_seed(0)
    backbone = models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=16,
        mmdit_num_layers=1,
        mmdit_num_heads=2,
        mmdit_position_size=16,
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=VAEBackbone([32, 32], [1, 1], [32, 32], [1, 1], sampler_method="mode"),
        clip_l=encoder("quick_gelu", "clip_l"),
        clip_g=encoder("gelu", "clip_g"),
        image_shape=(IMAGE, IMAGE, 3),
    )
    return models.StableDiffusion3TextToImage(
        backbone=backbone, preprocessor=preprocessor
    )


def sd3_generate(task):
    prompt = {"prompts": ["airplane", "port"], "negative_prompts": ["", ""]}
    return np.asarray(task.generate(prompt, num_steps=2, seed=1))


@pytest.fixture(scope="module")
def sd3_journey():
    task = sd3_task()
    base = sd3_generate(task)
    convert(task, SD3_TARGETS)
    return task, base


def test_sd3_converts_the_mmdit_and_generates(sd3_journey):
    task, base = sd3_journey
    assert type(task) is models.StableDiffusion3TextToImage
    assert all("diffuser" in p.split("/") for p, _ in lora_layers(task))
    images = sd3_generate(task)
    assert images.shape == base.shape and images.dtype == np.uint8
    assert np.any(images != base)  # the adapter is in the denoiser
    np.testing.assert_array_equal(sd3_generate(task), images)  # seeded


def test_sd3_adapter_file_gives_the_same_images(sd3_journey, tmp_path):
    task, _ = sd3_journey
    fresh = reloaded(task, sd3_task, tmp_path)
    np.testing.assert_array_equal(sd3_generate(fresh), sd3_generate(task))


def test_sd3_merged_task_generates_the_same_images(sd3_journey):
    task, _ = sd3_journey
    images = sd3_generate(merged(task)).astype("int32")
    # uint8 images: float32 rounding of the merged kernels may move a pixel
    # across a rounding boundary, by one level at most.
    np.testing.assert_array_less(np.abs(images - sd3_generate(task)), 2)
