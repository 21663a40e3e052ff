"""Run pytest once per Keras backend, each in its own process, and report.

    python .ci/backends.py [--summary FILE] [-- PYTEST_ARGS...]

The backend is fixed per process, so each of tensorflow, jax and torch gets
its own `python -m pytest` run, every time: a failing backend never hides
another. At the end it prints one line per backend (passed, failed, skipped,
seconds, pytest's exit status) and exits 1 if any run failed, counting
pytest's exit status 5 ("no tests ran") as a failure. The counts come from
pytest's junit XML; the seconds are the wall-clock time of the whole run.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

BACKENDS = ("tensorflow", "jax", "torch")
EXIT_MEANINGS = {
    0: "ok",
    1: "tests failed",
    2: "interrupted",
    3: "internal error",
    4: "usage error",
    5: "no tests ran",
}


def run_backend(backend, pytest_args, xml_dir):
    """Runs pytest under `backend`; returns its summary as a dict."""
    xml_path = os.path.join(xml_dir, f"{backend}.xml")
    # --durations: the slowest tests, to keep CI's time in view as tests grow.
    command = [
        sys.executable,
        "-m",
        "pytest",
        f"--junitxml={xml_path}",
        "--durations=15",
    ]
    env = dict(os.environ, KERAS_BACKEND=backend)
    print(f"\n=== KERAS_BACKEND={backend} {shlex.join(command[1:] + pytest_args)}")
    sys.stdout.flush()
    start = time.monotonic()
    status = subprocess.run(command + pytest_args, env=env).returncode
    seconds = time.monotonic() - start
    counts = junit_counts(xml_path)
    return dict(backend=backend, status=status, seconds=seconds, **counts)


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
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keras-lora-junit-") as xml_dir:
        results = [run_backend(b, args.pytest_args, xml_dir) for b in BACKENDS]
    lines = summary_lines(results)
    print("\n=== pytest per backend\n" + "\n".join(lines))
    if args.summary:
        with open(args.summary, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if any(r["status"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
