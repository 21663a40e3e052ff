"""Runs the sections for the backend of this process (`KERAS_BACKEND`)."""

import time

import keras

from benchmarks import config as configs
from benchmarks import machine
from benchmarks.config import SECTIONS
from benchmarks.isolated import smoke_freeze, smoke_process, stop_isolated


def run(quick, sections=SECTIONS, log=print):
    """Returns the results of `sections` on this process's Keras backend."""
    from benchmarks import (
        eager_forward,
        hotswap,
        inference,
        memory,
        merging,
        serving,
        training,
        transformer,
    )

    backend = keras.backend.backend()
    if quick:  # a smoke run: cheaper compilations (timings not meaningful)
        smoke_process(backend)
    config = configs.get(quick)
    started = {}
    steps = {
        "training": lambda: training.run_mlp(config),
        "transformer": lambda: transformer.run(config),
        "block": lambda: training.run_block(config),
        "inference": lambda: inference.run(config),
        "eager": lambda: eager_forward.run(**eager_forward.sizes(quick)),
        "memory": lambda: memory.run(config, backend, quick, started.get("memory")),
        "merge": lambda: merging.run(config, backend),
        "hotswap": lambda: hotswap.run(config),
        "serving": lambda: serving.run(config),
    }
    results = {
        "backend": backend,
        "quick": quick,
        "machine": machine.describe(),
        "sections": {},
        "seconds": {},
    }
    if quick and "memory" in sections:  # its child runs beside the others
        started["memory"] = memory.start_quick(config, backend)
    try:
        for name in sections:
            log(f"[{backend}] {name} ...")
            start = time.perf_counter()
            if quick:  # what earlier sections imported: out of gc's reach
                smoke_freeze()
            results["sections"][name] = steps[name]()
            results["seconds"][name] = round(time.perf_counter() - start, 1)
            log(f"[{backend}] {name}: {results['seconds'][name]} s")
    finally:
        for children in started.values():
            stop_isolated(children)
    return results
