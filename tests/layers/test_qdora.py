"""QDoRA: DoRA over int8, int4 and NF4 `Dense` and `EinsumDense` bases.

`W` is the dequantized kernel (`quantized.dequantized_kernel`, the one
merging uses); each reference is computed from it in float64 NumPy.

Tolerances. Float32 sums over a fan-in of 16: each output is off by at
most ~16·u (u = 6e-8) relative to its sum of magnitudes, well inside
`RTOL = 1e-5` at this data's sizes. An int8 base (and any base with
Keras's `inputs_quantizer`) also quantizes its inputs per row to int8 in
the base product `x·W` (absmax: each value off by at most `max|x_row| /
254`), so there the base term may be off by `max|x_row| / 254 · ‖W_j‖₁`
per output unit, times DoRA's factor `c_j`: that bound is added to the
tolerance, computed from the data.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers import quantized, variants

RTOL = 1e-5
MODES = ["int8", "int4", "int4/-1", "nf4"]
TARGETS = ["d1", "e1"]  # a Dense and an EinsumDense (2 output axes)


def float_model():
    inputs = keras.Input((5, 16))
    x = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    x = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 4), bias_axes="de", name="e1")(
        x
    )
    x = keras.layers.Reshape((5, 8))(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def quantize(model, mode):
    """`model` quantized in `mode`: Keras's int8; int4 in blocks of 8 rows
    (`"int4"`) or one scale per output unit (`"int4/-1"`); NF4 in blocks
    of 8 (`kl.quantize_nf4`). `"float"` leaves it float."""
    if mode == "nf4":
        return kl.quantize_nf4(model, block_size=8)
    if mode.startswith("int4"):
        block = -1 if mode == "int4/-1" else 8
        config = keras.quantizers.Int4QuantizationConfig(block_size=block)
        model.quantize("int4", config=config)
    elif mode != "float":
        model.quantize(mode)
    return model


def qdora(mode, targets=TARGETS):
    model = quantize(float_model(), mode)
    return kl.apply_lora(model, targets=targets, rank=2, alpha=3, use_dora=True)


def randomize(model, seed=0, targets=TARGETS):
    """Random nonzero A, B and magnitude on every LoRA layer: `s·A·B` a
    sizeable part of `W`, as after training."""
    rng = np.random.default_rng(seed)
    for name in targets:
        layer = model.get_layer(name)
        for variable, std in ((layer.lora_a, 0.3), (layer.lora_b, 0.3)):
            variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
        m = rng.uniform(0.5, 2.0, layer.lora_magnitude.shape).astype("float32")
        layer.lora_magnitude.assign(m)
    return model


def data(seed=0):
    return np.random.default_rng(seed).normal(size=(4, 5, 16)).astype("float32")


def dequantized(layer):
    """The LoRA `layer`'s base kernel as the package dequantizes it, float64."""
    return to_numpy(quantized.dequantized_kernel(layer.layer)).astype(np.float64)


def reference_kernel(layer):
    """`(W + s·A·B, c)` in float64: the adapted kernel and DoRA's factor
    `c = m / ‖W + s·A·B‖` per output unit (broadcast over the kernel)."""
    w = dequantized(layer)
    a = to_numpy(layer.lora_a).astype(np.float64)
    b = to_numpy(layer.lora_b).astype(np.float64)
    s = layer.scale
    if w.ndim == 2:
        adapted = w + s * a @ b
    elif layer.factoring == "standard":  # A (c, r), B (r, d, e)
        adapted = w + s * np.einsum("cr,rde->cde", a, b)
    else:  # Keras's: A (c, d, r) holds the heads, B (r, e)
        adapted = w + s * np.einsum("cdr,re->cde", a, b)
    norm = np.sqrt(np.sum(adapted**2, axis=0))  # over the input axis c
    c = to_numpy(layer.lora_magnitude).astype(np.float64) / norm
    return adapted, c


def reference_output(layer, x):
    """The LoRA `layer`'s output in float64, and the bound of its base
    product's input quantization (0 without an `inputs_quantizer`)."""
    adapted, c = reference_kernel(layer)
    x64 = x.astype(np.float64)
    y = np.tensordot(x64, c * adapted, axes=([-1], [0]))
    y = y + to_numpy(layer.layer.bias).astype(np.float64)
    bound = np.zeros_like(y)
    if getattr(layer.layer, "inputs_quantizer", None):
        step = np.abs(x64).max(axis=-1) / 254.0  # per row of the contraction
        l1 = np.abs(c * dequantized(layer)).sum(axis=0)  # per output unit
        bound = np.multiply.outer(step, l1)
    if layer.layer.activation is keras.activations.relu:
        y = np.maximum(y, 0.0)  # 1-Lipschitz: the bound carries over
    return y, bound


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def test_init_equals_the_quantized_base(mode):
    base = quantize(float_model(), mode)
    x = data()
    expected = to_numpy(base(x))
    lora = kl.apply_lora(base, targets=TARGETS, rank=2, use_dora=True)
    for name in TARGETS:
        layer = lora.get_layer(name)
        assert layer.layer.quantization_mode == mode.split("/")[0]
        norm = np.sqrt(np.sum(dequantized(layer) ** 2, axis=0))
        # float32 sums of 16 squares: RTOL (see the module docstring)
        np.testing.assert_allclose(to_numpy(layer.lora_magnitude), norm, rtol=RTOL)
    # B = 0: `c = m / ‖W‖` is 1 up to the rounding of two float32 norms of
    # the same column (≤ 16·u): the output is the quantized base's.
    np.testing.assert_allclose(to_numpy(lora(x)), expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("chunk", [variants.norm_chunk, 256])
@pytest.mark.parametrize("name", TARGETS)
def test_output_is_the_dora_formula_on_the_dequantized_kernel(
    mode, name, chunk, monkeypatch
):
    # 256 bytes: a per-channel Dense's norm reads its codes 4 rows at a time
    monkeypatch.setattr(variants, "norm_chunk", chunk)
    lora = randomize(qdora(mode))
    layer = lora.get_layer(name)
    x = data(1) if name == "d1" else np.abs(data(1))  # e1 sees relu outputs
    expected, bound = reference_output(layer, x)
    got = to_numpy(layer(x)).astype(np.float64)
    tolerance = RTOL * np.abs(expected) + 1e-6 + bound
    assert np.all(np.abs(got - expected) <= tolerance), np.max(
        np.abs(got - expected) - tolerance
    )
    # The check can fail: dropping DoRA's factor is off by far more.
    adapted, c = reference_kernel(layer)
    assert np.max(np.abs(c - 1.0)) > 0.1


def test_fit_moves_only_the_adapters_and_leaves_the_base_bitwise(mode):
    lora = randomize(qdora(mode))
    names = {v.path.split("/")[-1] for v in lora.trainable_weights}
    assert names == {"lora_a", "lora_b", "lora_magnitude"}
    frozen = {v.path: to_numpy(v).copy() for v in lora.non_trainable_weights}
    assert any("kernel" in path or "nf4" in path for path in frozen)
    before = {v.path: to_numpy(v).copy() for v in lora.trainable_weights}
    lora.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = data(2)
    y = np.tanh(x[:, :, :3])
    first = lora.evaluate(x, y, verbose=0)
    lora.fit(x, y, epochs=5, batch_size=4, verbose=0)
    assert lora.evaluate(x, y, verbose=0) < first
    for v in lora.non_trainable_weights:
        np.testing.assert_array_equal(to_numpy(v), frozen[v.path])
    for v in lora.trainable_weights:
        assert not np.array_equal(to_numpy(v), before[v.path]), v.path


def test_merge_gives_the_dora_kernel_and_requantizes(mode):
    lora = randomize(qdora(mode))
    merged = kl.merge_lora(lora)
    for name in TARGETS:
        adapted, c = reference_kernel(lora.get_layer(name))
        layer = merged.get_layer(name)
        assert layer.quantization_mode is None
        np.testing.assert_allclose(
            to_numpy(layer.kernel), c * adapted, rtol=RTOL, atol=1e-6
        )
    requantized = kl.merge_lora(lora, requantize=True)
    for name in TARGETS:
        base = lora.get_layer(name).layer
        layer = requantized.get_layer(name)
        assert layer.dtype_policy.name == base.dtype_policy.name
        # "dequantize, add the DoRA delta, quantize once": the merged float
        # layer quantized in the base's mode gives the same variables.
        reference = merged.get_layer(name)
        quantized.requantize(reference, base.quantization_mode, base)
        for got, want in zip(layer.weights, reference.weights, strict=True):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("fmt", ["keras_lora", "peft"])
@pytest.mark.parametrize("source", ["int8", "int4", "nf4"])
def test_adapter_files_move_between_float_and_quantized_bases(tmp_path, fmt, source):
    # PEFT's Linear covers a 2-D kernel: there the EinsumDense stays out.
    targets = ["d1"] if fmt == "peft" else TARGETS
    saved = randomize(qdora(source, targets), targets=targets)
    path = tmp_path / "adapter"
    kl.save_adapter(saved, path, format=fmt)
    for target in ("float", "int8", "int4", "nf4"):
        loaded = kl.load_adapter(qdora(target, targets), path)
        for name in targets:
            got, want = loaded.get_layer(name), saved.get_layer(name)
            assert got.use_dora
            for attr in ("lora_a", "lora_b", "lora_magnitude"):
                np.testing.assert_array_equal(
                    to_numpy(getattr(got, attr)), to_numpy(getattr(want, attr))
                )


def test_keras_file_round_trip_is_exact(tmp_path, mode):
    lora = randomize(qdora(mode))
    x = data(3)
    lora.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    for name in TARGETS:
        layer = reloaded.get_layer(name)
        assert layer.use_dora
        assert (
            layer.layer.dtype_policy.name
            == lora.get_layer(name).layer.dtype_policy.name
        )
    np.testing.assert_array_equal(to_numpy(reloaded(x)), to_numpy(lora(x)))


def test_pissa_olora_stay_refused_and_dora_off_qdora_bases_too():
    model = quantize(float_model(), "int8")
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"quantized.*cannot use init='{init}'"):
            kl.apply_lora(model, targets=["d1"], init=init)
    embedding = keras.layers.Embedding(10, 4)
    embedding.build((None, 3))
    embedding.quantize("int8")
    with pytest.raises(ValueError, match="QDoRA.*Dense and EinsumDense"):
        kl.LoRAEmbedding(embedding, rank=2, use_dora=True)
    dense = keras.layers.Dense(4)  # float8: Keras's training mode, not QDoRA's
    dense.build((None, 3))
    dense.quantize("float8")
    with pytest.raises(ValueError, match=r"QDoRA.*\['int8', 'int4', 'nf4'\]"):
        kl.LoRADense(dense, rank=2, use_dora=True)
    assert kl.LoRADense(dense, rank=2).quantization_mode == "float8"


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's memory analysis: JAX only"
)
@pytest.mark.parametrize("mode", MODES)
def test_norm_adds_no_kernel_sized_temporary_beyond_the_base_product(mode, monkeypatch):
    """The compiled gradient's temporaries (XLA's own count) of QDoRA
    against plain QLoRA on a `Dense(512)`, 1 MiB of float32 kernel:
    sub-channel int4 and NF4 products dequantize the kernel themselves,
    and the norm's dequantization (tied after the base product) reuses
    that memory. Keras's per-channel products (int8, `int4/-1`) multiply
    the integer codes and never form a float kernel: there the norm reads
    the codes `norm_chunk` bytes of float rows at a time (64 KiB here, 16
    chunks). Either way QDoRA adds O(out·r) plus, per-channel, one chunk."""
    import jax

    units, rank = 512, 8
    monkeypatch.setattr(variants, "norm_chunk", 64 * 2**10)

    def temp_bytes(dora):
        inputs = keras.Input((units,))
        model = keras.Model(inputs, keras.layers.Dense(units, name="t")(inputs))
        model = quantize(model, mode)
        lora = kl.apply_lora(model, rank=rank, use_dora=dora, targets=["t"])

        def loss(trainable, non_trainable, x):
            y, _ = lora.stateless_call(trainable, non_trainable, x, training=True)
            return (y * y).mean()

        x = np.ones((8, units), "float32")
        trainable = [v.value for v in lora.trainable_variables]
        non_trainable = [v.value for v in lora.non_trainable_variables]
        compiled = jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    extra = temp_bytes(True) - temp_bytes(False)
    small = 16 * 4 * units * (rank + 1)  # a few (rank + 1, out) float32 tensors
    allowed = small + (variants.norm_chunk if mode in ("int8", "int4/-1") else 0)
    assert extra <= allowed, (extra, allowed)


def test_norm_follows_base_codes_assigned_after_a_compiled_call(mode):
    """A compiled predict function, and torch's cached `‖W_j‖²` (keyed on
    the codes tensor's version), see base codes assigned after the first
    call (a checkpoint being loaded): nothing about the norm is baked in."""
    lora = randomize(qdora(mode))
    x = data(4)
    lora.predict_on_batch(x)  # traces (and compiles); caches on torch
    donor = float_model()
    kernel = donor.get_layer("d1").kernel
    kernel.assign(3.0 * to_numpy(kernel))  # other columns, other norms
    donor = quantize(donor, mode)
    layer = lora.get_layer("d1")
    for variable, value in zip(
        layer.layer.weights, donor.get_layer("d1").weights, strict=True
    ):
        variable.assign(to_numpy(value))
    expected, bound = reference_output(layer, x)
    got = to_numpy(layer(x)).astype(np.float64)
    assert np.all(np.abs(got - expected) <= RTOL * np.abs(expected) + 1e-6 + bound)
    np.testing.assert_allclose(
        lora.predict_on_batch(x), to_numpy(lora(x)), rtol=1e-5, atol=1e-6
    )
