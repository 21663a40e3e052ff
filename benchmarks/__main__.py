"""`python -m benchmarks --backend {tensorflow,jax,torch,all} [--quick] [--out DIR]
[--jobs N]`.

Each backend runs in its own process. The backend of this process is set
through `KERAS_BACKEND` before Keras is imported; a backend other than an
already-set `KERAS_BACKEND`, and every backend of `--backend all`, runs in a
child process. Writes `results-BACKEND.{txt,json}` and `chart-BACKEND.png`
(and, for `all`, `summary.md`, `results.json` and `chart.png`) to `--out`.

`--jobs N` runs up to N backends' children at once (`--backend all` only).
Use it for the `--quick` smoke run (CI: the sections run and write their
reports, timings are not meaningful); timings you report come from `--jobs
1` (the default), where nothing else runs beside a backend.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

from benchmarks.config import SECTIONS

BACKENDS = ("tensorflow", "jax", "torch")


def parse_args(argv=None):
    """Parses and validates the command line; raises `ValueError` on bad values."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="keras_lora benchmarks: training, inference, memory, merge.",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        help="tensorflow, jax, torch or all (default: $KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repeats, for CI (timings not meaningful)",
    )
    parser.add_argument(
        "--out", default="bench-out", help="output folder (default: bench-out)"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="backends run at once with --backend all (default 1: for timings)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}.")
    if args.backend not in BACKENDS + ("all",):
        raise ValueError(
            f"Unknown --backend {args.backend!r}; expected one of "
            f"{', '.join(BACKENDS)} or all."
        )
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(
            f"Unknown --sections {unknown or args.sections!r}; choose from "
            f"{', '.join(SECTIONS)}."
        )
    args.sections = sections
    return args


def main(argv=None):
    args = parse_args(argv)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    env_backend = os.environ.get("KERAS_BACKEND")
    if len(backends) == 1 and env_backend in (None, backends[0]):
        all_results = [_run_here(backends[0], args)]
    elif args.jobs > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_run_child, b, args) for b in backends]
            all_results = [f.result() for f in futures]
    else:
        all_results = [_run_child(backend, args) for backend in backends]
    if len(all_results) > 1:
        _write_summary(args.out, all_results)
    return 0


def _run_here(backend, args):
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from benchmarks import chart, report, suite

    results = suite.run(
        args.quick, args.sections, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    text = report.finish(results)
    print(text)
    stem = f"results-{backend}"
    report.write(args.out, stem, results, text)
    if chart.available():
        chart.write(os.path.join(args.out, f"chart-{backend}.png"), [results])
    else:
        print(
            "matplotlib is not installed (pip install keras-lora[bench]): "
            "no chart written.",
            file=sys.stderr,
        )
    return results


def _run_child(backend, args):
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--backend",
        backend,
        "--out",
        args.out,
        "--sections",
        ",".join(args.sections),
    ]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ, KERAS_BACKEND=backend)
    subprocess.run(
        command,
        env=env,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    with open(os.path.join(args.out, f"results-{backend}.json")) as f:
        return json.load(f)


def _write_summary(out_dir, all_results):
    from benchmarks import chart, machine, report

    info = all_results[0]["machine"]
    loads = "; ".join(
        f"{r['backend']} {r['machine']['load_average_at_start']}" for r in all_results
    )
    text = (
        f"Machine: {machine.one_line(info)}. Load average (1, 5, 15 min) at the "
        f"start of each backend: {loads}.\n\n" + report.summary_markdown(all_results)
    )
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(all_results, f, indent=1)
    if chart.available():
        chart.write(os.path.join(out_dir, "chart.png"), all_results)
    print(text)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:
        print(f"python -m benchmarks: error: {error}", file=sys.stderr)
        sys.exit(2)
