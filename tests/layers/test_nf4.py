"""NF4 bases (`kl.quantize_nf4`): storage, LoRA over them, merge, files."""

import gc

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import randomize_adapters, to_numpy
from keras.src import testing

import keras_lora as kl
from keras_lora.layers import nf4, quantized
from keras_lora.model.surgery import lora_layers

LEVELS = np.array(quantized.NF4_LEVELS, "float64")


def mlp(seed=0):
    """16 -> Dense 24 (relu) -> attention-like EinsumDense (4, 6) -> Dense 3."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    x = keras.layers.Dense(24, activation="relu", name="d1")(inputs)
    x = keras.layers.EinsumDense(
        "ab,bcd->acd", output_shape=(4, 6), bias_axes="cd", name="e1"
    )(x)
    x = keras.layers.Reshape((24,))(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def data(rows=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 16)).astype("float32")


def reference_nf4(kernel, block, double_quant):
    """NF4 of `kernel` in NumPy, written out independently: the nearest
    level of each value over its block's absmax, times the absmax (the
    double-quantized absmax where asked)."""
    flat = kernel.astype("float64").reshape(-1)
    pad = -flat.size % block
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    normalized = blocks / np.where(absmax > 0, absmax, 1)[:, None]
    codes = np.abs(normalized[..., None] - LEVELS).argmin(axis=-1)
    if double_quant:
        offset = absmax.astype("float32").mean(dtype="float32")
        centered = np.zeros(-(-absmax.size // 256) * 256)
        centered[: absmax.size] = absmax.astype("float32") - offset
        groups = centered.reshape(-1, 256)
        step = np.abs(groups).max(axis=1) / 127
        step = np.where(step > 0, step, 1)
        dq = np.round(groups / step[:, None]) * step[:, None]
        absmax = dq.reshape(-1)[: absmax.size] + offset
    values = LEVELS[codes] * absmax[:, None]
    return values.reshape(-1)[: flat.size].reshape(kernel.shape)


def nf4_variables(layer):
    return {v.name: to_numpy(v).copy() for v in layer.weights}


@pytest.mark.parametrize(
    "block_size,double_quant",
    [(64, False), (64, True), (8, False), (8, True)],
    ids=["b64", "b64-dq", "b8", "b8-dq"],
)
def test_storage_is_4_bit_and_dequantizes_as_the_paper(block_size, double_quant):
    model = mlp()
    kernels = {n: to_numpy(model.get_layer(n).kernel) for n in ("d1", "e1", "head")}
    assert kl.quantize_nf4(model, block_size, double_quant) is model
    for name, kernel in kernels.items():
        layer = model.get_layer(name)
        assert layer.quantization_mode == "nf4"
        codes = layer.nf4_codes
        # Two codes per byte; no float variable of a kernel's size is kept.
        blocks = -(-kernel.size // block_size)
        assert codes.dtype == "int8" and codes.shape == (blocks * block_size // 2,)
        for v in layer.weights:
            if "float" in str(v.dtype):
                assert np.prod(v.shape) < kernel.size, v.name
        assert not hasattr(layer, "_kernel")
        if keras.backend.backend() == "torch":  # nor a torch parameter
            assert not [k for k in model.torch_params if k.endswith("/kernel")]
        deq = to_numpy(quantized.dequantized_kernel(layer))
        assert deq.shape == kernel.shape
        # float32 NF4 vs a float64 reference: the same codes, values to
        # float32 rounding of `level·absmax`.
        want = reference_nf4(kernel, block_size, double_quant)
        np.testing.assert_allclose(deq, want, rtol=1e-6, atol=1e-7)


def test_b_zero_gives_the_nf4_base_exactly_and_training_keeps_it_frozen():
    model = kl.quantize_nf4(mlp(), block_size=8)
    x = data()
    base_out = to_numpy(model(x))
    lora = kl.apply_lora(model, targets=["d1", "e1"], rank=2)
    np.testing.assert_array_equal(to_numpy(lora(x)), base_out)
    assert {v.name for v in lora.trainable_weights} == {"lora_a", "lora_b"}
    before = {
        n: nf4_variables(lora.get_layer(n).layer if n != "head" else lora.get_layer(n))
        for n in ("d1", "e1", "head")
    }
    lora.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    lora.fit(x, np.ones((8, 3), "float32"), epochs=2, batch_size=4, verbose=0)
    for name, values in before.items():
        layer = lora.get_layer(name)
        layer = layer.layer if name != "head" else layer
        for key, value in nf4_variables(layer).items():
            np.testing.assert_array_equal(value, values[key], err_msg=key)
    assert not np.array_equal(to_numpy(lora(x)), base_out)  # B moved
    for _, layer in lora_layers(lora):  # B = 0 again: the NF4 base bitwise
        layer.lora_b.assign(np.zeros(layer.lora_b.shape, "float32"))
    np.testing.assert_array_equal(to_numpy(lora(x)), base_out)


def test_backward_through_nf4_layers_is_the_dequantized_kernels():
    # d1's adapter gets its gradient through e1 and head (NF4, their
    # backward the lean product's dy·W_deqᵀ): one SGD step equals the step
    # on a float model holding the dequantized kernels.
    model = kl.quantize_nf4(mlp(), block_size=8)
    twin = mlp(seed=5)
    for name in ("d1", "e1", "head"):
        layer = model.get_layer(name)
        twin.get_layer(name).kernel.assign(
            to_numpy(quantized.dequantized_kernel(layer))
        )
        twin.get_layer(name).bias.assign(to_numpy(layer.bias))
    x, y = data(), np.ones((8, 3), "float32")
    updated = []
    for m in (model, twin):
        lora = randomize_adapters(kl.apply_lora(m, targets=["d1"], rank=2), seed=3)
        lora.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        lora.train_on_batch(x, y)
        updated.append(to_numpy(lora.get_layer("d1").lora_a))
    # float32 sums in another order (dequantized kernel vs stored one).
    np.testing.assert_allclose(updated[0], updated[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_merge_gives_dequantized_plus_delta_and_requantize_gives_nf4(double_quant):
    model = kl.quantize_nf4(mlp(), block_size=8, double_quant=double_quant)
    lora = randomize_adapters(kl.apply_lora(model, targets=["d1", "e1"], rank=2))
    x = data()
    merged = kl.merge_lora(lora)
    for name in ("d1", "e1"):
        layer = lora.get_layer(name)
        plain = merged.get_layer(name)
        assert type(plain) in (keras.layers.Dense, keras.layers.EinsumDense)
        assert plain.quantization_mode is None
        want = to_numpy(quantized.dequantized_kernel(layer.layer)) + to_numpy(
            layer.delta()
        )
        np.testing.assert_allclose(to_numpy(plain.kernel), want, atol=1e-6)
    assert merged.get_layer("head").quantization_mode == "nf4"  # no adapter
    # float32 products summed in another order
    np.testing.assert_allclose(to_numpy(merged(x)), to_numpy(lora(x)), atol=1e-5)
    again = kl.merge_lora(lora, requantize=True)
    for name in ("d1", "e1"):
        layer = again.get_layer(name)
        assert isinstance(layer, nf4.NF4Storage)
        assert (layer.nf4_block_size, layer.nf4_double_quant) == (8, double_quant)
        float_kernel = to_numpy(merged.get_layer(name).kernel)
        np.testing.assert_allclose(
            to_numpy(quantized.dequantized_kernel(layer)),
            reference_nf4(float_kernel, 8, double_quant),
            rtol=1e-6,
            atol=1e-7,
        )


@pytest.mark.parametrize(
    "source",
    ["float", "int4", "nf4"],
)
def test_adapter_files_move_between_float_nf4_and_int4(tmp_path, source):
    def base(kind):
        model = mlp()  # the same float weights each time (seed 0)
        if kind == "nf4":
            kl.quantize_nf4(model, block_size=8)
        elif kind == "int4":
            for name in ("d1", "e1", "head"):
                model.get_layer(name).quantize(
                    "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8)
                )
        return kl.apply_lora(model, targets=["d1", "e1"], rank=2)

    saved = randomize_adapters(base(source), seed=7)
    kl.save_adapter(saved, tmp_path / "adapter")
    for target in {"float", "nf4", "int4"} - {source}:
        loaded = kl.load_adapter(base(target), tmp_path / "adapter")
        for name in ("d1", "e1"):
            for factor in ("lora_a", "lora_b"):
                np.testing.assert_array_equal(
                    to_numpy(getattr(loaded.get_layer(name), factor)),
                    to_numpy(getattr(saved.get_layer(name), factor)),
                )


@pytest.mark.parametrize("fmt", ["keras_lora", "peft"])
def test_adapter_file_from_nf4_loads_into_nf4_and_peft_file_anywhere(tmp_path, fmt):
    def base(kind):
        model = mlp()
        if kind == "nf4":
            kl.quantize_nf4(model, block_size=8)
        # PEFT's Linear covers a 2-D kernel: the EinsumDense stays out.
        return kl.apply_lora(model, targets=["d1", "head"], rank=2)

    saved = randomize_adapters(base("nf4"), seed=7)
    kl.save_adapter(saved, tmp_path / "adapter", format=fmt)
    targets = ["nf4", "float"] if fmt == "peft" else ["nf4"]
    for target in targets:
        loaded = kl.load_adapter(base(target), tmp_path / "adapter")
        for name in ("d1", "head"):
            for factor in ("lora_a", "lora_b"):
                np.testing.assert_array_equal(
                    to_numpy(getattr(loaded.get_layer(name), factor)),
                    to_numpy(getattr(saved.get_layer(name), factor)),
                )


def test_hot_swap_and_reversible_merge_over_nf4(tmp_path):
    def nf4_lora(rank, seed):
        model = kl.quantize_nf4(mlp(), block_size=8)
        lora = kl.apply_lora(model, targets=["d1", "e1"], rank=rank)
        return randomize_adapters(lora, seed=seed)

    x = data()
    kl.save_adapter(nf4_lora(4, seed=11), tmp_path / "r4.safetensors")
    plain = kl.quantize_nf4(mlp(), block_size=8)
    expected = to_numpy(kl.load_adapter(plain, tmp_path / "r4.safetensors")(x))
    model = kl.prepare_hotswap(nf4_lora(2, seed=5), 4)
    assert kl.hotswap_adapter(model, tmp_path / "r4.safetensors") is model
    # the padded rank-4 slots sum in another order
    np.testing.assert_allclose(to_numpy(model(x)), expected, atol=1e-6, rtol=0)
    before = to_numpy(model(x))
    kl.merge_lora(model, reversible=True)  # float kernel dequant + delta
    np.testing.assert_allclose(to_numpy(model(x)), before, atol=1e-5)
    kl.unmerge_lora(model)
    np.testing.assert_array_equal(to_numpy(model(x)), before)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_keras_file_round_trip_is_exact(tmp_path, double_quant):
    model = kl.quantize_nf4(mlp(), block_size=8, double_quant=double_quant)
    lora = randomize_adapters(kl.apply_lora(model, targets=["d1", "e1"], rank=2))
    lora.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = data()
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(lora(x)))
    for name in ("d1", "e1"):
        base = loaded.get_layer(name).layer
        assert isinstance(base, nf4.NF4Storage)
        assert base.nf4_double_quant is double_quant
        assert not hasattr(base, "_kernel")
    assert isinstance(loaded.get_layer("head"), nf4.NF4Dense)


def test_what_is_left_as_it_is():
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 8, name="emb")(inputs)
    x = keras.layers.Flatten()(embedded)
    x = keras.layers.Dense(6, name="int8")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))
    model.get_layer("int8").quantize("int8")
    kl.quantize_nf4(model, embeddings=False)
    assert model.get_layer("emb").quantization_mode is None
    assert model.get_layer("int8").quantization_mode == "int8"
    assert model.get_layer("d").quantization_mode == "nf4"
    # A block larger than the kernel: one padded block.
    assert model.get_layer("d").nf4_absmax.shape == (1,)


def test_conversion_collects_garbage_once_and_drops_the_float_kernels(monkeypatch):
    # Keras's `Layer.__delattr__` runs a full `gc.collect()` per deleted
    # variable (0.3-0.7 s each with TensorFlow imported): `quantize_nf4`
    # collects once for the whole model (a 6-block Llama: 14-18 s -> 2 s).
    model = mlp()
    calls = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or collect(*a))
    kl.quantize_nf4(model)
    assert len(calls) == 1
    names = [v.path for v in model.weights]
    assert not [n for n in names if n.endswith("/kernel")], names
    assert all(model.get_layer(n).quantization_mode == "nf4" for n in ("d1", "e1"))
    if keras.backend.backend() == "torch":  # no float kernel left as a parameter
        shapes = {tuple(p.shape) for p in model.get_layer("d1").parameters()}
        assert (16, 24) not in shapes


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"block_size": 0}, ValueError, r"`block_size` must be a positive even"),
        ({"block_size": 63}, ValueError, r"block_size=63"),
        ({"block_size": 64.0}, ValueError, r"block_size=64.0"),
        ({"block_size": True}, ValueError, r"block_size=True"),
        ({"double_quant": 1}, TypeError, r"`double_quant` must be a bool"),
        ({"double_quant": "yes"}, TypeError, r"double_quant='yes'"),
    ],
    ids=["block0", "block63", "block-float", "block-bool", "dq-int", "dq-str"],
)
def test_bad_arguments_raise_and_change_nothing(kwargs, error, match):
    model = mlp()
    before = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(error, match=match):
        kl.quantize_nf4(model, **kwargs)
    assert type(model.get_layer("d1")) is keras.layers.Dense
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match=r"quantize_nf4: `model` must be a keras.Model"):
        kl.quantize_nf4(keras.layers.Dense(3))
    lora = kl.apply_lora(mlp(), targets=["d1"], rank=2)
    with pytest.raises(ValueError, match=r"quantize_nf4: `model` has LoRA layers"):
        kl.quantize_nf4(lora)
    assert lora.get_layer("head").quantization_mode is None
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"quantize_nf4: model .* is not built"):
        kl.quantize_nf4(unbuilt)


WIDTH = 512
KERNEL_BYTES = WIDTH * WIDTH * 4


def nf4_stack(layers=6):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    h = inputs
    for i in range(layers):
        h = keras.layers.Dense(WIDTH, activation="tanh", name=f"d{i}")(h)
    return kl.quantize_nf4(keras.Model(inputs, h))


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="XLA's buffer assignment: JAX"
)
def test_jax_gradient_temporaries_hold_no_float_kernels(monkeypatch):
    # QLoRA's memory: dx through six NF4 layers keeps no dequantized kernel
    # for the backward pass (the lean product dequantizes again there).
    import jax

    from keras_lora.layers import quantized_product

    model = nf4_stack()
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(4, WIDTH)).astype("float32"))
    dy = keras.ops.convert_to_tensor(rng.normal(size=(4, WIDTH)).astype("float32"))

    def temp_bytes():
        def loss(variables, x):
            y, _ = model.stateless_call(trainable, variables, x)
            return keras.ops.sum(y * dy)

        trainable = [v.value for v in model.trainable_variables]  # biases
        variables = [v.value for v in model.non_trainable_variables]
        compiled = jax.jit(jax.grad(loss, argnums=1)).lower(variables, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    lean_bytes = temp_bytes()
    # The control: the same forward differentiated by JAX itself (no
    # written-out backward), which keeps each layer's dequantized kernel.
    monkeypatch.setattr(
        quantized_product, "_PRODUCT", lambda plan, x, params: plan.forward(x, params)
    )
    plain_bytes = temp_bytes()
    # Measured (jax on CPU, Keras 3.15), in float kernels of 1 MiB: lean
    # 1.29 (one kernel at a time, the lookup's index and the activations),
    # JAX's own differentiation 6.25 (every layer's kernel kept).
    assert lean_bytes < 2 * KERNEL_BYTES, lean_bytes / KERNEL_BYTES
    assert plain_bytes > 4 * KERNEL_BYTES, plain_bytes / KERNEL_BYTES


class NF4LayersHarnessTest(testing.TestCase):
    """Keras's layer harness (config round trip, symbolic and eager calls,
    weight counts, a training step, mixed precision) on the NF4 layers and
    on LoRA layers over them. Built from config, an NF4 layer's codes are
    zeros (level -1 · absmax 0): the harness checks structure, not values."""

    @parameterized.named_parameters(("plain", False, 2), ("dq", True, 4))
    def test_nf4_dense(self, double_quant, non_trainable):
        self.run_layer_test(
            nf4.NF4Dense,
            init_kwargs={"units": 5, "block_size": 4, "double_quant": double_quant},
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 5),
            expected_num_trainable_weights=1,  # the bias
            expected_num_non_trainable_weights=non_trainable,
            supports_masking=True,
        )

    @parameterized.named_parameters(("plain", False, 2), ("dq", True, 4))
    def test_nf4_einsum_dense(self, double_quant, non_trainable):
        self.run_layer_test(
            nf4.NF4EinsumDense,
            init_kwargs={
                "equation": "abc,cde->abde",
                "output_shape": (3, 2, 4),
                "bias_axes": "de",
                "block_size": 4,
                "double_quant": double_quant,
            },
            input_shape=(2, 3, 5),
            expected_output_shape=(2, 3, 2, 4),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=non_trainable,
        )

    def test_lora_dense_over_nf4(self):
        base = nf4.NF4Dense(5, block_size=4)
        base.build((None, 4))
        self.run_layer_test(
            kl.LoRADense,
            init_kwargs={"layer": base, "rank": 2},
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 5),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=3,  # codes, absmax, bias
            supports_masking=True,
            # The harness's mixed_float16 LoRA layer over this float32 base:
            # a quantized base computes in its own dtype (float32 out), as
            # LoRADense over a Keras int4 base does; NF4 layers built under
            # mixed precision pass the check (above).
            run_mixed_precision_check=False,
        )


def test_kerashub_llama3_over_nf4():
    # A KerasHub backbone is a Functional subclass: adapters go in in place.
    from tiny_kerashub import backbone, backbone_inputs

    model = backbone("llama3")
    kl.quantize_nf4(model, block_size=8)
    converted = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    assert converted and all(isinstance(la, nf4.NF4Storage) for la in converted)
    inputs = backbone_inputs(model)
    base_out = to_numpy(model(inputs))
    lora = kl.apply_lora(model, targets=["query", "value"], rank=2, in_place=True)
    np.testing.assert_array_equal(to_numpy(lora(inputs)), base_out)
    frozen = {id(v): to_numpy(v).copy() for la in converted for v in la.weights}
    lora.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    lora.fit(inputs, np.ones_like(base_out), epochs=1, batch_size=2, verbose=0)
    assert not np.array_equal(to_numpy(lora(inputs)), base_out)
    for la in converted:
        for v in la.weights:
            np.testing.assert_array_equal(to_numpy(v), frozen[id(v)], err_msg=v.path)


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("weights", ["normal", "student-t"])
def test_nf4_is_bitsandbytes_nf4_bitwise(block_size, weights):
    # bitsandbytes' own NF4 (QLoRA's quantizer, on CPU), of the same values
    # in the same flat order: the same absmax and the same dequantized
    # values, bitwise (double quantization differs by design: bitsandbytes
    # codes the absmax with an 8-bit float, docs/quantized.md). Rows are
    # whole blocks: bitsandbytes 0.50.2's CPU `dequantize_4bit` is wrong
    # when they are not (a (192, 96) tensor at block 64 comes back with
    # errors up to 0.57 of its largest value, against 0.11; its absmax
    # values, which equal ours, are right).
    import bitsandbytes.functional as bnb
    import torch

    rng = np.random.default_rng(3)
    shape = (96, 256)
    if weights == "normal":
        kernel = rng.normal(0, 0.02, shape)
    else:
        kernel = rng.standard_t(3, shape) * 0.02
    kernel = kernel.astype("float32")
    packed, state = bnb.quantize_4bit(
        torch.from_numpy(kernel), blocksize=block_size, quant_type="nf4"
    )
    want = bnb.dequantize_4bit(packed, state).numpy()
    values = nf4.quantize_array(kernel, block_size, False)
    np.testing.assert_array_equal(values["nf4_absmax"], state.absmax.numpy())
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(96)])
    layer = model.layers[0]  # its (256, 96) kernel holds the values, flat
    nf4.convert(layer, block_size, False, values)
    got = to_numpy(quantized.dequantized_kernel(layer)).reshape(shape)
    np.testing.assert_array_equal(got, want)
