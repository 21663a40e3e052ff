"""LoRA layers are drop-ins for the layers they wrap (contract 4): reads of
attributes the wrapper lacks fall through to the wrapped layer; writes and
private names never do."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl


def built(layer, shape):
    layer.build(shape)
    return layer


def test_public_reads_fall_through_to_the_wrapped_layer():
    dense = built(keras.layers.Dense(4, activation="relu", name="d"), (None, 3))
    lora = kl.LoRADense(dense, rank=2)
    assert lora.kernel is dense.kernel and lora.bias is dense.bias
    assert lora.units == 4 and lora.activation is dense.activation
    assert lora.use_bias is True and lora.lora_enabled is False

    einsum = built(
        keras.layers.EinsumDense("abc,cde->abde", (3, 2, 4), bias_axes="de"),
        (None, 3, 5),
    )
    lora = kl.LoRAEinsumDense(einsum, rank=2)
    assert lora.equation == "abc,cde->abde" and lora.kernel is einsum.kernel
    assert lora.bias_axes == "de" and lora.partial_output_shape == (3, 2, 4)

    embedding = built(keras.layers.Embedding(10, 6), (None,))
    lora = kl.LoRAEmbedding(embedding, rank=2)
    assert lora.embeddings is embedding.embeddings
    assert (lora.input_dim, lora.output_dim) == (10, 6)


def test_own_attributes_win_and_writes_and_private_names_do_not_fall_through():
    dense = built(keras.layers.Dense(4, name="d"), (None, 3))
    lora = kl.LoRADense(dense, rank=2)
    # The wrapper's own answers come first: its trainable flag, its name.
    dense_trainable = dense.trainable
    lora.trainable = True
    assert dense.trainable is dense_trainable
    assert lora.rank == 2
    # A write lands on the wrapper, never on the wrapped layer.
    lora.units = 99
    assert dense.units == 4
    # Private names are Keras's own bookkeeping: never read from the base.
    assert not hasattr(lora, "_kernel")
    with pytest.raises(AttributeError, match="LoRADense.*no_such_attribute"):
        lora.no_such_attribute  # noqa: B018


def test_keras_core_enable_lora_is_refused_on_a_lora_layer():
    lora = kl.LoRADense(built(keras.layers.Dense(4), (None, 3)), rank=2)
    with pytest.raises(ValueError, match="enable_lora"):
        lora.enable_lora(2)


@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
def test_keras_hub_reversible_embedding_reverse_applies_the_adapter(use_dora):
    """Tied logits (`reverse=True`, KerasHub's CausalLM head) see the
    adapted table: `x·(E + ΔE)ᵀ`."""
    table = keras_hub.layers.ReversibleEmbedding(12, 6, tie_weights=True)
    table.build((None,))
    lora = kl.LoRAEmbedding(table, rank=3, use_dora=use_dora)
    rng = np.random.default_rng(0)
    lora.lora_a.assign(rng.normal(0, 0.5, lora.lora_a.shape).astype("float32"))
    hidden = rng.normal(size=(2, 4, 6)).astype("float32")
    base_logits = to_numpy(table(hidden, reverse=True))
    logits = to_numpy(lora(hidden, reverse=True))
    adapted = to_numpy(lora.merged_kernel())
    assert np.abs(logits - base_logits).max() > 0.1  # the adapter is applied
    np.testing.assert_allclose(logits, hidden @ adapted.T, rtol=1e-5, atol=1e-5)
    ids = np.array([[1, 2, 3]])
    np.testing.assert_allclose(to_numpy(lora(ids)), adapted[ids], rtol=1e-5, atol=1e-5)
    merged = lora.merged_layer()
    assert isinstance(merged, keras_hub.layers.ReversibleEmbedding)
    np.testing.assert_allclose(
        to_numpy(merged(hidden, reverse=True)), logits, rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile")
def test_torch_compile_traces_a_lora_layer_in_one_graph():
    # On torch `self.layer` is a submodule, read through `__getattr__` on
    # every call; `torch.compile` broke the graph there (it cannot trace
    # `super()` in it) and fell back to eager per layer, which made a
    # compiled LoRA training step slower than the eager one.
    import torch

    base = keras.layers.Dense(8)
    base.build((None, 16))
    layer = kl.LoRADense(base, rank=2)
    layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    x = torch.randn(4, 16)
    layer(x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: layer(x))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lambda x: layer(x))
    np.testing.assert_allclose(
        to_numpy(compiled(x)), to_numpy(layer(x)), rtol=1e-6, atol=1e-6
    )
