"""`keras-lora --help`, `--version` and argument errors import no backend.

Importing Keras imports a backend (TensorFlow, JAX or torch), which takes
seconds; the console script's launcher (`keras_lora_cli`) imports
`keras_lora`, and with it Keras, only to run a command. These tests run the
installed console script in fresh interpreters and look at the modules each
one imported (`sys.modules`, or Python's `-X importtime` list for the script
itself), never at the clock. That a real command still works through the
console script is tested in test_cli.py.
"""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

# Top-level packages that a light answer must not import.
HEAVY = ["keras", "keras_lora", "tensorflow", "jax", "jaxlib", "torch"]

# `python -c PROBE OUT ARGV...`: loads the installed `keras-lora`
# console-script entry point, calls it with ARGV, and writes its exit status
# and the top-level names in `sys.modules` to OUT.
PROBE = """
import json, sys
from importlib.metadata import entry_points

out, argv = sys.argv[1], sys.argv[2:]
(script,) = {ep.value: ep for ep in entry_points(
    group="console_scripts", name="keras-lora")}.values()
try:
    status = script.load()(argv)
except SystemExit as e:
    status = e.code
modules = sorted({name.split(".")[0] for name in sys.modules})
with open(out, "w") as f:
    json.dump({"status": status, "modules": modules}, f)
"""


def run_entry_point(tmp_path, *argv):
    """Runs the console script's entry point in a fresh interpreter."""
    out = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert out.exists(), result.stderr
    found = json.loads(out.read_text())
    return found["status"], set(found["modules"]), result


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.mark.parametrize(
    "argv, status, stream, text",
    [
        (["--help"], 0, "stdout", "usage: keras-lora"),
        (["merge", "--help"], 0, "stdout", "usage: keras-lora merge"),
        (["--version"], 0, "stdout", f"keras-lora {metadata.version('keras-lora')}"),
        ([], 2, "stderr", "the following arguments are required: COMMAND"),
        (["frobnicate"], 2, "stderr", "invalid choice: 'frobnicate'"),
        (["inspect", "m.keras", "--rank", "0"], 2, "stderr", "positive integer"),
    ],
    ids=["help", "command-help", "version", "no-command", "bad-command", "bad-rank"],
)
def test_light_answers_import_no_backend(tmp_path, argv, status, stream, text):
    found_status, modules, result = run_entry_point(tmp_path, *argv)
    assert found_status == status
    assert text in getattr(result, stream)
    assert "keras_lora_cli" in modules  # the launcher ran in this interpreter
    assert modules.isdisjoint(HEAVY), sorted(modules.intersection(HEAVY))


def imported_by_console_script(*argv):
    """The installed `keras-lora` script, run as users run it; returns its
    result and the top-level names of every module it imported."""
    script = Path(sys.executable).with_name("keras-lora")
    result = subprocess.run(
        [str(script), *argv],
        capture_output=True,
        text=True,
        env=dict(_env(), PYTHONPROFILEIMPORTTIME="1"),
        timeout=300,
    )
    # Lines look like "import time:  123 |  456 |     package.module".
    modules = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return result, modules


def test_console_script_help_imports_no_backend():
    result, modules = imported_by_console_script("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: keras-lora")
    assert "keras_lora_cli" in modules  # the import list is really there
    assert modules.isdisjoint(HEAVY), sorted(modules.intersection(HEAVY))
