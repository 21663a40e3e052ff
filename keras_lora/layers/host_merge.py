"""Merging in host memory: `W + (scale·A)·B` in NumPy, and a merged layer
built straight from arrays.

A merge is a one-off pass over every adapted kernel, bound by memory
bandwidth. Three things keep it near a plain NumPy `W + s·A@B`:

- the scale is folded into the small `A`, not applied to the big product;
- the sum is formed in place in the product's buffer;
- the new layer's variables start from the merged arrays: its initializers
  (a random fill as large as the kernel) never run, and no second copy
  follows through `set_weights`.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_lora.layers.factoring import to_kernel


def host_view(x):
    """`x` as a NumPy array, without a copy where the backend allows it.

    Treat the result as read-only: it may share memory with `x`.
    """
    # `convert_to_numpy` copies on JAX, and on torch and TensorFlow goes
    # through a slow `np.array(tensor)`; CPU arrays of JAX and torch expose
    # their buffer, and a TensorFlow tensor's own `numpy()` is a fast copy.
    backend = keras.backend.backend()
    value = x.value if isinstance(x, keras.Variable) else x
    if backend == "jax":
        if all(d.platform == "cpu" for d in value.devices()):
            return np.asarray(value)
    elif backend == "tensorflow":
        if hasattr(value, "numpy"):
            return value.numpy()
    elif backend == "torch":
        import torch

        if value.device.type == "cpu" and value.dtype != torch.bfloat16:
            return value.detach().numpy()
    return ops.convert_to_numpy(x)


def merged_kernel_array(kernel, lora_a, lora_b, scale, rank, layout=(None, None)):
    """Returns `kernel + scale·A·B` as a NumPy array of the kernel's dtype,
    `A·B` laid out on the kernel as `layout` says (`layers.factoring`)."""
    kernel = host_view(kernel)
    a = np.asarray(ops.convert_to_numpy(lora_a), np.float32).reshape(-1, rank)
    b = np.asarray(ops.convert_to_numpy(lora_b), np.float32).reshape(rank, -1)
    # Non-finite values are the caller's check (`all_finite`), not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        merged = to_kernel(
            np.matmul(a * np.float32(scale), b), kernel.shape, layout, np
        )
        if not merged.flags.c_contiguous:
            merged = np.ascontiguousarray(merged)
        if kernel.dtype == np.float32:
            merged += kernel
        else:
            merged += kernel.astype(np.float32)
            merged = merged.astype(kernel.dtype)
    return merged


def all_finite(array):
    """Whether `array` has no NaN or Inf (min and max propagate both)."""
    if array.size == 0:
        return True
    try:
        return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
    except TypeError:
        return bool(np.all(np.isfinite(array)))


def build_with_weights(layer, values):
    """Returns a new, built layer of `layer`'s class, config and name whose
    weights are `values` (NumPy arrays, in `layer.weights` order, owned by
    the caller: the new variables may take over their memory).

    Each variable is created from its array, so the layer's initializers do
    not run. If the weights cannot be matched by name and shape, the layer
    is built normally and `set_weights(values)` fills it.
    """
    new = layer.__class__.from_config(layer.get_config())
    by_name = {}
    for variable, value in zip(layer.weights, values, strict=True):
        by_name.setdefault(variable.name, []).append(value)
    unique = all(len(v) == 1 for v in by_name.values())
    by_name = {name: v[0] for name, v in by_name.items()}
    injected = set()
    add_weight = new.add_weight
    signature = inspect.signature(add_weight)

    def add_weight_from_value(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        name = bound.arguments.get("name")
        shape = bound.arguments.get("shape")
        value = by_name.get(name) if unique else None
        if value is not None and shape is not None and tuple(shape) == value.shape:
            tensor = _adopt(value)
            bound.arguments["initializer"] = lambda shape, dtype=None: tensor
            injected.add(name)
        return add_weight(*bound.args, **bound.kwargs)

    new.add_weight = add_weight_from_value
    try:
        new.build_from_config(layer.get_build_config())
    finally:
        del new.add_weight
    if not unique or injected != set(by_name) or len(new.weights) != len(values):
        new.set_weights(values)
    return new


def _adopt(array):
    """A backend tensor on `array`'s memory where that needs no copy (torch;
    `array` must not be used elsewhere), else `array` itself."""
    if keras.backend.backend() == "torch" and array.flags.writeable:
        import torch

        try:
            return torch.from_numpy(array)
        except TypeError:  # a dtype torch cannot wrap, such as bfloat16
            pass
    return array
