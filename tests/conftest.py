import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


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
    from keras_lora.surgery import lora_layers

    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        for w in (layer.lora_a, layer.lora_b):
            w.assign(rng.normal(0, scale, w.shape).astype(w.dtype))
    return model
