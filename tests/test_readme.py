"""The README's API examples are real code: run them, check what they print."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def api_blocks():
    text = README.read_text()
    api = text[text.index("\n## API") :]
    return re.findall(r"```python\n(.*?)```", api, flags=re.S)


def test_readme_api_examples_run_and_print_what_they_claim(tmp_path, monkeypatch):
    blocks = api_blocks()
    # A block whose first line is "# not run: <why>" is a sketch that needs
    # devices or data a test can't have; its calls are tested elsewhere.
    blocks = [b for b in blocks if not b.startswith("# not run:")]
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), namespace)
        claimed = re.findall(r"^# (trainable params: .*)$", block, flags=re.M)
        for line in claimed:
            assert line in out.getvalue().splitlines()
