"""How `A·B` covers a kernel: one description, for tensors and arrays.

Every LoRA layer type describes its factoring as a `layout`
`(permutation, n_in)`: the kernel's axes, transposed by `permutation`
(`None`: kept as they are), are `n_in` input axes followed by output axes
(`None`: all but the last are input axes). `A` spans the input axes plus
`(rank,)` and `B` spans `(rank,)` plus the output axes, so the kernel's
update is `scale·A·B` on the `(fan_in, fan_out)` matrix, put back into the
kernel's shape. These functions work with `keras.ops` (`xp=ops`) and NumPy
(`xp=np`) alike, so the layers and the host merge share the math.
"""

import numpy as np


def _resolve(shape, layout):
    perm, n_in = layout
    if perm is None:
        perm = tuple(range(len(shape)))
    if n_in is None:
        n_in = len(shape) - 1
    return tuple(perm), n_in


def to_matrix(kernel, layout, xp):
    """`kernel` as its `(fan_in, fan_out)` matrix."""
    shape = tuple(kernel.shape)
    perm, n_in = _resolve(shape, layout)
    if perm != tuple(range(len(shape))):
        kernel = xp.transpose(kernel, perm)
    fan_in = int(np.prod([shape[i] for i in perm[:n_in]]))
    return xp.reshape(kernel, (fan_in, -1))


def to_kernel(matrix, shape, layout, xp):
    """The inverse of `to_matrix`: a `(fan_in, fan_out)` matrix back in a
    kernel of `shape`."""
    shape = tuple(shape)
    perm, _ = _resolve(shape, layout)
    identity = tuple(range(len(shape)))
    if perm == identity:
        return xp.reshape(matrix, shape)
    permuted = xp.reshape(matrix, tuple(shape[i] for i in perm))
    return xp.transpose(permuted, tuple(int(i) for i in np.argsort(perm)))


def product(a, b, scale, rank, shape, layout, xp):
    """`scale·A·B` as a kernel of `shape` (the scale folded into `A`)."""
    a = xp.reshape(a, (-1, rank))
    b = xp.reshape(b, (rank, -1))
    return to_kernel(xp.matmul(a * scale, b), shape, layout, xp)
