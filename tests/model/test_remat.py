"""`enable_remat`: Keras's full rematerialization on each transformer block
of a LoRA model, on tiny KerasHub causal LMs built from config.

Rematerialization changes what the backward pass keeps, never what it
computes: outputs, the loss and one training step's updates must be those
of the same model without it, and only the adapters train.
"""

import keras
import keras_hub
import numpy as np
import pytest
import tiny_kerashub
from conftest import randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model import remat as remat_module
from keras_lora.model.remat import enable_remat, transformer_blocks

SEQ = 8
TARGETS = ["query", "value"]

# XLA may fuse the recomputed forward differently from the kept one (and
# TF's recompute_grad reruns the block inside the gradient), so sums can
# be reassociated: float32 rounding, a few ulps of values of order 1.
ATOL = 1e-5
RTOL = 1e-4


def llama_lm(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=tiny_kerashub.VOCAB,
        num_layers=2,
        hidden_dim=16,
        num_query_heads=2,
        num_key_value_heads=1,
        intermediate_dim=32,
        dropout=0.0,
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def gpt2_lm(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tiny_kerashub.VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=32,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


BUILDERS = {"llama": llama_lm, "gpt2": gpt2_lm}


def lora_lm(name, remat, optimizer="sgd"):
    lm = BUILDERS[name]()
    kl.apply_lora(lm, targets=TARGETS, rank=2, in_place=True)
    randomize_adapters(lm, scale=0.3)  # B != 0: gradients reach A too
    if remat:
        enable_remat(lm)
    lm.compile(
        optimizer=keras.optimizers.SGD(0.5) if optimizer == "sgd" else optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return lm


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, tiny_kerashub.VOCAB, (2, SEQ + 1)).astype("int32")
    mask = np.ones((2, SEQ), "int32")
    mask[1, -2:] = 0
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:]


class CountRemat:
    """Counts the functions handed to the backend's remat (`keras.remat`;
    on JAX the package's own, see `remat._jax_remat`) while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = remat_module._remat

        def counting(f):
            self.calls += 1
            return original(f)

        monkeypatch.setattr(remat_module, "_remat", counting)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_outputs_loss_and_update_equal_without_remat(name, monkeypatch):
    x, y = batch()
    plain, remat = lora_lm(name, remat=False), lora_lm(name, remat=True)
    np.testing.assert_allclose(
        to_numpy(remat(x, training=False)),
        to_numpy(plain(x, training=False)),
        atol=ATOL,
        rtol=RTOL,
    )
    counter = CountRemat(monkeypatch)
    loss_plain = plain.train_on_batch(x, y)
    assert counter.calls == 0
    loss_remat = remat.train_on_batch(x, y)
    # The training step went through keras.remat: at least once per block
    # (JAX's trainer traces the step twice; torch also calls the layers
    # once more outside the step).
    assert counter.calls >= len(remat.backbone.transformer_layers) == 2
    np.testing.assert_allclose(loss_remat, loss_plain, atol=ATOL, rtol=RTOL)
    # One SGD step: new = old - 0.5 * gradient, so equal updates are equal
    # gradients (B != 0, so both A and B have non-zero gradients).
    updated = [to_numpy(w) for w in remat.trainable_weights]
    expected = [to_numpy(w) for w in plain.trainable_weights]
    assert len(updated) == 8
    for got, want in zip(updated, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_only_adapters_train(name):
    lm = lora_lm(name, remat=True, optimizer=keras.optimizers.Adam(0.1))
    frozen = {w.path: to_numpy(w).copy() for w in lm.non_trainable_weights}
    before = {w.path: to_numpy(w).copy() for w in lm.trainable_weights}
    assert all("lora" in path for path in before)
    x, y = batch()
    for _ in range(2):
        lm.train_on_batch(x, y)
    for w in lm.non_trainable_weights:
        np.testing.assert_array_equal(to_numpy(w), frozen[w.path])
    for w in lm.trainable_weights:
        assert not np.array_equal(to_numpy(w), before[w.path]), w.path


def test_a_saved_remat_model_loads_without_remat_and_takes_it_again(tmp_path):
    lm = lora_lm("llama", remat=True)
    x, _ = batch()
    expected = to_numpy(lm(x, training=False))
    path = str(tmp_path / "remat.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x, training=False)), expected)
    # The remat setting is not part of a layer's config (documented).
    assert all(b._remat_mode is None for b in loaded.backbone.transformer_layers)
    assert enable_remat(loaded) is loaded
    assert all(b._remat_mode for b in loaded.backbone.transformer_layers)
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), expected, atol=ATOL, rtol=RTOL
    )


class Block(keras.layers.Layer):
    """A user's residual block holding two `Dense` layers."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu", name="inner")
        self.outer = keras.layers.Dense(units, name="outer")
        self.drop = keras.layers.Dropout(0.0)

    def call(self, x, training=None):
        return x + self.drop(self.outer(self.inner(x)), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def block_model():
    inputs = keras.Input((4,))
    x = Block(4, name="block_0")(inputs)
    x = Block(4, name="block_1")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def test_outside_kerashub_each_child_with_lora_layers_is_a_block(monkeypatch):
    model = kl.apply_lora(block_model(), targets=["inner"], rank=2)
    blocks = transformer_blocks(model)
    assert [b.name for b in blocks] == ["block_0", "block_1"]
    enable_remat(model)
    model.compile(optimizer="sgd", loss="mse")
    counter = CountRemat(monkeypatch)
    model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 1), "float32"))
    assert counter.calls >= 2  # at least once per block


def _remat_modes(model):
    return [getattr(layer, "_remat_mode", None) for layer in model._flatten_layers()]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: "model", TypeError, "`model` must be a keras.Model"),
        (
            lambda: gpt2_lm(),
            ValueError,
            "has no LoRA layers. Rematerialization is for a LoRA model",
        ),
        (
            lambda: kl.apply_lora(tiny_mlp(), targets=["d1"], rank=2),
            ValueError,
            "found no transformer blocks in `model` 'mlp'",
        ),
    ],
    ids=["not_a_model", "no_lora_layers", "no_blocks"],
)
def test_refusals_change_nothing(make, error, message):
    model = make()
    before = None if isinstance(model, str) else _remat_modes(model)
    with pytest.raises(error, match=message):
        enable_remat(model)
    if before is not None:
        assert _remat_modes(model) == before


def tiny_mlp():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="mlp")


def test_apply_lora_remat_true_equals_no_remat(monkeypatch):
    """`apply_lora(..., remat=True)` rematerializes the blocks; outputs, the
    loss and one SGD step's updates equal those without remat."""
    plain = kl.apply_lora(llama_lm(), targets=TARGETS, rank=2, in_place=True)
    remat = kl.apply_lora(
        llama_lm(), targets=TARGETS, rank=2, in_place=True, remat=True
    )
    assert all(b._remat_mode for b in remat.backbone.transformer_layers)
    assert not any(b._remat_mode for b in plain.backbone.transformer_layers)
    x, y = batch()
    for model in (plain, remat):
        randomize_adapters(model, scale=0.3)  # B != 0: gradients reach A
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
    np.testing.assert_allclose(
        to_numpy(remat(x, training=False)),
        to_numpy(plain(x, training=False)),
        atol=ATOL,
        rtol=RTOL,
    )
    counter = CountRemat(monkeypatch)
    np.testing.assert_allclose(
        remat.train_on_batch(x, y), plain.train_on_batch(x, y), atol=ATOL, rtol=RTOL
    )
    assert counter.calls >= 2  # the step went through keras.remat
    assert len(remat.trainable_weights) == 8
    for got, want in zip(remat.trainable_weights, plain.trainable_weights, strict=True):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=ATOL, rtol=RTOL)


def test_apply_lora_remat_true_on_a_copy():
    """Not in place: the copy's blocks are rematerialized, and compute what
    the copy without remat computes."""
    model = block_model()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    plain = kl.apply_lora(model, targets=["inner"], rank=2)
    remat = kl.apply_lora(model, targets=["inner"], rank=2, remat=True)
    assert [b.name for b in transformer_blocks(remat)] == ["block_0", "block_1"]
    assert all(b._remat_mode for b in transformer_blocks(remat))
    assert not any(b._remat_mode for b in transformer_blocks(plain))
    np.testing.assert_allclose(
        to_numpy(remat(x)), to_numpy(plain(x)), atol=ATOL, rtol=RTOL
    )


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's buffer assignment: JAX"
)
def test_jax_remat_saves_activation_memory_on_this_compiler():
    # `jax.checkpoint` alone saves nothing on XLA's CPU compiler (it drops
    # the barriers' ordering and recomputes with the forward pass); the
    # package's remat ties the recomputation to the incoming gradient. Four
    # blocks at sequence 256, where the attention scores dominate: the
    # jitted gradient's temporaries with remat, over without, measured 0.38
    # here (0.31 on the benchmark's 4-layer model at sequence 2,048), and
    # 1.08 with `keras.remat` (`jax.checkpoint`) in its place.
    import jax

    def temporaries(remat):
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.Llama3Backbone(
            vocabulary_size=tiny_kerashub.VOCAB,
            num_layers=4,
            hidden_dim=32,
            num_query_heads=4,
            num_key_value_heads=2,
            intermediate_dim=64,
        )
        lm = keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)
        kl.apply_lora(lm, targets=TARGETS, rank=2, in_place=True, remat=remat)
        ids = np.ones((1, 256), "int32")
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

        def loss(trainable, non_trainable):
            logits, _ = lm.stateless_call(trainable, non_trainable, x, training=True)
            return keras.ops.mean(logits)

        args = (
            [v.value for v in lm.trainable_variables],
            [v.value for v in lm.non_trainable_variables],
        )
        compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(True) < 0.7 * temporaries(False)
