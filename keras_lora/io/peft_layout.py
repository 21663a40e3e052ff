"""PEFT's tensor layouts against Keras's, per kind of module.

- a Linear (our `Dense`): `lora_A.weight` `[r, in]` and `lora_B.weight`
  `[out, r]`, the transposes of our `lora_a` `(in, r)` and `lora_b`
  `(r, out)`;
- an Embedding: `lora_embedding_A` `[r, vocab]` and `lora_embedding_B`
  `[dim, r]`, again the transposes of ours;
- a Conv1d/2d/3d: `lora_A.weight` `[r, in, *kernel_size]` (our
  `(*kernel_size, in, r)`) and `lora_B.weight` `[out, r, 1, ...]` (our
  `(r, out)`), torch's conv layout against Keras's.
"""

import keras
import numpy as np

CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def keras_type_name(kind):
    if kind.startswith("Conv"):
        return kind[:-1] + "D"  # "Conv2d" -> "Conv2D"
    return {"Linear": "Dense", "Embedding": "Embedding"}[kind]


def keras_kind(layer):
    """The PEFT module kind matching a Keras base layer, or `None`."""
    if isinstance(layer, keras.layers.Dense):
        return "Linear"
    if isinstance(layer, keras.layers.Embedding):
        return "Embedding"
    if isinstance(layer, CONV_TYPES):
        return f"Conv{len(layer.kernel_size)}d"
    return None


def peft_kind(a):
    if a.ndim == 2:
        return "Linear"
    if a.ndim in (3, 4, 5):
        return f"Conv{a.ndim - 2}d"
    return None


def check_keras_layer(layer, path, function):
    kind = keras_kind(layer)
    if kind is None:
        raise ValueError(
            f"{function}: PEFT interop covers Dense, Embedding and "
            f"Conv1D/2D/3D layers; layer '{path}' is a {type(layer).__name__}."
        )
    if kind.startswith("Conv") and any(d != 1 for d in layer.dilation_rate):
        raise ValueError(
            f"{function}: layer '{path}' is a dilated convolution "
            f"(dilation_rate={layer.dilation_rate}). PEFT applies lora_A "
            "without dilation and keras_lora with it, so the outputs would "
            "differ; PEFT interop supports dilation 1 only."
        )


def tensor_names(kind):
    if kind == "Embedding":
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A.weight", "lora_B.weight")


def to_keras_layout(kind, a, b):
    """PEFT's A, B -> our `lora_a`, `lora_b`."""
    if kind.startswith("Conv"):
        a = np.transpose(a, (*range(2, a.ndim), 1, 0))  # [r, in, *k] -> (*k, in, r)
        b = b.reshape(b.shape[:2]).T  # [out, r, 1, ...] -> (r, out)
    else:
        a, b = a.T, b.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def to_peft_layout(kind, a, b):
    """Our `lora_a`, `lora_b` -> PEFT's A, B."""
    if kind.startswith("Conv"):
        spatial = a.ndim - 2
        a = np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(spatial)))
        b = b.T.reshape(b.shape[1], b.shape[0], *(1,) * spatial)
    else:
        a, b = a.T, b.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)
