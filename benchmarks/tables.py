"""Plain-text table helpers shared by the report and the sections.

They live apart from `benchmarks.report` so that a section can format its
own lines without importing the report, which imports the sections.
"""


def fmt(value, digits=2):
    """`value` to `digits` decimals, or `n/a` for `None`."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(header, rows):
    """Lines of a right-aligned plain-text table (first column left-aligned)."""
    widths = [
        max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)
    ]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
