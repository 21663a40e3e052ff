"""The reach table of docs/kerashub.md: every `*Backbone` class of
`keras_hub.models`, built tiny and tried.

    KERAS_BACKEND=torch python tests/kerashub_reach_table.py [--write]

For each family of `tests/kerashub_families.py` it runs the family checks
(`kerashub_families.check`: LoRA in place keeps the class, outputs equal at
init, one step moves only the adapters, an exact merge), then KerasHub's own
`enable_lora(2)` on the same backbone, and prints one row. A backbone class
with no tiny build says why (`NOT_BUILT`). `--write` puts the table into
docs/kerashub.md between the markers.

tests/model/test_kerashub_families.py checks, family by family on every
backend, that the page holds the row the checks give, and that every
backbone class of the installed KerasHub has a row: the table can't drift.
"""

import os
import sys

import keras_hub

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kerashub_families  # noqa: E402

START = "<!-- reach-table:start (tests/kerashub_reach_table.py) -->"
END = "<!-- reach-table:end -->"
PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "kerashub.md")
HEADER = (
    "| backbone class | family | keras_lora targets | LoRA layers | in place: "
    "class kept, equal at init, only adapters train, exact merge | "
    "`enable_lora(2)` layers |\n|---|---|---|---|---|---|"
)

# Backbone classes with no tiny build here, and why.
NOT_BUILT = {
    "FeaturePyramidBackbone": "a base class, not a model: its subclasses have rows",
    "Gemma3nBackbone": (
        "not built: 17 required arguments (AltUp, LAuReL, per-layer inputs)"
    ),
    "MobileNetV5Backbone": "not built: 17 per-stage block lists",
    "DFineBackbone": "not built: 25 required arguments around an HGNetV2 encoder",
    "SAM3PromptableConceptBackbone": "not built: six sub-models",
}


def backbone_classes():
    """The names of every `*Backbone` class `keras_hub.models` exports,
    aliases left out (`ESM2Backbone` is `ESMBackbone`, `Qwen2Backbone` is
    `QwenBackbone`, `SmolLMBackbone` is `SmolLM3Backbone` in KerasHub 0.32)."""
    base = keras_hub.models.Backbone
    return sorted(
        name
        for name in dir(keras_hub.models)
        if name.endswith("Backbone")
        and name != "Backbone"
        and issubclass(getattr(keras_hub.models, name), base)
        and getattr(keras_hub.models, name).__name__ == name
    )


def targets_text(name):
    targets = kerashub_families.TARGETS[name]
    if targets == "all-linear":
        return '`"all-linear"`'
    if targets is kerashub_families.conv_layers:
        return "convolutions"
    if targets is kerashub_families.moe_layers:
        return "experts + `Dense`/`EinsumDense` but the router"
    raise ValueError(f"no text for the targets of {name!r}: {targets!r}")


def family_row(name, found):
    """The table's row of family `name`, from what its checks returned
    (`kerashub_families.check`): they passed, so the checks column says yes."""
    return (
        f"| `{found['class']}` | {name} | {targets_text(name)} | "
        f"{found['lora_layers']} | yes | {found['enable_lora']} |"
    )


def missing_row(class_name):
    return f"| `{class_name}` | — | — | — | {NOT_BUILT[class_name]} | — |"


def table(progress=print):
    """The whole table, running every family's checks (a few minutes)."""
    rows, covered = [], set()
    for name in kerashub_families.FAMILIES:
        progress(f"  {name} ...")
        found = kerashub_families.check(name)
        rows.append((found["class"], name, family_row(name, found)))
        covered.add(found["class"])
    for class_name in backbone_classes():
        if class_name not in covered:
            rows.append((class_name, "", missing_row(class_name)))
    lines = [row for *_, row in sorted(rows)]
    return "\n".join([HEADER] + lines + ["", summary(lines)])


def summary(rows):
    """The sentence under the table, counted from its rows."""
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    classes = {c[0] for c in cells}
    built = [c for c in cells if c[1] != "—"]
    built_classes = {c[0] for c in built}
    enabled = {c[0] for c in built if c[5].isdigit() and int(c[5]) > 0}
    return (
        f"**{len(built_classes)} of {len(classes)} backbone classes** built tiny "
        f"({len(built)} families) pass every check with keras_lora; KerasHub's "
        f"`enable_lora(2)` adapts at least one layer in {len(enabled)} of them."
    )


def page_table(path=PAGE):
    """The page's rows and summary sentence between the markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no reach table between {START} and {END}")
    body = text.split(START, 1)[1].split(END, 1)[0]
    lines = body.splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    sentence = [line for line in lines if line.startswith("**")]
    return rows, sentence[0] if sentence else None


def write(new_table, path=PAGE):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    text = f"{before}{START}\n{new_table}\n{END}{after}"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    result = table(progress=lambda line: print(line, file=sys.stderr))
    if "--write" in sys.argv[1:]:
        write(result)
        print(f"wrote the table into {os.path.normpath(PAGE)}", file=sys.stderr)
    else:
        print(result)
