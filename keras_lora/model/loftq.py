"""LoftQ initialisation (Li et al. 2023): a quantized base plus adapters
that make up for its quantization error.

`apply_lora(model, init="loftq", loftq_mode=..., loftq_iter=...)` calls
`make_loftq_wrapper` on each target: from the float kernel `W` it
alternates `Q = dequantize(quantize(W - s·A·B))` and the rank-`r` SVD of
`W - Q` (`s·A·B`), quantizes the base layer from the last quantizer input
with the mode's own code (Keras's `layer.quantize` for int8/int4,
`layers.nf4` for NF4), so that the stored base is exactly `Q`, and sets
`A`, `B`. Unlike PEFT's `loftq_init`, which factors `W - Q` without the
LoRA scale, `A·B` is divided by `s = alpha/rank` so that `Q + s·A·B ≈ W`
whatever `alpha` is (PEFT's factors are right only for `alpha = rank`).
"""

import keras
import numpy as np
from keras import ops

from keras_lora.layers import factoring, nf4, quantized
from keras_lora.layers.variants import factor_kernel, scale_for

LOFTQ_MODES = ("int8", "int4", "nf4")
NF4_BLOCK_SIZE = 64  # QLoRA's block size, as `quantize_nf4`'s default


def validate_loftq(init, loftq_mode, loftq_iter):
    """Checks `apply_lora`'s LoftQ arguments. Returns `(mode, iters)`, or
    `(None, None)` without LoftQ."""
    if init != "loftq":
        if loftq_mode is not None or loftq_iter is not None:
            raise ValueError(
                "`loftq_mode` and `loftq_iter` apply only with init='loftq'. "
                f"Received: init={init!r}, loftq_mode={loftq_mode!r}, "
                f"loftq_iter={loftq_iter!r}"
            )
        return None, None
    if loftq_mode not in LOFTQ_MODES:
        raise ValueError(
            f"init='loftq' needs `loftq_mode`, one of {LOFTQ_MODES}. "
            f"Received: loftq_mode={loftq_mode!r}"
        )
    iters = 1 if loftq_iter is None else loftq_iter
    if isinstance(iters, (bool, np.bool_)) or not isinstance(iters, (int, np.integer)):
        raise TypeError(
            "`loftq_iter` must be an integer >= 1. "
            f"Received: loftq_iter={iters!r} of type {type(iters).__name__}"
        )
    if iters < 1:
        raise ValueError(
            f"`loftq_iter` must be an integer >= 1. Received: loftq_iter={iters}"
        )
    return loftq_mode, int(iters)


def check_loftq_target(path, layer):
    """Raises unless `layer` is a float, built, plain `Dense`/`EinsumDense`
    (LoftQ starts from the float kernel and quantizes it itself)."""
    if type(layer) not in (keras.layers.Dense, keras.layers.EinsumDense):
        raise TypeError(
            "init='loftq' adapts float `Dense` and `EinsumDense` layers only; "
            f"target '{path}' is a {type(layer).__name__}. Exclude it "
            "(`exclude=`) or choose other `targets`."
        )
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise ValueError(
            f"init='loftq' starts from a float kernel; target '{path}' is "
            f"already quantized ({mode!r}). Pass the float model."
        )


def _scratch(layer, weights=False):
    """A new float layer of `layer`'s config and shape (no shared state),
    with a copy of its weights if `weights`."""
    new = layer.__class__.from_config(layer.get_config())
    new.build_from_config(layer.get_build_config())
    if weights:
        new.set_weights(layer.get_weights())
    return new


def quantize_layer(layer, kernel, mode):
    """Quantizes the float `layer` in place from `kernel` (NumPy, the
    kernel's shape) in `mode`: Keras's `layer.quantize` for int8/int4,
    `layers.nf4.convert` for NF4."""
    if mode == "nf4":
        values = nf4.quantize_array(kernel.astype("float32"), NF4_BLOCK_SIZE, False)
        nf4.convert(layer, NF4_BLOCK_SIZE, False, values)
        return layer
    layer._kernel.assign(kernel.astype("float32"))
    layer.quantize(mode)
    return layer


def quantize_dequantize(layer, kernel, mode):
    """`dequantize(quantize(kernel))` as `layer`'s base will store it
    (float64 NumPy): the same quantizer on a scratch copy of `layer`."""
    scratch = quantize_layer(_scratch(layer), kernel, mode)
    return ops.convert_to_numpy(quantized.dequantized_kernel(scratch)).astype(
        np.float64
    )


def loftq_factors(layer, kernel, rank, scale, mode, iters, layout):
    """LoftQ's alternation on the float `kernel` of `layer`.

    Returns `(source, q, a, b)`: `source` the last quantizer input (the
    base is quantized from it), `q` its dequantization, and `a`
    `(fan_in, rank)`, `b` `(rank, out)` (float64, the matrix view of
    `layout`) with `q + scale·a·b ≈ kernel`."""
    w = np.asarray(kernel, np.float64)
    source = w
    for _ in range(iters):
        q = quantize_dequantize(layer, source, mode)
        matrix = factoring.to_matrix(w - q, layout, np)
        # PiSSA's factors of the quantization error: a = U·√(S/s), b = √(S/s)·Vᵀ.
        if rank > min(matrix.shape):
            raise ValueError(
                f"init='loftq' needs rank <= min(kernel dims) = "
                f"{min(matrix.shape)} on layer '{layer.name}'; received rank={rank}."
            )
        a, b = factor_kernel(matrix, rank, scale, "pissa")
        update = factoring.product(a, b, scale, rank, w.shape, layout, np)
        last = source
        source = w - update
    return last, q, a, b


def make_loftq_wrapper(layer, lora_cls, options, layer_kwargs, mode, iters):
    """The LoRA layer of LoftQ on float `layer`: a copy of it quantized in
    `mode` (so `layer`, and the model it came from, are left as they were,
    and a failure changes nothing), the adapter's `A`, `B` from
    `loftq_factors`."""
    kernel = ops.convert_to_numpy(layer._kernel).astype(np.float64)
    # The matrix view and factor shapes of the wrapper, from a float scratch.
    probe = lora_cls(_scratch(layer), **options, **layer_kwargs)
    layout, (a_shape, b_shape) = probe.kernel_layout(), probe.adapter_shapes()
    rank = options["rank"]
    alpha = rank if options.get("alpha") is None else options["alpha"]
    scale = scale_for(rank, alpha, layer_kwargs.get("use_rslora", False))
    source, _, a, b = loftq_factors(layer, kernel, rank, scale, mode, iters, layout)
    base = quantize_layer(_scratch(layer, weights=True), source, mode)
    # `init="loftq"` marks the adapter as fit to this base: adapter files
    # record the base's digest, and refuse to load on another base.
    wrapper = lora_cls(base, **options, **layer_kwargs, init="loftq")
    adapter = next(iter(wrapper._adapters.values()))
    dtype = keras.backend.standardize_dtype(adapter.a.dtype)
    a, b = a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)
    adapter.a.assign(a)
    adapter.b.assign(b)
    if adapter.magnitude is not None:
        # QDoRA: m = ‖Q + s·A·B‖ per output unit (as PEFT's DoRA init after
        # LoftQ), so that the output starts at Q + s·A·B, not at Q's norm.
        q = quantized.dequantized_kernel(base)
        q = ops.convert_to_numpy(q).astype(np.float64)
        update = factoring.product(
            a.astype(np.float64), b.astype(np.float64), scale, rank, q.shape, layout, np
        )
        norm = np.sqrt(np.sum(np.square(q + update), axis=wrapper._norm_axes()))
        mag_dtype = keras.backend.standardize_dtype(adapter.magnitude.dtype)
        adapter.magnitude.assign(
            norm.reshape(adapter.magnitude.shape).astype(mag_dtype)
        )
    return wrapper


def error_ratio(kernel, rank, mode, iters, alpha=None):
    """`‖W - (Q + s·A·B)‖_F / ‖W - Q₀‖_F` of LoftQ on a 2-D float `kernel`
    (`(in, out)`, a `Dense`'s), `Q₀` its plain quantization in `mode`."""
    kernel = np.asarray(kernel, np.float32)
    layer = keras.layers.Dense(kernel.shape[1], use_bias=False)
    layer.build((None, kernel.shape[0]))
    w = kernel.astype(np.float64)
    scale = scale_for(rank, rank if alpha is None else alpha, False)
    plain = quantize_dequantize(layer, w, mode)
    _, q, a, b = loftq_factors(layer, w, rank, scale, mode, iters, (None, None))
    return float(np.linalg.norm(w - q - scale * a @ b) / np.linalg.norm(w - plain))
