"""Merge, then export: the artifact has no adapter variables or math."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import keras

from keras_lora.atomic import atomic_output
from keras_lora.surgery import merge_lora

FORMATS = ("tf_saved_model", "keras")


def export(model, path, format="tf_saved_model", check_finite=True, verbose=False):
    """Merges `model`'s adapters, then exports the plain model to `path`.

    Formats:
        `"tf_saved_model"`: a TensorFlow SavedModel directory with a `serve`
            endpoint, via Keras's own `Model.export`. On the TensorFlow and
            JAX backends this runs in process. Keras cannot export from the
            torch backend (it needs torch_xla), so there the merged model is
            saved as `.keras` and exported by a subprocess running the
            TensorFlow backend. Either way `tensorflow` must be installed.
        `"keras"`: the merged model as one `.keras` file.

    The output is written beside `path` and moved into place when complete,
    so an interrupted export leaves any earlier output intact.

    Raises:
        ValueError: unknown `format`, `tensorflow` missing for a SavedModel,
            or `model` has no LoRA layers (see `merge_lora`).
    """
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {FORMATS}. Received: format={format!r}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike. Received: {path!r} "
            f"of type {type(path).__name__}"
        )
    if format == "tf_saved_model" and importlib.util.find_spec("tensorflow") is None:
        raise ValueError(
            "export(format='tf_saved_model') needs TensorFlow, on every backend. "
            "Install it with `pip install tensorflow-cpu`."
        )
    path = Path(path)
    if format == "keras":
        if path.suffix != ".keras":
            raise ValueError(f"`path` must end in '.keras'. Received: path='{path}'")
        if path.is_dir():
            raise ValueError(
                f"`path` '{path}' is a directory; format='keras' writes one "
                "'.keras' file there."
            )
    elif path.exists() and not path.is_dir():
        raise ValueError(
            f"`path` '{path}' is a file; format='tf_saved_model' writes a "
            "SavedModel directory there."
        )
    merged = merge_lora(model, check_finite=check_finite)
    if format == "keras":
        with atomic_output(path) as tmp:
            merged.save(tmp)
        return path
    with atomic_output(path, directory=True) as tmp:
        if keras.backend.backend() == "torch":
            _export_in_tensorflow_subprocess(merged, tmp, verbose)
        else:
            merged.export(str(tmp), format="tf_saved_model", verbose=verbose)
    return path


def _export_in_tensorflow_subprocess(model, out_dir, verbose):
    with tempfile.TemporaryDirectory() as work:
        keras_file = os.path.join(work, "merged.keras")
        model.save(keras_file)
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        result = subprocess.run(
            [sys.executable, "-m", "keras_lora.exporting", keras_file, str(out_dir)],
            env=env,
            capture_output=not verbose,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Exporting under the TensorFlow backend failed:\n{result.stderr or ''}"
            )


def _main(argv):
    """`python -m keras_lora.exporting MODEL.keras OUT_DIR`, run by `export`."""
    keras_file, out_dir = argv
    model = keras.saving.load_model(keras_file)
    model.export(out_dir, format="tf_saved_model", verbose=False)


if __name__ == "__main__":
    _main(sys.argv[1:])
