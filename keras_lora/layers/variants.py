"""LoRA variants and named adapters: the per-adapter state of a `LoRALayer`.

A LoRA layer holds one or more named adapters (`Adapter`) on one frozen
base. Each adapter has its own rank, alpha, scale rule and variant options:

- `dropout`: dropout on the adapter's input path, in training only;
- `use_rslora`: scale `alpha / sqrt(rank)` (rank-stabilized LoRA);
- `init`: `"default"` (small random A, zero B), `"gaussian"` (A from
  `N(0, 1/rank)`, zero B, PEFT's `"gaussian"`), `"pissa"` (A, B from the
  top-`rank` singular triplets of W, PiSSA) or `"olora"` (A, B from a QR
  decomposition of W, OLoRA). `"pissa"` and `"olora"` move the part of W they
  put into `scale·A·B` out of the frozen kernel: the layer holds that
  *residual* kernel as a variable of its own, because the base kernel is
  shared with the model `apply_lora` was given and must not change. This
  costs one extra kernel of memory per layer;
- `use_dora`: DoRA (weight-decomposed LoRA), a trainable magnitude per
  output unit, initialised to the norms of the columns of W, and the output
  `m · (W + s·A·B) / ‖W + s·A·B‖`, the norm held constant for the backward
  pass. The norm needs `W + s·A·B` itself, so a DoRA layer forms it (with
  no gradient through it) on every call: one extra kernel-sized product.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.config import (  # noqa: F401  (re-exported for older imports)
    BASE_CHANGING_INITS,
    DEFAULT_NAME,
    INITS,
    validate_adapter_name,
    validate_alpha,
    validate_dropout,
    validate_flag,
    validate_init,
    validate_rank,
)
from keras_lora.layers import factoring


class Adapter:
    """One named adapter of a LoRA layer: its options and its variables.

    Attributes:
        name, rank, alpha, use_rslora, dropout, init, use_dora: the options.
        a, b: the `lora_a`/`lora_b` variables (set when the layer builds).
        magnitude: DoRA's magnitude variable, or `None`.
        residual: the residual kernel variable of a `"pissa"`/`"olora"`
            adapter, or `None`.
    """

    def __init__(
        self,
        name,
        rank,
        alpha,
        use_rslora=False,
        dropout=0.0,
        init="default",
        use_dora=False,
    ):
        self.name = validate_adapter_name(name)
        self.rank = validate_rank(rank)
        alpha = validate_alpha(alpha)
        self.alpha = float(self.rank) if alpha is None else alpha
        self.use_rslora = validate_flag(use_rslora, "use_rslora")
        self.dropout = validate_dropout(dropout)
        self.init = validate_init(init)
        self.use_dora = validate_flag(use_dora, "use_dora")
        self.a = self.b = self.magnitude = self.residual = None

    @property
    def scale(self):
        """`alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`."""
        if self.use_rslora:
            return self.alpha / float(np.sqrt(self.rank))
        return self.alpha / self.rank

    @property
    def changes_base(self):
        return self.init in BASE_CHANGING_INITS

    @property
    def variables(self):
        return [v for v in (self.a, self.b, self.magnitude) if v is not None]

    def config(self, with_name=True):
        """The options as constructor keyword arguments; defaults left out."""
        config = {"rank": self.rank, "alpha": self.alpha}
        if with_name:
            config["name"] = self.name
        if self.use_rslora:
            config["use_rslora"] = True
        if self.dropout:
            config["dropout"] = self.dropout
        if self.init != "default":
            config["init"] = self.init
        if self.use_dora:
            config["use_dora"] = True
        return config

    def describe(self):
        """All options, defaults included (for adapter-file metadata)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "dropout": self.dropout,
            "init": self.init,
            "use_dora": self.use_dora,
        }


def factor_kernel(matrix, rank, scale, init):
    """PiSSA or OLoRA factors of a 2-D `matrix` (fan_in, out), in float64.

    Returns `(a, b)` with `a` `(fan_in, rank)` and `b` `(rank, out)`; the
    residual is `matrix - scale·a·b`.

    - `"pissa"`: with `matrix = U·S·Vᵀ`, `a = U_r·sqrt(S_r/scale)` and
      `b = sqrt(S_r/scale)·V_rᵀ`, so `scale·a·b` is the best rank-r part
      (as PEFT, which divides `S` by the scaling).
    - `"olora"`: with `matrixᵀ = Q·R` (PEFT's `weight = Q·R` in torch's
      `(out, in)` layout), `b = Q_rᵀ` and `a = R_rᵀ`, as PEFT.
    """
    m = np.asarray(matrix, np.float64)
    if init == "pissa":
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(s[:rank] / scale)
        a = u[:, :rank] * root
        b = root[:, None] * vt[:rank]
    elif init == "olora":
        q, r = np.linalg.qr(m.T)
        a = r[:rank].T
        b = q[:, :rank].T
    else:
        raise ValueError(init)
    if a.shape[1] < rank:
        raise ValueError(
            f"init={init!r} needs rank <= min(kernel dims) = {a.shape[1]}; "
            f"received rank={rank}."
        )
    return a, b


# ----- hooks the LoRA layer calls ---------------------------------------


def initializers(adapter, defaults):
    """`(a_init, b_init)` of `adapter`, from the layer type's `defaults`
    (one of which is `"zeros"`)."""
    a_init, b_init = defaults
    if adapter.init == "gaussian":
        normal = keras.initializers.RandomNormal(stddev=1.0 / adapter.rank)
        return (normal, b_init) if b_init == "zeros" else (a_init, normal)
    if adapter.changes_base:
        return "zeros", "zeros"  # set from the kernel by `init_from_kernel`
    return a_init, b_init


def init_from_kernel(adapter, kernel, layout, a_shape, b_shape, initialize):
    """PiSSA/OLoRA: sets `adapter.a`, `adapter.b` from the float `kernel`
    (NumPy) and returns the residual kernel `kernel - scale·A·B` (NumPy).
    Without `initialize` (weights about to be loaded) returns `kernel`."""
    if not initialize:
        return kernel
    dtype = keras.backend.standardize_dtype(adapter.a.dtype)
    wide = kernel.astype(np.float64)
    matrix = factoring.to_matrix(wide, layout, np)
    a, b = factor_kernel(matrix, adapter.rank, adapter.scale, adapter.init)
    a = a.reshape(a_shape).astype(dtype)
    b = b.reshape(b_shape).astype(dtype)
    adapter.a.assign(a)
    adapter.b.assign(b)
    # The residual is taken against the factors as stored (rounded to
    # `dtype`), so that residual + scale·A·B is the kernel again.
    update = factoring.product(
        a.astype(np.float64),
        b.astype(np.float64),
        adapter.scale,
        adapter.rank,
        kernel.shape,
        layout,
        np,
    )
    return wide - update


def column_norm(kernel, axes):
    """DoRA's norm per output unit: over the kernel's input `axes`."""
    return ops.sqrt(ops.sum(ops.square(kernel), axis=axes))


def dora_factor(frozen, delta, magnitude, axes):
    """`m / ‖W + ΔW‖` per output unit, the norm held constant (no gradient)."""
    norm = ops.stop_gradient(column_norm(ops.add(frozen, delta), axes))
    return ops.divide(ops.cast(magnitude, "float32"), norm)
