"""`mixed_adapter_model(..., cache=True)`: the adapters' stacks kept in
the served model (`keras_lora.model.stack_cache`).

Cached rows must equal uncached rows, and a cached copy must never serve
an adapter's old values: every write is followed by a call whose rows are
compared with the per-adapter models computed from the adapters' current
variables. Tolerance 1e-5 in float32, as in `test_mixed_adapters.py`: the
same products, summed in another order.
"""

import keras
import numpy as np
import pytest
from keras import ops
from model.test_mixed_adapters import (
    IMAGES,
    INDEX,
    NAMES,
    STRATEGIES,
    X,
    attention_model,
    compiled,
    conv_model,
    mixed_mlp,
    numpy,
    reference_rows,
)

import keras_lora as kl
from keras_lora.layers import LoRALayer
from keras_lora.model.mixed import mixed_layer
from keras_lora.model.tracking import own_variables
from keras_lora.model.walk import iter_layers

ATOL = 1e-5
BACKEND = keras.backend.backend()


def served_pair(model, strategy):
    cached = kl.mixed_adapter_model(model, NAMES, strategy=strategy, cache=True)
    cached.compile(jit_compile=BACKEND != "torch")
    return cached


def check_fresh(model, served, index=INDEX):
    """Eager call and compiled `predict_on_batch` both match the adapters'
    current values."""
    want = reference_rows(model, NAMES, X, index)
    np.testing.assert_allclose(numpy(served([X, index])), want, atol=ATOL)
    np.testing.assert_allclose(served.predict_on_batch([X, index]), want, atol=ATOL)


def scale_adapter(model, name, factor):
    for _, layer in iter_layers(model):
        if isinstance(layer, LoRALayer) and name in layer.adapter_names:
            a = layer.get_adapter(name).a
            a.assign(ops.convert_to_numpy(a) * factor)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_rows_match_the_per_adapter_models(strategy):
    model = mixed_mlp()
    served = served_pair(model, strategy)
    check_fresh(model, served)
    cache = mixed_layer(served)._stacks
    assert cache.entries  # every routed layer holds a copy
    # The copies are the served model's own non-trainable variables.
    own = {id(v) for entry in cache.by_layer.values() for v in entry[:2]}
    assert own == {id(v) for v in own_variables(mixed_layer(served))}
    assert own <= {id(v) for v in served.non_trainable_variables}
    assert not own & {id(v) for v in model.weights}


@pytest.mark.parametrize("strategy", ["concat", "gather", "grouped"])
def test_out_of_range_rows_get_the_base_output(strategy):
    """Tenant isolation with the copies: outside [0, n) reads the zero slot."""
    model = mixed_mlp()
    served = served_pair(model, strategy)
    bad = np.array([4, 5, -2, 2**31 - 1, -(2**31), 0, 1, -1, 3], "int32")
    with kl.disable_adapters(model):
        base = numpy(model(X))
    want = reference_rows(model, NAMES, X, np.where(bad < 4, bad, -1).clip(-1))
    want[:5] = base[:5]
    if BACKEND != "torch":
        served([X, INDEX])  # eager: copies checked fresh
        np.testing.assert_allclose(numpy(compiled(served)(X, bad)), want, atol=ATOL)
    else:
        from keras_lora.layers.mixed import routing

        layer = mixed_layer(served)
        with routing(
            ops.convert_to_tensor(bad), NAMES, strategy, layer._stacks.usable()
        ):
            np.testing.assert_allclose(numpy(model(X)), want, atol=ATOL)


@pytest.mark.parametrize("strategy", ["concat", "gather", "grouped"])
def test_assign_is_never_served_stale(strategy):
    """JAX and torch see a write themselves (a new array; a version
    counter); TensorFlow needs `refresh_adapters` after an in-place write
    made outside keras_lora (documented)."""
    model = mixed_mlp()
    served = served_pair(model, strategy)
    check_fresh(model, served)
    scale_adapter(model, "wide", 3.0)
    if BACKEND == "tensorflow":
        stale = served.predict_on_batch([X, INDEX])
        assert np.abs(stale - reference_rows(model, NAMES, X, INDEX)).max() > 1e-3
        served.refresh_adapters()
    check_fresh(model, served)


@pytest.mark.parametrize("strategy", ["concat", "gather", "grouped"])
def test_training_then_serving_reads_the_trained_adapters(strategy):
    model = mixed_mlp()
    kl.set_adapter(model, NAMES)
    served = served_pair(model, strategy)
    served.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    y = np.random.default_rng(5).normal(size=(9, 3)).astype("float32")
    check_fresh(model, served)
    served.train_on_batch([X, INDEX], y)
    check_fresh(model, served)
    served.fit([X, INDEX], y, batch_size=9, epochs=2, verbose=0)
    check_fresh(model, served)
    # `fit` with validation: the validation rows read the adapters as they
    # are at that step, not the copy taken before `fit`.
    history = served.fit(
        [X, INDEX],
        y,
        batch_size=9,
        epochs=1,
        verbose=0,
        validation_data=([X, INDEX], y),
    )
    want = reference_rows(model, NAMES, X, INDEX)
    loss = float(np.mean((want - y) ** 2))
    np.testing.assert_allclose(history.history["val_loss"][-1], loss, rtol=1e-4)
    check_fresh(model, served)
    if BACKEND != "tensorflow":  # training the LoRA model itself
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        model.fit(X, y, batch_size=9, epochs=1, verbose=0)
        check_fresh(model, served)


@pytest.mark.parametrize("strategy", ["concat", "gather", "grouped"])
def test_hotswap_and_adapter_set_changes(strategy, tmp_path):
    model = mixed_mlp()
    kl.prepare_hotswap(model, 4)
    served = served_pair(model, strategy)
    check_fresh(model, served)
    # hotswap_adapter writes in place: seen on every backend.
    other = mixed_mlp()
    kl.set_adapter(other, "wide")
    scale_adapter(other, "wide", -2.0)
    path = tmp_path / "wide.safetensors"
    kl.save_adapter(other, path, adapter="wide")
    kl.hotswap_adapter(model, path, adapter_name="wide")
    check_fresh(model, served)
    # Deleting a routed adapter: its rows get the base output.
    kl.delete_adapter(model, "dora")
    index = np.array([0, 1, 2, 3, -1, 2], "int32")
    with kl.disable_adapters(model):
        base = numpy(model(X[:6]))
    got = served.predict_on_batch([X[:6], index])
    np.testing.assert_allclose(got[[2, 4, 5]], base[[2, 4, 5]], atol=ATOL)


@pytest.mark.parametrize("strategy", ["auto", "concat"])
def test_concat_layers_keep_their_adapters_joined(strategy):
    """`"auto"` takes `"concat"` for one position and a total rank <= 128
    (`mixed_mlp`): each layer keeps its held adapters' `A`s (scales folded
    in) and `B`s joined along the rank axis, in slot order."""
    model = mixed_mlp()
    served = kl.mixed_adapter_model(model, NAMES, strategy, cache=True)
    entries = mixed_layer(served)._stacks.entries
    assert [(layer.name, layout) for layer, _, layout in entries] == [
        ("d1", "concat"),
        ("d2", "concat"),
    ]
    for layer, (a_cat, b_cat), _ in entries:
        held = [layer.get_adapter(n) for n in NAMES if n in layer.adapter_names]
        want_a = np.concatenate(
            [ops.convert_to_numpy(a.a) * float(a.scale) for a in held], axis=-1
        )
        want_b = np.concatenate([ops.convert_to_numpy(a.b) for a in held], axis=0)
        np.testing.assert_allclose(ops.convert_to_numpy(a_cat), want_a, atol=1e-6)
        np.testing.assert_allclose(ops.convert_to_numpy(b_cat), want_b, atol=1e-6)
    check_fresh(model, served)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_attention_block_and_convolutions(strategy):
    """Every routed layer type keeps a copy it can read: the attention
    block's `EinsumDense`s and embedding per strategy, convolutions (which
    always concatenate) joined."""
    model = attention_model()
    names = ["default", "b", "c"]
    tokens = np.random.default_rng(2).integers(0, 20, size=(5, 5)).astype("int32")
    index = np.array([2, 0, -1, 1, 2], "int32")
    served = kl.mixed_adapter_model(model, names, strategy=strategy, cache=True)
    want = reference_rows(model, names, tokens, index)
    np.testing.assert_allclose(numpy(served([tokens, index])), want, atol=ATOL)
    got = served.predict([tokens, index], batch_size=5, verbose=0)
    np.testing.assert_allclose(got, want, atol=ATOL)

    convs = conv_model()
    index = np.array([1, -1, 0, 1], "int32")
    served = kl.mixed_adapter_model(convs, ["default", "b"], strategy, cache=True)
    entries = mixed_layer(served)._stacks.entries
    assert [layout for *_, layout in entries] == ["concat", "concat"]
    want = reference_rows(convs, ["default", "b"], IMAGES, index)
    np.testing.assert_allclose(numpy(served([IMAGES, index])), want, atol=ATOL)


def test_a_copy_kept_for_grouped_serves_gather_too():
    """TensorFlow and torch keep a grouped layer's `A` stack transposed; a layer
    that gathers from it instead transposes it back."""
    from keras_lora.layers.mixed import routing

    model = mixed_mlp()
    served = served_pair(model, "grouped")
    served([X, INDEX])
    stacks = mixed_layer(served)._stacks.usable()
    layouts = {entry[2] for entry in stacks.values()}
    assert layouts == {"stack_t" if BACKEND in ("tensorflow", "torch") else "stack"}
    with routing(ops.convert_to_tensor(INDEX), NAMES, "gather", stacks):
        got = numpy(model(X))
    np.testing.assert_allclose(got, reference_rows(model, NAMES, X, INDEX), atol=ATOL)


@pytest.mark.parametrize("strategy", ["concat", "gather", "grouped"])
def test_a_copy_that_no_longer_fits_is_not_read(strategy):
    """Deleting the last routed slot shrinks `d1`'s stacks: its copy can
    no longer be rebuilt, so the layer stacks per call again and the
    functions compiled on the copy are dropped."""
    model = mixed_mlp()
    served = served_pair(model, strategy)
    live = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
    served.predict_on_batch([X, INDEX])  # compiled on the copies
    kl.delete_adapter(model, "first_only")  # slot 3, on d1 only
    want = numpy(live([X, INDEX]))
    np.testing.assert_allclose(served.predict_on_batch([X, INDEX]), want, atol=ATOL)
    np.testing.assert_allclose(numpy(served([X, INDEX])), want, atol=ATOL)
    with kl.disable_adapters(model):
        base = numpy(model(X))
    rows = INDEX == 3
    np.testing.assert_allclose(want[rows], base[rows], atol=ATOL)


def test_cache_is_not_saved_and_is_rebuilt_on_load(tmp_path):
    model = mixed_mlp()
    served = served_pair(model, "grouped")
    path = str(tmp_path / "served.keras")
    served.save(path)
    loaded = keras.saving.load_model(path)
    want = reference_rows(model, NAMES, X, INDEX)
    np.testing.assert_allclose(loaded.predict_on_batch([X, INDEX]), want, atol=ATOL)
    assert mixed_layer(loaded).cache


def test_cache_default_off():
    served = kl.mixed_adapter_model(mixed_mlp(), NAMES)
    assert mixed_layer(served)._stacks is None
    assert own_variables(mixed_layer(served)) == []
