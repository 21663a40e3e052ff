"""Hot-swapping compiles nothing on JAX: XLA compilations are counted, not
only Python traces (a jit cache miss from a changed argument placement
recompiles without retracing the Python function)."""

import contextlib
import logging

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters

import keras_lora as kl

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA compilations of jitted steps are a JAX notion; TensorFlow and "
    "torch count retraces in tests/io/test_hotswap_files.py",
)

X = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
Y = np.zeros((8, 3), "float32")


class _Compilations(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.names.append(message.split(" of ", 1)[1].split(" in ")[0])


@contextlib.contextmanager
def counting_compilations():
    import jax

    handler = _Compilations()
    logger = logging.getLogger("jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield handler.names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def tenant_files(tmp_path, base):
    paths = []
    for i, (rank, alpha) in enumerate(((2, 4.0), (8, 2.0), (4, 4.0))):
        tenant = kl.apply_lora(base, rank=rank, alpha=alpha)
        randomize_adapters(tenant, scale=0.2, seed=i)
        path = str(tmp_path / f"tenant_{i}.safetensors")
        kl.save_adapter(tenant, path)
        paths.append(path)
    return paths


def test_swaps_compile_neither_predict_nor_train_step(tmp_path):
    base = mlp()
    paths = tenant_files(tmp_path, base)
    served = kl.apply_lora(base, rank=2)
    kl.prepare_hotswap(served, max_rank=8)
    served.compile(optimizer="adam", loss="mse")
    served.predict(X, verbose=0)
    served.train_on_batch(X, Y)
    with counting_compilations() as compiled:
        for path in paths + paths:
            kl.hotswap_adapter(served, path)
            out = served.predict(X, verbose=0)
            served.train_on_batch(X, Y)
    assert not [name for name in compiled if "step" in name], compiled
    # The swaps did take effect: the last one equals a fresh load.
    fresh = kl.load_adapter(base, paths[-1])
    np.testing.assert_allclose(out, fresh.predict(X, verbose=0), atol=1e-5)


def test_swaps_compile_no_generate_step(tmp_path):
    from tiny_kerashub import gpt2_causal_lm

    causal_lm = gpt2_causal_lm()
    paths = []
    for i in range(2):
        tenant = gpt2_causal_lm()
        kl.apply_lora(tenant, targets=["query", "value"], rank=2 + 2 * i, in_place=True)
        randomize_adapters(tenant, scale=0.2, seed=i)
        path = str(tmp_path / f"gpt2_{i}.safetensors")
        kl.save_adapter(tenant, path)
        paths.append(path)
    kl.apply_lora(causal_lm, targets=["query", "value"], rank=2, in_place=True)
    kl.prepare_hotswap(causal_lm, max_rank=4)
    causal_lm.compile(sampler="greedy")
    causal_lm.generate("a b", max_length=8)
    outputs = []
    with counting_compilations() as compiled:
        for path in paths + paths:
            kl.hotswap_adapter(causal_lm, path)
            outputs.append(causal_lm.generate("a b", max_length=8))
    assert not [name for name in compiled if "generate" in name], compiled
    assert outputs[:2] == outputs[2:]
