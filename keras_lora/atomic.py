"""Atomic writes: build the output beside its destination, then rename."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path, directory=False):
    """Yields a temporary path in `path`'s folder; on success moves it to `path`.

    If the body raises, the temporary output is removed and whatever was at
    `path` before is left untouched. A file is moved with `os.replace`,
    which is atomic. A directory replaces an existing one with two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if directory:
            _replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _replace_directory(src, dst):
    if not dst.exists():
        os.replace(src, dst)
        return
    if not dst.is_dir():
        raise ValueError(f"Cannot write a directory to '{dst}': a file is there.")
    old = src.parent / (dst.name + ".old")
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
