"""Process memory: current and peak resident set size, in bytes (Linux).

The peak is the kernel's high-water mark (`VmHWM`), which
`reset_peak()` lowers to the current RSS by writing `5` to
`/proc/self/clear_refs`. Where that is not possible (not Linux, or not
permitted), a background thread samples the RSS every millisecond instead.
"""

import threading
import time

import psutil


def current_rss():
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Measures the peak RSS of the code run inside a `with` block.

    After the block, `start` is the RSS on entry, `peak` the highest RSS
    seen, `added` their difference and `method` how the peak was taken.
    """

    def __enter__(self):
        self.start = current_rss()
        self.method = "VmHWM" if _reset_high_water_mark() else "sampled"
        self._sampled_peak = self.start
        self._stop = threading.Event()
        self._thread = None
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, current_rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self._sampled_peak, current_rss())
        else:
            self.peak = _high_water_mark()
        self.added = self.peak - self.start
        return False


def settle(variables):
    """Waits until the backend has computed `variables`.

    JAX dispatches work asynchronously: a model's initializers (a random
    fill per kernel, with kernel-sized temporaries) are still running when
    the model is returned. A peak measured right after building a model
    would count the tail of its construction, by chance, so every memory
    measurement settles the model first. TensorFlow and torch run eagerly.
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready([v.value for v in variables])


def release_free_memory():
    """Returns the allocator's freed memory to the system (glibc's
    `malloc_trim`), so that a peak taken next counts new memory instead of
    reusing what earlier work freed. A no-op where that is unavailable."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss():
    """The process's peak RSS so far (`VmHWM`), or the current RSS."""
    return _high_water_mark() or current_rss()


def _reset_high_water_mark():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
