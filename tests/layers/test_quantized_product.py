"""The lean quantized product (`layers.quantized_product`) and
`lean_quantized`: the same outputs and input gradients as Keras's own
int8/int4 calls, and no kernel-sized float tensor kept for the backward
pass.

Every case is checked three ways: against Keras's quantized call of the
same layer (the lean product runs the same ops in the same order), against
a NumPy float64 reference built from the dequantized kernel, and, for the
gradient with respect to the inputs, against the backend's own autodiff
through Keras's call (`jax.vjp`, `tf.GradientTape`, `torch.autograd`).
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_lora as kl
from keras_lora.layers import quantized, quantized_product
from keras_lora.model import quantized_bases

BACKEND = keras.backend.backend()
EPS32 = np.finfo("float32").eps

# (mode, int4 block size): int8, int4 with one scale per output unit, and
# int4 with a scale and zero point per group of 8 input rows.
MODES = [("int8", None), ("int4", -1), ("int4", 8)]
MODE_IDS = ["int8", "int4_per_channel", "int4_b8"]

IN, OUT, VOCAB = 16, 12, 20


def quantize(layer, mode, block):
    config = None
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=block)
    layer.quantize(mode, config=config)
    return layer


def dense(mode, block, epilogue):
    keras.utils.set_random_seed(1)
    if epilogue:
        layer = keras.layers.Dense(OUT, activation="tanh", bias_initializer="he_normal")
    else:
        layer = keras.layers.Dense(OUT, use_bias=False)
    layer.build((None, IN))
    return quantize(layer, mode, block), (3, IN), {}


def einsum_2d(mode, block, epilogue):
    keras.utils.set_random_seed(2)
    layer = keras.layers.EinsumDense(
        "ab,bc->ac", output_shape=OUT, bias_axes="c" if epilogue else None
    )
    layer.build((None, IN))
    return quantize(layer, mode, block), (3, IN), {}


def einsum_attention(mode, block, epilogue):
    """A query projection: (batch, seq, hidden) -> (batch, seq, heads, dim)."""
    keras.utils.set_random_seed(3)
    layer = keras.layers.EinsumDense(
        "abc,cde->abde",
        output_shape=(None, 2, 6),
        bias_axes="de" if epilogue else None,
    )
    layer.build((None, 5, IN))
    return quantize(layer, mode, block), (2, 5, IN), {}


def reverse_embedding(tied, cap):
    def make(mode, block, epilogue):
        keras.utils.set_random_seed(4)
        layer = keras.layers.ReversibleEmbedding(
            VOCAB, IN, tie_weights=tied, logit_soft_cap=cap
        )
        layer.build((None, 5))
        return quantize(layer, mode, block), (2, 5, IN), {"reverse": True}

    return make


LAYERS = {
    "dense": (dense, False),
    "dense_bias_tanh": (dense, True),
    "einsum_ab": (einsum_2d, False),
    "einsum_ab_bias": (einsum_2d, True),
    "einsum_attention": (einsum_attention, True),
    "reverse_tied": (reverse_embedding(True, None), False),
    "reverse_untied": (reverse_embedding(False, None), False),
    "reverse_tied_cap": (reverse_embedding(True, 3.0), False),
    "reverse_untied_cap": (reverse_embedding(False, 3.0), False),
}


def make(name, mode, block):
    builder, epilogue = LAYERS[name]
    return builder(mode, block, epilogue)


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# ----- the backend's own autodiff ---------------------------------------------


def vjp(f, x, dy_seed=1):
    """`(f(x), dy·∂f/∂x)` by the backend's autodiff, `dy` a fixed random
    cotangent (not all ones: a transposition error shows)."""
    if BACKEND == "jax":
        import jax

        y, pullback = jax.vjp(f, keras.ops.convert_to_tensor(x))
        dy = inputs(y.shape, dy_seed)
        return to_numpy(y), to_numpy(pullback(keras.ops.convert_to_tensor(dy))[0])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        dy = tf.constant(inputs(tuple(y.shape), dy_seed))
        return to_numpy(y), to_numpy(tape.gradient(y, x, output_gradients=dy))
    import torch

    x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
    y = f(x)
    dy = keras.ops.convert_to_tensor(inputs(tuple(y.shape), dy_seed))
    (dx,) = torch.autograd.grad(y, x, grad_outputs=dy)
    return to_numpy(y), to_numpy(dx)


def keras_call(layer, kwargs):
    """Keras's own quantized call of `layer`, whatever `lean_quantized` set."""
    return lambda x: type(layer).quantized_call(layer, x, **kwargs)


def lean_call(layer, kwargs):
    """The call `lean_quantized` gives `layer`."""
    return lambda x: quantized_bases._lean_quantized_call(layer, x, **kwargs)


# ----- the NumPy reference ----------------------------------------------------


def reference(layer, x, kwargs):
    """`(y, |x|·|W|, W)` in float64: the layer's output from its dequantized
    kernel (and Keras's input quantization, where the layer has one), the
    magnitudes that bound float32 rounding, and the kernel as `x` meets it
    (for the gradient)."""
    x_eff = np.asarray(x, "float64")
    if getattr(layer, "inputs_quantizer", None):  # int8: x -> q/scale first
        axis = getattr(layer, "quantization_axis", -1)
        if isinstance(layer, keras.layers.Embedding):
            q, s = layer.inputs_quantizer(keras.ops.convert_to_tensor(x))
        else:
            q, s = layer.inputs_quantizer(keras.ops.convert_to_tensor(x), axis=axis)
            if isinstance(layer, keras.layers.EinsumDense):
                s = layer._adjust_scale_for_quant(s, "input")
        q, s = to_numpy(q).astype("float64"), to_numpy(s).astype("float64")
        x_eff = q / s.reshape(q.shape[:-1] + (1,))  # one scale per row
    if isinstance(layer, keras.layers.Embedding):
        table = to_numpy(
            quantized.dequantized_kernel(layer, reverse=not layer.tie_weights)
        ).astype("float64")
        kernel = table.T if layer.tie_weights else table  # (IN, VOCAB)
        y = x_eff @ kernel
        bound = np.abs(x_eff) @ np.abs(kernel)
        cap = layer.logit_soft_cap
        if cap is not None:
            y = np.tanh(y / cap) * cap
        return y, bound, kernel
    kernel = to_numpy(quantized.dequantized_kernel(layer)).astype("float64")
    if isinstance(layer, keras.layers.EinsumDense):
        equation = layer.equation
        y = np.einsum(equation, x_eff, kernel)
        bound = np.einsum(equation, np.abs(x_eff), np.abs(kernel))
    else:
        y, bound = x_eff @ kernel, np.abs(x_eff) @ np.abs(kernel)
    if layer.bias is not None:
        y = y + to_numpy(layer.bias)
        bound = bound + np.abs(to_numpy(layer.bias))
    if (
        layer.activation is not None
        and layer.activation is not keras.activations.linear
    ):
        y = np.tanh(y)  # the only activation used here
    return y, bound, kernel


def rounding_tolerance(bound, y):
    """Float32 against float64: each of the `IN` products and sums of a
    dot product rounds once (`IN·eps·Σ|x||w|`), the dequantization, the
    bias, the output scale and tanh a few ulps more; 4x margin."""
    return 4 * (IN + 4) * EPS32 * (bound + np.abs(y))


# ----- (a) outputs, (b) input gradients, per layer ----------------------------


@pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_outputs_and_input_gradients_equal_keras_and_numpy(name, mode, block):
    layer, shape, kwargs = make(name, mode, block)
    assert quantized_product.applies(layer, reverse=bool(kwargs))
    x = inputs(shape)

    # Op by op, the lean call runs Keras's ops: bitwise the same.
    want = to_numpy(keras_call(layer, kwargs)(keras.ops.convert_to_tensor(x)))
    got = to_numpy(lean_call(layer, kwargs)(keras.ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(got, want)

    # Differentiated: the lean product's own forward (tied to x) and
    # backward, against autodiff through Keras's call.
    y_keras, dx_keras = vjp(keras_call(layer, kwargs), x)
    y_lean, dx_lean = vjp(lean_call(layer, kwargs), x)
    np.testing.assert_array_equal(y_lean, y_keras)
    # Both compute dx = dy·W_deqᵀ from the same dequantized kernel; with a
    # soft cap or tanh, dy first goes through the same elementwise
    # derivative. Keras's autodiff may transpose the kernel, or the product,
    # differently (an einsum's transposed equation, the matmul's operand
    # order), so sums can be reassociated: float32 rounding of dot
    # products of IN terms of order 1.
    if not (mode == "int8" and isinstance(layer, keras.layers.Embedding)):
        np.testing.assert_allclose(dx_lean, dx_keras, rtol=1e-5, atol=1e-5)
    # else: a Keras bug (3.15). Keras's int8 reverse call quantizes the
    # inputs (`round`) with no custom gradient, so autodiff gives dx = 0
    # except through the max-abs scale; its int8 Dense and EinsumDense pass
    # the gradient straight through the input quantization, and so does
    # the lean product for all of them. Checked against NumPy below.

    # The NumPy reference (float64).
    y_ref, bound, kernel = reference(layer, x, kwargs)
    np.testing.assert_array_less(
        np.abs(y_lean - y_ref), rounding_tolerance(bound, y_ref)
    )
    # dx = (dy·f'(z))·Wᵀ (straight through Keras's input quantization, as
    # Keras's own gradient), f' the derivative of tanh or the soft cap.
    dy = inputs(y_ref.shape, 1).astype("float64")
    if isinstance(layer, keras.layers.Embedding) and layer.logit_soft_cap:
        dy = dy * (1 - (y_ref / layer.logit_soft_cap) ** 2)
    elif getattr(layer, "activation", None) is keras.activations.tanh:
        dy = dy * (1 - y_ref**2)
    if isinstance(layer, keras.layers.EinsumDense):
        dx_ref = np.einsum(layer._custom_gradient_equation, dy, kernel)
        dx_bound = np.einsum(
            layer._custom_gradient_equation, np.abs(dy), np.abs(kernel)
        )
    else:
        dx_ref, dx_bound = dy @ kernel.T, np.abs(dy) @ np.abs(kernel.T)
    # The derivative itself is computed in float32 from the float32 y.
    np.testing.assert_array_less(
        np.abs(dx_lean - dx_ref), rounding_tolerance(dx_bound, dx_ref) + 1e-6
    )


@pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)
def test_product_is_the_kernel_product_before_the_epilogue(mode, block):
    layer, shape, _ = make("dense_bias_tanh", mode, block)
    x = inputs(shape)
    y = to_numpy(quantized_product.product(layer, keras.ops.convert_to_tensor(x)))
    full = to_numpy(layer(x))
    bias = to_numpy(layer.bias)
    np.testing.assert_allclose(np.tanh(y + bias), full, rtol=1e-6, atol=1e-6)


# ----- (b) through a model with lean_quantized ---------------------------------


def tiny_model(mode, block, seed=0):
    """Dense -> attention-like EinsumDense -> Dense -> tied LM head, on the
    embeddings (the lookup has no kernel-sized backward)."""
    keras.utils.set_random_seed(seed)
    embedding = keras.layers.ReversibleEmbedding(VOCAB, IN, name="embed")
    embedding.build((None, 5))
    hidden = keras.Input((5, IN))
    h = keras.layers.Dense(IN, activation="tanh", name="up")(hidden)
    q = keras.layers.EinsumDense(
        "abc,cde->abde", output_shape=(None, 2, 8), bias_axes="de", name="query"
    )(h)
    h = keras.layers.Reshape((5, IN))(q)
    h = keras.layers.Dense(IN, name="down")(h)
    model = keras.Model(hidden, embedding(h, reverse=True))
    if mode is not None:
        quantize_model(model, mode, block)
    return model


def quantize_model(model, mode, block):
    config = None
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=block)
    model.quantize(mode, config=config)


class CountProducts:
    """Counts `quantized_product.product` calls while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = quantized_product.product

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(quantized_product, "product", counting)


@pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)
def test_a_lean_model_equals_keras_in_outputs_and_gradients(mode, block, monkeypatch):
    model = tiny_model(mode, block)
    if mode == "int8":
        # Keras's int8 LM head passes no gradient through its input
        # quantization (a Keras bug, see above): up to the head.
        model = keras.Model(model.input, model.get_layer("down").output)
    x = inputs((2, 5, IN))
    counter = CountProducts(monkeypatch)
    y_keras, dx_keras = vjp(model, x)
    assert counter.calls == 0
    assert kl.lean_quantized(model) is model
    y_lean, dx_lean = vjp(model, x)
    # up, query, down and (int4) the LM head: a product each.
    assert counter.calls >= (3 if mode == "int8" else 4)
    np.testing.assert_array_equal(y_lean, y_keras)
    # As for one layer: the same dequantized kernels, sums maybe reassociated.
    np.testing.assert_allclose(dx_lean, dx_keras, rtol=1e-5, atol=1e-5)


def test_lean_quantized_is_idempotent_and_leaves_other_calls_to_keras(monkeypatch):
    inputs_ = keras.Input((IN,))
    names = ["float", "float8", "int8_lora", "int8", "int4"]
    h = inputs_
    for name in names:
        h = keras.layers.Dense(IN, name=name)(h)
    model = keras.Model(inputs_, h)
    model.get_layer("float8").quantize("float8")
    model.get_layer("int8_lora").quantize("int8")
    model.get_layer("int8_lora").enable_lora(2)
    model.get_layer("int8").quantize("int8")
    model.get_layer("int4").quantize("int4")
    x = inputs((2, IN))
    want = to_numpy(model(x))

    assert kl.lean_quantized(model) is model
    calls = {n: model.get_layer(n).__dict__.get("quantized_call") for n in names}
    assert kl.lean_quantized(model) is model  # again: the same calls kept
    assert {n: model.get_layer(n).__dict__.get("quantized_call") for n in names} == (
        calls
    )
    counter = CountProducts(monkeypatch)
    np.testing.assert_array_equal(to_numpy(model(x)), want)
    # Only the plain int8 and int4 layers compute the lean product.
    assert counter.calls == 2
    for name in ("float", "float8", "int8_lora"):
        assert not quantized_product.applies(model.get_layer(name)), name


def test_a_lean_model_round_trips_through_a_keras_file(tmp_path):
    model = kl.lean_quantized(tiny_model("int4", 8))
    tokens = inputs((2, 5, IN))
    want = to_numpy(model(tokens))
    path = str(tmp_path / "lean.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(tokens)), want)
    # The override is not part of the file: loaded layers have Keras's call
    # until `lean_quantized` is called again (documented).
    assert not any(quantized_bases.is_lean(layer) for layer in loaded._flatten_layers())
    kl.lean_quantized(loaded)
    assert quantized_bases.is_lean(loaded.get_layer("up"))
    np.testing.assert_array_equal(to_numpy(loaded(tokens)), want)


# ----- (c) memory: no kernel-sized float tensor kept --------------------------
# JAX: XLA's compiled temporaries of a jitted gradient. torch: what the
# autograd graph keeps. TensorFlow has no cheap, stable view of either
# (eager tapes keep whatever the custom gradient's closure holds, and
# tf.function's memory is the runtime allocator's), and its tie is a plain
# control dependency: the equality tests above are what TensorFlow gets.

DEPTH, WIDTH = 6, 512
KERNEL_BYTES = WIDTH * WIDTH * 4  # one float32 kernel


def int4_stack(block):
    keras.utils.set_random_seed(0)
    inputs_ = keras.Input((WIDTH,))
    h = inputs_
    for i in range(DEPTH):
        h = keras.layers.Dense(WIDTH, activation="tanh", name=f"d{i}")(h)
    model = keras.Model(inputs_, h)
    quantize_model(model, "int4", block)
    return model


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's buffer assignment: JAX")
@pytest.mark.parametrize("block", [128, -1], ids=["b128", "per_channel"])
def test_jax_gradient_temporaries_hold_no_float_kernels(block):
    import jax

    model = int4_stack(block)
    x = keras.ops.convert_to_tensor(inputs((4, WIDTH)))
    dy = keras.ops.convert_to_tensor(inputs((4, WIDTH), 1))

    def temp_bytes():
        def loss(variables, x):
            y, _ = model.stateless_call(trainable, variables, x)
            return keras.ops.sum(y * dy)

        trainable = [v.value for v in model.trainable_variables]  # biases
        variables = [v.value for v in model.non_trainable_variables]
        compiled = jax.jit(jax.grad(loss, argnums=1)).lower(variables, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    keras_bytes = temp_bytes()
    kl.lean_quantized(model)
    lean_bytes = temp_bytes()
    # Measured (jax 0.10.2 on CPU, Keras 3.15), in float kernels of 1 MiB:
    # Keras 6.05 (block 128, Keras's default) and 12.26 (per-channel):
    # every layer's dequantized kernel alive at once; lean 1.05 for both
    # (one kernel at a time, plus the activations).
    assert lean_bytes < 2 * KERNEL_BYTES, lean_bytes
    # The measurement sees the kernels (else the bound above proves
    # nothing): Keras's own path holds most of them at once.
    assert keras_bytes > 4 * KERNEL_BYTES, keras_bytes


def kept_for_backward(output):
    """Every tensor the autograd graph of `output` keeps for the backward
    pass: the saved tensors of each node, and for custom `Function`s the
    tensors their context holds, also inside closures (Keras's custom
    gradients keep theirs in `ctx.grad_fn`'s closure)."""
    import torch

    found, seen, nodes = [], set(), [output.grad_fn]

    def collect(value, depth=0):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item, depth)
        elif callable(value) and depth < 3:
            for cell in getattr(value, "__closure__", None) or ():
                try:
                    collect(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass

    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                collect(getattr(node, name))
        if hasattr(node, "saved_tensors"):  # a custom Function's context
            collect(node.saved_tensors)
            for value in vars(node).values() if hasattr(node, "__dict__") else ():
                collect(value)
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.skipif(BACKEND != "torch", reason="torch's autograd graph")
@pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)
def test_torch_backward_keeps_no_kernel_sized_tensor(mode, block):
    """Between the forward and the backward pass the lean product keeps the
    layers' own variables (packed codes, scales) and nothing kernel-sized
    besides; Keras's int4 calls keep each layer's unpacked int8 kernel in
    their gradient's closure (2x the packed codes, per layer)."""
    keras.utils.set_random_seed(0)
    width = 64
    inputs_ = keras.Input((width,))
    h = keras.layers.Dense(width, name="d0")(inputs_)
    h = keras.layers.Dense(width, name="d1")(h)
    model = keras.Model(inputs_, h)
    quantize_model(model, mode, block)
    x = keras.ops.convert_to_tensor(inputs((2, width)))
    variables = {v.value.data_ptr() for v in model.weights}

    def kernel_sized():
        y = model(x.detach().requires_grad_(True))
        kept = kept_for_backward(y)
        assert kept  # the walk sees the graph's tensors
        return [
            (t.dtype, tuple(t.shape))
            for t in kept
            if t.numel() >= width * width and t.data_ptr() not in variables
        ]

    keras_kept = kernel_sized()
    kl.lean_quantized(model)
    assert kernel_sized() == []
    if mode == "int4":  # the walk finds what Keras keeps: the test can fail
        assert len(keras_kept) == 2, keras_kept
    else:  # Keras's int8 call keeps its variables only
        assert keras_kept == []


# ----- the reverse product in vocabulary chunks ------------------------------


@pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reverse_product_in_vocabulary_chunks_equals_keras(
    tied, mode, block, monkeypatch
):
    # A table larger than `vocabulary_chunk` is dequantized a chunk of rows
    # at a time: 3 rows a chunk here, 7 chunks of the 20, the last short.
    layer, shape, kwargs = reverse_embedding(tied, None)(mode, block, False)
    monkeypatch.setattr(quantized_product, "vocabulary_chunk", 3 * IN * 4)
    plan = quantized_product._Plan(layer, reverse=True)
    params = quantized.kernel_params(layer, reverse=True)
    assert len(plan._vocabulary_chunks(params)) == 7
    x = inputs(shape)
    y_keras, dx_keras = vjp(keras_call(layer, kwargs), x)
    y_lean, dx_lean = vjp(lean_call(layer, kwargs), x)
    # Each logit is the same dot product as Keras's (float32 rounding of IN
    # terms of order 1 if the matmul blocks it otherwise); dx sums the
    # chunks' products, a reassociation of the same sums.
    np.testing.assert_allclose(y_lean, y_keras, rtol=1e-5, atol=1e-5)
    if mode != "int8":  # Keras's int8 reverse gradient: see above
        np.testing.assert_allclose(dx_lean, dx_keras, rtol=1e-5, atol=1e-5)
    y_ref, _, kernel = reference(layer, x, kwargs)
    dy = inputs(y_ref.shape, 1).astype("float64")
    np.testing.assert_allclose(dx_lean, dy @ kernel.T, rtol=1e-4, atol=1e-4)
    if BACKEND == "jax":  # traced: the chunks' ties under jit
        import jax

        jitted = jax.jit(lean_call(layer, kwargs))
        y_jit, dx_jit = vjp(jitted, x)
        np.testing.assert_allclose(y_jit, y_lean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx_jit, dx_lean, rtol=1e-5, atol=1e-5)
