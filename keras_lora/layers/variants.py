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
  pass. The norm is computed without forming `W + s·A·B` (`dora_norm`):
  `‖W_j‖² + 2s·(Aᵀ W)_j·B_j + s²·B_jᵀ (AᵀA) B_j`, which reads the kernel
  but writes nothing kernel-sized (extra memory O(out·rank)).
  Over a quantized base (QDoRA: int8, int4, NF4 `Dense`/`EinsumDense`),
  `W` is the dequantized kernel, the one merging uses: each call
  dequantizes it once, transiently, for `‖W_j‖²` and `AᵀW`
  (`quantized_dora_factor`); no float copy of the kernel is kept.
"""

import contextlib
import functools
import threading
import weakref

import keras
import numpy as np
from keras import ops

from keras_lora.config import (  # noqa: F401  (re-exported for older imports)
    BASE_CHANGING_INITS,
    DEFAULT_NAME,
    INITS,
    QUANTIZED_BASE_INITS,
    validate_adapter_name,
    validate_alpha,
    validate_dropout,
    validate_flag,
    validate_init,
    validate_rank,
)
from keras_lora.layers import factoring, quantized, quantized_product


class Adapter:
    """One named adapter of a LoRA layer: its options and its variables.

    Attributes:
        name, rank, alpha, use_rslora, dropout, init, use_dora: the options.
        hotswap: whether the scale is a variable (`prepare_hotswap`), so
            that `hotswap_adapter` can change it without a retrace.
        a, b: the `lora_a`/`lora_b` variables (set when the layer builds).
        magnitude: DoRA's magnitude variable, or `None`.
        residual: the residual kernel variable of a `"pissa"`/`"olora"`
            adapter, or `None`.
        scale_variable: the scale's non-trainable float32 variable of a
            `hotswap` adapter (set when the layer builds), or `None`.
    """

    def __init__(
        self,
        name,
        rank,
        alpha=None,
        use_rslora=False,
        dropout=0.0,
        init="default",
        use_dora=False,
        hotswap=False,
    ):
        self.a = self.b = self.magnitude = self.residual = None
        self.scale_variable = None
        self.name = validate_adapter_name(name)
        self.rank = validate_rank(rank)
        alpha = validate_alpha(alpha)
        self._alpha = float(self.rank) if alpha is None else alpha
        self._use_rslora = validate_flag(use_rslora, "use_rslora")
        self.dropout = validate_dropout(dropout)
        self.init = validate_init(init)
        self.use_dora = validate_flag(use_dora, "use_dora")
        self.hotswap = validate_flag(hotswap, "hotswap")

    @property
    def alpha(self):
        return self._alpha

    @alpha.setter
    def alpha(self, value):
        self._alpha = value
        self._sync_scale()

    @property
    def use_rslora(self):
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value):
        self._use_rslora = value
        self._sync_scale()

    @property
    def scale(self):
        """`alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`: a
        Python float, or the scale variable of a built `hotswap` adapter
        (read it with `ops`, or `scale_value` for a float)."""
        if self.scale_variable is not None:
            return self.scale_variable
        return self.scale_value

    @property
    def scale_value(self):
        """The scale as a Python float, from `alpha`, `rank`, `use_rslora`."""
        return scale_for(self.rank, self._alpha, self._use_rslora)

    def set_scale(self, scale, use_rslora, assign=True):
        """Sets `alpha` so that the scale is `scale` under the rule
        `use_rslora`, at this adapter's rank; with `assign`, the scale
        variable too (a `hotswap_adapter` assigns it with the factors)."""
        self._use_rslora = use_rslora
        root = float(np.sqrt(self.rank)) if use_rslora else float(self.rank)
        self._alpha = float(scale) * root
        if assign:
            self._sync_scale()

    def _sync_scale(self):
        if self.scale_variable is not None:
            self.scale_variable.assign(np.float32(self.scale_value))

    @property
    def changes_base(self):
        return self.init in BASE_CHANGING_INITS

    @property
    def pins_base(self):
        """Whether the adapter is right on one base kernel only (PiSSA/OLoRA
        residuals, LoftQ's quantized base): adapter files record its digest."""
        return self.changes_base or self.init in QUANTIZED_BASE_INITS

    @property
    def variables(self):
        """The trainable ones: the factors and DoRA's magnitude."""
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
        if self.hotswap:
            config["hotswap"] = True
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


def scale_for(rank, alpha, use_rslora):
    """LoRA's scale: `alpha / rank`, or `alpha / sqrt(rank)` (rsLoRA)."""
    if use_rslora:
        return alpha / float(np.sqrt(rank))
    return alpha / rank


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


def _norm_view(ndim, layout, norm_axes):
    """How `dora_norm` sees a kernel: `(order, n_group, n_in)`, or `None`.

    The kernel, transposed by `order`, is `n_group` group axes, `n_in` input
    axes (the ones the norm reduces) and output axes, with `A` (transposed
    by `order` too) spanning the group and input axes plus `(rank,)` and
    `B` spanning `(rank,)` plus the output axes; the norm comes out over
    group then output axes, the magnitude's (kernel) order. Group axes are
    the output axes `A` holds: Keras's EinsumDense factoring, e.g. the
    heads of a `(dim, heads, head_dim)` query kernel. `None` when the
    layout fits neither form (Keras's factoring with a contracted last axis).
    """
    perm, n_layout = layout
    identity = tuple(range(ndim))
    perm = identity if perm is None else tuple(int(i) for i in perm)
    n_layout = ndim - 1 if n_layout is None else n_layout
    inputs = tuple(sorted(int(i) for i in norm_axes))
    if perm == identity and n_layout == ndim - 1 and ndim - 1 not in inputs:
        group = tuple(i for i in range(ndim - 1) if i not in inputs)
        return group + inputs + (ndim - 1,), len(group), len(inputs)
    outputs = perm[n_layout:]
    if set(perm[:n_layout]) == set(inputs) and list(outputs) == sorted(outputs):
        return perm, 0, n_layout
    return None


# ‖W_j‖² of frozen torch kernels: `W` never trains, so its column norms are
# computed once and reused while the kernel's in-place version counter
# (bumped by every `assign`) stays the same: `{id(kernel): (weak reference
# to it, {view: (version, norms)})}`, an entry dropped with its kernel.
# Eager torch only: under XLA (JAX, TensorFlow) the sum of squares fuses
# with the kernel's other read, and a traced function has no counter.
_SQUARED_NORMS = {}


def _squared_norms(w, kernel, view):
    """`‖W_j‖²` of the reshaped kernel `w` (`(..., fan_in, out)`); cached
    for a torch `kernel` tensor (see `_SQUARED_NORMS`)."""
    if kernel is None:
        return ops.sum(ops.multiply(w, w), axis=-2)
    key = id(kernel)
    entry = _SQUARED_NORMS.get(key)
    if entry is None or entry[0]() is not kernel:
        drop = functools.partial(_SQUARED_NORMS.pop, key, None)
        entry = (weakref.ref(kernel, lambda _: drop()), {})
        _SQUARED_NORMS[key] = entry
    entries, version = entry[1], kernel._version
    cached = entries.get(view)
    if cached is None or cached[0] != version:
        cached = (version, ops.sum(ops.multiply(w, w), axis=-2))
        entries[view] = cached
    return cached[1]


def _cache_key(frozen):
    """The torch tensor to cache `frozen`'s column norms under, or `None`."""
    if keras.backend.backend() != "torch" or not isinstance(frozen, keras.Variable):
        return None
    return frozen.value  # a fresh tensor under autocast: no reuse, no harm


def dora_norm(frozen, a, b, scale, layout, norm_axes, kernel=None):
    """`‖W + scale·A·B‖` per output unit, float32, never forming `W + s·A·B`.

    Per output column `j` of the kernel as a matrix (`layers.factoring`):
    `‖W_j‖² + 2s·(AᵀW)_j·B_j + s²·B_jᵀ(AᵀA)B_j`. `AᵀW` reads the kernel
    once and is `(rank, out)`; `AᵀA` is `(rank, rank)`. A layout this form
    does not fit (see `_norm_view`) takes the direct norm of `W + s·A·B`.

    Args:
        frozen: the frozen kernel `W` (base or residual), float32.
        a, b: the adapter's factors, float32.
        scale: the adapter's scale `s`.
        layout: the layer's `kernel_layout()`.
        norm_axes: the kernel axes the norm reduces (`_norm_axes()`).
        kernel: on torch, the frozen kernel's own tensor, under which
            `‖W_j‖²` is cached (`_SQUARED_NORMS`); `None` recomputes it.
    """
    shape = tuple(frozen.shape)
    rank = int(b.shape[0])
    view = _norm_view(len(shape), layout, norm_axes)
    if view is None:
        delta = factoring.product(a, b, scale, rank, shape, layout, ops)
        return column_norm(ops.add(frozen, delta), norm_axes)
    order, n_group, n_in = view
    groups = int(np.prod([shape[i] for i in order[:n_group]]))
    fan_in = int(np.prod([shape[i] for i in order[n_group : n_group + n_in]]))
    if order != tuple(range(len(shape))):
        frozen = ops.transpose(frozen, order)
        if n_group:  # A holds the group axes too, in the kernel's order
            a = ops.transpose(a, order)
    # No group axes: 2-D products (a batched product of one is several
    # times slower on eager torch).
    lead = (groups,) if n_group else ()
    w = ops.reshape(frozen, lead + (fan_in, -1))
    a = ops.reshape(a, lead + (fan_in, rank))
    b = ops.reshape(b, (rank, -1))
    a_t = ops.swapaxes(a, -1, -2)
    cross = ops.sum(ops.multiply(ops.matmul(a_t, w), b), axis=-2)
    gram = ops.matmul(a_t, a)
    square = ops.sum(ops.multiply(ops.matmul(gram, b), b), axis=-2)
    total = _squared_norms(w, kernel, view) + (2.0 * scale) * cross
    total = total + (scale * scale) * square
    # Rounding can take a column of W + s·A·B that is all but zero below 0.
    norm = ops.sqrt(ops.maximum(total, 0.0))
    outputs = [d for i, d in enumerate(shape) if i not in set(norm_axes)]
    return ops.reshape(norm, outputs)


def dora_factor(frozen, adapter, layout, norm_axes):
    """`m / ‖W + s·A·B‖` per output unit, the norm held constant (no
    gradient): `frozen` is `W`, `adapter` a DoRA `Adapter`."""
    a = ops.stop_gradient(ops.cast(adapter.a, "float32"))
    b = ops.stop_gradient(ops.cast(adapter.b, "float32"))
    kernel = _cache_key(frozen)
    frozen = ops.stop_gradient(ops.cast(frozen, "float32"))
    norm = dora_norm(frozen, a, b, adapter.scale, layout, norm_axes, kernel)
    return ops.divide(ops.cast(adapter.magnitude, "float32"), ops.stop_gradient(norm))


# Rows of a per-channel quantized Dense kernel dequantized at a time by
# QDoRA's norm: at most this many bytes of float32 (see `_per_channel_norm`).
norm_chunk = 8 * 2**20


def _per_channel_dense(base, params):
    """Whether `base` is a `Dense` whose kernel is `codes / scale`, one
    scale per output unit (int8, per-channel int4): its product multiplies
    the integer codes and never forms a float kernel."""
    if isinstance(base, keras.layers.EinsumDense) or len(params) != 2:
        return False
    return base.quantization_mode in ("int8", "int4")


def _per_channel_norm(base, params, a, b, scale, anchor):
    """`‖W + scale·A·B‖` per output unit of a per-channel `Dense` base
    (`W = Q / s`, one `s` per column), reading `Q` in chunks of rows.

    `‖W_j‖² = Σ_chunks ‖Q_j‖² / s_j²` and `(AᵀW)_j = Σ_chunks (A_kᵀQ_k)_j /
    s_j`: each chunk's codes are tied to both of the previous chunk's sums,
    so that one chunk of float rows (`norm_chunk` bytes) is alive at a
    time.
    """
    codes, s = params
    adjust = getattr(base, "_adjust_scale_for_dequant", None)
    if adjust is not None:
        s = adjust(s)
    s = ops.reshape(ops.cast(s, "float32"), (-1,))
    rows, units = int(a.shape[0]), int(b.shape[-1])
    columns = getattr(base, "_int4_unpacked_column_size", None) or units
    step = max(1, norm_chunk // (4 * units))
    squared = cross = None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        (part,) = quantized_product.tie(anchor, (codes[start:stop],))
        if squared is not None:  # both of the previous chunk's reads done
            (part,) = quantized_product.tie(squared, (part,))
        if base.quantization_mode == "int4":
            part = quantized.unpack_int4(part, columns, axis=-1)
        part = ops.cast(part, "float32")
        sq = ops.sum(ops.multiply(part, part), axis=0)
        aq = ops.matmul(ops.transpose(a[start:stop]), part)
        squared = sq if squared is None else ops.add(squared, sq)
        cross = aq if cross is None else ops.add(cross, aq)
        anchor = cross
    w_squared = ops.divide(squared, ops.multiply(s, s))
    aw = ops.divide(cross, s)
    cross_term = ops.sum(ops.multiply(aw, b), axis=0)
    gram = ops.matmul(ops.transpose(a), a)
    square = ops.sum(ops.multiply(ops.matmul(gram, b), b), axis=0)
    total = w_squared + (2.0 * scale) * cross_term + (scale * scale) * square
    return ops.sqrt(ops.maximum(total, 0.0))


# The base product of the QDoRA call in progress, per thread and layer.
_ANCHOR = threading.local()


@contextlib.contextmanager
def norm_anchor(layer, base):
    """Within it, `quantized_dora_factor(layer, ...)` ties its
    dequantization to `base` (the call's base product), in this thread."""
    anchors = _ANCHOR.__dict__.setdefault("by_layer", {})
    key, previous = id(layer), anchors.get(id(layer))
    anchors[key] = base
    try:
        yield
    finally:
        if previous is None:
            anchors.pop(key, None)
        else:
            anchors[key] = previous


def quantized_dora_factor(layer, adapter, anchor=None):
    """`m / ‖W + s·A·B‖` of a DoRA `adapter` on the LoRA `layer` whose base
    is quantized (QDoRA), `W` being the dequantized kernel (the one
    `quantized.dequantized_kernel` gives, which merging uses).

    The norm is `dora_norm`'s factored form, which writes nothing
    kernel-sized but reads `W`: the kernel is dequantized once per call,
    transiently, tied (`quantized_product.tie`) to `anchor` (the call's
    base product `x·W_q`, see `norm_anchor`; by default `A`), so that the
    compiler runs it after the base product's own dequantization is
    freed, and can neither keep it nor hoist it. No float copy of the
    kernel outlives the call.

    On torch, `‖W_j‖²` is computed once and cached against the codes
    tensor's version counter (as a float kernel's, `_SQUARED_NORMS`).
    """
    base = layer.layer
    a = ops.stop_gradient(ops.cast(adapter.a, "float32"))
    b = ops.stop_gradient(ops.cast(adapter.b, "float32"))
    params = quantized.kernel_params(base)
    key = params[0] if keras.backend.backend() == "torch" else None
    layout, axes = layer.kernel_layout(), layer._norm_axes()
    if anchor is None:
        anchor = getattr(_ANCHOR, "by_layer", {}).get(id(layer), a)
    anchor = ops.stop_gradient(anchor)
    if _per_channel_dense(base, params):
        norm = _per_channel_norm(base, params, a, b, adapter.scale, anchor)
    else:
        params = quantized_product.tie(anchor, params)
        frozen = quantized.dequantized_kernel(base, params, "float32")
        norm = dora_norm(frozen, a, b, adapter.scale, layout, axes, key)
    norm = ops.stop_gradient(norm)
    return ops.divide(ops.cast(adapter.magnitude, "float32"), norm)


class QuantizedDoRA:
    """The QDoRA hooks of the LoRA layer types whose quantized bases take
    DoRA (`LoRADense`, `LoRAEinsumDense`): over a quantized base, the norm
    comes from the dequantized kernel (`quantized_dora_factor`), tied after
    the call's base product (`norm_anchor`); a float base is untouched."""

    def _add_updates(self, inputs, base, training, adapters):
        if self.quantization_mode is None:  # the float path, untouched
            return super()._add_updates(inputs, base, training, adapters)
        with norm_anchor(self, base):
            return super()._add_updates(inputs, base, training, adapters)

    def _dora_factor(self, adapter, frozen=None):
        if uses_quantized_norm(self, adapter, frozen):
            return quantized_dora_factor(self, adapter)
        return super()._dora_factor(adapter, frozen)


def uses_quantized_norm(layer, adapter, frozen):
    """Whether `layer._dora_factor(adapter, frozen)` takes QDoRA's norm:
    a quantized (int8, int4, NF4) base, no kernel given, no residual."""
    return (
        frozen is None
        and adapter.residual is None
        and layer.quantization_mode in quantized_product.MODES
    )
