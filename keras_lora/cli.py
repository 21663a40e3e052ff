"""The commands of the `keras-lora` command line (also `python -m keras_lora`).

The console script's launcher, the top-level module `keras_lora_cli`, parses
the arguments and imports this module only to run a command, so that
`--help`, `--version` and argument errors never import Keras.

Exit statuses (docs/cli.md has the table): 0 success; 2 a usage error (bad
arguments, a missing or unreadable input); 3 inputs that were read but are
not what the command needs (a model without LoRA layers to merge, an
adapter that does not fit the model); 1 any other failure; 130 interrupted.
Every error is one line. Outputs are written beside their destination and
renamed into place when complete.
"""

import sys
from pathlib import Path

PROG = "keras-lora"


class InputError(Exception):
    """A usage error: bad arguments, or a missing or unreadable input: exit
    status 2."""


class UnfitInputError(Exception):
    """Inputs that were read but are not what the command needs (a model
    without LoRA layers to merge, an adapter that does not fit the model):
    exit status 3."""


def run(args):
    """Runs the command that `keras_lora_cli` parsed; returns the exit status.

    Args:
        args: the `argparse.Namespace` of `keras_lora_cli.build_parser()`.
    """
    commands = {
        "inspect": _inspect,
        "merge": _merge,
        "apply": _apply,
        "export": _export,
    }
    try:
        return commands[args.command](args) or 0
    except InputError as e:
        return _fail(e, 2)
    except UnfitInputError as e:
        return _fail(e, 3)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # one line, never a traceback
        return _fail(f"{type(e).__name__}: {e}", 1)


def _fail(message, status):
    text = " ".join(str(message).split())
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return status


def _check_input_file(path):
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: '{path}'")
    if path.is_dir():
        raise InputError(f"'{path}' is a directory; expected a .keras model file")
    return path


def _load_model(path):
    path = _check_input_file(path)
    import keras

    import keras_lora  # noqa: F401  (registers the LoRA layer classes)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:
        raise InputError(
            f"cannot read model '{path}': {type(e).__name__}: {e}"
        ) from None


def _check_keras_output(path):
    if Path(path).suffix != ".keras":
        raise InputError(f"the output must end in '.keras'. Received: '{path}'")
    _check_output_folder(path)


def _check_output_folder(path):
    from keras_lora.atomic import check_parent

    try:
        check_parent(path)
    except OSError as e:
        raise InputError(str(e)) from None


def _inspect(args):
    if Path(args.model).suffix != ".keras":
        return _inspect_adapter(args)
    args.rank = 8 if args.rank is None else args.rank
    import numpy as np

    from keras_lora.layers import lora_class_for
    from keras_lora.model.surgery import apply_lora, lora_layers
    from keras_lora.model.targets import match_layers
    from keras_lora.model.walk import iter_layers
    from keras_lora.summary import trainable_summary

    model = _load_model(args.model)
    layers = list(iter_layers(model))
    rows = [("path", "type", "kernel shape", "rank", "LoRA params", "target")]
    if lora_layers(model):
        for path, layer in lora_layers(model):
            params = sum(int(np.prod(v.shape)) for v in (layer.lora_a, layer.lora_b))
            kernel = tuple(layer.base_kernel.shape)
            rows.append(
                (
                    path,
                    type(layer).__name__,
                    str(kernel),
                    str(layer.rank),
                    f"{params:,}",
                    "yes",
                )
            )
        _print_table(rows)
        print(trainable_summary(model, print_fn=None))
        return 0
    supported = lambda layer: lora_class_for(layer) is not None  # noqa: E731
    if args.targets:
        try:
            ids = {
                id(layer)
                for pattern in args.targets
                for _, layer in match_layers(pattern, layers, "--targets", supported)
            }
        except (TypeError, ValueError) as e:
            raise InputError(str(e)) from None

        def targets(layer):
            return id(layer) in ids

        targets.__name__ = "--targets"
    else:
        targets = None
    try:
        # `model` was loaded for this look only: convert it in place, which
        # keeps any class (a KerasHub task or backbone).
        lora_model = apply_lora(model, targets=targets, rank=args.rank, in_place=True)
    except ValueError as e:
        lora_model, selected = None, set()
        problem = str(e)
    else:
        selected = {p for p, _ in lora_layers(lora_model)}
        problem = None
    for path, layer in layers:
        if not supported(layer):
            continue
        cls = lora_class_for(layer)
        kernel = tuple(cls.kernel_variable(layer).shape)
        params = cls.adapter_size(layer, args.rank)
        rows.append(
            (
                path,
                type(layer).__name__,
                str(kernel),
                str(args.rank),
                f"{params:,}",
                "yes" if path in selected else "no",
            )
        )
    _print_table(rows)
    if lora_model is None:
        raise UnfitInputError(problem)
    print(trainable_summary(lora_model, print_fn=None))
    return 0


def _inspect_adapter(args):
    given = [o for o, v in (("--targets", args.targets), ("--rank", args.rank)) if v]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise InputError(
            f"{' and '.join(given)} {verb} to a .keras model; '{args.model}' "
            "is read as an adapter (its name does not end in '.keras')"
        )
    source, layers = _read_adapter(args.model)
    rows = [
        ("layer", "type", "rank", "alpha", "scale", "variant", "factoring")
        + ("A shape", "B shape", "params")
    ]
    for layer in layers:
        rows.append(
            (
                layer.name,
                layer.type,
                str(layer.rank),
                f"{layer.alpha:g}",
                f"{layer.scale:.4g}",
                layer.variant,
                layer.factoring,
                str(layer.a_shape),
                str(layer.b_shape),
                f"{layer.params:,}",
            )
        )
    _print_table(rows)
    total = sum(layer.params for layer in layers)
    print(f"{source}: {len(layers)} layers, {total:,} adapter parameters")
    return 0


def _read_adapter(path):
    """`describe(path)`, a missing or unreadable adapter being exit status 2."""
    from keras_lora.io.describe import describe

    if not Path(path).exists():
        raise InputError(f"no such adapter file or directory: '{path}'")
    try:
        return describe(path)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot read adapter '{path}': {e}") from None


def _print_table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def _merge(args):
    from keras_lora.exporting import export
    from keras_lora.model.surgery import lora_layers

    _check_keras_output(args.output)
    model = _load_model(args.model)
    if not lora_layers(model):
        raise UnfitInputError(
            f"'{args.model}' has no LoRA layers, so there is nothing to merge"
        )
    export(model, args.output, format="keras")
    print(f"wrote {args.output}")
    return 0


def _apply(args):
    from keras_lora.atomic import atomic_output
    from keras_lora.io import load_adapter
    from keras_lora.model.merge import merge_lora

    _check_keras_output(args.output)
    name_map = _parse_name_map(args.name_map)
    model = _load_model(args.model)
    adapter = Path(args.adapter)
    _read_adapter(adapter)  # unreadable: status 2; not fitting the model: 3
    try:
        model = load_adapter(
            model,
            adapter,
            name_map=name_map,
            strict=args.strict,
            in_place=args.in_place,
        )
    except (OSError, ValueError, TypeError) as e:
        hint = ""
        if "in_place=True" in str(e) and not args.in_place:
            hint = " (on the command line: pass --in-place)"
        raise UnfitInputError(f"cannot apply adapter '{adapter}': {e}{hint}") from None
    if args.merge:
        model = merge_lora(model)
    with atomic_output(args.output) as tmp:
        model.save(tmp)
    print(f"wrote {args.output}")
    return 0


def _parse_name_map(pairs):
    if not pairs:
        return None
    name_map = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise InputError(
                f"--name-map entries look like SOURCE=KERAS. Received: {pair!r}"
            )
        name_map[source] = target
    return name_map


def _export(args):
    from keras_lora.exporting import export, write_plain
    from keras_lora.model.walk import lora_layers

    _check_input_file(args.model)
    _check_output_folder(args.output)
    if args.format == "keras":
        _check_keras_output(args.output)
    model = _load_model(args.model)
    if lora_layers(model):
        export(model, args.output, format=args.format)
    else:
        write_plain(model, args.output, format=args.format)
    print(f"wrote {args.output}")
    return 0
