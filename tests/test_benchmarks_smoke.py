"""Cheap checks of `benchmarks/`: the CLI's argument errors, and the report,
target table and chart on made-up figures. Nothing here runs a benchmark
or asserts a timing: CI runs `python -m benchmarks --quick` on every
backend, and targets are reported by the benchmark, never tested.
"""

import json
import pathlib
import sys

import pytest

# `benchmarks/` sits next to `tests/` and is not installed with the package.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import chart, report  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "theano"], "Unknown --backend 'theano'"),
        (["--backend", "jax", "--sections", "training,speed"], "Unknown --sections"),
        (["--backend", "jax", "--sections", ","], "Unknown --sections"),
        (["--backend", "all", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    ],
)
def test_bad_arguments_raise_value_error(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.parse_args(argv)


def test_good_arguments():
    args = cli.parse_args(
        ["--backend", "all", "--quick", "--out", "x", "--sections", "merge, memory"]
    )
    assert (args.backend, args.quick, args.out) == ("all", True, "x")
    assert args.sections == ["merge", "memory"]
    assert args.jobs == 1  # timings come from one backend at a time
    assert cli.parse_args(["--backend", "all", "--jobs", "2"]).jobs == 2


def _timing(ms, trainable):
    return {
        "median_ms": ms,
        "min_ms": ms,
        "samples_ms": [ms],
        "trainable_params": trainable,
    }


def _results():
    training = {
        "config": {
            "depth": 4,
            "width": 8,
            "classes": 2,
            "batch": 4,
            "rank": 2,
            "repeats": 1,
            "steps": 1,
        },
        "jit_compile": True,
        "rows": {
            "full": _timing(10.0, 300),
            "core_lora": _timing(9.0, 64),
            "keras_lora": _timing(6.0, 64),
            "floor": _timing(5.0, 8),
        },
        "ratios": {"keras_lora/core_lora": 6 / 9, "keras_lora/floor": 1.2},
    }
    inference = {
        "config": {"depth": 4, "width": 8, "rank": 2, "repeats": 1, "steps": 1},
        "batches": {
            "1": {
                "rows": {k: _timing(1.0, 0) for k in ("plain", "unmerged", "merged")},
                "ratios": {"merged/plain": 1.0, "unmerged/plain": 1.1},
            },
        },
    }
    point = {
        "params": 100,
        "layers": 1,
        "merge_s": 0.2,
        "numpy_s": 0.1,
        "merge/numpy": 2.0,
        "merge_ns_per_param": 2e6,
    }
    merge = {
        "config": {"width": 10, "rank": 2},
        "points": [point, point],
        "max_merge/numpy": 2.0,
        "per_param_growth": 1.0,
    }
    return {
        "backend": "jax",
        "quick": True,
        "machine": {
            "cpu": "cpu",
            "cpu_count": 2,
            "memory_gb": 1.0,
            "os": "os",
            "load_average_at_start": [0.0, 0.0, 0.0],
        },
        "sections": {"training": training, "inference": inference, "merge": merge},
    }


def test_report_targets_and_chart(tmp_path):
    results = _results()
    text = report.finish(results)
    status = {(t["figure"], t["where"]): t["status"] for t in results["targets"]}
    assert status[("keras_lora/core_lora", "MLP")] == "pass"
    assert status[("keras_lora/floor", "MLP")] == "MISS"
    assert status[("merge/numpy", "all sizes")] == "pass"
    assert "train step: keras_lora / floor" in text
    report.write(str(tmp_path), "results", results, text)
    assert json.loads((tmp_path / "results.json").read_text())["backend"] == "jax"
    assert report.summary_markdown([results]).count("\n") == 3
    if chart.available():
        chart.write(str(tmp_path / "chart.png"), [results])
        assert (tmp_path / "chart.png").stat().st_size > 0
