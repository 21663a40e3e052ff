"""Hostile and broken input, table-driven, for every name in `keras_lora.__all__`.

Each case calls one public function with a bad argument or a broken file
and must:
- raise `ValueError` or `TypeError` (a missing path: `FileNotFoundError`)
  whose message names the argument or layer and what was expected; never
  an `AttributeError`, `IndexError`, `KeyError` or a backend error;
- leave every model, layer and file it was given exactly as it was (weight
  values, `trainable` flags of layers and variables, file bytes, and no
  stray files).

Then fault injection (a writer dying after some bytes) and loading that
never executes code from a file.
"""

import dataclasses
import functools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl
from keras_lora.io import keras_lora_format

BACKEND = keras.backend.backend()


def rewrite_adapter(src, dst, tensors_fn=None, info_fn=None):
    """Copies a keras_lora adapter file, changing its tensors or metadata,
    with a valid checksum (so that only the intended defect is there)."""
    with safetensors.safe_open(str(src), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["keras_lora"])
    if tensors_fn:
        tensors = tensors_fn(tensors)
    if info_fn:
        info = info_fn(info)
    info["sha256"] = keras_lora_format._digest(tensors)
    safetensors.numpy.save_file(
        tensors, str(dst), metadata={"keras_lora": json.dumps(info)}
    )
    return dst


def rename_layer(old, new):
    def tensors_fn(tensors):
        return {k.replace(f"{old}/", f"{new}/", 1): v for k, v in tensors.items()}

    def info_fn(info):
        info["layers"] = {
            (new if k == old else k): v for k, v in info["layers"].items()
        }
        return info

    return tensors_fn, info_fn


class Env:
    """What a case works on, made lazily in `tmp`; `snapshot()` covers all
    of it that exists."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.inputs = set()  # paths of input files a case makes

    def input(self, path):
        self.inputs.add(str(Path(path).relative_to(self.tmp)))
        return path

    @functools.cached_property
    def base(self):
        return mlp()

    @functools.cached_property
    def lora(self):
        return randomize_adapters(kl.apply_lora(self.base, rank=4, alpha=8))

    @functools.cached_property
    def nan_lora(self):
        lora = kl.apply_lora(mlp(name="nan_net"), rank=2)
        b = lora.get_layer("d2").lora_b
        b.assign(np.where(np.arange(b.shape[1]) == 1, np.nan, 0.5) * np.ones(b.shape))
        return lora

    @functools.cached_property
    def inf_lora(self):
        lora = kl.apply_lora(mlp(name="inf_net"), rank=2)
        lora.get_layer("d1").lora_a.assign(np.full((16, 2), np.inf, "float32"))
        return lora

    @functools.cached_property
    def ln_model(self):
        inputs = keras.Input((8,))
        x = keras.layers.Dense(8, name="d")(inputs)
        x = keras.layers.LayerNormalization(name="ln")(x)
        return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))

    @functools.cached_property
    def hot(self):
        """A LoRA model at rank 2 prepared for hot-swapping up to rank 4."""
        model = kl.apply_lora(mlp(name="hot_net"), rank=2)
        kl.prepare_hotswap(model, max_rank=4)
        return model

    @functools.cached_property
    def rank8_file(self):
        """An adapter file of rank 8 for the same layers as `hot`."""
        path = self.input(self.tmp / "rank8.safetensors")
        kl.save_adapter(kl.apply_lora(mlp(name="hot_net"), rank=8), path)
        return path

    @functools.cached_property
    def unbuilt(self):
        return keras.Sequential([keras.layers.Dense(4, name="d")])

    @functools.cached_property
    def unbuilt_lora(self):
        return keras.Sequential([kl.LoRADense(keras.layers.Dense(4, name="d"))])

    @functools.cached_property
    def dense(self):
        dense = keras.layers.Dense(6, name="dense6")
        dense.build((None, 4))
        return dense

    @functools.cached_property
    def lora_dense(self):
        dense = keras.layers.Dense(6, name="inner6")
        dense.build((None, 4))
        return kl.LoRADense(dense, rank=2)

    @functools.cached_property
    def adapter(self):
        return kl.save_adapter(self.lora, self.tmp / "task.safetensors")

    @functools.cached_property
    def peft_dir(self):
        return kl.save_adapter(self.lora, self.tmp / "task_peft", format="peft")

    @functools.cached_property
    def merged_file(self):
        return kl.export(self.lora, self.tmp / "merged.keras", format="keras")

    def file(self, name, data):
        path = self.tmp / name
        path.write_bytes(data)
        return self.input(path)

    def folder(self, name):
        path = self.tmp / name
        path.mkdir()
        return self.input(path)

    def peft_with(self, name, **changes):
        path = self.tmp / name
        shutil.copytree(self.peft_dir, path)
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
        return self.input(path)


def snapshot(env):
    layers, files = {}, {}
    for key, value in vars(env).items():
        if isinstance(value, keras.layers.Layer):
            sublayers = value._flatten_layers(include_self=True, recursive=True)
            layers[key] = (
                [
                    (
                        type(lay).__name__,
                        lay.name,
                        lay.trainable,
                        getattr(lay, "adapter_names", None),
                        getattr(lay, "active_adapters", None),
                    )
                    for lay in sublayers
                ],
                [(w.path, w.trainable, to_numpy(w).copy()) for w in value.weights],
            )
    for path in sorted(env.tmp.rglob("*")):
        rel = str(path.relative_to(env.tmp))
        files[rel] = path.read_bytes() if path.is_file() else "<dir>"
    return layers, files


def assert_unchanged(before, after):
    layers_before, files_before = before
    layers_after, files_after = after
    assert sorted(files_after) == sorted(files_before), "files appeared or vanished"
    for name, data in files_before.items():
        assert files_after[name] == data, f"file '{name}' changed"
    assert layers_after.keys() == layers_before.keys()
    for key, (flags, weights) in layers_before.items():
        flags_after, weights_after = layers_after[key]
        assert flags_after == flags, f"{key}: layer trainable flags changed"
        assert len(weights_after) == len(weights), f"{key}: weights added/removed"
        for (path, trainable, value), (path2, trainable2, value2) in zip(
            weights, weights_after, strict=True
        ):
            assert (path, trainable) == (path2, trainable2), f"{key}: {path}"
            np.testing.assert_array_equal(value2, value, err_msg=f"{key}: {path}")


@dataclasses.dataclass
class Case:
    function: str
    id: str
    call: object  # env -> None; the bad call
    error: object  # exception class or tuple
    match: str  # regex the message must contain
    needs: tuple = ()  # env attributes to make before the snapshot


def C(function, case_id, call, error, match, needs=""):
    return Case(function, case_id, call, error, match, tuple(needs.split()))


L = kl.LoRADense
BAD_FILE = (ValueError,)
CASES = [
    # --- LoRA layer constructors -----------------------------------------
    C(
        "LoRADense",
        "rank=0",
        lambda e: L(e.dense, rank=0),
        ValueError,
        r"`rank`.*rank=0",
        "dense",
    ),
    C(
        "LoRADense",
        "rank=-3",
        lambda e: L(e.dense, rank=-3),
        ValueError,
        r"`rank` must be a positive integer",
        "dense",
    ),
    C(
        "LoRADense",
        "rank=2.5",
        lambda e: L(e.dense, rank=2.5),
        TypeError,
        r"`rank`.*integer.*2\.5",
        "dense",
    ),
    C(
        "LoRADense",
        "rank='8'",
        lambda e: L(e.dense, rank="8"),
        TypeError,
        r"`rank`.*'8'",
        "dense",
    ),
    C(
        "LoRADense",
        "rank=None",
        lambda e: L(e.dense, rank=None),
        TypeError,
        r"`rank`.*None",
        "dense",
    ),
    C(
        "LoRADense",
        "rank=True",
        lambda e: L(e.dense, rank=True),
        TypeError,
        r"`rank`.*True",
        "dense",
    ),
    C(
        "LoRADense",
        "alpha=0",
        lambda e: L(e.dense, alpha=0),
        ValueError,
        r"`alpha`.*positive.*alpha=0",
        "dense",
    ),
    C(
        "LoRADense",
        "alpha=-1",
        lambda e: L(e.dense, alpha=-1.0),
        ValueError,
        r"`alpha`.*-1",
        "dense",
    ),
    C(
        "LoRADense",
        "alpha=inf",
        lambda e: L(e.dense, alpha=float("inf")),
        ValueError,
        r"`alpha`.*inf",
        "dense",
    ),
    C(
        "LoRADense",
        "alpha=nan",
        lambda e: L(e.dense, alpha=float("nan")),
        ValueError,
        r"`alpha`.*nan",
        "dense",
    ),
    C(
        "LoRADense",
        "alpha='big'",
        lambda e: L(e.dense, alpha="big"),
        TypeError,
        r"`alpha`.*'big'",
        "dense",
    ),
    C(
        "LoRADense",
        "dropout=1",
        lambda e: L(e.dense, dropout=1.0),
        ValueError,
        r"`dropout`.*\[0, 1\)",
        "dense",
    ),
    C(
        "LoRADense",
        "dropout=-0.1",
        lambda e: L(e.dense, dropout=-0.1),
        ValueError,
        r"`dropout`.*-0\.1",
        "dense",
    ),
    C(
        "LoRADense",
        "dropout='x'",
        lambda e: L(e.dense, dropout="x"),
        TypeError,
        r"`dropout`.*'x'",
        "dense",
    ),
    C(
        "LoRADense",
        "layer=str",
        lambda e: L("dense"),
        TypeError,
        r"LoRADense wraps.*Dense.*str",
    ),
    C(
        "LoRADense",
        "layer=None",
        lambda e: L(None),
        TypeError,
        r"LoRADense wraps.*NoneType",
    ),
    C(
        "LoRADense",
        "layer=LayerNorm",
        lambda e: L(keras.layers.LayerNormalization()),
        TypeError,
        r"LoRADense wraps.*LayerNormalization",
    ),
    C(
        "LoRADense",
        "layer=LoRADense",
        lambda e: L(e.lora_dense),
        TypeError,
        r"already a LoRA layer.*inner6",
        "lora_dense",
    ),
    C(
        "LoRADense",
        "unknown kwarg",
        lambda e: L(e.dense, rnak=4),
        ValueError,
        r"Unrecognized keyword arguments.*rnak",
        "dense",
    ),
    C(
        "LoRAEinsumDense",
        "layer=Dense",
        lambda e: kl.LoRAEinsumDense(e.dense),
        TypeError,
        r"LoRAEinsumDense wraps.*EinsumDense.*Dense",
        "dense",
    ),
    C(
        "LoRAEmbedding",
        "layer=Dense",
        lambda e: kl.LoRAEmbedding(e.dense),
        TypeError,
        r"LoRAEmbedding wraps.*Embedding.*Dense",
        "dense",
    ),
    C(
        "LoRAEmbedding",
        "rank=0",
        lambda e: kl.LoRAEmbedding(keras.layers.Embedding(5, 3), rank=0),
        ValueError,
        r"`rank`",
    ),
    C(
        "LoRAConv",
        "layer=Dense",
        lambda e: kl.LoRAConv(e.dense),
        TypeError,
        r"LoRAConv wraps.*Dense",
        "dense",
    ),
    C(
        "LoRAConv",
        "DepthwiseConv2D",
        lambda e: kl.LoRAConv(keras.layers.DepthwiseConv2D(3)),
        TypeError,
        r"LoRAConv wraps.*DepthwiseConv2D",
    ),
    C(
        "LoRADepthwiseConv",
        "layer=Dense",
        lambda e: kl.LoRADepthwiseConv(e.dense),
        TypeError,
        r"LoRADepthwiseConv wraps.*Dense",
        "dense",
    ),
    C(
        "LoRADepthwiseConv",
        "rank=0",
        lambda e: kl.LoRADepthwiseConv(keras.layers.DepthwiseConv2D(3), rank=0),
        ValueError,
        r"`rank`",
    ),
    C(
        "LoRAMoeExperts",
        "layer=Dense",
        lambda e: kl.LoRAMoeExperts(e.dense),
        TypeError,
        r"LoRAMoeExperts wraps a KerasHub experts layer",
        "dense",
    ),
    C(
        "LoRAMoeExperts",
        "rank=0",
        lambda e: kl.LoRAMoeExperts(_mixtral_experts(), rank=0),
        ValueError,
        r"`rank`",
    ),
    C(
        "lean_quantized",
        "model=layer",
        lambda e: kl.lean_quantized(e.dense),
        TypeError,
        r"lean_quantized: `model` must be a keras.Model",
        "dense",
    ),
    C(
        "quantize_nf4",
        "model=layer",
        lambda e: kl.quantize_nf4(e.dense),
        TypeError,
        r"quantize_nf4: `model` must be a keras.Model",
        "dense",
    ),
    C(
        "quantize_nf4",
        "block_size=63",
        lambda e: kl.quantize_nf4(e.base, block_size=63),
        ValueError,
        r"quantize_nf4: `block_size` must be a positive even integer.*63",
        "base",
    ),
    C(
        "quantize_nf4",
        "double_quant=str",
        lambda e: kl.quantize_nf4(e.base, double_quant="yes"),
        TypeError,
        r"quantize_nf4: `double_quant` must be a bool.*'yes'",
        "base",
    ),
    C(
        "enable_remat",
        "model=str",
        lambda e: kl.enable_remat("model"),
        TypeError,
        r"enable_remat: `model` must be a keras.Model",
    ),
    C(
        "enable_remat",
        "no LoRA layers",
        lambda e: kl.enable_remat(e.base),
        ValueError,
        r"enable_remat: `model` 'mlp' has no LoRA layers",
        "base",
    ),
    C(
        "enable_remat",
        "no transformer blocks",
        lambda e: kl.enable_remat(e.lora),
        ValueError,
        r"enable_remat: found no transformer blocks",
        "lora",
    ),
    C(
        "apply_lora",
        "remat='yes'",
        lambda e: kl.apply_lora(e.base, remat="yes"),
        TypeError,
        r"`remat` must be True or False",
        "base",
    ),
    # Without the up-front check, the copy would have frozen the shared
    # base layers (and in place, swapped them) before enable_remat refused.
    C(
        "apply_lora",
        "remat=True, no transformer blocks",
        lambda e: kl.apply_lora(e.base, remat=True),
        ValueError,
        r"apply_lora: found no transformer blocks.*Nothing was changed",
        "base",
    ),
    C(
        "apply_lora",
        "remat=True, in place, no transformer blocks",
        lambda e: kl.apply_lora(e.base, remat=True, in_place=True),
        ValueError,
        r"apply_lora: found no transformer blocks.*Nothing was changed",
        "base",
    ),
    C(
        "LoRAConv",
        "Conv2DTranspose",
        lambda e: kl.LoRAConv(keras.layers.Conv2DTranspose(4, 3)),
        TypeError,
        r"LoRAConv wraps.*Conv2DTranspose",
    ),
    C(
        "LoRALayer",
        "abstract base",
        lambda e: kl.LoRALayer(e.dense),
        TypeError,
        r"LoRALayer.*base class.*LoRADense",
        "dense",
    ),
    # --- apply_lora --------------------------------------------------------
    C(
        "apply_lora",
        "model=str",
        lambda e: kl.apply_lora("model.keras"),
        TypeError,
        r"`model` must be a keras.Model.*str",
    ),
    C(
        "apply_lora",
        "model=layer",
        lambda e: kl.apply_lora(e.dense),
        TypeError,
        r"`model` must be a keras.Model.*Dense",
        "dense",
    ),
    C(
        "apply_lora",
        "unbuilt model",
        lambda e: kl.apply_lora(e.unbuilt),
        ValueError,
        r"not built",
        "unbuilt",
    ),
    C(
        "apply_lora",
        "rank=0",
        lambda e: kl.apply_lora(e.base, rank=0),
        ValueError,
        r"`rank`",
        "base",
    ),
    C(
        "apply_lora",
        "rank=1.5",
        lambda e: kl.apply_lora(e.base, rank=1.5),
        TypeError,
        r"`rank`",
        "base",
    ),
    C(
        "apply_lora",
        "alpha=-2",
        lambda e: kl.apply_lora(e.base, alpha=-2),
        ValueError,
        r"`alpha`",
        "base",
    ),
    C(
        "apply_lora",
        "dropout=1.5",
        lambda e: kl.apply_lora(e.base, dropout=1.5),
        ValueError,
        r"`dropout`",
        "base",
    ),
    C(
        "apply_lora",
        "targets match nothing",
        lambda e: kl.apply_lora(e.base, targets=["nope"]),
        ValueError,
        r"`targets` entry 'nope' matches no layer.*Candidates.*d1",
        "base",
    ),
    C(
        "apply_lora",
        "regex matches nothing",
        lambda e: kl.apply_lora(e.base, targets="enc.*"),
        ValueError,
        r"`targets`.*matches no layer",
        "base",
    ),
    C(
        "apply_lora",
        "invalid regex",
        lambda e: kl.apply_lora(e.base, targets="d1(("),
        ValueError,
        r"`targets` is not a valid regex",
        "base",
    ),
    C(
        "apply_lora",
        "targets=int",
        lambda e: kl.apply_lora(e.base, targets=42),
        TypeError,
        r"`targets` must be.*42",
        "base",
    ),
    C(
        "apply_lora",
        "targets=[int]",
        lambda e: kl.apply_lora(e.base, targets=[1]),
        TypeError,
        r"`targets` entries must be.*str",
        "base",
    ),
    C(
        "apply_lora",
        "unsupported layer type",
        lambda e: kl.apply_lora(e.ln_model, targets=["ln"]),
        ValueError,
        r"'ln'.*LayerNormalization.*cannot be selected",
        "ln_model",
    ),
    C(
        "apply_lora",
        "exclude matches nothing",
        lambda e: kl.apply_lora(e.base, exclude=["nope"]),
        ValueError,
        r"`exclude` entry 'nope'",
        "base",
    ),
    C(
        "apply_lora",
        "exclude removes all",
        lambda e: kl.apply_lora(e.base, targets=["d1"], exclude=["d1"]),
        ValueError,
        r"`exclude` removes every layer",
        "base",
    ),
    C(
        "apply_lora",
        "trainable matches nothing",
        lambda e: kl.apply_lora(e.base, trainable=["nope"]),
        ValueError,
        r"`trainable` entry 'nope'",
        "base",
    ),
    C(
        "apply_lora",
        "target also trainable",
        lambda e: kl.apply_lora(e.base, targets=["d1"], trainable=["d1"]),
        ValueError,
        r"'d1'.*both LoRA targets and in `trainable`",
        "base",
    ),
    C(
        "apply_lora",
        "LoRA model again",
        lambda e: kl.apply_lora(e.lora),
        ValueError,
        r"already has LoRA layers.*d1",
        "lora",
    ),
    C(
        "apply_lora",
        "unknown layer kwarg",
        lambda e: kl.apply_lora(e.base, rnak=2),
        ValueError,
        r"Unrecognized keyword arguments.*rnak",
        "base",
    ),
    # --- merge_lora --------------------------------------------------------
    C(
        "merge_lora",
        "model=str",
        lambda e: kl.merge_lora("m"),
        TypeError,
        r"`model` must be a keras.Model",
    ),
    C(
        "merge_lora",
        "no LoRA layers",
        lambda e: kl.merge_lora(e.base),
        ValueError,
        r"no LoRA layers.*nothing to merge",
        "base",
    ),
    C(
        "merge_lora",
        "unbuilt model",
        lambda e: kl.merge_lora(e.unbuilt_lora),
        ValueError,
        r"not built",
        "unbuilt_lora",
    ),
    C(
        "merge_lora",
        "NaN adapter",
        lambda e: kl.merge_lora(e.nan_lora),
        ValueError,
        r"'d2'.*NaN or Inf",
        "nan_lora",
    ),
    C(
        "merge_lora",
        "Inf adapter",
        lambda e: kl.merge_lora(e.inf_lora),
        ValueError,
        r"'d1'.*NaN or Inf",
        "inf_lora",
    ),
    C(
        "merge_lora",
        "reversible=str",
        lambda e: kl.merge_lora(e.lora, reversible="yes"),
        TypeError,
        r"`reversible` must be True or False",
        "lora",
    ),
    # --- export ------------------------------------------------------------
    C(
        "export",
        "format",
        lambda e: kl.export(e.lora, e.tmp / "out", format="onnx"),
        ValueError,
        r"`format` must be one of.*'onnx'",
        "lora",
    ),
    C(
        "export",
        "path=int",
        lambda e: kl.export(e.lora, 7),
        TypeError,
        r"`path` must be a str or os.PathLike.*int",
        "lora",
    ),
    C(
        "export",
        "no LoRA layers",
        lambda e: kl.export(e.base, e.tmp / "out"),
        ValueError,
        r"no LoRA layers",
        "base",
    ),
    C(
        "export",
        "NaN adapter",
        lambda e: kl.export(e.nan_lora, e.merged_file, format="keras"),
        ValueError,
        r"'d2'.*NaN or Inf",
        "nan_lora merged_file",
    ),
    C(
        "export",
        "not .keras",
        lambda e: kl.export(e.lora, e.tmp / "m.h5", format="keras"),
        ValueError,
        r"`path` must end in '.keras'",
        "lora",
    ),
    C(
        "export",
        "directory for .keras",
        lambda e: kl.export(e.lora, e.folder("dir.keras"), format="keras"),
        ValueError,
        r"`path`.*is a folder; this format writes one file",
        "lora",
    ),
    C(
        "export",
        "existing folder for .keras",
        lambda e: kl.export(e.lora, e.folder("served"), format="keras"),
        ValueError,
        r"`path` '.*served' is a folder; this format writes one file",
        "lora",
    ),
    C(
        "export",
        "missing folder",
        lambda e: kl.export(e.lora, e.tmp / "no" / "saved"),
        FileNotFoundError,
        r"the folder '.*no' does not exist\. keras_lora does not create folders",
        "lora",
    ),
    C(
        "export",
        "file for SavedModel",
        lambda e: kl.export(e.lora, e.file("saved", b"x")),
        ValueError,
        r"`path`.*is a file.*SavedModel",
        "lora",
    ),
    # --- save_adapter ------------------------------------------------------
    C(
        "save_adapter",
        "missing folder",
        lambda e: kl.save_adapter(e.lora, e.tmp / "no" / "a.safetensors"),
        FileNotFoundError,
        r"the folder '.*no' does not exist\. keras_lora does not create folders",
        "lora",
    ),
    C(
        "save_adapter",
        "model=str",
        lambda e: kl.save_adapter("m", e.tmp / "a.safetensors"),
        TypeError,
        r"`model` must be a keras.Model",
    ),
    C(
        "save_adapter",
        "path=None",
        lambda e: kl.save_adapter(e.lora, None),
        TypeError,
        r"`path` must be a str or os.PathLike",
        "lora",
    ),
    C(
        "save_adapter",
        "no LoRA layers",
        lambda e: kl.save_adapter(e.base, e.tmp / "a.safetensors"),
        ValueError,
        r"no LoRA layers",
        "base",
    ),
    C(
        "save_adapter",
        "format",
        lambda e: kl.save_adapter(e.lora, e.tmp / "a", format="npz"),
        ValueError,
        r"`format` must be one of.*'npz'",
        "lora",
    ),
    C(
        "save_adapter",
        "name_map=int",
        lambda e: kl.save_adapter(e.lora, e.tmp / "a", format="peft", name_map=3),
        TypeError,
        r"`name_map` must be",
        "lora",
    ),
    C(
        "save_adapter",
        "name_map for keras_lora",
        lambda e: kl.save_adapter(e.lora, e.tmp / "a.safetensors", name_map={}),
        ValueError,
        r"`name_map` applies to format='peft'",
        "lora",
    ),
    C(
        "save_adapter",
        "directory for file",
        lambda e: kl.save_adapter(e.lora, e.folder("adir")),
        ValueError,
        r"'.*adir' is a directory",
        "lora",
    ),
    C(
        "save_adapter",
        "file for PEFT dir",
        lambda e: kl.save_adapter(e.lora, e.file("afile", b"x"), format="peft"),
        ValueError,
        r"writes a directory.*afile.*is a file",
        "lora",
    ),
    C(
        "save_adapter",
        "unbuilt LoRA layer",
        lambda e: kl.save_adapter(e.unbuilt_lora, e.tmp / "u.safetensors"),
        ValueError,
        r"'d'.*not built",
        "unbuilt_lora",
    ),
    # --- load_adapter ------------------------------------------------------
    C(
        "load_adapter",
        "model=str",
        lambda e: kl.load_adapter("m", e.adapter),
        TypeError,
        r"`model` must be a keras.Model",
        "adapter",
    ),
    C(
        "load_adapter",
        "path=int",
        lambda e: kl.load_adapter(e.base, 3),
        TypeError,
        r"`path` must be a str or os.PathLike",
        "base",
    ),
    C(
        "load_adapter",
        "name_map=int",
        lambda e: kl.load_adapter(e.base, e.adapter, name_map=3),
        TypeError,
        r"`name_map` must be",
        "base adapter",
    ),
    C(
        "load_adapter",
        "missing file",
        lambda e: kl.load_adapter(e.base, e.tmp / "nope.safetensors"),
        FileNotFoundError,
        r"No adapter file.*nope",
        "base",
    ),
    C(
        "load_adapter",
        "zero-byte file",
        lambda e: kl.load_adapter(e.base, e.file("zero.safetensors", b"")),
        ValueError,
        r"zero.safetensors.*empty \(0 bytes\)",
        "base",
    ),
    C(
        "load_adapter",
        "truncated file",
        lambda e: kl.load_adapter(
            e.base,
            e.file(
                "half.safetensors",
                e.adapter.read_bytes()[: e.adapter.stat().st_size // 2],
            ),
        ),
        ValueError,
        r"half.safetensors.*not a readable safetensors file",
        "base adapter",
    ),
    C(
        "load_adapter",
        "header only",
        lambda e: kl.load_adapter(
            e.base, e.file("head.safetensors", e.adapter.read_bytes()[:8])
        ),
        ValueError,
        r"head.safetensors.*not a readable",
        "base adapter",
    ),
    C(
        "load_adapter",
        "garbage bytes",
        lambda e: kl.load_adapter(e.base, e.file("junk.safetensors", os.urandom(256))),
        ValueError,
        r"junk.safetensors",
        "base",
    ),
    C(
        "load_adapter",
        "directory for file",
        lambda e: kl.load_adapter(e.base, e.folder("empty")),
        ValueError,
        r"'.*empty' is a directory.*no adapter_config.json",
        "base",
    ),
    C(
        "load_adapter",
        "plain safetensors",
        lambda e: kl.load_adapter(
            e.base, e.tmp / "task_peft" / "adapter_model.safetensors"
        ),
        ValueError,
        r"not a keras_lora adapter.*PEFT",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "wrong shapes",
        lambda e: kl.load_adapter(
            kl.apply_lora(mlp(hidden=24, name="wide"), rank=4), e.adapter
        ),
        ValueError,
        r"(?s)Shape mismatch.*'d1' lora_b: the model expects shape \(4, 24\).*"
        r"has \(4, 32\)",
        "adapter",
    ),
    C(
        "load_adapter",
        "wrong rank",
        lambda e: kl.load_adapter(
            e.lora,
            e.input(
                kl.save_adapter(
                    kl.apply_lora(mlp(name="r2"), rank=2), e.tmp / "r2.safetensors"
                )
            ),
        ),
        ValueError,
        r"(?s)Shape mismatch.*'d1' lora_a.*\(16, 4\).*\(16, 2\)",
        "lora",
    ),
    C(
        "load_adapter",
        "rank metadata lies",
        lambda e: kl.load_adapter(
            e.base,
            e.input(
                rewrite_adapter(
                    e.adapter,
                    e.tmp / "lie.safetensors",
                    info_fn=lambda i: {
                        **i,
                        "layers": {k: {**v, "rank": 3} for k, v in i["layers"].items()},
                    },
                )
            ),
        ),
        ValueError,
        r"records rank 3 but lora_a has shape",
        "base adapter",
    ),
    C(
        "load_adapter",
        "integer dtype",
        lambda e: kl.load_adapter(
            e.lora,
            e.input(
                rewrite_adapter(
                    e.adapter,
                    e.tmp / "int.safetensors",
                    tensors_fn=lambda t: {k: v.astype("int32") for k, v in t.items()},
                )
            ),
        ),
        ValueError,
        r"'d1' lora_a: expected floating point.*int32",
        "lora adapter",
    ),
    C(
        "load_adapter",
        "unknown layer names",
        lambda e: kl.load_adapter(
            e.lora,
            e.input(
                rewrite_adapter(
                    e.adapter, e.tmp / "names.safetensors", *rename_layer("d1", "zz")
                )
            ),
        ),
        ValueError,
        r"(?s)match no LoRA layer.*'zz'",
        "lora adapter",
    ),
    C(
        "load_adapter",
        "corrupt metadata",
        lambda e: kl.load_adapter(
            e.base,
            e.file("meta.safetensors", _with_metadata({"keras_lora": "{not json"})),
        ),
        ValueError,
        r"meta.safetensors.*metadata is corrupt",
        "base",
    ),
    C(
        "load_adapter",
        "checksum mismatch",
        lambda e: kl.load_adapter(
            e.base, e.file("flip.safetensors", _flip_last_byte(e.adapter))
        ),
        ValueError,
        r"flip.safetensors.*corrupt.*checksum",
        "base adapter",
    ),
    C(
        "load_adapter",
        "PEFT unknown field",
        lambda e: kl.load_adapter(e.base, e.peft_with("p1", fancy_new_option=3)),
        ValueError,
        r"fancy_new_option=3.*does not know",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "PEFT layer replication",
        lambda e: kl.load_adapter(
            e.base, e.peft_with("p2", layer_replication=[[0, 1]])
        ),
        ValueError,
        r"layer_replication=\[\[0, 1\]\] \(replicated layers\)",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "PEFT r=0",
        lambda e: kl.load_adapter(e.base, e.peft_with("p3", r=0)),
        ValueError,
        r"`r` must be a positive integer.*0",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "PEFT type",
        lambda e: kl.load_adapter(e.base, e.peft_with("p4", peft_type="IA3")),
        ValueError,
        r"peft_type 'LORA'.*IA3",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "PEFT config not JSON",
        lambda e: kl.load_adapter(e.base, _broken_config(e)),
        ValueError,
        r"adapter_config.json' is not valid JSON",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "PEFT weights truncated",
        lambda e: kl.load_adapter(e.base, _truncated_peft(e)),
        ValueError,
        r"adapter_model.safetensors' is not a readable",
        "base peft_dir",
    ),
    C(
        "load_adapter",
        "KerasHub file without lora",
        lambda e: kl.load_adapter(e.base, _hdf5(e, "no.lora.h5", "other")),
        ValueError,
        r"no.lora.h5' is an HDF5 file but no KerasHub LoRA file",
        "base",
    ),
    C(
        "load_adapter",
        "KerasHub file with rank 0",
        lambda e: kl.load_adapter(e.base, _hdf5(e, "r0.lora.h5", "lora/vars/rank", 0)),
        ValueError,
        r"r0.lora.h5': `rank` must be a positive integer",
        "base",
    ),
    # --- trainable_summary / TrainableSummary ----------------------------
    C(
        "trainable_summary",
        "model=str",
        lambda e: kl.trainable_summary("m"),
        TypeError,
        r"`model` must be a Keras model or layer.*str",
    ),
    C(
        "trainable_summary",
        "print_fn=int",
        lambda e: kl.trainable_summary(e.base, print_fn=5),
        TypeError,
        r"`print_fn` must be a callable or None.*5",
        "base",
    ),
    C(
        "TrainableSummary",
        "trainable=str",
        lambda e: kl.TrainableSummary("1", 2),
        TypeError,
        r"`trainable` must be a non-negative integer",
    ),
    C(
        "TrainableSummary",
        "total < trainable",
        lambda e: kl.TrainableSummary(3, 2),
        ValueError,
        r"`trainable` \(3\).*`total` \(2\)",
    ),
    # --- named adapters ------------------------------------------------------
    C(
        "list_adapters",
        "model=str",
        lambda e: kl.list_adapters("m"),
        TypeError,
        r"list_adapters: `model` must be a keras.Model",
    ),
    C(
        "list_adapters",
        "no LoRA layers",
        lambda e: kl.list_adapters(e.base),
        ValueError,
        r"list_adapters: model 'mlp' has no LoRA layers",
        "base",
    ),
    C(
        "active_adapters",
        "model=int",
        lambda e: kl.active_adapters(3),
        TypeError,
        r"active_adapters: `model` must be a keras.Model",
    ),
    C(
        "active_adapters",
        "no LoRA layers",
        lambda e: kl.active_adapters(e.base),
        ValueError,
        r"no LoRA layers",
        "base",
    ),
    C(
        "add_adapter",
        "bad name",
        lambda e: kl.add_adapter(e.lora, "no spaces!"),
        ValueError,
        r"adapter_name` must be.*'no spaces!'",
        "lora",
    ),
    C(
        "add_adapter",
        "name=int",
        lambda e: kl.add_adapter(e.lora, 7),
        ValueError,
        r"adapter_name` must be.*7",
        "lora",
    ),
    C(
        "add_adapter",
        "existing name",
        lambda e: kl.add_adapter(e.lora, "default"),
        ValueError,
        r"already have adapter 'default'",
        "lora",
    ),
    C(
        "add_adapter",
        "rank=0",
        lambda e: kl.add_adapter(e.lora, "second", rank=0),
        ValueError,
        r"`rank`.*rank=0",
        "lora",
    ),
    C(
        "add_adapter",
        "dropout=2",
        lambda e: kl.add_adapter(e.lora, "second", dropout=2),
        ValueError,
        r"`dropout`.*\[0, 1\)",
        "lora",
    ),
    C(
        "add_adapter",
        "targets match nothing",
        lambda e: kl.add_adapter(e.lora, "second", targets=["nope"]),
        ValueError,
        r"`targets` entry 'nope' matches no layer",
        "lora",
    ),
    C(
        "set_adapter",
        "unknown name",
        lambda e: kl.set_adapter(e.lora, "nope"),
        ValueError,
        r"unknown adapter.*'nope'.*'default'",
        "lora",
    ),
    C(
        "set_adapter",
        "no names",
        lambda e: kl.set_adapter(e.lora, []),
        ValueError,
        r"set_adapter: unknown adapter",
        "lora",
    ),
    C(
        "set_adapter",
        "names=int",
        lambda e: kl.set_adapter(e.lora, 5),
        TypeError,
        r"`names` must be an adapter name or a list of names.*5",
        "lora",
    ),
    C(
        "disable_adapters",
        "no LoRA layers",
        lambda e: _enter(kl.disable_adapters(e.base)),
        ValueError,
        r"disable_adapters: model 'mlp' has no LoRA layers",
        "base",
    ),
    C(
        "disable_adapters",
        "model=str",
        lambda e: _enter(kl.disable_adapters("m")),
        TypeError,
        r"`model` must be a keras.Model",
    ),
    C(
        "enable_adapters",
        "no LoRA layers",
        lambda e: kl.enable_adapters(e.base),
        ValueError,
        r"enable_adapters: model 'mlp' has no LoRA layers",
        "base",
    ),
    C(
        "enable_adapters",
        "model=str",
        lambda e: kl.enable_adapters("m"),
        TypeError,
        r"enable_adapters: `model` must be a keras.Model",
    ),
    C(
        "enable_adapters",
        "model=None",
        lambda e: kl.enable_adapters(None),
        TypeError,
        r"enable_adapters: `model` must be a keras.Model.*None",
    ),
    C(
        "delete_adapter",
        "unknown name",
        lambda e: kl.delete_adapter(e.lora, "nope"),
        ValueError,
        r"no LoRA layer has adapter 'nope'",
        "lora",
    ),
    C(
        "delete_adapter",
        "only adapter",
        lambda e: kl.delete_adapter(e.lora, "default"),
        ValueError,
        r"'default' is the only adapter of layers.*d1",
        "lora",
    ),
    C(
        "combine_adapters",
        "unknown name",
        lambda e: kl.combine_adapters(e.lora, {"nope": 1.0}),
        ValueError,
        r"unknown adapter.*'nope'",
        "lora",
    ),
    C(
        "combine_adapters",
        "NaN weight",
        lambda e: kl.combine_adapters(e.lora, {"default": float("nan")}),
        ValueError,
        r"weight of 'default' must be a finite number",
        "lora",
    ),
    C(
        "combine_adapters",
        "weights=list",
        lambda e: kl.combine_adapters(e.lora, ["default"]),
        (TypeError, ValueError),
        r"`weights` must be a non-empty dict",
        "lora",
    ),
    C(
        "unmerge_lora",
        "not merged",
        lambda e: kl.unmerge_lora(e.lora),
        ValueError,
        r"unmerge_lora: model .* is not merged in place",
        "lora",
    ),
    C(
        "unmerge_lora",
        "model=str",
        lambda e: kl.unmerge_lora("m"),
        TypeError,
        r"unmerge_lora: `model` must be a keras.Model",
    ),
    # --- from_core_lora -----------------------------------------------------
    C(
        "from_core_lora",
        "model=str",
        lambda e: kl.from_core_lora("m"),
        TypeError,
        r"from_core_lora: `model` must be a keras.Model",
    ),
    C(
        "from_core_lora",
        "no core LoRA",
        lambda e: kl.from_core_lora(e.base),
        ValueError,
        r"has no layer with Keras core LoRA enabled",
        "base",
    ),
    C(
        "from_core_lora",
        "in_place='yes'",
        lambda e: kl.from_core_lora(e.base, in_place="yes"),
        TypeError,
        r"`in_place` must be True or False",
        "base",
    ),
    # --- mixed_adapter_model ------------------------------------------------
    C(
        "mixed_adapter_model",
        "model=str",
        lambda e: kl.mixed_adapter_model("m", ["default"]),
        TypeError,
        r"mixed_adapter_model: `model` must be a keras.Model",
    ),
    C(
        "mixed_adapter_model",
        "unknown name",
        lambda e: kl.mixed_adapter_model(e.lora, ["default", "nope"]),
        ValueError,
        r"unknown adapter names \['nope'\]",
        "lora",
    ),
    C(
        "mixed_adapter_model",
        "names=str",
        lambda e: kl.mixed_adapter_model(e.lora, "default"),
        TypeError,
        r"`names` must be a list of adapter names",
        "lora",
    ),
    C(
        "mixed_adapter_model",
        "names=[]",
        lambda e: kl.mixed_adapter_model(e.lora, []),
        ValueError,
        r"`names` must be a non-empty list",
        "lora",
    ),
    C(
        "mixed_adapter_model",
        "no LoRA layers",
        lambda e: kl.mixed_adapter_model(e.base, ["default"]),
        ValueError,
        r"has no LoRA layers",
        "base",
    ),
    C(
        "mixed_adapter_model",
        "strategy='fast'",
        lambda e: kl.mixed_adapter_model(e.lora, ["default"], strategy="fast"),
        ValueError,
        r"`strategy` must be one of",
        "lora",
    ),
    # --- prepare_hotswap ----------------------------------------------------
    C(
        "prepare_hotswap",
        "model=str",
        lambda e: kl.prepare_hotswap("m", 8),
        TypeError,
        r"prepare_hotswap: `model` must be a keras.Model",
    ),
    C(
        "prepare_hotswap",
        "max_rank=0",
        lambda e: kl.prepare_hotswap(e.lora, 0),
        ValueError,
        r"`max_rank` must be a positive integer",
        "lora",
    ),
    C(
        "prepare_hotswap",
        "max_rank below a rank",
        lambda e: kl.prepare_hotswap(e.lora, 2),
        ValueError,
        r"`max_rank` must be at least the rank of every adapter",
        "lora",
    ),
    C(
        "prepare_hotswap",
        "no LoRA layers",
        lambda e: kl.prepare_hotswap(e.base, 8),
        ValueError,
        r"has no LoRA layers",
        "base",
    ),
    # --- hotswap_adapter ----------------------------------------------------
    C(
        "hotswap_adapter",
        "missing file",
        lambda e: kl.hotswap_adapter(e.hot, e.tmp / "missing.safetensors"),
        FileNotFoundError,
        r"No adapter file or PEFT directory",
        "hot",
    ),
    C(
        "hotswap_adapter",
        "not prepared",
        lambda e: kl.hotswap_adapter(e.lora, e.rank8_file),
        ValueError,
        r"is not prepared for hot-swapping",
        "lora rank8_file",
    ),
    C(
        "hotswap_adapter",
        "rank above capacity",
        lambda e: kl.hotswap_adapter(e.hot, e.rank8_file),
        ValueError,
        r"rank 8",
        "hot rank8_file",
    ),
    # --- lora_layout_map ----------------------------------------------------
    C(
        "lora_layout_map",
        "device_mesh=str",
        lambda e: kl.lora_layout_map("mesh"),
        (TypeError, ValueError),
        r"lora_layout_map: .*(`device_mesh` must be a|JAX backend only)",
    ),
    # --- loraplus_optimizer -------------------------------------------------
    *[
        C(
            "loraplus_optimizer",
            f"ratio={ratio!r}",
            lambda e, ratio=ratio: kl.loraplus_optimizer(
                keras.optimizers.Adam(), ratio=ratio
            ),
            error,
            r"`ratio` must be a positive finite number",
        )
        for ratio, error in [
            (0, ValueError),
            (-16, ValueError),
            (float("nan"), ValueError),
            (float("inf"), ValueError),
            ("16", TypeError),
            (None, TypeError),
            (True, TypeError),
        ]
    ],
    C(
        "loraplus_optimizer",
        "optimizer='adam'",
        lambda e: kl.loraplus_optimizer("adam"),
        TypeError,
        r"`optimizer` must be a keras.optimizers.Optimizer instance; got str",
    ),
    C(
        "loraplus_optimizer",
        "optimizer=class",
        lambda e: kl.loraplus_optimizer(keras.optimizers.SGD),
        TypeError,
        r"`optimizer` must be a keras.optimizers.Optimizer instance",
    ),
    C(
        "loraplus_optimizer",
        "LossScaleOptimizer",
        lambda e: kl.loraplus_optimizer(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
        ),
        TypeError,
        r"`optimizer` is a LossScaleOptimizer.*wrap the optimizer",
    ),
    C(
        "loraplus_optimizer",
        "already LoRA+",
        lambda e: kl.loraplus_optimizer(
            kl.loraplus_optimizer(keras.optimizers.SGD(), ratio=4)
        ),
        ValueError,
        r"`optimizer` is already a LoRA\+ optimizer \(ratio=4.0\)",
    ),
]


def _enter(context):
    with context:
        pass


def _with_metadata(metadata):
    from safetensors.numpy import save

    return save({"x/lora_a": np.zeros((2, 2), "float32")}, metadata=metadata)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    return bytes(data)


def _broken_config(env):
    path = env.peft_with("pj")
    (path / "adapter_config.json").write_text("{'r': 8,")
    return path


def _truncated_peft(env):
    path = env.peft_with("pt")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    return path


def _hdf5(env, name, entry, value=None):
    """An HDF5 file holding one group (`value` None) or one dataset."""
    import h5py

    path = env.tmp / name
    with h5py.File(path, "w") as f:
        if value is None:
            f.create_group(entry)
        else:
            f.create_dataset(entry, data=value)
    return env.input(path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.function}[{c.id}]")
def test_bad_input_is_refused_and_changes_nothing(case, tmp_path):
    env = Env(tmp_path)
    for name in case.needs:
        getattr(env, name)
    before = snapshot(env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            case.call(env)
    error = info.value
    assert isinstance(error, case.error), f"{type(error).__name__}: {error}"
    assert not isinstance(error, (AttributeError, IndexError, KeyError))
    assert re.search(case.match, str(error)), f"message: {error}"
    # Only the input files the case itself made may be new.
    after = snapshot(env)
    for key in list(after[1]):
        if key not in before[1] and any(
            key == made or key.startswith(made + "/") for made in env.inputs
        ):
            del after[1][key]
    assert_unchanged(before, after)


def _mixtral_experts():
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralMoeExperts

    experts = MixtralMoeExperts(num_experts=2, hidden_dim=4, intermediate_dim=8)
    experts.build((None, 4))
    return experts


def test_every_public_name_has_bad_input_cases():
    covered = {case.function for case in CASES}
    assert set(kl.__all__) - covered == set()


def test_rank_above_the_kernel_rank_warns_and_still_works():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    with pytest.warns(UserWarning, match=r"rank 8 .* min\(in, out\) = 3"):
        layer = kl.LoRADense(dense, rank=8)
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(dense(x)))


# ----- fault injection ---------------------------------------------------


def dying(real, keep=0.5):
    """A writer that writes through `real`, keeps only a `keep` share of
    the bytes it wrote, then fails like a full disk."""

    def write(*args, **kwargs):
        real(*args, **kwargs)
        target = Path(args[1] if len(args) > 1 else kwargs["filename"])
        if target.is_file():
            data = target.read_bytes()
            target.write_bytes(data[: int(len(data) * keep)])
        raise OSError(28, "No space left on device")

    return write


def dir_state(path):
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(Path(path).rglob("*"))
    }


def test_save_adapter_killed_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    env = Env(tmp_path)
    path, lora = env.adapter, env.lora
    peft_path = env.peft_dir
    before = dir_state(tmp_path)
    randomize_adapters(lora, seed=5)  # new values the failed save would write
    monkeypatch.setattr(
        safetensors.numpy, "save_file", dying(safetensors.numpy.save_file)
    )
    with pytest.raises(OSError, match="No space left"):
        kl.save_adapter(lora, path)
    with pytest.raises(OSError, match="No space left"):
        kl.save_adapter(lora, peft_path, format="peft")
    monkeypatch.undo()
    assert dir_state(tmp_path) == before  # same bytes, no temporary files
    restored = kl.load_adapter(mlp(), path)
    assert len(kl.model.surgery.lora_layers(restored)) == 2
    restored = kl.load_adapter(mlp(), peft_path)
    assert len(kl.model.surgery.lora_layers(restored)) == 2


def test_keras_export_killed_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    env = Env(tmp_path)
    path = env.merged_file
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    expected = to_numpy(keras.saving.load_model(path)(x))
    before = dir_state(tmp_path)
    randomize_adapters(env.lora, seed=9)
    real_save = keras.Model.save

    def save(model, filepath, *args, **kwargs):
        dying(lambda m, p: real_save(m, p, *args, **kwargs))(model, filepath)

    monkeypatch.setattr(keras.Model, "save", save)
    with pytest.raises(OSError, match="No space left"):
        kl.export(env.lora, path, format="keras")
    monkeypatch.undo()
    assert dir_state(tmp_path) == before
    np.testing.assert_array_equal(to_numpy(keras.saving.load_model(path)(x)), expected)


def test_saved_model_export_killed_midway_keeps_the_previous_directory(
    tmp_path, monkeypatch
):
    env = Env(tmp_path)
    out = env.folder("exported")
    (out / "saved_model.pb").write_bytes(b"previous export")
    (out / "variables").mkdir()
    (out / "variables" / "variables.index").write_bytes(b"previous index")
    before = dir_state(tmp_path)
    lora = env.lora

    def half_export(directory, *args, **kwargs):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "saved_model.pb").write_bytes(b"half of a new exp")
        raise OSError(28, "No space left on device")

    # TensorFlow exports in process; JAX and torch through a TensorFlow
    # subprocess (see keras_lora.exporting).
    if BACKEND == "tensorflow":
        monkeypatch.setattr(
            keras.Model, "export", lambda model, d, *a, **k: half_export(d)
        )
    else:
        monkeypatch.setattr(
            kl.exporting,
            "_export_in_tensorflow_subprocess",
            lambda model, out_dir, verbose: half_export(out_dir),
        )
    with pytest.raises(OSError, match="No space left"):
        kl.export(lora, out)
    monkeypatch.undo()
    before.pop("task.safetensors", None)
    assert dir_state(tmp_path) == before


# ----- loading never runs code from a file ----------------------------------


class _Marker:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_peft_weights_are_refused_not_unpickled(tmp_path):
    env = Env(tmp_path)
    peft = env.peft_with("pickled")
    (peft / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    (peft / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(ValueError, match="pickle"):
        kl.load_adapter(env.base, peft)
    assert not marker.exists()


def test_adapter_loading_never_calls_pickle(tmp_path, monkeypatch):
    env = Env(tmp_path)
    adapter, peft = env.adapter, env.peft_dir

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    assert kl.load_adapter(mlp(), adapter) is not None
    assert kl.load_adapter(mlp(), peft) is not None


def _keras_file_with_code(tmp_path, marker):
    """A LoRA `.keras` file whose LoRADense wraps a Lambda carrying code
    that, if it ever ran, would create `marker`."""
    env = Env(tmp_path)
    path = tmp_path / "lora.keras"
    env.lora.save(path)
    evil = keras.layers.Lambda(
        lambda x, p=str(marker): (open(p, "w").close(), x)[1], name="d1"
    )
    evil_config = keras.saving.serialize_keras_object(evil)
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(members["config.json"])
    layers = config["config"]["layers"]
    wrapper = next(lay for lay in layers if lay["config"].get("name") == "d1")
    wrapper["config"]["layer"] = evil_config
    members["config.json"] = json.dumps(config).encode()
    crafted = tmp_path / "crafted.keras"
    with zipfile.ZipFile(crafted, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return crafted


def test_keras_safe_mode_is_kept_for_lora_files(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = _keras_file_with_code(tmp_path, marker)
    with pytest.raises(ValueError, match="(?i)unsafe|safe_mode|lambda"):
        keras.saving.load_model(crafted)
    assert not marker.exists()
    # The CLI loads with safe mode too: a one-line error, exit status 2.
    result = subprocess.run(
        [sys.executable, "-m", "keras_lora", "inspect", str(crafted)],
        capture_output=True,
        text=True,
        env=dict(os.environ, KERAS_BACKEND=BACKEND),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert not marker.exists()


def test_library_never_loads_unsafely():
    root = Path(kl.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "safe_mode=False" not in text, source
        assert "enable_unsafe_deserialization" not in text, source
        assert not re.search(r"^\s*(import|from) (pickle|dill|cloudpickle)", text, re.M)
        assert "torch.load" not in text, source
