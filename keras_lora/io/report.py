"""How the adapter-file code tells the user about problems it may skip."""

import sys
import warnings


def user_stacklevel():
    """The `stacklevel` that makes a warning point at the caller of keras_lora."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        "keras_lora"
    ):
        frame, level = frame.f_back, level + 1
    return level


def report(problems, strict, what):
    """Raises `ValueError` (strict) or warns about `problems`, message lines."""
    if not problems:
        return
    message = f"{what}:\n  " + "\n  ".join(problems)
    if strict:
        raise ValueError(message + "\nPass strict=False to skip them with a warning.")
    warnings.warn(
        message + "\nSkipped them (strict=False).", stacklevel=user_stacklevel()
    )
