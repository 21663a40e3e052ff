import functools
import gc
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# JAX compiles every eager op for each new shape: most of the JAX suite's
# time is XLA compiling tiny programs (a tiny ViT's family check makes about
# 190 compilations, 80% of its time). Without XLA's optimization passes they
# compile faster (measured, interleaved: 4 family checks and 4 int4 training
# tests took 101-105 s against 121-133 s). TensorFlow's `fit` compiles its
# steps with XLA too (`jit_compile="auto"`): the same two XLA options, read
# when XLA first compiles, took two files of `fit` tests from 39 to 32 s. The
# tests check behaviour, never XLA's speed (the benchmarks run in their own
# processes, with the default passes). The whole suite passes either way;
# KERAS_LORA_TEST_XLA_OPT=1 keeps the default passes.
FEWER_XLA_PASSES = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
if os.environ.get("KERAS_LORA_TEST_XLA_OPT") != "1":
    if keras.backend.backend() == "jax":
        import jax  # noqa: E402

        jax.config.update("jax_disable_most_optimizations", True)
    elif keras.backend.backend() == "tensorflow":
        flags = os.environ.get("XLA_FLAGS", "")
        if FEWER_XLA_PASSES not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {FEWER_XLA_PASSES}".strip()


def pytest_collection_finish(session):
    """Freezes what collection imported out of the garbage collector's sight.

    Keras calls `gc.collect()` whenever a layer deletes a variable attribute
    (`Layer.__delattr__`: every `quantize`d layer, every NF4 conversion) and
    in `clear_session`, and Python runs full collections on its own as
    objects pile up. Each full collection walks every object alive, and the
    imported TensorFlow, JAX, torch, KerasHub and transformers make 450,000
    to 700,000 of them: 0.5 to 0.7 s a collection, for nothing, since
    imported modules are never freed. `gc.freeze()` moves them to the
    permanent generation; objects the tests make are collected as before.
    KERAS_LORA_TEST_GC_FREEZE=0 turns it off.
    """
    if os.environ.get("KERAS_LORA_TEST_GC_FREEZE") != "0":
        gc.collect()
        gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After each test module (its module fixtures torn down), collects its
    garbage and freezes what is left alive: what earlier modules left (the
    caches of the package and its dependencies, each test module's own
    objects) would otherwise make every later collection slower again (in
    a whole TensorFlow run, `test_quantized_load.py`'s tests took 10 s each
    against 2.7 s in a run of the file alone). `tests/io` and that file on
    TensorFlow, back to back on a loaded machine: 285 s with one freeze
    after collection, 89 s with this one after each module too."""
    yield
    last_of_module = nextitem is None or nextitem.module is not item.module
    if last_of_module and os.environ.get("KERAS_LORA_TEST_GC_FREEZE") != "0":
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@functools.cache
def channels_first_conv_error():
    """Why a plain `keras.layers.Conv2D(data_format="channels_first")` cannot
    run eagerly on this backend and machine, or None where it runs.

    TensorFlow's CPU kernels take NCHW only through oneDNN, which TensorFlow
    enables on some CPUs and not on others; elsewhere Keras's own layer fails
    with `UnimplementedError`. So the question is asked of the plain layer,
    once per session, and never answered from the CPU's name.
    """
    layer = keras.layers.Conv2D(2, 1, data_format="channels_first", name="probe")
    try:
        layer(np.zeros((1, 2, 3, 3), "float32"))
    except Exception as e:  # whatever the backend raises, the layer cannot run
        return f"{type(e).__name__}: {_error_text(e)}"
    return None


def _error_text(error):
    """The backend's own message, without Keras's wrapper, colours or op names."""
    text = re.sub(r"\x1b\[[0-9;]*m|\{\{[^}]*\}\}", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered"):
        lines = lines[1:]
    return lines[0] if lines else repr(error)


@pytest.fixture
def channels_first_conv():
    """Skips the test where the plain channels_first Conv2D cannot run."""
    error = channels_first_conv_error()
    if error:
        pytest.skip(
            "the plain keras.layers.Conv2D(data_format='channels_first') cannot "
            f"run on this backend and machine: {error}"
        )


def backend():
    return keras.backend.backend()


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def mlp(input_dim=16, hidden=32, outputs=3, name="mlp"):
    """A small functional MLP: d1 -> d2 -> head."""
    inputs = keras.Input((input_dim,), name="x")
    x = keras.layers.Dense(hidden, activation="relu", name="d1")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="d2")(x)
    out = keras.layers.Dense(outputs, name="head")(x)
    return keras.Model(inputs, out, name=name)


def randomize_adapters(model, scale=0.1, seed=0):
    """Gives every adapter non-zero weights, so LoRA changes the output."""
    from keras_lora.model.surgery import lora_layers

    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        for w in (layer.lora_a, layer.lora_b):
            w.assign(rng.normal(0, scale, w.shape).astype(w.dtype))
    return model
