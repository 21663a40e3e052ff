"""Merge, then export: the artifact has no adapter variables or math.

A served model of `mixed_adapter_model` is exported as it is (nothing
merged): its `serve` endpoint takes the inputs plus `adapter_index`.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import keras

from keras_lora.atomic import atomic_output, check_parent
from keras_lora.model.merge import merge_lora
from keras_lora.model.mixed import INDEX_NAME, mixed_layer
from keras_lora.model.walk import iter_layers

FORMATS = ("tf_saved_model", "keras")


def export(model, path, format="tf_saved_model", check_finite=True, verbose=False):
    """Merges `model`'s adapters, then exports the plain model to `path`.

    Formats:
        `"tf_saved_model"`: a TensorFlow SavedModel directory with a `serve`
            endpoint, via Keras's own `Model.export` under the TensorFlow
            backend. On that backend it runs in process. On JAX and torch the
            merged model, which is plain Keras, is saved as `.keras` (a
            backend-neutral file) and exported by a subprocess running the
            TensorFlow backend: Keras cannot export from torch (it needs
            torch_xla), and its JAX export fails on models whose layers
            compare symbolic shapes (KerasHub's `PositionEmbedding`). The
            subprocess imports the modules that define the model's classes
            (`keras_hub` for a KerasHub model); classes defined in
            `__main__` must be registered in an importable module instead.
            Either way `tensorflow` must be installed.
        `"keras"`: the merged model as one `.keras` file.

    A served model from `mixed_adapter_model` is exported unmerged, with
    every adapter it routes to: the SavedModel's `serve` endpoint (and its
    `serving_default` signature) takes the model's inputs plus
    `adapter_index` (int32, `(batch,)`), named `inputs` and
    `adapter_index` for a single-input model, by their keys for dict
    inputs, `inputs_0`, `inputs_1`, ... for a list. Out-of-range indices
    give the base output there (a graph raises nothing).

    The output is written beside `path` and moved into place when complete,
    so an interrupted export leaves any earlier output intact. The folder
    that holds `path` must exist: keras_lora does not create it.

    Raises:
        ValueError: unknown `format`, `tensorflow` missing for a SavedModel,
            a folder at `path` for `format="keras"` (a file for a
            SavedModel), or `model` has no LoRA layers (see `merge_lora`).
        FileNotFoundError: the folder that is to hold `path` does not exist.
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
        if path.is_dir():
            raise ValueError(
                f"export(format='keras'): `path` '{path}' is a folder; this "
                "format writes one file ending in '.keras'. Pass a file path "
                f"such as '{path / 'model.keras'}', or format='tf_saved_model' "
                "for a SavedModel folder."
            )
        if path.suffix != ".keras":
            raise ValueError(f"`path` must end in '.keras'. Received: path='{path}'")
    elif path.exists() and not path.is_dir():
        raise ValueError(
            f"`path` '{path}' is a file; format='tf_saved_model' writes a "
            "SavedModel directory there."
        )
    check_parent(path)
    if mixed_layer(model) is not None:
        merged = model  # a mixed-batch model is served unmerged
    else:
        merged = merge_lora(model, check_finite=check_finite)
    return write_plain(merged, path, format, verbose)


def write_plain(model, path, format="tf_saved_model", verbose=False):
    """Writes `model`, which has no adapter math to merge (merged, never
    adapted, or a served mixed model), atomically to `path`: one `.keras`
    file, or a SavedModel written under the TensorFlow backend (in process
    there, in a subprocess from JAX and torch: see `export`). `export` and
    `keras-lora export` both end here."""
    if format == "keras":
        with atomic_output(path) as tmp:
            model.save(tmp)
        return path
    with atomic_output(path, directory=True) as tmp:
        if keras.backend.backend() == "tensorflow":
            _write_saved_model(model, str(tmp), verbose)
        else:
            _export_in_tensorflow_subprocess(model, tmp, verbose)
    return path


def _defining_modules(model):
    """The modules that define the classes of `model`, its layers and its
    preprocessor, other than Keras's own: the subprocess imports them so
    that their registered classes deserialize (e.g. `keras_hub`'s)."""
    objects = [model, *(layer for _, layer in iter_layers(model))]
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        objects += [preprocessor, getattr(preprocessor, "tokenizer", None)]
    modules = []
    for obj in objects:
        module = type(obj).__module__
        root = module.split(".")[0]
        if obj is None or root in ("keras", "builtins", "__main__"):
            continue
        if module not in modules:
            modules.append(module)
    return modules


def _export_in_tensorflow_subprocess(model, out_dir, verbose):
    with tempfile.TemporaryDirectory() as work:
        keras_file = os.path.join(work, "merged.keras")
        model.save(keras_file)
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        modules = _defining_modules(model)
        command = [sys.executable, "-m", "keras_lora.exporting", keras_file]
        result = subprocess.run(
            [*command, str(out_dir), *modules],
            env=env,
            capture_output=not verbose,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Exporting under the TensorFlow backend failed:\n{result.stderr or ''}"
            )


def _write_saved_model(model, out_dir, verbose=False):
    """Keras's own export; for a served mixed model, an `ExportArchive` with
    a named `adapter_index` input (TensorFlow backend)."""
    layer = mixed_layer(model)
    if layer is None:
        model.export(out_dir, format="tf_saved_model", verbose=verbose)
        return
    import tensorflow as tf

    def spec(tensor, name):
        return tf.TensorSpec(tensor.shape, tensor.dtype, name=name)

    struct = layer.model.input
    index = tf.TensorSpec((None,), "int32", name=INDEX_NAME)
    if isinstance(struct, dict):
        specs = {key: spec(t, key) for key, t in struct.items()}
        specs[INDEX_NAME] = index
        signature, serve = [specs], model
    else:
        many = isinstance(struct, (list, tuple))
        tensors = list(struct) if many else [struct]
        names = [f"inputs_{i}" for i in range(len(tensors))] if many else ["inputs"]
        signature = [spec(t, n) for t, n in zip(tensors, names, strict=True)]
        signature.append(index)

        def serve(*args):
            return model(list(args))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(out_dir, verbose=verbose)


def _main(argv):
    """`python -m keras_lora.exporting MODEL.keras OUT_DIR [MODULE ...]`, run
    by `export` under the TensorFlow backend; imports each MODULE first."""
    keras_file, out_dir, *modules = argv
    for module in modules:
        importlib.import_module(module)
    model = keras.saving.load_model(keras_file)
    _write_saved_model(model, out_dir)


if __name__ == "__main__":
    _main(sys.argv[1:])
