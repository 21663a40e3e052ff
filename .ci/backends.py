"""Run pytest once per Keras backend, each in its own process, and report.

    python .ci/backends.py [--jobs N] [--summary FILE] [-- PYTEST_ARGS...]

The backend is fixed per process, so each of tensorflow, jax and torch gets
its own `python -m pytest` run, every time: a failing backend never hides
another. At the end it prints one line per backend (passed, failed, skipped,
seconds, pytest's exit status) and exits 1 if any run failed, counting
pytest's exit status 5 ("no tests ran") as a failure. The counts come from
pytest's junit XML; the seconds are the wall-clock time of the whole run.

`--jobs N` runs up to N backends at once (default: 2 where the machine has
2 cores or more, else 1). The tests are mostly one Python thread each, so
on a 2-core machine jax (the longest) runs beside tensorflow then torch,
and the whole takes about the longest backend's time instead of the sum.
Each backend writes its output to a log, printed whole when it ends (no
interleaving), and gets its own pytest `--basetemp`.
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

BACKENDS = ("tensorflow", "jax", "torch")
# Longest first, so that parallel runs finish together (CI, 2 cores: jax
# took 1,244 s, tensorflow 711 s, torch 452 s at cd3f13e).
LONGEST_FIRST = ("jax", "tensorflow", "torch")
_print_lock = threading.Lock()
EXIT_MEANINGS = {
    0: "ok",
    1: "tests failed",
    2: "interrupted",
    3: "internal error",
    4: "usage error",
    5: "no tests ran",
}


def run_backend(backend, pytest_args, work_dir, capture=False):
    """Runs pytest under `backend`; returns its summary as a dict. With
    `capture`, its output goes to a log printed whole when it ends."""
    xml_path = os.path.join(work_dir, f"{backend}.xml")
    # --durations: the slowest tests, to keep CI's time in view as tests grow.
    command = [
        sys.executable,
        "-m",
        "pytest",
        f"--junitxml={xml_path}",
        f"--basetemp={os.path.join(work_dir, 'tmp-' + backend)}",
        "--durations=15",
    ]
    env = dict(os.environ, KERAS_BACKEND=backend)
    title = f"\n=== KERAS_BACKEND={backend} {shlex.join(command[1:] + pytest_args)}"
    start = time.monotonic()
    if capture:
        with _print_lock:
            print(f"=== KERAS_BACKEND={backend}: started", flush=True)
        log_path = os.path.join(work_dir, f"{backend}.log")
        with open(log_path, "w") as log:
            status = subprocess.run(
                command + pytest_args, env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        with _print_lock, open(log_path) as log:
            print(title, flush=True)
            sys.stdout.write(log.read())
            sys.stdout.flush()
    else:
        print(title, flush=True)
        status = subprocess.run(command + pytest_args, env=env).returncode
    seconds = time.monotonic() - start
    counts = junit_counts(xml_path)
    return dict(backend=backend, status=status, seconds=seconds, **counts)


def run_all(pytest_args, work_dir, jobs):
    """Every backend, `jobs` at a time; the results in `BACKENDS` order."""
    if jobs <= 1:
        return [run_backend(b, pytest_args, work_dir) for b in BACKENDS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            b: pool.submit(run_backend, b, pytest_args, work_dir, True)
            for b in LONGEST_FIRST
        }
        return [futures[b].result() for b in BACKENDS]


def junit_counts(xml_path):
    """passed/failed/skipped from pytest's junit XML (errors count as failed)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return dict(passed=0, failed=0, skipped=0)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    failed = total["failures"] + total["errors"]
    return dict(
        passed=total["tests"] - failed - total["skipped"],
        failed=failed,
        skipped=total["skipped"],
    )


def summary_lines(results):
    lines = [
        f"{'backend':<11} {'passed':>6} {'failed':>6} {'skipped':>7} "
        f"{'seconds':>8}  result"
    ]
    for r in results:
        meaning = EXIT_MEANINGS.get(r["status"], "failed")
        result = "ok" if r["status"] == 0 else f"FAILED (exit {r['status']}: {meaning})"
        lines.append(
            f"{r['backend']:<11} {r['passed']:>6} {r['failed']:>6} "
            f"{r['skipped']:>7} {r['seconds']:>8.1f}  {result}"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", help="also write the summary lines to this file")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2 if (os.cpu_count() or 1) >= 2 else 1,
        help="backends run at once (default: 2 on 2 cores or more, else 1)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keras-lora-pytest-") as work_dir:
        results = run_all(args.pytest_args, work_dir, args.jobs)
    lines = summary_lines(results)
    lines.append(
        f"{'wall clock':<11} {time.monotonic() - start:>32.1f}  "
        f"({args.jobs} backend{'s' if args.jobs > 1 else ''} at a time)"
    )
    print("\n=== pytest per backend\n" + "\n".join(lines))
    if args.summary:
        with open(args.summary, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if any(r["status"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
