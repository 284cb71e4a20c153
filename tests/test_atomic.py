"""Folder swaps that an interrupt cannot split, and live temporary folders no clean-up removes."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_export.core import atomic
from vlm_export.core.atomic import (
    PublishedLog,
    WriteError,
    atomic_directory,
    atomic_file,
    remove_stale_temps,
    stale_temps,
)
from vlm_export.core.interrupts import exit_status_of, work_written

ROOT = Path(__file__).resolve().parents[1]


class Stopped(Exception):
    """What the test's SIGTERM handler raises."""


def _write_bundle(folder: Path, text: str) -> None:
    for name in ("a.bin", "b.bin"):
        (folder / name).write_text(f"{text} {name}")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.bin").write_text(f"{text} c")


def _contents(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture()
def old_bundle(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    target.mkdir()
    _write_bundle(target, "old")
    return target


def _whole(target: Path) -> str:
    """'old' or 'new' when ``target`` holds that bundle complete and nothing is parked beside."""
    assert not list(target.parent.glob(f".{target.name}*")), "a folder left parked"
    for which in ("old", "new"):
        expected = {"a.bin": f"{which} a.bin", "b.bin": f"{which} b.bin", "sub/c.bin": f"{which} c"}
        if _contents(target) == expected:
            return which
    raise AssertionError(f"{target} holds neither whole bundle: {_contents(target)}")


def _replace_calls(monkeypatch: pytest.MonkeyPatch, action) -> list[tuple[str, str]]:
    """Route atomic's os.replace through ``action(call number, do_replace)``."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs) -> None:
        calls.append((str(src), str(dst)))
        action(len(calls), lambda: real(src, dst, *args, **kwargs))

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


@pytest.mark.parametrize("call", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_overwrite_swap_completes_it(
    old_bundle, monkeypatch, call, sig
) -> None:
    """A real Ctrl-C (or SIGTERM) right after either rename: the swap completes, then the
    interrupt is raised; the new bundle stands whole and nothing is parked."""

    def stop(signum, frame) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    placed = []

    def action(number: int, do_replace) -> None:
        do_replace()
        if number == call:
            os.kill(os.getpid(), sig)

    calls = _replace_calls(monkeypatch, action)
    try:
        raised = KeyboardInterrupt if sig == signal.SIGINT else Stopped
        done = functools.partial(placed.append, 1)
        with pytest.raises(raised), atomic_directory(old_bundle, True, done) as tmp:
            _write_bundle(tmp, "new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 2 and placed == [1]  # placed() ran before the interrupt was raised
    assert _whole(old_bundle) == "new"


def test_ctrl_c_in_the_swap_of_a_command_comes_after_its_work_is_written(
    old_bundle, monkeypatch, capsys
) -> None:
    """With the commands' own Ctrl-C handling: the bundle is placed, the command succeeds."""

    def action(number: int, do_replace) -> None:
        do_replace()
        os.kill(os.getpid(), signal.SIGINT)

    _replace_calls(monkeypatch, action)

    def command() -> int:
        with atomic_directory(old_bundle, overwrite=True, placed=work_written) as tmp:
            _write_bundle(tmp, "new")
        return 0

    assert exit_status_of(command, "interrupted; nothing was written") == 0
    assert "interrupted" not in capsys.readouterr().err
    assert _whole(old_bundle) == "new"


@pytest.mark.parametrize("call", [1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_exception_at_either_rename_leaves_one_whole_bundle(
    old_bundle, monkeypatch, call, when
) -> None:
    """KeyboardInterrupt raised by a rename itself (before or after it renamed): the old bundle
    is put back, or the new one kept with the old removed; never no bundle, never one parked."""

    def action(number: int, do_replace) -> None:
        if number == call and when == "before":
            raise KeyboardInterrupt
        do_replace()
        if number == call and when == "after":
            raise KeyboardInterrupt

    _replace_calls(monkeypatch, action)
    with pytest.raises(KeyboardInterrupt), atomic_directory(old_bundle, overwrite=True) as tmp:
        _write_bundle(tmp, "new")
    expected = "new" if (call, when) == (2, "after") else "old"
    assert _whole(old_bundle) == expected


def test_a_failed_second_rename_puts_the_old_bundle_back(old_bundle, monkeypatch) -> None:
    def action(number: int, do_replace) -> None:
        if number == 2:
            raise OSError(28, "No space left on device")
        do_replace()

    _replace_calls(monkeypatch, action)
    with pytest.raises(OSError, match="No space"), atomic_directory(old_bundle, True) as tmp:
        _write_bundle(tmp, "new")
    assert _whole(old_bundle) == "old"


def test_signals_are_handled_as_before_once_the_swap_is_done(old_bundle) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with atomic_directory(old_bundle, overwrite=True) as tmp:
        _write_bundle(tmp, "new")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---- a live run's temporary folder is not a leftover ----------------------------------------


def _age(path: Path, seconds: float = 3600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_finishing_write_leaves_a_concurrent_runs_staging_folder(tmp_path) -> None:
    """B starts and finishes while A works in a subfolder of its staging folder (whose own
    mtime stays old): B's clean-up keeps A's folder, and A then replaces B's bundle."""
    target = tmp_path / "out"
    with atomic_directory(target, overwrite=True) as slow:
        (slow / "sub").mkdir()
        _age(slow)
        with atomic_directory(target, overwrite=True) as quick:
            _write_bundle(quick, "old")
        assert (slow / "sub").is_dir()
        (slow / "sub").rmdir()
        _write_bundle(slow, "new")
    assert _whole(target) == "new"


def test_a_run_whose_output_another_run_wrote_meanwhile_says_so(tmp_path) -> None:
    target = tmp_path / "out"
    refused = pytest.raises(FileExistsError, match="by another run.*nothing was replaced")
    with refused, atomic_directory(target) as slow:
        with atomic_directory(target) as quick:
            _write_bundle(quick, "old")
        _write_bundle(slow, "new")
    assert _whole(target) == "old"


def test_staging_held_by_another_process_is_kept_until_it_dies(tmp_path) -> None:
    target = tmp_path / "out"
    code = (
        "import sys, time; from vlm_export.core.atomic import atomic_directory\n"
        f"with atomic_directory({str(target)!r}) as tmp:\n"
        "    print(tmp, flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        staging = Path(child.stdout.readline().strip())
        _age(staging)
        assert staging.is_dir()
        assert remove_stale_temps(target, before=time.time() + 10) == []
        assert staging.is_dir()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert remove_stale_temps(target, before=time.time() + 10) == [staging]  # killed: a leftover
    assert not staging.exists()


def test_live_temporary_files_are_not_leftovers(tmp_path) -> None:
    target = tmp_path / "state.npz"
    later = time.time() + 10
    with atomic_file(target) as handle:
        handle.write(b"partial")
        assert stale_temps(target, before=later) == []
    log = PublishedLog(tmp_path / "run.jsonl")
    try:
        log.write("a line\n")
        assert stale_temps(tmp_path / "run.jsonl", before=later) == []
    finally:
        log.close()


def test_a_vanished_staging_folder_says_so(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(WriteError, match="removed while this run worked"):  # noqa: SIM117
        with atomic_directory(target) as tmp:
            shutil.rmtree(tmp)  # what an older version's clean-up did
            (tmp / "a.bin").write_text("x")
    assert not target.exists()


def test_a_name_too_long_for_its_temporary_copy_is_refused_before_any_work(tmp_path) -> None:
    """The longest name written safely leaves room for ``.NAME.vlm-tmp-XXXXXXXX`` on the file
    system; one byte more is refused by ``check_can_create`` (before minutes of work), not by
    the write at the end."""
    from vlm_export.core.atomic import WriteError, atomic_write_bytes, check_can_create

    most = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = most - len(".") - len(".vlm-tmp-") - 8
    fits = tmp_path / ("s" * (longest - 4) + ".npz")
    check_can_create(fits)
    atomic_write_bytes(fits, b"x")
    assert fits.read_bytes() == b"x"
    too_long = tmp_path / ("s" * (longest - 3) + ".npz")
    with pytest.raises(WriteError, match=f"may have at most {longest} on this file system"):
        check_can_create(too_long)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fits.name]
