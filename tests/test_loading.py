"""--pretrained that is not a usable checkpoint file: one line that says what it is, no noise."""

from __future__ import annotations

import os
import pickle
import threading
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")

from vlm_export.export.cli import main as export_main  # noqa: E402
from vlm_export.models.loading import TEST_MODEL, ModelLoadError, load_clip  # noqa: E402


def _load_error(pretrained: str) -> str:
    """load_clip's error for ``pretrained``, in a thread that must not block (a FIFO opened
    for reading would wait for a writer)."""
    errors: list[BaseException] = []

    def load() -> None:
        try:
            load_clip(TEST_MODEL, pretrained)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), f"loading {pretrained} blocked"
    (error,) = errors
    assert isinstance(error, ModelLoadError), error
    return str(error)


def test_a_folder_is_said_to_be_a_folder(tmp_path) -> None:
    (tmp_path / "ckpt.pt").mkdir()
    assert _load_error(str(tmp_path / "ckpt.pt")) == (
        f"{tmp_path / 'ckpt.pt'} is a folder, not a checkpoint file"
    )


def test_a_folder_named_like_no_tag_is_said_to_be_a_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("weights").mkdir()
    assert _load_error("weights") == "weights is a folder, not a checkpoint file"


def test_a_fifo_is_never_opened(tmp_path) -> None:
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    assert _load_error(str(fifo)) == f"{fifo} is a FIFO, not a checkpoint file"


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_device_is_said_to_be_a_device() -> None:
    assert _load_error("/dev/null") == "/dev/null is a character device, not a checkpoint file"


def test_a_missing_file_is_still_not_found(tmp_path) -> None:
    assert (
        _load_error(str(tmp_path / "gone.pt")) == f"checkpoint file not found: {tmp_path}/gone.pt"
    )


def test_a_plain_pickle_is_one_error_and_no_warning(tmp_path) -> None:
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelLoadError, match="not a readable checkpoint file"):
            load_clip(TEST_MODEL, str(path))
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


def test_the_command_says_it_in_one_line(tmp_path, capsys) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "ckpt.pt").mkdir()
    argv = ["--model", TEST_MODEL, "--pretrained", str(tmp_path / "ckpt.pt"), "--quiet"]
    code = export_main(
        [*argv, "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"vlm-export: error: {tmp_path / 'ckpt.pt'} is a folder, not a checkpoint file"
    ]
    assert not (tmp_path / "o").exists()
