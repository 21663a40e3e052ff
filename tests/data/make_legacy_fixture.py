"""Writes `legacy_einsum_lora.keras`, `legacy_einsum_lora.npz` and the
adapter file `legacy_einsum_adapter.safetensors` (keras_lora format).

Run once with the code of commit f11f28d (before `LoRAEinsumDense` had a
`factoring` option, when every file held Keras core's factoring), from the
repository root: `KERAS_BACKEND=jax python tests/data/make_legacy_fixture.py`.
The files are committed; `tests/layers/test_einsum_factoring.py` checks that they
still load to the same outputs. Rerunning this with newer code would write
the new default factoring instead, so do not regenerate them.
"""

import os

import keras
import numpy as np

import keras_lora as kl

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 5), name="proj")(x)
    model = keras.Model(inputs, x)
    lora = kl.apply_lora(model, rank=2, targets=["query", "value", "proj"])
    rng = np.random.default_rng(0)
    for variable in lora.weights:
        if "lora_b" in variable.path:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    sample = rng.normal(size=(2, 3, 8)).astype("float32")
    expected = keras.ops.convert_to_numpy(lora(sample))
    lora.save(os.path.join(HERE, "legacy_einsum_lora.keras"))
    kl.save_adapter(lora, os.path.join(HERE, "legacy_einsum_adapter.safetensors"))
    shapes = {v.path: np.array(v.shape) for v in lora.weights if "lora_" in v.path}
    np.savez(
        os.path.join(HERE, "legacy_einsum_lora.npz"),
        sample=sample,
        expected=expected,
        **{f"shape:{k}": v for k, v in shapes.items()},
    )


if __name__ == "__main__":
    main()
