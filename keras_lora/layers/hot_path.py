"""The few tensor ops of a LoRA layer's forward pass, with less work per call.

Inside `call` the inputs are backend tensors already, and the adapters are
read in the call's dtype, so no op needs Keras's per-call argument
conversion and type promotion. On eager torch that conversion costs about
ten times a batch-1 product itself (`keras.ops.matmul` ~50 µs against
`torch.matmul` ~5 µs), which is what made a LoRA model slower than its
base at batch 1; `benchmarks/eager_forward.py` measures it. The results
are the same products and sums.
"""

import keras
from keras import ops


def _matmul():
    if keras.backend.backend() == "torch":
        import torch

        return torch.matmul
    # TensorFlow's own matmul does not broadcast a 2-D right operand over
    # batch axes; Keras's does.
    return ops.matmul


matmul = _matmul()


def value(x):
    """The backend tensor of a Keras variable (autocast as Keras reads it),
    or `x` itself."""
    return x.value if isinstance(x, keras.Variable) else x


def read(variable, dtype):
    """`variable`'s value in `dtype` (a standardized dtype name)."""
    x = value(variable)
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)
