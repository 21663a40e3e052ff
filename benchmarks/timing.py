"""Interleaved wall-clock timing: warm-ups, repeats, medians.

Every timed callable must block until its result is ready (Keras's
`train_on_batch` and `predict_on_batch` return NumPy values, so they do).
"""

import statistics
import time


def time_interleaved(functions, repeats, steps, warmup):
    """Times each callable in `functions` (a dict), interleaving the rows.

    Each callable first runs `warmup` times. Then, `repeats` times, every
    row runs `steps` calls back to back; the row order rotates between
    repeats so that no row always follows the same neighbour.

    Returns:
        `{name: {"median_ms": ..., "min_ms": ..., "samples_ms": [...]}}`,
        each sample being the mean time of one call within a repeat.
    """
    names = list(functions)
    for name in names:
        for _ in range(warmup):
            functions[name]()
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            function = functions[name]
            start = time.perf_counter()
            for _ in range(steps):
                function()
            samples[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {name: summarize(values) for name, values in samples.items()}


def summarize(samples_ms):
    return {
        "median_ms": statistics.median(samples_ms),
        "min_ms": min(samples_ms),
        "samples_ms": [round(s, 4) for s in samples_ms],
    }


def ratio(numerator, denominator):
    """`numerator / denominator`, or `None` when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
