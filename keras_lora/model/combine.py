"""Adapter arithmetic: the factors of the adapter `combine_adapters` adds.

Each method computes, in one LoRA layer, the new adapter's `(A, B)` from
the layer's adapters `i` (factors `A_i`, `B_i`, scale `s_i`) and their
weights `w_i`, as PEFT 0.21's `add_weighted_adapter(combination_type=...)`
does, on the host in float32 NumPy. The new adapter has `alpha = rank`
(scale 1), as PEFT's (`lora_alpha = r`).

- `"cat"`: `A = [A_1, ..., A_n]`, `B = [w_1·s_1·B_1; ...; w_n·s_n·B_n]`;
  exactly `Σ w_i·s_i·A_i·B_i`, rank `Σ r_i`.
- `"linear"`, `"ties"`, `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`
  merge the `A_i` and, apart, the `B_i` (equal ranks needed), each with the
  task-arithmetic rule of that name, weighting `A_i` by
  `sign(w_i·s_i)·sqrt(|w_i·s_i|)` and `B_i` by `sqrt(|w_i·s_i|)`.
- The `"..._svd"` methods (and `"svd"`, plain task arithmetic) merge the
  updates `s_i·A_i·B_i` themselves and keep the `svd_rank` leading singular
  directions: `B` gets `U·S`, `A` gets `Vᵀ`, optionally clamped at the
  `svd_clamp` quantile of their values.

Rules (PEFT's `peft.utils.merge_utils`): `magnitude` pruning keeps the
`int(density·size)` largest values of a tensor; `random` (DARE) keeps each
value with probability `density` and divides by `density`; `ties` elects per
element the sign of the sum (`"total"`) or the count (`"frequency"`) of the
pruned tensors and averages the weighted values of that sign. A density of 1
prunes nothing.
"""

import math
import numbers

import numpy as np
from keras import ops

SVD_METHODS = (
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("cat",) + FACTOR_METHODS + SVD_METHODS
# The methods that prune, and so need a `density`.
PRUNING = tuple(m for m in METHODS if m not in ("cat", "linear", "svd"))
SIGN_METHODS = ("total", "frequency")


def validate_options(method, density, seed, svd_rank, svd_clamp, majority_sign):
    """Checks `combine_adapters`' method options; returns `density` as a
    float (or `None`)."""
    where = "combine_adapters"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"{where}: `method` must be one of {list(METHODS)}. "
            f"Received: method={method!r}"
        )
    if method in PRUNING:
        if (
            density is None
            or isinstance(density, bool)
            or not isinstance(density, numbers.Real)
            or not 0.0 < float(density) <= 1.0
        ):
            raise ValueError(
                f"{where}: method={method!r} needs `density`, the fraction of "
                f"values kept, a number in (0, 1]. Received: density={density!r}"
            )
        density = float(density)
    elif density is not None:
        raise ValueError(
            f"{where}: method={method!r} does not prune; `density` is for "
            f"{list(PRUNING)}. Received: density={density!r}"
        )
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise ValueError(
            f"{where}: `seed` must be None or a non-negative int. "
            f"Received: seed={seed!r}"
        )
    if method not in SVD_METHODS and (svd_rank, svd_clamp) != (None, None):
        raise ValueError(
            f"{where}: `svd_rank` and `svd_clamp` are for {list(SVD_METHODS)}. "
            f"Received: method={method!r}, svd_rank={svd_rank!r}, "
            f"svd_clamp={svd_clamp!r}"
        )
    if svd_rank is not None and (
        isinstance(svd_rank, bool)
        or not isinstance(svd_rank, numbers.Integral)
        or svd_rank < 1
    ):
        raise ValueError(
            f"{where}: `svd_rank` must be None or a positive int. "
            f"Received: svd_rank={svd_rank!r}"
        )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool)
        or not isinstance(svd_clamp, numbers.Real)
        or not 0.0 <= float(svd_clamp) <= 1.0
    ):
        raise ValueError(
            f"{where}: `svd_clamp` must be None or a quantile in [0, 1]. "
            f"Received: svd_clamp={svd_clamp!r}"
        )
    if majority_sign not in SIGN_METHODS:
        raise ValueError(
            f"{where}: `majority_sign_method` must be one of {list(SIGN_METHODS)}. "
            f"Received: majority_sign_method={majority_sign!r}"
        )
    if majority_sign != "total" and "ties" not in method:
        raise ValueError(
            f"{where}: `majority_sign_method` is for the ties methods. "
            f"Received: method={method!r}, majority_sign_method={majority_sign!r}"
        )
    return density


def effective_method(method, count):
    """PEFT merges a single adapter linearly, whatever the method asked
    (`"cat"` excepted here: ours keeps its exact factors)."""
    return "linear" if count == 1 and method != "cat" else method


def check_ranks(method, ranks):
    """`ranks`: `{adapter name: its largest rank in the model}`. The factor
    methods need one rank (PEFT's rule); returns the new adapter's rank for
    the SVD methods' default (`svd_rank=None`): the largest."""
    if method in FACTOR_METHODS and len(set(ranks.values())) > 1:
        raise ValueError(
            f"combine_adapters: method={method!r} merges the A and B factors "
            f"elementwise and needs adapters of one rank (as PEFT); received "
            f"ranks {ranks}. Use method='cat' or an '_svd' method."
        )
    return max(ranks.values())


def combined_factors(parts, method, density, rng, svd_rank, svd_clamp, sign):
    """The new adapter's `(A, B)` in one layer, float32.

    Args:
        parts: `[(adapter, weight)]`, the layer's adapters to combine.
        method: as `effective_method` gives it.
        density, svd_clamp, sign: the method's options.
        rng: a `numpy.random.Generator` for DARE's masks.
        svd_rank: the SVD methods' rank.

    Returns:
        `(a, b)`: for `"cat"`, shaped like the adapters' factors; else `a`
        is `(fan_in, rank)` and `b` `(rank, fan_out)`.
    """
    adapters = [ad for ad, _ in parts]
    scaled = [w * ad.scale_value for ad, w in parts]
    if method == "cat":
        a = np.concatenate([_float32(ad.a) for ad in adapters], axis=-1)
        b = np.concatenate(
            [np.float32(w * ad.scale_value) * _float32(ad.b) for ad, w in parts], axis=0
        )
        return a, b
    # Each adapter's factors as `(fan_in, rank)` and `(rank, fan_out)`.
    a_list = [_float32(ad.a).reshape(-1, ad.rank) for ad in adapters]
    b_list = [_float32(ad.b).reshape(ad.rank, -1) for ad in adapters]
    if method in FACTOR_METHODS:
        if len({ad.rank for ad in adapters}) > 1:
            raise ValueError(
                f"combine_adapters: method={method!r} needs adapters of one "
                "rank in every layer; received ranks "
                f"{ {ad.name: ad.rank for ad in adapters} }."
            )
        roots = [math.sqrt(abs(s)) for s in scaled]
        # The sign goes on A only, so that B's does not cancel it.
        signed = [-r if s < 0 else r for s, r in zip(scaled, roots, strict=True)]
        rule = _RULES[method]
        return (
            rule(a_list, signed, density, rng, sign),
            rule(b_list, roots, density, rng, sign),
        )
    # As PEFT's `get_delta_weight`: each update carries its scale.
    deltas = [
        (a @ b) * np.float32(ad.scale_value)
        for ad, a, b in zip(adapters, a_list, b_list, strict=True)
    ]
    rule = _RULES["linear" if method == "svd" else method.removesuffix("_svd")]
    delta = rule(deltas, [w for _, w in parts], density, rng, sign)
    return _svd_factors(delta, svd_rank, svd_clamp)


def _float32(variable):
    return np.asarray(ops.convert_to_numpy(variable), np.float32)


def _svd_factors(delta, rank, clamp):
    """`(A, B)` of rank `rank` from the `(fan_in, fan_out)` update `delta`,
    as PEFT: with `deltaᵀ = U·S·Vᵀ` (PEFT's `(out, in)` layout),
    `B = (U_r·S_r)ᵀ` and `A = V_r` (signs by `svd_flip`), clamped to `±`
    quantile `clamp` of their values. Zero-padded where `delta` has fewer
    than `rank` singular values (PEFT fails there)."""
    u, s, vh = np.linalg.svd(delta.T, full_matrices=False)
    u, vh = svd_flip(u[:, :rank], vh[:rank])
    u = u * s[:rank]
    if clamp is not None:
        high = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), clamp)
        u = np.clip(u, -high, high)
        vh = np.clip(vh, -high, high)
    a = np.zeros((delta.shape[0], rank), np.float32)
    b = np.zeros((rank, delta.shape[1]), np.float32)
    a[:, : vh.shape[0]] = vh.T
    b[: u.shape[1]] = u.T
    return a, b


def svd_flip(u, vh):
    """Gives each singular pair `(u_i, v_i)` the sign that makes the
    largest `|u_i|` entry positive: an SVD's signs are arbitrary (LAPACK's
    differ between builds, and torch's from NumPy's), and `svd_clamp`'s
    quantile is not symmetric, so a fixed rule makes the clamp reproducible."""
    rows = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[rows, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


# ----- PEFT's merge rules (`peft.utils.merge_utils`) on NumPy arrays -------


def _weighted(tensors, weights):
    stacked = np.stack(tensors)
    column = np.asarray(weights, np.float32).reshape((-1,) + (1,) * tensors[0].ndim)
    return stacked, stacked * column


def _magnitude_prune(tensor, density):
    if density >= 1:
        return tensor
    keep = int(density * tensor.size)
    flat = tensor.ravel()
    mask = np.zeros(flat.shape, np.float32)
    mask[np.argsort(-np.abs(flat), kind="stable")[:keep]] = 1
    return tensor * mask.reshape(tensor.shape)


def bernoulli_mask(rng, shape, density):
    """DARE's mask: 1 with probability `density`, else 0 (float32)."""
    return (rng.random(shape) < density).astype(np.float32)


def _random_prune(tensor, density, rng):
    if density >= 1:
        return tensor
    return tensor * bernoulli_mask(rng, tensor.shape, density) / np.float32(density)


def _disjoint_merge(pruned, weighted, sign_method):
    signs = np.sign(pruned)
    votes = pruned.sum(axis=0) if sign_method == "total" else signs.sum(axis=0)
    mask = signs == np.where(votes >= 0, 1.0, -1.0).astype(np.float32)
    kept = mask.sum(axis=0).astype(np.float32)
    return (weighted * mask).sum(axis=0) / np.maximum(kept, np.float32(1))


def _linear(tensors, weights, density, rng, sign):
    return _weighted(tensors, weights)[1].sum(axis=0)


def _magnitude(tensors, weights, density, rng, sign):
    pruned = [_magnitude_prune(t, density) for t in tensors]
    return _weighted(pruned, weights)[1].sum(axis=0)


def _ties(tensors, weights, density, rng, sign):
    pruned = [_magnitude_prune(t, density) for t in tensors]
    return _disjoint_merge(*_weighted(pruned, weights), sign)


def _dare_linear(tensors, weights, density, rng, sign):
    pruned = [_random_prune(t, density, rng) for t in tensors]
    return _weighted(pruned, weights)[1].sum(axis=0)


def _dare_ties(tensors, weights, density, rng, sign):
    pruned = [_random_prune(t, density, rng) for t in tensors]
    return _disjoint_merge(*_weighted(pruned, weights), sign)


_RULES = {
    "linear": _linear,
    "magnitude_prune": _magnitude,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
}
