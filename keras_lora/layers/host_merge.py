"""Merging in host memory: `W + (scale·A)·B` in NumPy, and a merged layer
built straight from arrays.

A merge is a one-off pass over every adapted kernel, bound by memory
bandwidth. Four things keep it near (or under) a plain NumPy `W + s·A@B`:

- the scale is folded into the small `A`, not applied to the big product;
- `A·B` is written straight into the merged kernel's buffer; for a kernel
  laid out as its `(fan_in, fan_out)` matrix, `+ W` and the finite check
  then run in blocks of rows small enough to stay in cache, so the kernel
  is read once and the merged kernel written once and read once;
- the merged kernel is written into a 64-byte aligned buffer, which each
  backend can take over without a copy (a JAX CPU array through
  `jax.device_put`, a TensorFlow tensor and a torch tensor through DLPack
  or `from_numpy`);
- the new layer's variables start from the merged arrays: its initializers
  (a random fill as large as the kernel) never run, and no second copy
  follows through `set_weights`.
"""

import inspect
import mmap

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
    # their buffer, and so does a TensorFlow CPU tensor to `np.asarray`
    # (its `numpy()` copies).
    backend = keras.backend.backend()
    value = x.value if isinstance(x, keras.Variable) else x
    if backend == "jax":
        if all(d.platform == "cpu" for d in value.devices()):
            return np.asarray(value)
    elif backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(value)  # a variable's read shares memory
        if "CPU" in tensor.device.upper():
            return np.asarray(tensor)
    elif backend == "torch":
        import torch

        if value.device.type == "cpu" and value.dtype != torch.bfloat16:
            return value.detach().numpy()
    return ops.convert_to_numpy(x)


def aligned_empty(shape, dtype):
    """An uninitialized C-contiguous array whose data starts on a 64-byte
    boundary, as XLA and TensorFlow need to adopt host memory uncopied.

    A large one is its own anonymous memory map (page aligned). NumPy's
    allocator asks for transparent huge pages on large arrays, and the
    kernel's compaction for them made first writes several times slower
    on a busy machine (system time 2.05 s against 0.46 s for 800 MB); a
    merge writes each page once, so huge pages gain nothing here.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size >= _MAPPED_BYTES:
        return np.frombuffer(mmap.mmap(-1, size), dtype).reshape(shape)
    buffer = np.empty(size + _ALIGNMENT, np.uint8)
    start = (-buffer.ctypes.data) % _ALIGNMENT
    return buffer[start : start + size].view(dtype).reshape(shape)


def merged_kernel_array(kernel, lora_a, lora_b, scale, rank, layout=(None, None)):
    """Returns `kernel + scale·A·B` as a NumPy array of the kernel's dtype,
    `A·B` laid out on the kernel as `layout` says (`layers.factoring`)."""
    return merge_kernel(kernel, lora_a, lora_b, scale, rank, layout)[0]


def merge_kernel(kernel, lora_a, lora_b, scale, rank, layout=(None, None)):
    """`(merged, finite)`: `merged_kernel_array`'s result in an aligned
    buffer, and whether it has no NaN or Inf (`all_finite`, found while
    each block is in cache)."""
    kernel = host_view(kernel)
    a = np.asarray(ops.convert_to_numpy(lora_a), np.float32).reshape(-1, rank)
    b = np.asarray(ops.convert_to_numpy(lora_b), np.float32).reshape(rank, -1)
    a = a * np.float32(scale)
    merged = aligned_empty(kernel.shape, kernel.dtype)
    # Non-finite values are the caller's check (`finite`), not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        if not _rows_of_matrix(kernel.shape, layout):
            delta = to_kernel(np.matmul(a, b), kernel.shape, layout, np)
            if kernel.dtype == np.float32:
                np.add(kernel, delta, out=merged)
            else:
                merged[...] = delta + kernel.astype(np.float32)
            return merged, all_finite(merged)
        w = kernel.reshape(a.shape[0], -1)
        out = merged.reshape(w.shape)
        direct = kernel.dtype == np.float32
        # One BLAS call for the product: OpenBLAS wakes its threads per call,
        # which costs far more than the product on a busy machine.
        product = np.matmul(a, b, out=out if direct else None)
        step = max(1, _BLOCK_BYTES // (4 * max(1, w.shape[1])))
        finite = True
        for start in range(0, w.shape[0], step):
            rows = slice(start, start + step)
            block = product[rows]
            block += w[rows] if direct else w[rows].astype(np.float32)
            finite = finite and all_finite(block)
            if not direct:
                out[rows] = block
    return merged, finite


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


def _rows_of_matrix(shape, layout):
    """Whether the kernel's `(fan_in, fan_out)` matrix is the kernel itself
    reshaped (no transpose in the layout), so its blocks of rows are."""
    perm, _ = layout
    return perm is None or tuple(perm) == tuple(range(len(shape)))


def _adopt(array):
    """A backend tensor on `array`'s memory where that needs no copy
    (`array` must not be used elsewhere), else `array` itself."""
    aligned = array.ctypes.data % _ALIGNMENT == 0 and array.flags.c_contiguous
    backend = keras.backend.backend()
    try:
        if backend == "torch" and array.flags.writeable:
            import torch

            return torch.from_numpy(array)
        if backend == "jax" and aligned:
            import jax

            if jax.default_backend() == "cpu":
                return jax.device_put(array)  # XLA's CPU client adopts it
        if backend == "tensorflow" and aligned and array.dtype.kind == "f":
            import tensorflow as tf

            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    except (TypeError, ValueError, BufferError, RuntimeError):
        pass  # a dtype the backend cannot wrap, such as bfloat16
    return array


_ALIGNMENT = 64
_MAPPED_BYTES = 1 << 20
# Rows of a block of the chunked merge: about 256 KiB of float32.
_BLOCK_BYTES = 1 << 18
