"""Every LoRA option and its one validator. No Keras here.

Layers, adapter-file readers and the CLI all check options through these
functions, so a value is accepted or refused the same way wherever it comes
from (a constructor argument, a `.keras` config, an adapter file's
metadata, a command line). Each returns the normalized value or raises a
`TypeError`/`ValueError` that names the argument, what was expected and
what was received.
"""

import numbers
import re

import numpy as np

INITS = ("default", "gaussian", "pissa", "olora", "loftq")
# Inits that rewrite the frozen kernel into a residual.
BASE_CHANGING_INITS = ("pissa", "olora")
# Inits whose factors fit one quantized base (LoftQ: `Q + s·A·B ≈ W`):
# the kernel is not rewritten, but the adapter is right on that base only.
QUANTIZED_BASE_INITS = ("loftq",)
DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def validate_rank(rank, argument="rank"):
    """Returns `rank` if it is a positive integer, else raises."""
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral):
        raise TypeError(
            f"`{argument}` must be a positive integer. Received: {argument}={rank!r} "
            f"of type {type(rank).__name__}"
        )
    if rank <= 0:
        raise ValueError(
            f"`{argument}` must be a positive integer. Received: {argument}={rank}"
        )
    return int(rank)


def validate_alpha(alpha, argument="alpha"):
    """Returns `alpha` as a float if it is `None` or a finite positive number."""
    if alpha is None:
        return None
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"`{argument}` must be a positive number or None. "
            f"Received: {argument}={alpha!r} of type {type(alpha).__name__}"
        )
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"`{argument}` must be a finite positive number or None. "
            f"Received: {argument}={alpha}"
        )
    return float(alpha)


def pattern_value(pattern, name, default, separator="."):
    """PEFT's rule for `rank_pattern`/`alpha_pattern`: the value of the
    first key that, as a regular expression, matches the end of `name`
    (a module name, `separator` "."; a Keras layer path, "/") after a
    separator, else `default`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*{re.escape(separator)})?({key})$", name):
            return value
    return default


def validate_pattern(pattern, argument, validate):
    """`{pattern: value}` of a `rank_pattern`/`alpha_pattern` (PEFT's
    per-module ranks and alphas), each value checked by `validate` (one of
    `validate_rank`, `validate_alpha`); `None` is `{}`."""
    pattern = {} if pattern is None else pattern
    if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
        raise TypeError(
            f"`{argument}` must map layer-name patterns (str) to values. "
            f"Received: {argument}={pattern!r}"
        )
    return {k: validate(v, f"{argument}[{k!r}]") for k, v in pattern.items()}


def validate_flag(value, argument):
    """Returns `value` if it is a real bool: `"false"` must not mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{argument}` must be True or False. Received: {argument}={value!r} "
            f"of type {type(value).__name__}"
        )
    return bool(value)


def validate_dropout(dropout, argument="dropout"):
    """Returns `dropout` as a float in `[0, 1)`, else raises."""
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
        raise TypeError(
            f"`{argument}` must be a number in [0, 1). "
            f"Received: {argument}={dropout!r} of type {type(dropout).__name__}"
        )
    if not np.isfinite(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"`{argument}` must be a number in [0, 1). Received: {argument}={dropout}"
        )
    return float(dropout)


def validate_init(init, argument="init"):
    """Returns `init` if it is one of `INITS` (`True`/`None`: the default)."""
    if init is True or init is None:
        return "default"
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(
            f"`{argument}` must be one of {INITS}. Received: {argument}={init!r}"
        )
    return init


def validate_adapter_name(name, argument="adapter_name"):
    """Returns `name` if it is a usable adapter name, else raises."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"`{argument}` must be a non-empty string of letters, digits, "
            "'_', '.' and '-' (not starting with '.' or '-'). "
            f"Received: {argument}={name!r}"
        )
    return name


FACTORINGS = ("standard", "keras")
# What a config or adapter file without a `factoring` entry holds: every
# file written before the option existed used Keras core's factoring.
LEGACY_FACTORING = "keras"


def validate_factoring(factoring, argument="factoring"):
    """Returns `factoring` if it is `None` or one of `FACTORINGS`."""
    if factoring is not None and (
        not isinstance(factoring, str) or factoring not in FACTORINGS
    ):
        raise ValueError(
            f"`{argument}` must be one of {FACTORINGS} or None. "
            f"Received: {argument}={factoring!r}"
        )
    return factoring
