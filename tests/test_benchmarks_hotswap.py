"""The hot-swap section's report and targets, on made-up figures (nothing
here times anything; `python -m benchmarks --sections hotswap` measures)."""

import pathlib
import sys

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import hotswap, targets  # noqa: E402


def _section(retraces, swap_ms, raw_ms):
    def row(ms):
        return {"median_ms": ms, "min_ms": ms, "samples_ms": [ms]}

    return {
        "config": {
            "depth": 4,
            "width": 8,
            "max_rank": 8,
            "ranks": [2],
            "alphas": [1.0],
        },
        "retraces": retraces,
        "retrace_counter": "traces",
        "swaps": 100,
        "files": 1,
        "assigned_bytes": 1000,
        "variables": 3,
        "rows": {
            "hotswap_adapter": row(swap_ms),
            "raw assign": row(raw_ms),
            "swap's assign": row(raw_ms),
        },
        "ratio_min": swap_ms / raw_ms,
        "ratio_median": swap_ms / raw_ms,
        "own_ratio_min": swap_ms / raw_ms,
    }


def test_report_lines_and_targets():
    section = _section(retraces=0, swap_ms=3.0, raw_ms=1.0)
    text = "\n".join(hotswap.report_lines(section))
    assert "retraces over 100 swaps" in text and "ratio 3.00 median" in text
    rows = targets.check({"sections": {"hotswap": section}})
    status = {(r["figure"], r["where"]): r["status"] for r in rows}
    assert status == {
        ("hotswap/retraces", "100 swaps"): "pass",
        ("hotswap/raw_assign", "min"): "MISS",
        ("hotswap/raw_assign", "median"): "MISS",
    }
    rows = targets.check({"sections": {"hotswap": _section(1, 1.5, 1.0)}})
    assert [r["status"] for r in rows] == ["MISS", "pass", "pass"]
