"""Property-based tests (hypothesis) over random shapes, ranks and alphas.

Examples are few (`max_examples` 4 to 8 per property, derandomized so CI
sees the same ones every run) and `deadline=None`: each builds Keras
layers, which takes milliseconds to seconds depending on the backend.
"""

import json
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import randomize_adapters, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

# Ranks above min(in, out) are among the examples; their warning is tested
# in test_hostile_inputs.py.
pytestmark = pytest.mark.filterwarnings("ignore:LoRA layer .* is above min")


def few(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


# Few distinct sizes: JAX compiles each op once per shape, so shapes that
# repeat across examples keep the run short; their combinations still vary.
dims = st.sampled_from([1, 2, 3, 5, 8])
ranks = st.sampled_from([1, 2, 4, 8])
alphas = st.one_of(st.none(), st.floats(0.05, 64.0, allow_nan=False))
batch_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)
KINDS = ["dense", "einsum", "embedding", "conv1d"]


def make_layer(kind, d_in, d_out, use_bias=True):
    """A built base layer of `kind`, and an input for it (batch shape `B`)."""
    if kind == "dense":
        layer = keras.layers.Dense(
            d_out, use_bias=use_bias, bias_initializer="random_normal"
        )
        return (
            layer,
            lambda rng, b: rng.normal(size=(*b, d_in)).astype("float32"),
            (
                None,
                d_in,
            ),
        )
    if kind == "einsum":
        layer = keras.layers.EinsumDense(
            "abc,cde->abde",
            (None, 2, d_out),
            bias_axes="de" if use_bias else None,
            bias_initializer="random_normal",
        )
        return (
            layer,
            lambda rng, b: rng.normal(size=(b[0], 3, d_in)).astype("float32"),
            (None, 3, d_in),
        )
    if kind == "embedding":
        layer = keras.layers.Embedding(d_in + 1, d_out)
        return (
            layer,
            lambda rng, b: rng.integers(0, d_in + 1, size=(*b, 2)).astype("int32"),
            (None, 2),
        )
    layer = keras.layers.Conv1D(
        d_out, 2, padding="same", use_bias=use_bias, bias_initializer="random_normal"
    )
    return (
        layer,
        lambda rng, b: rng.normal(size=(b[0], 5, d_in)).astype("float32"),
        (None, 5, d_in),
    )


def lora_for(kind, layer, rank, alpha):
    cls = {
        "dense": kl.LoRADense,
        "einsum": kl.LoRAEinsumDense,
        "embedding": kl.LoRAEmbedding,
        "conv1d": kl.LoRAConv,
    }[kind]
    return cls(layer, rank=rank, alpha=alpha)


@few(6)
@given(
    kind=st.sampled_from(KINDS),
    d_in=dims,
    d_out=dims,
    rank=ranks,
    alpha=alphas,
    batch=batch_shapes,
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fresh_lora_layer_computes_exactly_the_base_output(
    kind, d_in, d_out, rank, alpha, batch, use_bias, seed
):
    base, make_x, shape = make_layer(kind, d_in, d_out, use_bias)
    base.build(shape)
    x = make_x(np.random.default_rng(seed), batch)
    expected = to_numpy(base(x))
    lora = lora_for(kind, base, rank, alpha)
    np.testing.assert_array_equal(to_numpy(lora(x)), expected)


@few(6)
@given(
    kind=st.sampled_from(KINDS),
    d_in=dims,
    d_out=dims,
    rank=ranks,
    alpha=alphas,
    seed=st.integers(0, 2**16),
)
def test_merged_layer_equals_unmerged(kind, d_in, d_out, rank, alpha, seed):
    rng = np.random.default_rng(seed)
    base, make_x, shape = make_layer(kind, d_in, d_out)
    base.build(shape)
    rank = min(rank, d_in, d_out)
    lora = lora_for(kind, base, rank, alpha)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    x = make_x(rng, [3])
    unmerged = to_numpy(lora(x))
    merged = to_numpy(lora.merged_layer()(x))
    # float32: error relative to the size of what is summed.
    scale = max(1.0, float(np.max(np.abs(unmerged))))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=2e-5 * scale)


@few(8)
@given(
    d_in=st.sampled_from([1, 3, 16, 64]),
    d_out=st.sampled_from([1, 3, 16, 64]),
    rank=st.sampled_from([1, 4, 32]),
)
def test_dense_trainable_count_is_rank_times_in_plus_out(d_in, d_out, rank):
    base = keras.layers.Dense(d_out)
    base.build((None, d_in))
    layer = lora_for("dense", base, rank, None)  # warns when rank > min
    count = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    assert count == rank * (d_in + d_out)
    assert kl.trainable_summary(layer, print_fn=None).trainable == count


@few(5)
@given(
    kind=st.sampled_from(KINDS),
    d_in=dims,
    d_out=dims,
    rank=st.integers(1, 4),
    alpha=alphas,
    seed=st.integers(0, 2**16),
)
def test_config_and_keras_file_round_trips_are_exact(
    kind, d_in, d_out, rank, alpha, seed
):
    rng = np.random.default_rng(seed)
    base, make_x, shape = make_layer(kind, d_in, d_out)
    lora = lora_for(kind, base, rank, alpha)
    config = lora.get_config()
    clone = type(lora).from_config(config)
    assert clone.get_config() == config

    dtype = "int32" if kind == "embedding" else "float32"
    inputs = keras.Input(shape[1:], dtype=dtype)
    model = keras.Model(inputs, lora(inputs))
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    x = make_x(rng, [2])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
    layer = loaded.layers[-1]
    assert type(layer) is type(lora)
    assert (layer.rank, layer.alpha, layer.scale) == (lora.rank, lora.alpha, lora.scale)
    # (JSON turns the build config's tuples into lists.)
    assert json.loads(json.dumps(layer.get_config())) == json.loads(
        json.dumps(lora.get_config())
    )
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(b), to_numpy(a))
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


@few(4)
@given(
    d_in=st.sampled_from([2, 5, 16]),
    hidden=st.sampled_from([2, 5, 16]),
    rank=st.integers(1, 4),
    alpha=alphas,
    seed=st.integers(0, 2**16),
)
def test_adapter_file_round_trip_is_exact(d_in, hidden, rank, alpha, seed):
    inputs = keras.Input((d_in,))
    x = keras.layers.Dense(hidden, activation="relu", name="a")(inputs)
    x = keras.layers.Dense(hidden, name="b")(x)
    base = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    lora = randomize_adapters(kl.apply_lora(base, rank=rank, alpha=alpha), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = kl.save_adapter(lora, Path(tmp) / "a.safetensors")
        restored = kl.load_adapter(base, path)
        # ... and into a LoRA model with other adapter values.
        other = randomize_adapters(kl.apply_lora(base, rank=rank), seed=seed + 1)
        assert kl.load_adapter(other, path) is other
    for model in (restored, other):
        pairs = zip(lora_layers(model), lora_layers(lora), strict=True)
        for (p, got), (q, want) in pairs:
            assert p == q
            assert (got.rank, got.alpha, got.scale) == (
                want.rank,
                want.alpha,
                want.scale,
            )
            np.testing.assert_array_equal(to_numpy(got.lora_a), to_numpy(want.lora_a))
            np.testing.assert_array_equal(to_numpy(got.lora_b), to_numpy(want.lora_b))
