"""The `keras-lora` console script: argument parsing, `--help` and `--version`.

This module sits outside the `keras_lora` package on purpose. Importing
`keras_lora` registers its layer classes with Keras, so it imports Keras and
with it a backend (TensorFlow, JAX or torch), which takes seconds. Here only
the standard library is imported until a command actually runs: `--help`,
`--version` and argument errors answer at once, and a real command imports
`keras_lora.cli`, which does the work.

```
keras-lora inspect MODEL.keras [--targets PATTERN ...] [--rank R]
keras-lora inspect ADAPTER
keras-lora merge LORA_MODEL.keras OUT.keras
keras-lora apply BASE.keras ADAPTER OUT.keras [--merge] [--in-place]
                 [--name-map PEFT=KERAS ...]
keras-lora export MODEL.keras OUT_DIR [--format tf_saved_model]
```
"""

import argparse

PROG = "keras-lora"
EXPORT_FORMATS = ("tf_saved_model", "keras")


def main(argv=None):
    """Runs the command line; returns the exit status.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` if None.
    """
    args = build_parser().parse_args(argv)
    from keras_lora.cli import run  # imports Keras and a backend

    return run(args)


def version():
    """The installed keras-lora version, read without importing keras_lora."""
    from importlib import metadata

    try:
        return metadata.version("keras-lora")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA adapters for Keras 3: inspect, merge, apply and export.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="list the layers LoRA can adapt, or what an adapter holds",
        description=(
            "Print a table of the layers LoRA can adapt (path, type, kernel "
            "shape, LoRA parameters at rank R, whether targeted) and the "
            "trainable percentage LoRA at rank R on the targets gives. On a "
            "model that already has LoRA layers, list those with their ranks. "
            "A path that does not end in .keras is read as an adapter (a "
            "keras_lora .safetensors file, a PEFT adapter directory, a "
            "KerasHub .lora.h5 file): print each layer's type, rank, alpha, "
            "scale, variant, factoring and A/B shapes."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL.keras|ADAPTER",
        help="a .keras model file, or an adapter file or PEFT directory",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        metavar="PATTERN",
        help=(
            "regexes matched in full against layer names or paths (a plain "
            "name matches itself). Default: every Dense that does not "
            "produce a model output."
        ),
    )
    p.add_argument(
        "--rank", type=_positive_int, default=None, help="LoRA rank (default 8)"
    )

    p = sub.add_parser(
        "merge",
        help="write the merged plain model of a LoRA model",
        description=(
            "Merge every LoRA layer of LORA_MODEL.keras into its base layer "
            "and write the plain model (no keras_lora inside) to OUT.keras."
        ),
    )
    p.add_argument(
        "model", metavar="LORA_MODEL.keras", help="a .keras model with LoRA layers"
    )
    p.add_argument("output", metavar="OUT.keras", help="the .keras file to write")

    p = sub.add_parser(
        "apply",
        help="combine a base model and an adapter file",
        description=(
            "Load ADAPTER (a keras_lora .safetensors file or a PEFT adapter "
            "directory) into BASE.keras and write the result to OUT.keras: "
            "the LoRA model, or with --merge the merged plain model."
        ),
    )
    p.add_argument("model", metavar="BASE.keras", help="the base .keras model")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter file or PEFT directory")
    p.add_argument("output", metavar="OUT.keras", help="the .keras file to write")
    p.add_argument("--merge", action="store_true", help="write the merged plain model")
    p.add_argument(
        "--name-map",
        nargs="+",
        metavar="SOURCE=KERAS",
        default=None,
        help=(
            "map adapter names to Keras layer names or paths, e.g. "
            "--name-map 0=dense 2=dense_1 (PEFT module paths on the left)"
        ),
    )
    p.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="skip adapter entries that match no layer, with a warning",
    )
    p.add_argument(
        "--in-place",
        action="store_true",
        help=(
            "convert the loaded model itself (load_adapter(..., in_place=True)): "
            "needed for a KerasHub task or backbone, which a copy would turn "
            "into a plain Functional model"
        ),
    )

    p = sub.add_parser(
        "export",
        help="merge a LoRA model and export it (TensorFlow backend)",
        description=(
            "Merge MODEL.keras's LoRA layers and export the plain model to "
            "OUT_DIR. This always runs under the TensorFlow backend (a "
            ".keras file is backend-neutral), in a subprocess when this "
            "process runs another backend. A model without LoRA layers is "
            "exported as it is."
        ),
    )
    p.add_argument("model", metavar="MODEL.keras", help="a .keras model file")
    p.add_argument("output", metavar="OUT_DIR", help="the directory (or file) to write")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="tf_saved_model",
        help="tf_saved_model (default) or keras (a merged .keras file)",
    )
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
