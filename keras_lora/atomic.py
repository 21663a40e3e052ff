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
    The folder that holds `path` must exist (see `check_parent`).
    """
    path = Path(path)
    check_parent(path)
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


def check_parent(path):
    """Raises unless the folder that is to hold `path` exists.

    keras_lora never creates folders above an output, as Keras's
    `model.save` does not: a mistyped folder is an error, not a new tree.

    Raises:
        FileNotFoundError: the folder does not exist.
        NotADirectoryError: a file is there.
    """
    parent = Path(path).absolute().parent
    if parent.is_dir():
        return
    what = "is a file" if parent.exists() else "does not exist"
    error = NotADirectoryError if parent.exists() else FileNotFoundError
    folder = Path(path).parent
    raise error(
        f"Cannot write `path` '{path}': the folder '{folder}' {what}. "
        "keras_lora does not create folders; create it first "
        f"(`os.makedirs('{folder}')`) or pick another path."
    )


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
