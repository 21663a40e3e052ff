"""Where outputs go: `save_adapter` and `export` never create the folder
that is to hold their output (as Keras's `model.save` does not), and
`export(format="keras")` onto a folder says that it is a folder."""

import os

import keras
import pytest
from conftest import mlp

import keras_lora as kl


@pytest.fixture
def lora_model():
    return kl.apply_lora(mlp(), rank=2)


def _tree(root):
    return sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    )


@pytest.mark.parametrize(
    "write",
    [
        lambda m, p: kl.save_adapter(m, p / "a.safetensors"),
        lambda m, p: kl.save_adapter(m, p / "peft_dir", format="peft"),
        lambda m, p: kl.export(m, p / "m.keras", format="keras"),
        lambda m, p: kl.export(m, p / "saved_model"),
    ],
    ids=["save_adapter", "save_adapter-peft", "export-keras", "export-saved_model"],
)
def test_a_missing_folder_is_an_error_and_nothing_is_created(
    lora_model, tmp_path, write
):
    before = _tree(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        write(lora_model, tmp_path / "no" / "such")
    message = str(info.value)
    assert "the folder" in message and "does not exist" in message
    assert "keras_lora does not create folders" in message
    assert str(tmp_path / "no" / "such") in message
    assert _tree(tmp_path) == before
    # A file where the folder should be.
    (tmp_path / "plain").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"the folder '.*plain' is a file"):
        write(lora_model, tmp_path / "plain")
    assert (tmp_path / "plain").read_text() == "x"


def test_export_keras_onto_a_folder_says_it_is_a_folder(lora_model, tmp_path):
    for folder in (tmp_path / "served", tmp_path / "served.keras"):
        folder.mkdir()
        (folder / "keep.txt").write_text("x")
        with pytest.raises(ValueError, match=r"is a folder; this format writes one"):
            kl.export(lora_model, folder, format="keras")
        assert _tree(folder) == ["keep.txt"]


def test_outputs_into_an_existing_folder_still_work(lora_model, tmp_path):
    kl.save_adapter(lora_model, tmp_path / "a.safetensors")
    kl.export(lora_model, tmp_path / "m.keras", format="keras")
    loaded = kl.load_adapter(mlp(), tmp_path / "a.safetensors")
    assert len(loaded.trainable_weights) == 4
    assert keras.saving.load_model(tmp_path / "m.keras") is not None
