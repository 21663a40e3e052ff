"""The keras-lora command line. Most checks call `main` in process; a few
run the installed console script and `python -m keras_lora`."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model.surgery import lora_layers
from keras_lora.model.walk import iter_layers
from keras_lora_cli import main

X = np.random.default_rng(5).normal(size=(4, 6)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def mlp():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(16, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="mlp")


@pytest.fixture
def files(tmp_path):
    """A saved base model, its LoRA model, and that model's adapter file."""
    base = mlp()
    lora = kl.apply_lora(base, rank=2, alpha=4)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(lora):
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    base.save(tmp_path / "base.keras")
    lora.save(tmp_path / "lora.keras")
    kl.save_adapter(lora, tmp_path / "task.safetensors")
    return tmp_path, _np(lora(X))


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-lora: error: "), err
    assert "Traceback" not in err


def test_inspect_plain_model(files, capsys):
    tmp, _ = files
    status, out, _ = run(capsys, "inspect", tmp / "base.keras", "--rank", 4)
    assert status == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    # path, type, kernel shape (2 tokens), rank, params, target
    assert rows["fc1"][1:] == ["Dense", "(6,", "16)", "4", "88", "yes"]
    assert rows["head"][-2:] == ["76", "no"]  # an output layer: not a default target
    # LoRA on fc1 and fc2 at rank 4: 88 + 128 trainable; base 112 + 272 + 51.
    assert out.splitlines()[-1] == (
        "trainable params: 216 || all params: 651 || trainable%: 33.1797"
    )


def test_inspect_targets_and_lora_models(files, capsys):
    tmp, _ = files
    status, out, _ = run(
        capsys, "inspect", tmp / "base.keras", "--targets", "fc2", "he.*"
    )
    assert status == 0
    targeted = [line.split()[0] for line in out.splitlines() if line.endswith("yes")]
    assert targeted == ["fc2", "head"]
    status, _, err = run(capsys, "inspect", tmp / "base.keras", "--targets", "nope")
    assert status == 2 and "matches no layer" in err
    assert_one_line_error(err)
    status, out, _ = run(capsys, "inspect", tmp / "lora.keras")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["fc1", "fc2"]
    assert "LoRADense" in out and "trainable%" in out


def test_merge(files, capsys):
    tmp, want = files
    status, out, _ = run(capsys, "merge", tmp / "lora.keras", tmp / "merged.keras")
    assert status == 0 and "merged.keras" in out
    merged = keras.saving.load_model(tmp / "merged.keras")
    assert not lora_layers(merged)
    np.testing.assert_allclose(_np(merged(X)), want, atol=1e-5)
    # A readable model that is not what `merge` needs: status 3, not 2.
    status, _, err = run(capsys, "merge", tmp / "base.keras", tmp / "m2.keras")
    assert status == 3 and "no LoRA layers" in err
    assert_one_line_error(err)
    assert not (tmp / "m2.keras").exists()


def test_inspect_of_a_model_the_default_targets_miss_exits_3(tmp_path, capsys):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(inputs))
    model.save(tmp_path / "head_only.keras")
    status, out, err = run(capsys, "inspect", tmp_path / "head_only.keras")
    assert status == 3 and "selects nothing" in err
    assert_one_line_error(err)
    assert out.splitlines()[1].split()[0] == "head"  # the table still prints


@pytest.mark.parametrize("command", ["merge", "apply", "export"])
def test_an_output_in_a_missing_folder_exits_2(files, capsys, command):
    tmp, _ = files
    output = tmp / "no" / "such" / ("o.keras" if command != "export" else "out")
    argv = {
        "merge": ["merge", tmp / "lora.keras", output],
        "apply": ["apply", tmp / "base.keras", tmp / "task.safetensors", output],
        "export": ["export", tmp / "lora.keras", output],
    }[command]
    status, _, err = run(capsys, *argv)
    assert status == 2 and "does not exist" in err and "no/such" in err
    assert_one_line_error(err)
    assert not (tmp / "no").exists()


def test_apply_adapter_file_and_merge(files, capsys):
    tmp, want = files
    status, _, _ = run(
        capsys, "apply", tmp / "base.keras", tmp / "task.safetensors", tmp / "out.keras"
    )
    assert status == 0
    out_model = keras.saving.load_model(tmp / "out.keras")
    assert [p for p, _ in lora_layers(out_model)] == ["fc1", "fc2"]
    np.testing.assert_allclose(_np(out_model(X)), want, atol=1e-6)
    status, _, _ = run(
        capsys,
        "apply",
        tmp / "base.keras",
        tmp / "task.safetensors",
        tmp / "merged.keras",
        "--merge",
    )
    assert status == 0
    merged = keras.saving.load_model(tmp / "merged.keras")
    assert not lora_layers(merged)
    np.testing.assert_allclose(_np(merged(X)), want, atol=1e-5)


def test_apply_peft_directory_with_name_map(files, capsys):
    tmp, want = files
    lora = keras.saving.load_model(tmp / "lora.keras")
    kl.save_adapter(
        lora, tmp / "peft", format="peft", name_map={"fc1": "0", "fc2": "2"}
    )
    argv = ["apply", tmp / "base.keras", tmp / "peft", tmp / "out.keras"]
    # A readable adapter that does not fit the model: status 3.
    status, _, err = run(capsys, *argv)
    assert status == 3 and "map to no Keras layer" in err
    assert_one_line_error(err)
    assert not (tmp / "out.keras").exists()
    status, _, _ = run(capsys, *argv, "--name-map", "0=fc1", "2=fc2")
    assert status == 0
    out_model = keras.saving.load_model(tmp / "out.keras")
    np.testing.assert_allclose(_np(out_model(X)), want, atol=1e-6)


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{tmp}/missing.keras"],
        ["inspect", "{tmp}"],
        ["inspect", "{tmp}/garbage.keras"],
        ["merge", "{tmp}/missing.keras", "{tmp}/o.keras"],
        ["merge", "{tmp}/lora.keras", "{tmp}/o.h5"],
        ["apply", "{tmp}/base.keras", "{tmp}/missing.safetensors", "{tmp}/o.keras"],
        ["apply", "{tmp}/base.keras", "{tmp}/garbage.keras", "{tmp}/o.keras"],
        [
            "apply",
            "{tmp}/base.keras",
            "{tmp}/task.safetensors",
            "{tmp}/o.keras",
            "--name-map",
            "nonsense",
        ],
        ["export", "{tmp}/missing.keras", "{tmp}/out"],
    ],
    ids=lambda argv: "-".join(a.rsplit("/", 1)[-1] for a in argv),
)
def test_bad_input_is_one_line_and_status_2(files, capsys, argv):
    tmp, _ = files
    (tmp / "garbage.keras").write_bytes(b"this is no zip file")
    status, _, err = run(capsys, *(a.format(tmp=tmp) for a in argv))
    assert status == 2
    assert_one_line_error(err)
    assert not (tmp / "o.keras").exists() and not (tmp / "out").exists()


@pytest.mark.parametrize("command", [None, "inspect", "merge", "apply", "export"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: keras-lora")
    if command:
        assert f"keras-lora {command}" in out


def test_usage_errors_exit_2(capsys):
    for argv in (
        [],
        ["frobnicate"],
        ["inspect"],
        ["inspect", "m.keras", "--rank", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_export_uses_tensorflow(files, capsys):
    """On the JAX and torch backends this runs `python -m keras_lora export`
    in a TensorFlow subprocess; on TensorFlow it exports in process."""
    tmp, want = files
    status = main(["export", str(tmp / "lora.keras"), str(tmp / "saved")])
    assert status == 0
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tmp / "saved"))
    served = loaded.serve(tf.constant(X)).numpy()
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert not any(name.startswith(".") for name in os.listdir(tmp))


def test_console_script_reports_missing_input(tmp_path):
    script = Path(sys.executable).with_name("keras-lora")
    result = subprocess.run(
        [str(script), "merge", str(tmp_path / "nope.keras"), str(tmp_path / "o.keras")],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"keras-lora: error: no such file: '{tmp_path / 'nope.keras'}'"
    )
    assert "Traceback" not in result.stderr


def test_reloaded_lora_model_keeps_layer_paths(files):
    tmp, _ = files
    model = keras.saving.load_model(tmp / "lora.keras")
    assert [p for p, _ in iter_layers(model)] == ["fc1", "fc2", "head"]


def _table(out):
    """The rows of an `inspect` table, split on runs of two spaces."""
    import re

    lines = out.strip().splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[1:-1]], lines[-1]


def test_inspect_reads_a_keras_lora_adapter_file(tmp_path, capsys):
    inputs = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.Dense(6, name="fc")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    lora = kl.apply_lora(model, targets=["query", "fc"], rank=2, alpha=8)
    kl.add_adapter(lora, "legal", rank=4, targets=["fc"], use_dora=True)
    kl.add_adapter(lora, "fast", rank=4, use_rslora=True, dropout=0.1)
    kl.save_adapter(lora, tmp_path / "task.safetensors")
    kl.save_adapter(lora, tmp_path / "legal.safetensors", adapter="legal")
    kl.save_adapter(lora, tmp_path / "fast.safetensors", adapter="fast")
    status, out, err = run(capsys, "inspect", tmp_path / "task.safetensors")
    assert status == 0, err
    rows, last = _table(out)
    assert out.split()[:10] == [
        "layer", "type", "rank", "alpha", "scale", "variant", "factoring",
        "A", "shape", "B",
    ]  # fmt: skip
    assert rows == [  # in the file's order (its header sorts the paths)
        ["fc", "Dense", "2", "8", "4", "lora", "-", "(8, 2)", "(2, 6)", "28"],
        ["mha/query", "EinsumDense", "2", "8", "4", "lora", "standard",
         "(8, 2)", "(2, 2, 4)", "32"],
    ]  # fmt: skip
    assert last == (
        f"adapter file '{tmp_path / 'task.safetensors'}': 2 layers, "
        "60 adapter parameters"
    )
    status, out, _ = run(capsys, "inspect", tmp_path / "legal.safetensors")
    rows, _ = _table(out)
    assert status == 0
    # DoRA adds the magnitude vector (6) to A (8 x 4) and B (4 x 6).
    assert rows == [
        ["fc", "Dense", "4", "4", "1", "dora", "-", "(8, 4)", "(4, 6)", "62"]
    ]
    status, out, _ = run(capsys, "inspect", tmp_path / "fast.safetensors")
    rows, _ = _table(out)
    assert status == 0
    assert [row[2:6] for row in rows] == [["4", "4", "2", "rslora,dropout=0.1"]] * 2


def test_inspect_reads_a_peft_directory(files, capsys):
    tmp, _ = files
    lora = keras.saving.load_model(tmp / "lora.keras")
    kl.save_adapter(
        lora, tmp / "peft", format="peft", name_map={"fc1": "0", "fc2": "2"}
    )
    status, out, err = run(capsys, "inspect", tmp / "peft")
    assert status == 0, err
    rows, last = _table(out)
    # PEFT's layout: lora_A (rank, in), lora_B (out, rank); alpha 4, rank 2.
    assert rows == [
        ["0", "Linear", "2", "4", "2", "lora", "-", "(2, 6)", "(16, 2)", "44"],
        ["2", "Linear", "2", "4", "2", "lora", "-", "(2, 16)", "(16, 2)", "64"],
    ]
    assert last == f"PEFT adapter '{tmp / 'peft'}': 2 layers, 108 adapter parameters"


def test_inspect_reads_a_kerashub_lora_file(tmp_path, capsys):
    from tiny_kerashub import backbone

    model = backbone("gpt2")
    model.enable_lora(rank=2)
    model.save_lora_weights(str(tmp_path / "task.lora.h5"))
    status, out, err = run(capsys, "inspect", tmp_path / "task.lora.h5")
    assert status == 0, err
    rows, last = _table(out)
    # KerasHub adapts query and value of the one block (its layers with
    # weights number 9 and 11): EinsumDense kernels (16, 2, 8), factored as
    # Keras core does (A (16, 2, 2), B (2, 8)); no alpha, so scale 1.
    assert rows == [
        [f"lora/{i}", "-", "2", "2", "1", "lora", "keras", "(16, 2, 2)", "(2, 8)",
         "80"]
        for i in (9, 11)
    ]  # fmt: skip
    assert last.endswith("2 layers, 160 adapter parameters")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{tmp}/missing.safetensors"], "no such adapter file"),
        (["inspect", "{tmp}/garbage.safetensors"], "cannot read adapter"),
        (["inspect", "{tmp}/base_dir"], "is a directory"),
        (["inspect", "{tmp}/task.safetensors", "--rank", "4"], "--rank applies"),
        (["inspect", "{tmp}/task.safetensors", "--targets", "fc1"], "--targets"),
        (
            ["apply", "{tmp}/base.keras", "{tmp}/garbage.safetensors", "{tmp}/o.keras"],
            "cannot read adapter",
        ),
    ],
    ids=["missing", "garbage", "folder", "rank", "targets", "apply-garbage"],
)
def test_an_unreadable_adapter_exits_2(files, capsys, argv, message):
    tmp, _ = files
    (tmp / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (tmp / "base_dir").mkdir()
    status, _, err = run(capsys, *(a.format(tmp=tmp) for a in argv))
    assert status == 2 and message in err, err
    assert_one_line_error(err)
    assert not (tmp / "o.keras").exists()


def test_an_adapter_that_does_not_fit_the_model_exits_3(files, capsys):
    tmp, _ = files
    inputs = keras.Input((6,))
    other = keras.Model(inputs, keras.layers.Dense(3, name="fc1")(inputs))
    other.save(tmp / "other.keras")  # fc1 is (6, 3) here, (6, 16) in the file
    status, _, err = run(
        capsys,
        "apply",
        tmp / "other.keras",
        tmp / "task.safetensors",
        tmp / "o.keras",
    )
    assert status == 3 and "cannot apply adapter" in err, err
    assert_one_line_error(err)
    assert not (tmp / "o.keras").exists()
