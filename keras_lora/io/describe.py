"""What an adapter file or PEFT directory holds, read without a model.

`describe(path)` reads an adapter with its format's own reader (the same
steps and checks as `load_adapter`, less matching layers of a model) and
returns one row per layer: the name the adapter gives it, its type, rank,
alpha, scale, variant, factoring and the shapes of `A` and `B` as stored.
`keras-lora inspect` prints it.
"""

import dataclasses
import math
from pathlib import Path

from keras_lora.io import keras_lora_format, kerashub_format, peft_extras, peft_format
from keras_lora.io.extra_records import ExtraRecord
from keras_lora.io.formats import find_reader
from keras_lora.io.peft_config import read_config


@dataclasses.dataclass
class AdapterLayer:
    """One layer of an adapter, as its file records it.

    Attributes:
        name: the layer's name in the file (a Keras layer path, a PEFT
            module path, a KerasHub `lora/<n>` group).
        type: the base layer's type (`"Dense"`, PEFT's `"Linear"`), or
            `"-"` where the file does not record it.
        rank, alpha: the adapter's rank and alpha.
        scale: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
        variant: `"lora"`, or what differs from it: `"rslora"`, `"dora"`,
            `"init=pissa"`, `"dropout=0.1"`, comma-separated.
        factoring: an `EinsumDense` kernel's factoring (`"standard"`,
            `"keras"`), else `"-"`.
        a_shape, b_shape: the stored shapes of `A` and `B`.
        params: the number of adapter weights (`A`, `B`, DoRA's magnitude).
    """

    name: str
    type: str
    rank: int
    alpha: float
    scale: float
    variant: str
    factoring: str
    a_shape: tuple
    b_shape: tuple
    params: int


def describe(path):
    """Reads the adapter at `path` and describes each of its layers.

    Args:
        path: a `keras_lora` `.safetensors` file, a PEFT adapter directory
            or a KerasHub `*.lora.h5` file.

    Returns:
        `(source, layers)`: what was read (`"adapter file 'x.safetensors'"`)
        and a list of `AdapterLayer`, in the file's order.

    Raises:
        FileNotFoundError: nothing at `path`.
        TypeError, ValueError: the file is not a valid adapter, as
            `load_adapter` would say.
    """
    reader = find_reader(path)
    layers = _DESCRIBERS[reader.NAME](path)
    return f"{reader.DESCRIPTION} '{path}'", layers


def _keras_lora(path):
    records = keras_lora_format.read(path, None, None, [], strict=True)
    records = [r for r in records if not isinstance(r, ExtraRecord)]
    return [
        _row(
            r.key,
            r.base_type or "-",
            r.rank,
            r.alpha,
            r.use_rslora,
            _variant(r.use_rslora, r.use_dora, r.init, r.dropout),
            r.factoring or "-",
            r.a.shape,
            r.b.shape,
            r.a.size + r.b.size + (0 if r.magnitude is None else r.magnitude.size),
        )
        for r in records
    ]


def _peft(path):
    directory = Path(path)
    options = read_config(directory)
    rank = options.pop("rank")
    options.pop("base_model_class", None)
    init = "loftq" if options.pop("loftq") else options["init"]
    if options.pop("target_parameters", None):
        raise ValueError(
            f"PEFT adapter '{directory}' adapts parameters (`target_parameters`, "
            "MoE experts), whose rank and expert count only the model tells "
            "apart; load it into its KerasHub model with `load_adapter`."
        )
    patterns = options.pop("rank_pattern"), options.pop("alpha_pattern")
    extra = {}  # modules_to_save and biases: not adapters, no rows
    pairs, magnitudes = peft_format._group_tensors(
        directory, options["use_dora"], True, extra
    )
    _, unknown = peft_extras.split_extra_keys(
        extra, options["modules_to_save"], options["bias"]
    )
    peft_format._report_unknown(
        directory, [peft_format.PREFIX + key for key in unknown], True
    )
    rows = []
    for module, pair in pairs.items():
        kind, a, b = peft_format._peft_pair(module, pair, rank, patterns[0], directory)
        module_options = peft_format._module_options(options, patterns, module)
        magnitude = magnitudes.get(module)
        rows.append(
            _row(
                module,
                kind,
                a.shape[0],
                module_options["alpha"],
                options["use_rslora"],
                _variant(
                    options["use_rslora"],
                    options["use_dora"],
                    init,
                    options["dropout"],
                ),
                "-",
                a.shape,
                b.shape,
                a.size + b.size + (0 if magnitude is None else magnitude.size),
            )
        )
    return rows


def _kerashub(path):
    rank, factors = kerashub_format._read_h5(path)
    return [
        _row(
            f"lora/{index}",
            "-",
            rank,
            float(rank),  # KerasHub's LoRA has no alpha: scale 1
            False,
            "lora",
            "keras" if a.ndim > 2 or b.ndim > 2 else "-",
            a.shape,
            b.shape,
            a.size + b.size,
        )
        for index, (a, b) in sorted(factors.items())
    ]


_DESCRIBERS = {
    keras_lora_format.NAME: _keras_lora,
    peft_format.NAME: _peft,
    kerashub_format.NAME: _kerashub,
}


def _variant(use_rslora, use_dora, init, dropout):
    parts = ["rslora"] if use_rslora else []
    parts += ["dora"] if use_dora else []
    parts += [f"init={init}"] if init != "default" else []
    parts += [f"dropout={dropout:g}"] if dropout else []
    return ",".join(parts) or "lora"


def _row(name, type_, rank, alpha, use_rslora, variant, factoring, a, b, params):
    rank, alpha = int(rank), float(alpha)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    return AdapterLayer(
        name,
        type_,
        rank,
        alpha,
        scale,
        variant,
        factoring,
        tuple(int(d) for d in a),
        tuple(int(d) for d in b),
        int(params),
    )
