"""Reading a `.safetensors` file into numpy, bfloat16 included.

`safetensors`' numpy API cannot return bfloat16 tensors (numpy has no such
dtype unless `ml_dtypes` registered one), yet PEFT adapters are often saved
in bfloat16. Those tensors are read from the file's bytes with `ml_dtypes` (a
Keras dependency) and widened to float32, exactly. Every other dtype goes
through `safetensors` itself.
"""

import json

import numpy as np
import safetensors


def read_safetensors(path):
    """Returns `(tensors, metadata)`: numpy arrays by key, and the header's
    metadata dict (or `None`).

    Raises:
        OSError: the file cannot be opened.
        ValueError: it is truncated, corrupted or not a safetensors file, or
            holds a dtype that cannot be read.
    """
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
            tensors, wide = {}, []
            for key in f.keys():
                try:
                    tensors[key] = _widen(f.get_tensor(key))
                except TypeError:  # a dtype numpy lacks, e.g. bfloat16
                    wide.append(key)
    except OSError:
        raise
    except Exception as e:
        raise ValueError(
            f"'{path}' is not a readable safetensors file (truncated, "
            f"corrupted or another format): {e}"
        ) from None
    if wide:
        tensors.update(_read_bfloat16(path, wide))
    return tensors, metadata


def _widen(array):
    # With `ml_dtypes` imported, numpy may hand back a bfloat16 array.
    if array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def _read_bfloat16(path, keys):
    import ml_dtypes

    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    out = {}
    for key in keys:
        entry = header[key]
        if entry["dtype"] != "BF16":
            raise ValueError(
                f"'{path}': tensor {key!r} has dtype {entry['dtype']}, which "
                "keras_lora cannot read; save the adapter in float32, float16 "
                "or bfloat16."
            )
        start, end = entry["data_offsets"]
        raw = data[8 + size + start : 8 + size + end]
        array = np.frombuffer(raw, dtype=ml_dtypes.bfloat16)
        out[key] = array.reshape(entry["shape"]).astype(np.float32)
    return out
