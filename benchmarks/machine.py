"""What the benchmark ran on, for the report."""

import importlib.metadata
import os
import platform


def describe():
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": _load_average(),
        "packages": {},
    }
    for package in (
        "keras",
        "tensorflow-cpu",
        "tensorflow",
        "jax",
        "jaxlib",
        "torch",
        "peft",
        "numpy",
    ):
        try:
            info["packages"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def one_line(info):
    gb = info["memory_gb"]
    memory = f", {gb:.0f} GB RAM" if gb else ""
    return f"{info['cpu']}, {info['cpu_count']} cores{memory}, {info['os']}"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb():
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return None


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
