"""Runs one measurement in a fresh Python process with a chosen backend.

Peak memory is a per-process figure, so each memory measurement gets its
own process: `python -m benchmarks.isolated BACKEND TASK JSON_ARGS`. The
child prints its result as one JSON line, prefixed with `RESULT `.
"""

import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile

PREFIX = "RESULT "

# task name -> "module:function"; the function takes the decoded JSON args.
TASKS = {
    "train_memory": "benchmarks.memory:train_memory_worker",
    "apply_lora_memory": "benchmarks.memory:apply_lora_memory_worker",
    "merge_scaling": "benchmarks.merging:merge_scaling_worker",
    "qlora_train": "benchmarks.qlora:qlora_train_worker",
    "remat_memory": "benchmarks.qlora:remat_memory_worker",
    # `--quick` smoke runs: several `(task, args)` one after the other in one
    # process (its figures are meaningless; the workers' code runs).
    "in_one_process": "benchmarks.isolated:in_one_process_worker",
}


# XLA's own options for a quick smoke run (`smoke_process`): the ones
# `jax_disable_most_optimizations` sets on JAX.
SMOKE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def run_isolated(backend, task, args, timeout=1800):
    """Runs `task(args)` in a child process on `backend`; returns its result."""
    return run_isolated_together(backend, [(task, args)], timeout)[0]


def run_isolated_together(backend, jobs, timeout=1800):
    """Runs each `(task, args)` of `jobs` in its own child process, all at
    once (for measurements that do not time anything, such as peak memory);
    returns their results in order."""
    return collect_isolated(start_isolated(backend, jobs), timeout)


def start_isolated(backend, jobs):
    """Starts `run_isolated_together`'s children and returns at once; their
    results come from `collect_isolated`. Each child writes to temporary
    files, so that it never waits on a full pipe while this process does
    other work."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    for task, _ in jobs:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASKS)}")
    started = []
    for task, args in jobs:
        command = [sys.executable, "-m", "benchmarks.isolated", backend, task]
        stdout = tempfile.TemporaryFile("w+")
        stderr = tempfile.TemporaryFile("w+")
        child = subprocess.Popen(
            command + [json.dumps(args)],
            env=env,
            stdout=stdout,
            stderr=stderr,
            text=True,
            cwd=_project_root(),
        )
        started.append((backend, task, child, stdout, stderr))
    return started


def collect_isolated(started, timeout=1800):
    """Waits for the children of `start_isolated`; returns their results in
    order."""
    results = []
    for backend, task, child, stdout, stderr in started:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        outputs = []
        for f in (stdout, stderr):
            f.seek(0)
            outputs.append(f.read())
            f.close()
        results.append(_parse(task, backend, child.returncode, *outputs))
    return results


def stop_isolated(started):
    """Kills the children of `start_isolated` still running (a section
    failed before collecting them)."""
    for _, _, child, stdout, stderr in started:
        if child.poll() is None:
            child.kill()
            child.wait()
        stdout.close()
        stderr.close()


def _parse(task, backend, returncode, stdout, stderr):
    for line in reversed(stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    raise RuntimeError(
        f"Isolated task {task!r} on {backend} failed (exit {returncode}):"
        f"\n{stderr[-3000:]}"
    )


def _project_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_one_process_worker(jobs):
    """Every `(task, args)` of `jobs` in this one process, in order (a
    `--quick` smoke run: `smoke_process` makes it cheaper)."""
    smoke_process(os.environ.get("KERAS_BACKEND"))
    results = []
    for task, args in jobs:
        smoke_freeze()
        results.append(task_function(task)(args))
    return results


def smoke_process(backend):
    """Makes this process cheaper, for a `--quick` smoke run (whose timings
    are not meaningful). Full runs never call it.

    - XLA compiles without most of its optimization passes, as the JAX
      tests do (`tests/conftest.py`): on JAX through
      `jax_disable_most_optimizations`; on TensorFlow through `XLA_FLAGS`,
      read when XLA first compiles (a tiny Llama's train step compiles in
      1.6-2.5 s instead of 2.3-3.5 s), and inherited by the process's
      children.
    - torch runs its ops on one thread: the smoke run shares 2 cores between
      two backends and their memory children, and torch's threads waiting
      on each other made tiny matmuls take 12 ms (the serving section: 12-15
      s with torch's default threads, 4 s with one, on a loaded 2-core
      machine).
    """
    if backend == "jax":
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    elif backend == "tensorflow":
        flags = os.environ.get("XLA_FLAGS", "")
        if SMOKE_XLA_FLAGS not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {SMOKE_XLA_FLAGS}".strip()
    elif backend == "torch":
        import torch

        torch.set_num_threads(1)


def smoke_freeze():
    """Collects this process's garbage, then moves every object still alive
    out of the garbage collector's reach (`gc.freeze`), for a `--quick`
    smoke run: later collections scan only newer objects. Keras collects on
    every variable it deletes (9 times in one `model.quantize` of a tiny
    Llama), and with TensorFlow, JAX, torch and KerasHub imported a full
    collection takes about 0.35 s on a 2-core CI machine. Full runs never
    call it (a cycle of frozen objects is never freed)."""
    gc.collect()
    gc.freeze()


def task_function(task):
    """The function registered for `task` in `TASKS`."""
    module_name, function_name = TASKS[task].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv):
    backend, task, args = argv
    os.environ["KERAS_BACKEND"] = backend
    result = task_function(task)(json.loads(args))
    print(PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
