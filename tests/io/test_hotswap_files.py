"""`hotswap_adapter`: files of any rank <= capacity, alpha and scale rule, in
the keras_lora and PEFT formats (KerasHub-mapped too), give the outputs of a
fresh `load_adapter`; compiled predict and train steps are not traced again;
a file that does not fit changes nothing."""

import collections
import os

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.model.surgery import lora_layers

X = np.random.default_rng(5).normal(size=(8, 16)).astype("float32")
Y = np.random.default_rng(6).normal(size=(8, 3)).astype("float32")
# Eager `load_adapter` outputs against a compiled (XLA / tf.function) predict
# of the padded model: float32 rounding of differently ordered sums.
ATOL = 1e-5
TRACES = collections.Counter()
SWAPS = [  # (rank, alpha, use_rslora): ranks {2, 4, 8} and three alphas
    (2, 1.0, False),
    (4, 4.0, False),
    (8, 16.0, False),
    (2, 16.0, True),
    (8, 1.0, True),
    (4, 4.0, True),
]


class TraceCounter(keras.layers.Layer):
    """The identity; counts how often its `call` runs as Python. Under
    `jax.jit` or `tf.function` that is once per trace, not per call."""

    def call(self, x):
        TRACES[id(self)] += 1
        return x


def counted_mlp():
    inputs = keras.Input((16,), name="x")
    x = TraceCounter(name="counter")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="d1")(x)
    x = keras.layers.Dense(32, activation="relu", name="d2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def adapter_file(base, path, rank, alpha, use_rslora=False, seed=0, **options):
    """Saves a random adapter for `base` to `path`; returns its outputs on X
    when loaded fresh, the reference a swap must give."""
    lora = kl.apply_lora(base, rank=rank, alpha=alpha, use_rslora=use_rslora, **options)
    randomize_adapters(lora, scale=0.3, seed=seed)
    fmt = "peft" if path.suffix != ".safetensors" else "keras_lora"
    kl.save_adapter(lora, path, format=fmt)
    return to_numpy(kl.load_adapter(base, path)(X))


def prepared(base, rank=2, max_rank=8, **options):
    lora = kl.apply_lora(base, rank=rank, **options)
    return kl.prepare_hotswap(lora, max_rank)


def snapshot(model):
    layers = lora_layers(model)
    return (
        [(v.path, v.trainable, to_numpy(v).tobytes()) for v in model.weights],
        [
            (p, a.rank, a.alpha, a.use_rslora, a.dropout)
            for p, layer in layers
            for a in map(layer.get_adapter, layer.adapter_names)
        ],
    )


@pytest.mark.parametrize("fmt", ["keras_lora", "peft"])
def test_swaps_equal_fresh_loads(fmt, tmp_path):
    base = mlp()
    model = prepared(base)
    for i, (rank, alpha, rslora) in enumerate(SWAPS):
        path = tmp_path / (f"a{i}.safetensors" if fmt == "keras_lora" else f"a{i}")
        expected = adapter_file(base, path, rank, alpha, rslora, seed=i)
        assert kl.hotswap_adapter(model, path) is model
        np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-6, rtol=0)


def test_dora_and_named_adapters_swap(tmp_path):
    base = mlp()
    model = prepared(base, use_dora=True)
    kl.add_adapter(model, "plain", rank=2)
    kl.prepare_hotswap(model, 8)  # pads the new adapter too
    expected = adapter_file(base, tmp_path / "d.safetensors", 4, 3.0, use_dora=True)
    kl.hotswap_adapter(model, tmp_path / "d.safetensors")
    np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-6, rtol=0)
    expected = adapter_file(base, tmp_path / "p.safetensors", 8, 2.0, seed=3)
    kl.hotswap_adapter(model, tmp_path / "p.safetensors", adapter_name="plain")
    kl.set_adapter(model, "plain")
    np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-6, rtol=0)


def test_compiled_predict_and_train_step_are_not_traced_again(tmp_path):
    if keras.backend.backend() == "torch":
        pytest.skip(
            "torch runs Keras steps eagerly (no trace to repeat); "
            "test_torch_compiled_steps_are_not_recompiled covers torch.compile"
        )
    base = counted_mlp()
    model = prepared(base)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    # The counter layer is shared with `base` and the fresh loads (apply_lora
    # keeps unadapted layers), so count only what the compiled calls run.
    counter = id(model.get_layer("counter"))

    def traces(step):
        before = TRACES[counter]
        result = step()
        return TRACES[counter] - before, result

    first = traces(lambda: model.predict(X, batch_size=8, verbose=0))[0]
    first += traces(lambda: model.train_on_batch(X, Y))[0]
    assert first >= 2  # the counter does see the first traces
    retraces = 0
    for round_ in range(2):
        for i, (rank, alpha, rslora) in enumerate(SWAPS):
            path = tmp_path / f"a{i}.safetensors"
            if round_ == 0:
                adapter_file(base, path, rank, alpha, rslora, seed=i)
            expected = to_numpy(kl.load_adapter(base, path)(X))
            kl.hotswap_adapter(model, path)
            n, got = traces(lambda: model.predict(X, batch_size=8, verbose=0))
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
            retraces += n + traces(lambda: model.train_on_batch(X, Y))[0]
    assert retraces == 0


def test_torch_compiled_steps_are_not_recompiled(tmp_path):
    if keras.backend.backend() != "torch":
        pytest.skip("torch.compile (jit_compile=True) is torch's compiler")
    from torch._dynamo.utils import counters

    base = mlp()
    model = prepared(base)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=True)
    # Two warm-up rounds: Keras's torch train step compiles again on its
    # second call (a guard on the gradients existing), swap or not.
    for _ in range(2):
        model.predict(X, batch_size=8, verbose=0)
        model.train_on_batch(X, Y)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for i, (rank, alpha, rslora) in enumerate(SWAPS[:3]):  # compiling is slow
        expected = adapter_file(
            base, tmp_path / f"a{i}.safetensors", rank, alpha, rslora
        )
        kl.hotswap_adapter(model, tmp_path / f"a{i}.safetensors")
        got = model.predict(X, batch_size=8, verbose=0)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        model.train_on_batch(X, Y)
    assert counters["stats"]["unique_graphs"] == graphs


def test_kerashub_mapped_peft_directory_swaps(tmp_path):
    tiny = pytest.importorskip("tiny_kerashub")
    inputs = tiny.backbone_inputs(tiny.backbone("gpt2"))

    def hub_lora(rank, alpha, seed):
        backbone = tiny.backbone("gpt2")
        kl.apply_lora(  # attention too: GPT2's fused c_attn in PEFT's names
            backbone, targets=projections, rank=rank, alpha=alpha, in_place=True
        )
        randomize_adapters(backbone, scale=0.3, seed=seed)
        return backbone

    def out(model):
        return to_numpy(model(inputs))

    source = hub_lora(4, 8.0, seed=1)
    kl.save_adapter(source, tmp_path / "hub_peft", format="peft")  # HF names
    # GPT2's fused c_attn holds q, k and v as one rank-12 adapter (A shared,
    # B block-diagonal) and reads back so: the model needs capacity >= 12.
    model = kl.prepare_hotswap(hub_lora(2, 2.0, seed=3), 16)
    kl.hotswap_adapter(model, tmp_path / "hub_peft")
    np.testing.assert_allclose(out(model), out(source), atol=1e-5, rtol=0)
    query = dict(lora_layers(model))["transformer_layer_0/self_attention/query"]
    assert query.rank == 16 and np.abs(to_numpy(query.lora_b)[12:]).max() == 0


def projections(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def bad_cases(base, tmp_path):
    """`{case: (make the file, error, message)}`: files that must not fit a
    model prepared by `prepared(base, max_rank=8)`."""

    def save(name, model, **kwargs):
        randomize_adapters(model)
        kl.save_adapter(model, tmp_path / name, **kwargs)
        return tmp_path / name

    return {
        "rank-above-capacity": (
            lambda: save("r16.safetensors", kl.apply_lora(base, rank=16)),
            "above the capacity",
        ),
        "fewer-layers": (
            lambda: save("d1.safetensors", kl.apply_lora(base, rank=2, targets=["d1"])),
            "cover exactly",
        ),
        "wrong-shapes": (
            lambda: save("wide.safetensors", kl.apply_lora(mlp(hidden=24), rank=2)),
            "shape",
        ),
        "dora-into-plain": (
            lambda: save(
                "dora.safetensors", kl.apply_lora(base, rank=2, use_dora=True)
            ),
            "DoRA",
        ),
        "pissa": (
            lambda: save(
                "pissa.safetensors", kl.apply_lora(base, rank=2, init="pissa")
            ),
            "pissa",
        ),
        # Fit to another (quantized) base: the file's base digest differs.
        "loftq-on-another-base": (
            lambda: save(
                "loftq.safetensors",
                kl.apply_lora(
                    base, rank=2, init="loftq", loftq_mode="int8", loftq_iter=2
                ),
            ),
            "init='loftq'",
        ),
        # A trained head travels with `load_adapter`, not with a swap.
        "trained-head": (
            lambda: save(
                "head.safetensors", kl.apply_lora(base, rank=2, trainable=["head"])
            ),
            "trained layers or biases",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "rank-above-capacity",
        "fewer-layers",
        "wrong-shapes",
        "dora-into-plain",
        "pissa",
        "loftq-on-another-base",
        "trained-head",
    ],
)
def test_a_file_that_does_not_fit_changes_nothing(case, tmp_path):
    base = mlp()
    model = prepared(base)
    make, message = bad_cases(base, tmp_path)[case]
    path = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        kl.hotswap_adapter(model, path)
    assert snapshot(model) == before


def test_bad_calls_are_refused(tmp_path):
    base = mlp()
    adapter_file(base, tmp_path / "a.safetensors", 2, 2.0)
    with pytest.raises(ValueError, match="prepare_hotswap"):
        kl.hotswap_adapter(kl.apply_lora(base, rank=2), tmp_path / "a.safetensors")
    model = prepared(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no adapter named 'tenant'"):
        kl.hotswap_adapter(model, tmp_path / "a.safetensors", adapter_name="tenant")
    with pytest.raises(ValueError, match="no LoRA layers"):
        kl.hotswap_adapter(base, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="path"):
        kl.hotswap_adapter(model, 3)
    with pytest.raises(FileNotFoundError):
        kl.hotswap_adapter(model, tmp_path / "missing.safetensors")
    assert snapshot(model) == before
    kl.merge_lora(model, in_place=True)
    with pytest.raises(ValueError, match="unmerge_lora"):
        kl.hotswap_adapter(model, tmp_path / "a.safetensors")
    assert snapshot(model) == before


def test_dropout_of_the_file_is_reported_not_applied(tmp_path):
    base = mlp()
    model = prepared(base)
    expected = adapter_file(base, tmp_path / "a.safetensors", 2, 2.0, dropout=0.5)
    with pytest.warns(UserWarning, match="keeps the model's dropout"):
        kl.hotswap_adapter(model, tmp_path / "a.safetensors")
    np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-6, rtol=0)
    assert {layer.dropout for _, layer in lora_layers(model)} == {0.0}


def test_ranks_and_alphas_may_differ_per_layer(tmp_path):
    base = mlp()
    source = kl.apply_lora(base, rank=2)
    for (_, layer), (rank, alpha) in zip(
        lora_layers(source), [(3, 5.0), (8, 2.0)], strict=True
    ):
        adapter = layer.add_adapter("mixed", rank=rank, alpha=alpha)
        rng = np.random.default_rng(rank)
        for v in (adapter.a, adapter.b):
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    kl.save_adapter(source, tmp_path / "mixed.safetensors", adapter="mixed")
    kl.set_adapter(source, "mixed")
    model = prepared(base)
    kl.hotswap_adapter(model, tmp_path / "mixed.safetensors")
    np.testing.assert_allclose(to_numpy(model(X)), to_numpy(source(X)), atol=1e-6)


def test_a_changed_file_is_read_and_checked_again(tmp_path, monkeypatch):
    """A file swapped in before is not read again while unchanged; any write
    to it (even one that keeps its size and sets its mtime back) makes the
    next swap read it, verify its checksum and refuse it if corrupt."""
    from keras_lora.io import hotswap as io_hotswap

    base = mlp()
    model = prepared(base)
    a = adapter_file(base, tmp_path / "a.safetensors", 2, 2.0, seed=1)
    b = adapter_file(base, tmp_path / "b.safetensors", 4, 8.0, seed=2)
    reads = []
    own_read = io_hotswap.read_records
    monkeypatch.setattr(
        io_hotswap,
        "read_records",
        lambda reader, path, *rest: reads.append(path) or own_read(reader, path, *rest),
    )
    for path, want in [("a", a), ("b", b), ("a", a), ("b", b)]:
        kl.hotswap_adapter(model, tmp_path / f"{path}.safetensors")
        np.testing.assert_allclose(to_numpy(model(X)), want, atol=1e-6, rtol=0)
    assert [p.name for p in reads] == ["a.safetensors", "b.safetensors"]

    # Same size, one tensor byte flipped, the old mtime set back.
    path = tmp_path / "a.safetensors"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    before = snapshot(model)
    with pytest.raises(ValueError, match="checksum"):
        kl.hotswap_adapter(model, path)
    assert snapshot(model) == before
    assert [p.name for p in reads][-1] == "a.safetensors"

    # Rewritten with another adapter: read again, its values assigned.
    c = adapter_file(base, path, 8, 1.0, seed=3)
    kl.hotswap_adapter(model, path)
    np.testing.assert_allclose(to_numpy(model(X)), c, atol=1e-6, rtol=0)
    assert len(reads) == 4


def test_remembered_swaps_follow_the_adapter_variables(tmp_path):
    """A remembered check belongs to the adapter's variables: after
    `prepare_hotswap` pads further (new variables), the file is checked
    against the new ones and fills them; a file that stopped fitting (the
    model merged) is refused as before."""
    base = mlp()
    model = prepared(base, max_rank=4)
    want = adapter_file(base, tmp_path / "a.safetensors", 4, 2.0)
    kl.hotswap_adapter(model, tmp_path / "a.safetensors")
    kl.prepare_hotswap(model, 8)
    kl.hotswap_adapter(model, tmp_path / "a.safetensors")
    np.testing.assert_allclose(to_numpy(model(X)), want, atol=1e-6, rtol=0)
    ranks = {layer.get_adapter("default").rank for _, layer in lora_layers(model)}
    assert ranks == {8}
    kl.merge_lora(model, in_place=True)
    with pytest.raises(ValueError, match="unmerge_lora"):
        kl.hotswap_adapter(model, tmp_path / "a.safetensors")
