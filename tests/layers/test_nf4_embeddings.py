"""NF4 embedding tables (`kl.quantize_nf4`): lookups, LM-head logits and
their backward, LoRA on a tied NF4 table, KerasHub language models."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras.src import testing
from test_nf4 import reference_nf4

import keras_lora as kl
from keras_lora.layers import nf4, quantized, quantized_product
from keras_lora.model.surgery import lora_layers

VOCAB = 96


def tiny_lm(tie, width, seed=0):
    """ids -> ReversibleEmbedding -> Dense "d" -> the same embedding's
    logits (its reverse table if untied); a plain `Embedding` "pos" too."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((5,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(VOCAB, width, tie_weights=tie, name="emb")
    h = emb(ids) + keras.layers.Embedding(VOCAB, width, name="pos")(ids)
    h = keras.layers.Dense(width, activation="tanh", name="d")(h)
    return keras.Model(ids, emb(h, reverse=True))


def token_ids(rows=3, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, 5)).astype("int32")


def dequantized_twin(model, tie, width):
    """A float `tiny_lm` holding the NF4 `model`'s dequantized tables."""
    twin = tiny_lm(tie, width, seed=9)
    for name in ("emb", "pos", "d"):
        source, target = model.get_layer(name), twin.get_layer(name)
        if name == "d":  # NF4 too: its dequantized kernel
            target.kernel.assign(to_numpy(source.kernel))
            target.bias.assign(to_numpy(source.bias))
            continue
        target.embeddings.assign(to_numpy(source.embeddings))
        if name == "emb" and not tie:
            target.reverse_embeddings.assign(to_numpy(source.reverse_embeddings))
    return twin


CASES = [(True, 32), (False, 32), (True, 20), (False, 20)]
IDS = ["tied", "untied", "tied-w20", "untied-w20"]  # width 20: rows cross blocks


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("tie,width", CASES, ids=IDS)
def test_tables_are_4_bit_and_dequantize_as_the_paper(tie, width, double_quant):
    model = tiny_lm(tie, width)
    emb, pos = model.get_layer("emb"), model.get_layer("pos")
    tables = {"emb": to_numpy(emb.embeddings), "pos": to_numpy(pos.embeddings)}
    reverse = None if tie else to_numpy(emb.reverse_embeddings)
    kl.quantize_nf4(model, block_size=8, double_quant=double_quant)
    assert type(model.get_layer("emb")) is nf4.NF4ReversibleEmbedding
    assert type(model.get_layer("pos")) is nf4.NF4Embedding
    for name, table in tables.items():
        layer = model.get_layer(name)
        assert layer.quantization_mode == "nf4"
        assert layer.nf4_codes.shape == (table.size // 2,)
        # No float variable of a table's size is kept.
        for v in layer.weights:
            assert "float" not in str(v.dtype) or np.prod(v.shape) < table.size
        assert not hasattr(layer, "_embeddings")
        # float32 NF4 against a float64 reference: to float32 rounding.
        want = reference_nf4(table, 8, double_quant)
        np.testing.assert_allclose(to_numpy(layer.embeddings), want, 1e-6, 1e-7)
    if not tie:  # stored transposed, by vocabulary rows; read back as Keras's
        layer = model.get_layer("emb")
        want = reference_nf4(reverse.T, 8, double_quant).T
        np.testing.assert_allclose(to_numpy(layer.reverse_embeddings), want, 1e-6, 1e-7)
    if keras.backend.backend() == "torch":  # no torch parameter of a table
        assert not [k for k in model.torch_params if "embeddings" in k]


@pytest.mark.parametrize("tie,width", CASES, ids=IDS)
def test_lookup_and_logits_are_the_dequantized_tables(tie, width, monkeypatch):
    model = kl.quantize_nf4(tiny_lm(tie, width), block_size=4)
    twin = dequantized_twin(model, tie, width)
    x = token_ids()
    # The lookup reads the same float32 values: exact.
    for name in ("emb", "pos"):
        np.testing.assert_array_equal(
            to_numpy(model.get_layer(name)(x)), to_numpy(twin.get_layer(name)(x))
        )
    logits = to_numpy(model(x))
    # The same float32 products, possibly blocked otherwise: float32 noise.
    np.testing.assert_allclose(logits, to_numpy(twin(x)), rtol=1e-5, atol=1e-6)
    # The LM head in chunks of 16 vocabulary rows (whole blocks only).
    monkeypatch.setattr(quantized_product, "vocabulary_chunk", 16 * width * 4)
    np.testing.assert_allclose(to_numpy(model(x)), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_backward_through_the_nf4_lm_head_is_the_dequantized_tables(
    tie, chunked, monkeypatch
):
    # The adapter on "d" gets its gradient through the NF4 logits (the lean
    # product's dy·table): one SGD step equals the step on the float twin.
    if chunked:
        monkeypatch.setattr(quantized_product, "vocabulary_chunk", 16 * 32 * 4)
    model = kl.quantize_nf4(tiny_lm(tie, 32), block_size=8)
    twin = dequantized_twin(model, tie, 32)
    x, y = token_ids(), np.random.default_rng(2).normal(size=(3, 5, VOCAB))
    steps = []
    for source in (model, twin):
        lora = kl.apply_lora(source, targets=["d"], rank=2)
        layer = lora.get_layer("d")
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
        layer.lora_a.assign(np.full(layer.lora_a.shape, 0.05, "float32"))
        lora.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        lora.fit(x, y.astype("float32"), epochs=1, batch_size=3, verbose=0)
        steps.append([to_numpy(v) for v in (layer.lora_a, layer.lora_b)])
    for got, want in zip(*steps, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert not np.allclose(got, 0.05) and not np.allclose(got, 0.1)


def test_lora_on_a_tied_nf4_table_trains_merges_and_requantizes():
    model = kl.quantize_nf4(tiny_lm(True, 32), block_size=8)
    x = token_ids()
    base_out = to_numpy(model(x))
    lora = kl.apply_lora(model, targets=["emb", "d"], rank=2)
    np.testing.assert_array_equal(to_numpy(lora(x)), base_out)  # B=0 / A=0
    emb = lora.get_layer("emb")
    frozen = {v.name: to_numpy(v).copy() for v in emb.layer.weights}
    lora.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    lora.fit(x, np.ones_like(base_out), epochs=2, batch_size=3, verbose=0)
    for v in emb.layer.weights:  # the NF4 codes and absmax stay bitwise
        np.testing.assert_array_equal(to_numpy(v), frozen[v.name], err_msg=v.name)
    assert np.abs(to_numpy(emb.lora_a)).max() > 0
    out = to_numpy(lora(x))
    assert not np.array_equal(out, base_out)
    merged = emb.merged_layer()
    assert type(merged) is keras.layers.ReversibleEmbedding
    a, b = to_numpy(emb.lora_a), to_numpy(emb.lora_b)
    want = to_numpy(emb.layer.embeddings) + emb.scale * a @ b
    np.testing.assert_allclose(to_numpy(merged.embeddings), want, rtol=1e-6, atol=1e-6)
    plain = kl.merge_lora(lora)
    np.testing.assert_allclose(to_numpy(plain(x)), out, rtol=1e-4, atol=1e-5)
    again = kl.merge_lora(lora, requantize=True).get_layer("emb")
    assert type(again) is nf4.NF4ReversibleEmbedding and again.nf4_block_size == 8


def test_an_untied_nf4_table_is_refused_as_a_lora_target():
    model = kl.quantize_nf4(tiny_lm(False, 32), block_size=8)
    with pytest.raises(ValueError, match=r"quantized \('nf4'\) ReversibleEmbedding"):
        kl.apply_lora(model, targets=["emb"], rank=2)
    assert not lora_layers(model)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_keras_file_round_trip_is_exact(tmp_path, tie):
    model = kl.quantize_nf4(tiny_lm(tie, 32), block_size=8, double_quant=True)
    x = token_ids()
    path = str(tmp_path / "nf4.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("emb")) is nf4.NF4ReversibleEmbedding
    assert type(loaded.get_layer("pos")) is nf4.NF4Embedding
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_embeddings_false_and_bad_arguments():
    model = kl.quantize_nf4(tiny_lm(True, 32), embeddings=False)
    assert model.get_layer("emb").quantization_mode is None
    assert model.get_layer("pos").quantization_mode is None
    assert model.get_layer("d").quantization_mode == "nf4"
    fresh = tiny_lm(True, 32)
    with pytest.raises(TypeError, match=r"`embeddings` must be a bool.*'yes'"):
        kl.quantize_nf4(fresh, embeddings="yes")
    assert type(fresh.get_layer("emb")) is keras.layers.ReversibleEmbedding
    assert fresh.get_layer("d").quantization_mode is None


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_kerashub_causal_lm_over_nf4(tmp_path, name):
    # GPT-2 ties its LM head to the token embedding, Llama 3 does not.
    import keras_hub
    from tiny_kerashub import backbone, backbone_inputs

    lm_class = {"gpt2": "GPT2CausalLM", "llama3": "Llama3CausalLM"}[name]
    lm = getattr(keras_hub.models, lm_class)(backbone=backbone(name), preprocessor=None)
    inputs = backbone_inputs(lm.backbone)
    inputs.pop("segment_ids", None)
    float_logits = to_numpy(lm(inputs))
    float_class = type(lm.backbone.token_embedding)
    kl.quantize_nf4(lm)
    token = lm.backbone.token_embedding
    assert type(token) is nf4.NF4ReversibleEmbedding
    assert token.float_layer_class() is float_class
    assert bool(token.tie_weights) is (name == "gpt2")
    nf4_logits = to_numpy(lm(inputs))
    # NF4's error on these N(0, 0.02)-ish weights: well below the logits'.
    error = np.abs(nf4_logits - float_logits).max()
    assert 0 < error < 0.25 * np.abs(float_logits).max(), error
    # Saved before any adapter too: the task's file records its NF4 layers.
    lm.save(str(tmp_path / "nf4.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "nf4.keras"))
    assert type(reloaded.backbone.token_embedding) is nf4.NF4ReversibleEmbedding
    np.testing.assert_array_equal(to_numpy(reloaded(inputs)), nf4_logits)
    kl.apply_lora(lm, targets=["query", "value"], rank=2, in_place=True)
    np.testing.assert_array_equal(to_numpy(lm(inputs)), nf4_logits)
    frozen = [to_numpy(v).copy() for v in token.weights]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lm.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    lm.fit(inputs, inputs["token_ids"], epochs=1, batch_size=2, verbose=0)
    for v, value in zip(token.weights, frozen, strict=True):
        np.testing.assert_array_equal(to_numpy(v), value)
    trained = to_numpy(lm(inputs))
    assert not np.array_equal(trained, nf4_logits)
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.backbone.token_embedding) is nf4.NF4ReversibleEmbedding
    np.testing.assert_array_equal(to_numpy(loaded(inputs)), trained)


def test_kerashub_subclass_is_stored_and_given_back(tmp_path):
    # KerasHub's own `ReversibleEmbedding` (a subclass that changes nothing):
    # converted, saved, and a merge gives KerasHub's class back.
    import keras_hub

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    emb = keras_hub.layers.ReversibleEmbedding(VOCAB, 32, name="emb")
    model = keras.Model(inputs, emb(emb(inputs), reverse=True))
    kl.quantize_nf4(model, block_size=8)
    assert type(model.get_layer("emb")) is nf4.NF4ReversibleEmbedding
    path = str(tmp_path / "hub.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    lora = kl.apply_lora(loaded, targets=["emb"], rank=2)
    merged = kl.merge_lora(lora).get_layer("emb")
    assert type(merged) is keras_hub.layers.ReversibleEmbedding
    requantized = kl.merge_lora(lora, requantize=True).get_layer("emb")
    assert requantized.float_layer_class() is keras_hub.layers.ReversibleEmbedding


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's buffer assignment: JAX"
)
def test_jax_lookup_dequantizes_only_the_rows_it_reads():
    import jax

    layer = keras.layers.Embedding(4096, 256)
    layer.build()
    table_bytes = 4096 * 256 * 4
    model = keras.Sequential([keras.Input((8,), dtype="int32"), layer])
    kl.quantize_nf4(model)
    ids = token_ids(2)[:, :4].repeat(2, axis=1)
    variables = [v.value for v in model.non_trainable_variables]

    def lookup(variables, ids):
        return model.stateless_call([], variables, ids)[0]

    compiled = jax.jit(lookup).lower(variables, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # 16 rows' codes, absmax and values: a few KiB (measured 0.002 of the
    # table); a whole dequantized table, or its indices, would be >= 1/8.
    assert temp < table_bytes / 16, temp / table_bytes


class NF4EmbeddingHarnessTest(testing.TestCase):
    """Keras's layer harness on the NF4 embedding classes (built from
    config their codes are zeros: structure, not values)."""

    def test_nf4_embedding(self):
        self.run_layer_test(
            nf4.NF4Embedding,
            init_kwargs={"input_dim": 10, "output_dim": 8, "block_size": 4},
            input_data=np.array([[1, 2, 3], [4, 5, 9]], "int32"),
            expected_output_shape=(2, 3, 8),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=2,
        )

    def test_nf4_reversible_embedding_untied(self):
        self.run_layer_test(
            nf4.NF4ReversibleEmbedding,
            init_kwargs={
                "input_dim": 10,
                "output_dim": 8,
                "tie_weights": False,
                "block_size": 4,
                "double_quant": True,
            },
            input_data=np.array([[1, 2, 3], [4, 5, 9]], "int32"),
            expected_output_shape=(2, 3, 8),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=8,
        )


def test_lookup_matches_numpy_on_every_row():
    # Every id of the vocabulary, including the last rows (padding after).
    layer = keras.layers.Embedding(VOCAB, 24)
    layer.build()
    table = to_numpy(layer.embeddings)
    model = kl.quantize_nf4(
        keras.Sequential([keras.Input((VOCAB,), dtype="int32"), layer])
    )
    ids = np.arange(VOCAB, dtype="int32")[None]
    got = to_numpy(model(ids))[0]
    np.testing.assert_allclose(got, reference_nf4(table, 64, False), 1e-6, 1e-7)
    assert quantized.dequantized_kernel(model.layers[0]).shape == (VOCAB, 24)


def test_a_bare_nf4_backbone_refuses_keras_files(tmp_path):
    # KerasHub rebuilds a backbone from constructor arguments (float
    # layers): a file would not load, so saving it is refused up front.
    from tiny_kerashub import backbone

    model = kl.quantize_nf4(backbone("gpt2"), block_size=8)
    path = tmp_path / "backbone.keras"
    with pytest.raises(ValueError, match=r"converted .*to NF4 by `quantize_nf4`"):
        model.save(str(path))
    assert not path.exists()
