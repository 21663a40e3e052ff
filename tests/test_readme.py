"""The README's and docs/'s examples are real code: run them, check what they print.

Conventions for a ```python block in README.md or docs/*.md:

- Blocks run in page order, in one namespace per page, in a fresh working
  directory, so a later block of a page may use names from an earlier one.
- A block whose first line is "# not run: <why>" is a sketch that needs
  devices or data a test can't have; its calls are tested elsewhere.
- A claimed output is a comment right after a `print(...)` call (on the same
  line or the next) or on the line after a `trainable_summary(...)` call, and
  any "# trainable params: ..." line. Each must be a line that the block
  printed.
"""

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run:"
PRINTING = ("print", "trainable_summary")


def python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def runnable_blocks(page):
    return [b for b in python_blocks(page) if not b.startswith(NOT_RUN)]


def claimed_lines(block):
    """The output lines a block claims to print (see the module docstring)."""
    lines = block.split("\n")
    claims = [m for m in re.findall(r"^# (trainable params: .*)$", block, flags=re.M)]
    for stmt in ast.parse(block).body:
        call = getattr(stmt, "value", None)
        if not isinstance(call, ast.Call):
            continue
        name = ast.unparse(call.func).rsplit(".", 1)[-1]
        if name not in PRINTING:
            continue
        last = lines[stmt.end_lineno - 1]
        inline = last[stmt.end_col_offset :].strip()
        if name == "print" and inline.startswith("# "):
            claims.append(inline[2:])
        if stmt.end_lineno < len(lines) and lines[stmt.end_lineno].startswith("# "):
            claims.append(lines[stmt.end_lineno][2:])
    return claims


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_the_examples_are_not_all_sketches():
    runnable = sum(len(runnable_blocks(page)) for page in PAGES)
    assert runnable >= 9
    assert claimed_lines('print("a")  # a\nkl.trainable_summary(m)\n# b\n') == [
        "a",
        "b",
    ]


@pytest.mark.parametrize(
    "page", [p for p in PAGES if runnable_blocks(p)], ids=lambda p: p.name
)
def test_examples_run_and_print_what_they_claim(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in runnable_blocks(page):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(page), "exec"), namespace)
        printed = out.getvalue().splitlines()
        for line in claimed_lines(block):
            assert line in printed, f"{page.name}: {line!r} not in {printed}"


def test_the_kerashub_example_runs_end_to_end():
    """examples/kerashub_causal_lm.py, under this session's backend: it asserts
    its own results (loss falls, the reloaded adapter and the SavedModel give
    the LoRA model's logits) and prints them."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kerashub_causal_lm.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "SavedModel serves the LoRA logits" in result.stdout
