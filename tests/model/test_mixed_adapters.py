"""`mixed_adapter_model`: each row of a batch with its own adapter.

Every served row is compared with the model that has only that adapter
active (`set_adapter`), or with adapters disabled for `-1`. Tolerance
1e-5 in float32: the served model sums the same products in another order
(one product over the concatenated factors, or a gathered batched one).
"""

import keras
import numpy as np
import pytest
from conftest import mlp
from keras import ops
from tiny_kerashub import backbone, backbone_inputs

import keras_lora as kl
from keras_lora.layers import LoRADense, LoRALayer
from keras_lora.layers.mixed import routing
from keras_lora.model.walk import iter_layers

STRATEGIES = ["auto", "concat", "gather", "grouped"]
ATOL = 1e-5


def randomize(model, seed=0):
    """Non-zero A, B for every adapter; DoRA magnitudes moved off the norms."""
    rng = np.random.default_rng(seed)
    for _, layer in iter_layers(model):
        if not isinstance(layer, LoRALayer):
            continue
        for name in layer.adapter_names:
            adapter = layer.get_adapter(name)
            for w in (adapter.a, adapter.b):
                w.assign(rng.normal(0, 0.3, w.shape).astype(w.dtype))
            if adapter.magnitude is not None:
                m = ops.convert_to_numpy(adapter.magnitude)
                adapter.magnitude.assign(m * rng.uniform(0.5, 1.5, m.shape))
    return model


def numpy(x):
    return keras.tree.map_structure(ops.convert_to_numpy, x)


def reference_rows(model, names, inputs, index):
    """Row i from the model with only `names[index[i]]` active (-1: none)."""
    active = kl.active_adapters(model)
    outputs = {}
    for k, name in enumerate(names):
        kl.set_adapter(model, name)
        outputs[k] = numpy(model(inputs))
    kl.set_adapter(model, active)
    with kl.disable_adapters(model):
        outputs[-1] = numpy(model(inputs))
    return np.stack([outputs[int(k)][row] for row, k in enumerate(index)])


def mixed_mlp():
    model = kl.apply_lora(mlp(input_dim=6, hidden=8, outputs=3), rank=2)
    kl.add_adapter(model, "wide", rank=4, alpha=7.0, use_rslora=True)
    kl.add_adapter(model, "dora", rank=1, use_dora=True)
    kl.add_adapter(model, "first_only", rank=3, targets=["d1"])
    return randomize(model)


NAMES = ["default", "wide", "dora", "first_only"]
X = np.random.default_rng(1).normal(size=(9, 6)).astype("float32")
INDEX = np.array([0, 1, 2, 3, -1, 3, 2, 1, 0], "int32")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_match_the_per_adapter_models(strategy):
    model = mixed_mlp()
    served = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
    want = reference_rows(model, NAMES, X, INDEX)
    np.testing.assert_allclose(numpy(served([X, INDEX])), want, atol=ATOL)
    compiled = served.predict([X, INDEX], batch_size=9, verbose=0)
    np.testing.assert_allclose(compiled, want, atol=ATOL)
    # The served model is a view: the LoRA model's own state is untouched.
    assert kl.active_adapters(model) == ["default"]


def attention_model():
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(20, 8, name="embed")(tokens)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(tokens, out)
    targets = ["embed", "query", "value", "attention_output", "head"]
    model = kl.apply_lora(model, rank=2, targets=targets)
    kl.add_adapter(model, "b", rank=3, alpha=5.0)
    kl.add_adapter(model, "c", rank=2, use_dora=True, targets=["head", "query"])
    return randomize(model)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_block_and_embedding(strategy):
    model = attention_model()
    names = ["default", "b", "c"]
    tokens = np.random.default_rng(2).integers(0, 20, size=(5, 5)).astype("int32")
    index = np.array([2, 0, -1, 1, 2], "int32")
    served = kl.mixed_adapter_model(model, names, strategy=strategy)
    want = reference_rows(model, names, tokens, index)
    np.testing.assert_allclose(numpy(served([tokens, index])), want, atol=ATOL)
    got = served.predict([tokens, index], batch_size=5, verbose=0)
    np.testing.assert_allclose(got, want, atol=ATOL)


def conv_model():
    """Conv2D and Conv1D with adapters `default` (rank 2) and `b` (DoRA)."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Conv1D(3, 2, name="c2")(keras.layers.Reshape((36, 4))(x))
    model = kl.apply_lora(keras.Model(inputs, x), rank=2, targets=["c1", "c2"])
    kl.add_adapter(model, "b", rank=1, alpha=3.0, use_dora=True)
    return randomize(model)


IMAGES = np.random.default_rng(3).normal(size=(4, 6, 6, 2)).astype("float32")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_convolutions(strategy):
    model = conv_model()
    index = np.array([1, -1, 0, 1], "int32")
    served = kl.mixed_adapter_model(model, ["default", "b"], strategy=strategy)
    want = reference_rows(model, ["default", "b"], IMAGES, index)
    np.testing.assert_allclose(numpy(served([IMAGES, index])), want, atol=ATOL)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "grouped"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kerashub_backbone_in_place(name, strategy, cache):
    model = kl.apply_lora(backbone(name), rank=2, in_place=True)
    kl.add_adapter(model, "b", rank=3, alpha=6.0)
    kl.add_adapter(model, "c", rank=2, use_dora=True)
    randomize(model)
    names = ["default", "b", "c"]
    inputs = backbone_inputs(model, batch=4)
    index = np.array([1, 2, -1, 0], "int32")
    served = kl.mixed_adapter_model(model, names, strategy=strategy, cache=cache)
    want = reference_rows(model, names, inputs, index)
    got = numpy(served({**inputs, "adapter_index": index}))
    np.testing.assert_allclose(got, want, atol=ATOL)


def compiled(served, traces=None):
    """`served` under `jax.jit` or `tf.function`, counting traces."""
    traces = [] if traces is None else traces

    def forward(x, index):
        traces.append(1)
        return served([x, index])

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(forward)
    import tensorflow as tf

    return tf.function(forward)


def count_traces(served, feeds):
    """How many times one compiled function traces `served` over `feeds`."""
    traces = []

    def forward(x, index):
        traces.append(1)
        return served([x, index])

    if keras.backend.backend() == "jax":
        import jax

        compiled = jax.jit(forward)
    else:
        import tensorflow as tf

        compiled = tf.function(forward)
    outputs = [numpy(compiled(x, index)) for x, index in feeds]
    return len(traces), outputs


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="torch runs eagerly: nothing traces"
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_traced_function_serves_any_mix(strategy):
    model = mixed_mlp()
    served = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
    rng = np.random.default_rng(4)
    mixes = [INDEX, np.zeros(9, "int32"), np.full(9, -1, "int32"), INDEX[::-1]]
    feeds = [(X, np.ascontiguousarray(m)) for m in mixes]
    feeds.append((X, rng.integers(-1, 4, size=9).astype("int32")))
    n, outputs = count_traces(served, feeds)
    assert n == 1
    for (x, index), got in zip(feeds, outputs, strict=True):
        want = reference_rows(model, NAMES, x, index)
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_grouped_in_a_graph_with_unknown_batch_and_length():
    """`"grouped"` sizes its groups from the data inside one compiled
    function: TensorFlow with the batch and sequence length unknown at trace
    time, `jax.jit`, and `torch.compile` (where group sizes cannot be data)."""
    model = attention_model()
    names = ["default", "b", "c"]
    served = kl.mixed_adapter_model(model, names, strategy="grouped")
    rng = np.random.default_rng(6)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = (tf.TensorSpec((None, None), "int32"), tf.TensorSpec((None,), "int32"))
        forward = tf.function(lambda x, i: served([x, i]), input_signature=spec)
    elif backend == "jax":
        import jax

        forward = jax.jit(lambda x, i: served([x, i]))
    else:
        import torch

        forward = torch.compile(lambda x, i: served([x, i]), backend="eager")
    for batch, index in ((5, [2, 0, -1, 1, 2]), (3, [1, 1, 0])):
        tokens = rng.integers(0, 20, size=(batch, 5)).astype("int32")
        index = np.array(index, "int32")
        if backend == "torch":
            got = forward(*(ops.convert_to_tensor(v) for v in (tokens, index)))
        else:
            got = forward(tokens, index)
        want = reference_rows(model, names, tokens, index)
        np.testing.assert_allclose(numpy(got), want, atol=ATOL)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's kernels")
@pytest.mark.parametrize("positions", [1, 3])
def test_jax_ragged_dot_and_per_row_kernels_agree(positions):
    """`"grouped"` on JAX uses `ragged_dot` off CPU and blocks of one slot
    each on CPU (where XLA expands `ragged_dot` densely); both, run here,
    give each position its own slot's `x·A·B` (the last slot all zeros)."""
    import jax

    from keras_lora.layers.mixed_grouped import _grouped_jax

    rng = np.random.default_rng(7)
    a = rng.normal(size=(4, 6, 3)).astype("float32")
    b = rng.normal(size=(4, 3, 5)).astype("float32")
    a[-1], b[-1] = 0.0, 0.0
    index = np.array([2, 0, 3, 1, 2, 0, 3], "int32")
    x = rng.normal(size=(len(index) * positions, 6)).astype("float32")
    slots = np.repeat(index, positions)
    want = np.einsum("ni,nir,nro->no", x, a[slots], b[slots])
    for ragged in (True, False):
        got = jax.jit(_grouped_jax, static_argnums=(4, 5))(
            x, a, b, index, positions, ragged
        )
        np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's kernels")
@pytest.mark.parametrize("n, slots", [(256, 65), (50, 9), (5, 30)])
def test_jax_blocks_hold_each_position_of_its_own_slot(n, slots):
    """The CPU kernel pads each slot's run of sorted positions to whole
    blocks: several blocks per slot, empty slots, more slots than
    positions; every position gets exactly its own slot's product."""
    import jax

    from keras_lora.layers.mixed_grouped import _blocked_jax

    rng = np.random.default_rng(9)
    a = rng.normal(size=(slots, 12, 4)).astype("float32")
    b = rng.normal(size=(slots, 4, 6)).astype("float32")
    rows = rng.integers(0, max(slots // 2, 1), size=n).astype("int32")  # slots unused
    x = rng.normal(size=(n, 12)).astype("float32")
    want = np.einsum("ni,nir,nro->no", x, a[rows], b[rows])
    got = jax.jit(_blocked_jax)(x, a, b, rows)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=ATOL)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's kernels")
def test_jax_grouped_exports_with_a_symbolic_batch():
    """`jax.export` with a polymorphic batch: no block count can be sized,
    so the CPU kernel reads each position's own factors instead."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from keras_lora.layers.mixed_grouped import _grouped_jax

    rng = np.random.default_rng(10)
    a = jnp.asarray(rng.normal(size=(5, 6, 3)).astype("float32"))
    b = jnp.asarray(rng.normal(size=(5, 3, 4)).astype("float32"))
    n = export.symbolic_shape("n")[0]
    exported = export.export(
        jax.jit(lambda x, index: _grouped_jax(x, a, b, index, 1, False))
    )(
        jax.ShapeDtypeStruct((n, 6), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    x = rng.normal(size=(7, 6)).astype("float32")
    index = np.array([0, 1, 4, 2, 3, 1, 0], "int32")
    a_np, b_np = np.asarray(a), np.asarray(b)
    want = np.einsum("ni,nir,nro->no", x, a_np[index], b_np[index])
    np.testing.assert_allclose(np.asarray(exported.call(x, index)), want, atol=ATOL)


def test_block_rows_balances_factor_reads_and_padding():
    from keras_lora.layers.mixed_grouped import block_rows

    # sqrt(256·8/65) = 5.6 -> 8 (the serving row's 64 adapters);
    # sqrt(16·8/9) = 3.8 -> 4; at least 1 row, at most 64.
    assert [block_rows(256, 8, 65), block_rows(16, 8, 9)] == [8, 4]
    assert [block_rows(1, 8, 65), block_rows(10**6, 64, 2)] == [1, 64]


BAD = np.array([4, 5, -2, 2**31 - 1, -(2**31), 0, 1, -1, 3], "int32")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_rows_get_the_base_output_in_a_graph(strategy):
    """Tenant isolation: an index outside [-1, n) never reads an adapter,
    by clamping, wrapping or an out-of-bounds gather: the row is the base's.
    (In a graph nothing can raise; eagerly `served` raises, so the layers'
    own routing is also called directly, on every backend; torch has no
    graph to compile here.)"""
    model = mixed_mlp()
    with kl.disable_adapters(model):
        base = numpy(model(X))
    want = reference_rows(model, NAMES, X, np.where(BAD < 4, BAD, -1).clip(-1))
    want[:5] = base[:5]
    with routing(ops.convert_to_tensor(BAD), NAMES, strategy):
        np.testing.assert_allclose(numpy(model(X)), want, atol=ATOL)
    if keras.backend.backend() != "torch":
        served = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
        got = numpy(compiled(served)(X, BAD))
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_bad_index_in_eager_mode_raises():
    served = kl.mixed_adapter_model(mixed_mlp(), NAMES)
    for bad in ([0, 4], [-2, 0], [0, 2**31 - 1]):
        index = np.array(bad + [0] * 7, "int32")
        with pytest.raises(ValueError, match=r"adapter_index.*\[-1, 4\)"):
            served([X, index])
    # `predict` checks NumPy indices on the host before compiling anything.
    with pytest.raises(ValueError, match=r"adapter_index.*\[-1, 4\)"):
        served.predict([X, np.array([9] * 9, "int32")], verbose=0)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        served.get_layer("mixed_adapters")(X, np.zeros((9, 1), "int32"))
    with pytest.raises(TypeError, match="integer"):
        served.get_layer("mixed_adapters")(X, np.zeros((9,), "float32"))


def trainable_state(model):
    return [(v.path, v.trainable) for v in model.weights]


def test_bad_names_change_nothing():
    model = mixed_mlp()
    before = trainable_state(model), kl.active_adapters(model)
    with pytest.raises(ValueError, match=r"unknown adapter names \['nope'\]"):
        kl.mixed_adapter_model(model, ["default", "nope"])
    with pytest.raises(ValueError, match="unique"):
        kl.mixed_adapter_model(model, ["wide", "wide"])
    with pytest.raises(ValueError, match="non-empty"):
        kl.mixed_adapter_model(model, [])
    with pytest.raises(TypeError, match="`names` must be a list"):
        kl.mixed_adapter_model(model, "default")
    with pytest.raises(ValueError, match=r"`strategy` must be one of"):
        kl.mixed_adapter_model(model, NAMES, strategy="loop")
    with pytest.raises(TypeError, match="keras.Model"):
        kl.mixed_adapter_model(model.layers[1], NAMES)
    assert (trainable_state(model), kl.active_adapters(model)) == before


def test_refused_adapters_and_layer_types():
    model = kl.apply_lora(mlp(input_dim=6, hidden=8), rank=2)
    kl.add_adapter(model, "pissa", rank=2, init="pissa", targets=["d2"])
    with pytest.raises(ValueError, match=r"'pissa' uses init='pissa'"):
        kl.mixed_adapter_model(model, ["default", "pissa"])
    kl.mixed_adapter_model(model, ["default"])  # the others still serve

    class NoRouting(LoRADense):
        _routed_first = None

    inputs = keras.Input((4,))
    dense = keras.layers.Dense(2)
    dense.build((None, 4))
    odd = keras.Model(inputs, NoRouting(dense, rank=1)(inputs))
    with pytest.raises(TypeError, match="NoRouting, which has no per-row"):
        kl.mixed_adapter_model(odd, ["default"])


def variables_of(model, name):
    found = []
    for _, layer in iter_layers(model):
        if isinstance(layer, LoRALayer) and name in layer.adapter_names:
            found += [
                ops.convert_to_numpy(v) for v in layer.get_adapter(name).variables
            ]
    return found


def changed(before, after):
    return [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_updates_each_adapter_from_its_own_rows_only(strategy):
    model = mixed_mlp()
    kl.set_adapter(model, NAMES)  # all routed adapters trainable
    served = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
    served.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    y = np.random.default_rng(5).normal(size=(9, 3)).astype("float32")
    base = [ops.convert_to_numpy(v) for v in model.non_trainable_weights]
    before = {name: variables_of(model, name) for name in NAMES}
    # Rows of "wide" and the base only: "wide" learns, no other adapter moves.
    index = np.array([1, 1, -1, 1, -1, 1, 1, -1, 1], "int32")
    served.train_on_batch([X, index], y)
    after = {name: variables_of(model, name) for name in NAMES}
    assert all(changed(before["wide"], after["wide"]))
    for name in ("default", "dora", "first_only"):
        assert not any(changed(before[name], after[name])), name
    # Now "dora" and "first_only" rows only.
    index = np.array([2, 3, 2, 3, 2, 3, 2, 3, 2], "int32")
    served.train_on_batch([X, index], y)
    again = {name: variables_of(model, name) for name in NAMES}
    assert all(changed(after["dora"], again["dora"]))
    assert all(changed(after["first_only"], again["first_only"]))
    for name in ("default", "wide"):
        assert not any(changed(after[name], again[name])), name
    frozen = [ops.convert_to_numpy(v) for v in model.non_trainable_weights]
    assert not any(changed(base, frozen))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_after_prepare_hotswap(strategy):
    """Padded ranks and scale variables (`prepare_hotswap`) route the same."""
    model = mixed_mlp()
    want = reference_rows(model, NAMES, X, INDEX)
    kl.prepare_hotswap(model, 8)
    served = kl.mixed_adapter_model(model, NAMES, strategy=strategy)
    np.testing.assert_allclose(numpy(served([X, INDEX])), want, atol=ATOL)
    got = served.predict([X, INDEX], batch_size=9, verbose=0)
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tied_reversible_embedding(strategy):
    """The lookup and the tied logits `x·(E + s·A·B)ᵀ` both route per row."""
    tokens = keras.Input((4,), dtype="int32")
    embed = keras.layers.ReversibleEmbedding(12, 6, tie_weights=True, name="embed")
    x = keras.layers.Dense(6, name="mix")(embed(tokens))
    model = keras.Model(tokens, embed(x, reverse=True))
    model = kl.apply_lora(model, rank=2, targets=["embed", "mix"])
    kl.add_adapter(model, "b", rank=3, alpha=2.0, targets=["embed"])
    randomize(model)
    ids = np.random.default_rng(6).integers(0, 12, size=(4, 4)).astype("int32")
    index = np.array([1, 0, -1, 1], "int32")
    served = kl.mixed_adapter_model(model, ["default", "b"], strategy=strategy)
    want = reference_rows(model, ["default", "b"], ids, index)
    np.testing.assert_allclose(numpy(served([ids, index])), want, atol=ATOL)


def test_int64_index_never_wraps_to_another_tenant():
    """Keras casts the index to the int32 input, which wraps 2**32 + 1 to 1:
    a wide index is checked (eagerly) or sent to the base (traced) first."""
    model = mixed_mlp()
    served = kl.mixed_adapter_model(model, NAMES)
    wide = np.full((9,), 2**32 + 1, "int64")
    with pytest.raises(ValueError, match=r"\[-1, 4\).*4294967297"):
        served([X, wide])
    with pytest.raises(ValueError, match=r"\[-1, 4\).*4294967297"):
        served.predict([X, wide], verbose=0)
    if keras.backend.backend() == "tensorflow":  # int64 stays int64 in a graph
        import tensorflow as tf

        with kl.disable_adapters(model):
            base = numpy(model(X))
        got = numpy(compiled(served)(tf.constant(X), tf.constant(wide)))
        np.testing.assert_allclose(got, base, atol=ATOL)
