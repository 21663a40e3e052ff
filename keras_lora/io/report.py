"""How the adapter-file code tells the user about problems it may skip."""

import warnings

from keras_lora.layers.checks import caller_stacklevel


def report(problems, strict, what):
    """Raises `ValueError` (strict) or warns about `problems`, message lines."""
    if not problems:
        return
    message = f"{what}:\n  " + "\n  ".join(problems)
    if strict:
        raise ValueError(message + "\nPass strict=False to skip them with a warning.")
    warnings.warn(
        message + "\nSkipped them (strict=False).", stacklevel=caller_stacklevel()
    )
