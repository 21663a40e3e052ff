"""PEFT's tensor layouts against Keras's, per kind of module.

Which PEFT module kind a Keras layer corresponds to is the LoRA layer
type's to say (`LoRALayer.peft_kind`, `peft_refusal`, `kernel_axes`); this
module only moves tensors between the two layouts:

- a Linear: `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`, the
  transposes of our `lora_a` and `lora_b` flattened to `(in, r)` and
  `(r, out)` (a `Dense` is flat already; an `EinsumDense` kernel's input
  and output axes flatten in kernel order);
- an Embedding: `lora_embedding_A` `[r, vocab]` and `lora_embedding_B`
  `[dim, r]`, again the transposes of ours;
- a Conv1d/2d/3d: `lora_A.weight` `[r, in, *kernel_size]` (our
  `(*kernel_size, in, r)`) and `lora_B.weight` `[out, r, 1, ...]` (our
  `(r, out)`), torch's conv layout against Keras's.
"""

import numpy as np

from keras_lora.layers import lora_class_for


def keras_type_name(kind):
    if kind.startswith("Conv"):
        return kind[:-1] + "D"  # "Conv2d" -> "Conv2D"
    return {"Linear": "Dense", "Embedding": "Embedding"}[kind]


def keras_kind(layer):
    """The PEFT module kind matching a Keras base layer, or `None`."""
    cls = lora_class_for(layer)
    return None if cls is None else cls.peft_kind(layer)


def keras_shapes(layer, rank):
    """`(lora_a, lora_b)` shapes of base `layer` under the standard
    factoring, at `rank`."""
    cls = lora_class_for(layer)
    shape = tuple(cls.kernel_variable(layer).shape)
    in_axes, out_axes = cls.kernel_axes(layer)
    return (
        tuple(shape[i] for i in in_axes) + (rank,),
        (rank,) + tuple(shape[i] for i in out_axes),
    )


def peft_kind(a):
    if a.ndim == 2:
        return "Linear"
    if a.ndim in (3, 4, 5):
        return f"Conv{a.ndim - 2}d"
    return None


def check_keras_layer(layer, path, function):
    """Raises unless PEFT's LoRA of base `layer` is keras_lora's."""
    kind = keras_kind(layer)
    if kind is None:
        raise ValueError(
            f"{function}: layer '{path}' is a {type(layer).__name__}, whose "
            "LoRA has no PEFT counterpart. Save it in the 'keras_lora' "
            "format."
        )
    reason = lora_class_for(layer).peft_refusal(layer)
    if reason is not None:
        raise ValueError(f"{function}: layer '{path}' is {reason}.")


def tensor_names(kind):
    if kind == "Embedding":
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A.weight", "lora_B.weight")


def to_keras_layout(kind, a, b, shapes=None):
    """PEFT's A, B -> our `lora_a`, `lora_b` (of `shapes`, where given)."""
    if kind.startswith("Conv"):
        a = np.transpose(a, (*range(2, a.ndim), 1, 0))  # [r, in, *k] -> (*k, in, r)
        b = b.reshape(b.shape[:2]).T  # [out, r, 1, ...] -> (r, out)
    else:
        a, b = a.T, b.T
        if shapes is not None and a.size == np.prod(shapes[0]):
            a = a.reshape(shapes[0])
        if shapes is not None and b.size == np.prod(shapes[1]):
            b = b.reshape(shapes[1])
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def to_peft_layout(kind, a, b):
    """Our `lora_a`, `lora_b` -> PEFT's A, B."""
    if kind.startswith("Conv"):
        spatial = a.ndim - 2
        a = np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(spatial)))
        b = b.T.reshape(b.shape[1], b.shape[0], *(1,) * spatial)
    else:
        rank = a.shape[-1]
        a, b = a.reshape(-1, rank).T, b.reshape(rank, -1).T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)
