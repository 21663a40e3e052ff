"""Counting what trains."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainableSummary:
    """Trainable and total weight counts of a model."""

    trainable: int
    total: int

    def __post_init__(self):
        for field in ("trainable", "total"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(
                    f"`{field}` must be a non-negative integer. Received: "
                    f"{field}={value!r} of type {type(value).__name__}"
                )
            if value < 0:
                raise ValueError(
                    f"`{field}` must be a non-negative integer. Received: "
                    f"{field}={value}"
                )
        if self.trainable > self.total:
            raise ValueError(
                f"`trainable` ({self.trainable}) cannot exceed `total` ({self.total})."
            )

    @property
    def percent(self):
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self):
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_summary(model, print_fn=print):
    """Prints and returns a model's trainable and total parameter counts.

    Prints e.g. `trainable params: 120,000 || all params: 50,130,000 ||
    trainable%: 0.2394`. Pass `print_fn=None` to print nothing.

    Returns:
        A `TrainableSummary` with `trainable`, `total` and `percent`.
    """
    if not hasattr(model, "trainable_weights") or not hasattr(model, "weights"):
        raise TypeError(
            "`model` must be a Keras model or layer. "
            f"Received: {model!r} of type {type(model).__name__}"
        )
    if print_fn is not None and not callable(print_fn):
        raise TypeError(
            "`print_fn` must be a callable or None. Received: "
            f"print_fn={print_fn!r} of type {type(print_fn).__name__}"
        )
    summary = TrainableSummary(
        trainable=_count(model.trainable_weights), total=_count(model.weights)
    )
    if print_fn is not None:
        print_fn(str(summary))
    return summary


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))
