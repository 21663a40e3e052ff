"""The adapter file formats, and reading any of them into records.

`WRITERS` names the formats `save_adapter` writes; `READERS` are tried in
order, the first that claims a path reads it. `find_reader` and
`read_records` are the one reader that `load_adapter` and `hotswap_adapter`
share: the format of a path, then the file read into validated
`LayerRecord`s keyed by Keras layer path, following a top-level layer
renamed by Keras's name counter.

A format is a module with `NAME` and `DESCRIPTION` and, to be read,
`claims(path) -> bool` and `read(path, name_map, model, layers, strict)`
returning `LayerRecord`s (`layers`: the model's `(path, layer)` pairs); to
be written, `check(model, records, path, name_map)`, which raises on what
it cannot hold, and `save(model, records, path, name_map) -> Path`.
"""

import os

from keras_lora.io import keras_lora_format, kerashub_format, peft_format
from keras_lora.io.names import follow_renumbered_layers

WRITERS = {fmt.NAME: fmt for fmt in (keras_lora_format, peft_format)}
# Tried in order; the keras_lora reader claims whatever the others do not.
READERS = (peft_format, kerashub_format, keras_lora_format)
FORMATS = tuple(WRITERS)


def check_path(path):
    """Raises `TypeError` unless `path` is a str or `os.PathLike`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike. Received: {path!r} "
            f"of type {type(path).__name__}"
        )


def find_reader(path):
    """The format of `READERS` that reads `path`.

    Raises:
        FileNotFoundError: nothing at `path`.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No adapter file or PEFT directory at '{path}'.")
    return next(fmt for fmt in READERS if fmt.claims(path))


def read_records(reader, path, name_map, model, layers, strict):
    """Reads the adapter at `path` into records for `model`.

    Args:
        reader: the format reading it, from `find_reader(path)`.
        path: an adapter file or PEFT directory.
        name_map: as `load_adapter`'s (already checked).
        model: the `keras.Model` the records are for.
        layers: `model`'s `(path, layer)` pairs, from the one walk.
        strict: as `load_adapter`'s.

    Returns:
        `(records, source)`: the validated `LayerRecord`s, and what was
        read, for messages (`"adapter file 'x.safetensors'"`).

    Raises:
        TypeError, ValueError: the file is not a valid adapter (see each
            format).
    """
    records = reader.read(path, name_map, model, layers, strict)
    if name_map is None:
        records = follow_renumbered_layers(records, layers)
    return records, f"{reader.DESCRIPTION} '{path}'"
