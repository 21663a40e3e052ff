"""The performance contract: a LoRA training step never forms `W + s·A·B`.

We trace one forward+backward pass of a layer with the backend's own tools
and look for any computed tensor shaped like the kernel `(in, out)`. With
`in`, `out`, batch and rank all different, only a merged kernel or a full
kernel gradient has that shape. Keras core's `enable_lora` is traced the
same way as a control: it must be caught, or the detector proves nothing.
"""

import keras
import numpy as np
from conftest import backend

import keras_lora as kl

IN, OUT, RANK, BATCH = 24, 40, 4, 8


def keras_lora_layer():
    dense = keras.layers.Dense(OUT)
    dense.build((None, IN))
    return kl.LoRADense(dense, rank=RANK, alpha=8)


def core_lora_layer():
    dense = keras.layers.Dense(OUT)
    dense.build((None, IN))
    dense.enable_lora(RANK)
    return dense


def kernel_shaped_tensors(layer):
    """Shapes of computed tensors equal to `(IN, OUT)` in a training step."""
    x = np.random.default_rng(0).normal(size=(BATCH, IN)).astype("float32")
    return {"jax": _jax, "tensorflow": _tensorflow, "torch": _torch}[backend()](
        layer, x
    )


def _jax(layer, x):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, frozen):
        out, _ = layer.stateless_call(trainable, frozen, x)
        return (out**2).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, frozen)
    return [
        var.aval.shape
        for eqn in _all_eqns(jaxpr.jaxpr)
        for var in eqn.outvars
        if tuple(var.aval.shape) == (IN, OUT)
    ]


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                yield from _all_eqns(getattr(inner, "jaxpr", inner))


def _tensorflow(layer, x):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, layer.trainable_variables)

    graph = step.get_concrete_function(tf.constant(x)).graph
    # The tape also emits gradients nobody asked for (the frozen kernel's);
    # Grappler prunes them before running. Count only what the result needs.
    needed, stack = set(), [t.op for t in graph.outputs]
    while stack:
        op = stack.pop()
        if op.name not in needed:
            needed.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    skip = {"ReadVariableOp", "Identity", "Const", "Placeholder"}
    return [
        tuple(t.shape)
        for op in graph.get_operations()
        if op.name in needed and op.type not in skip
        for t in op.outputs
        if tuple(t.shape) == (IN, OUT)
    ]


def _torch(layer, x):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            aliasing = func._schema.is_mutable or func.is_view
            name = func.__name__
            copy = name.startswith(("detach", "_to_copy", "clone", "lift"))
            if not (aliasing or copy):
                for t in out if isinstance(out, (list, tuple)) else [out]:
                    if isinstance(t, torch.Tensor) and tuple(t.shape) == (IN, OUT):
                        found.append((name, tuple(t.shape)))
            return out

    inputs = torch.tensor(x)
    with Record():
        loss = (layer(inputs) ** 2).sum()
        loss.backward()
    return found


def test_keras_lora_step_has_no_kernel_sized_tensor():
    assert kernel_shaped_tensors(keras_lora_layer()) == []


def test_detector_catches_keras_core_lora():
    assert kernel_shaped_tensors(core_lora_layer()) != []
