"""Imports point one way: config -> layers -> model -> io -> cli/exporting.

Every import in the package (at the top of a module or inside a function)
is read with `ast`, and none may reach a higher level than the module that
makes it. See docs/layout.md.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The level of each part of the package, lowest first. A module may import
# its own level and the levels below it, never one above.
LEVELS = {
    "config": 0,
    "version": 0,
    "atomic": 0,
    "layers": 1,
    "model": 2,
    "summary": 2,
    "distribution": 2,
    "io": 3,
    "exporting": 4,
    # The command's subcommands load `.keras` files, so they import the
    # whole package (which registers every class a file may name).
    "cli": 5,
    "__main__": 5,
}
FACE = 5  # `keras_lora` itself (its `__init__`) and the `keras-lora` launcher


def level(module):
    """The level of a dotted module name of this project, or `None` for a
    module from elsewhere."""
    parts = module.split(".")
    if parts[0] == "keras_lora_cli":
        return FACE
    if parts[0] != "keras_lora":
        return None
    if len(parts) == 1:
        return FACE
    assert parts[1] in LEVELS, (
        f"keras_lora.{parts[1]} has no level: give it one in LEVELS (and in "
        "docs/layout.md)."
    )
    return LEVELS[parts[1]]


def wrong_way_imports(module, source):
    """`(importer, imported, line)` for each import in `source` (the text
    of `module`) that reaches a higher level than `module`."""
    own = level(module)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, (
                f"{module}:{node.lineno}: a relative import; the package "
                "imports by absolute name."
            )
            base = node.module
            # `from keras_lora.io import peft_format` imports a submodule;
            # `from keras_lora import __version__` the package's face.
            names = [
                f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = level(name)
            if target is not None and target > own:
                found.append((module, name, node.lineno))
    return found


def _is_module(name):
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules():
    files = sorted((ROOT / "keras_lora").rglob("*.py")) + [ROOT / "keras_lora_cli.py"]
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def test_imports_point_one_way():
    wrong = []
    for module, path in _modules():
        wrong += wrong_way_imports(module, path.read_text(encoding="utf-8"))
    assert not wrong, "imports pointing the wrong way:\n" + "\n".join(
        f"  {importer}:{line} imports {imported}" for importer, imported, line in wrong
    )


def test_the_check_sees_imports_pointing_the_wrong_way():
    source = (
        "from keras_lora.model.walk import iter_layers\n"
        "def f():\n"
        "    from keras_lora import __version__\n"
        "    import keras_lora.cli\n"
    )
    assert wrong_way_imports("keras_lora.layers.base", source) == [
        ("keras_lora.layers.base", "keras_lora.model.walk", 1),
        ("keras_lora.layers.base", "keras_lora", 3),
        ("keras_lora.layers.base", "keras_lora.cli", 4),
    ]
    assert wrong_way_imports("keras_lora.io.records", source) == [
        ("keras_lora.io.records", "keras_lora", 3),
        ("keras_lora.io.records", "keras_lora.cli", 4),
    ]
