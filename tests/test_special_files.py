"""Outputs that are character devices or FIFOs are written through, never replaced; anything else
that is not a regular file or a new name is refused before any work; no FIFO wait outlives a
stop signal.

As root, the devices are device nodes of the real null and full devices (same major and minor
numbers) made in the test's folder, so that a regression replaces a node of the test, never
``/dev/null`` of the machine; as another user, and in a child that drops to ``nobody``, the real
``/dev/null`` and ``/dev/full`` (which such a user cannot replace).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakebundle import make_bundle, write_images
from polling import WAIT_S, wait_until

from vlm_export.core.atomic import WriteError, atomic_write_bytes, check_can_create
from vlm_export.core.paths import check_paths
from vlm_export.core.special_files import SpecialFileError, kind_of
from vlm_export.runtime import cli

RAIL = ["--shots", "2", "--hidden-dim", "16"]
ROOT = os.geteuid() == 0
NULL, FULL = os.makedev(1, 3), os.makedev(1, 7)  # Linux's /dev/null and /dev/full
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux device numbers")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tca+rail bundle, images, class folders and two learner states."""
    root = tmp_path_factory.mktemp("special")
    bundle = make_bundle(root / "bundle", method="tca+rail")
    write_images(root / "images", 3)
    for seed, name in enumerate(("cat", "dog", "bird")):
        write_images(root / "data" / name, 3, seed=seed)
    learn = ["learn", str(bundle), str(root / "data"), "--domain", "animals", *RAIL, "--quiet"]
    for name in ("a.npz", "b.npz"):
        assert cli.main([*learn, "--state", str(root / name)]) == 0
    return {"root": root, "bundle": bundle}


def _commands(w: dict[str, Path], tmp: Path) -> dict[str, Callable[[Path], list[str]]]:
    """Every output option the issue names: argv writing that output to ``out``."""
    bundle, data, images, a, b = (
        str(w["bundle"]),
        str(w["root"] / "data"),
        str(w["root"] / "images"),
        str(w["root"] / "a.npz"),
        str(w["root"] / "b.npz"),
    )
    learn = ["learn", bundle, data, "--domain", "animals", *RAIL, "--quiet"]
    return {
        "eval-tta --json": lambda out: ["eval-tta", bundle, data, "--quiet", "--json", str(out)],
        "eval-tta --plot": lambda out: ["eval-tta", bundle, data, "--quiet", "--plot", str(out)],
        "eval --json": lambda out: (
            ["eval", bundle, data, "--order", "animals", *RAIL] + ["--quiet", "--json", str(out)]
        ),
        "bench --json": lambda out: (
            ["bench", bundle, "--backends", "onnxruntime"] + ["--json", str(out)]
        ),
        "merge OUT": lambda out: ["merge", str(out), a, b],
        "merge --inference-state": lambda out: (
            ["merge", str(tmp / "m.npz"), a, b] + ["--inference-state", str(out)]
        ),
        "learn --inference-state": lambda out: (
            [*learn, "--state", str(tmp / "l.npz")] + ["--inference-state", str(out)]
        ),
        "run --out": lambda out: ["run", bundle, images, "--quiet", "--out", str(out)],
    }


NAMES = list(_commands({"root": Path(), "bundle": Path()}, Path()))
#: what each output starts with, read from a FIFO
HEADS = {
    "eval-tta --json": b"{",
    "eval-tta --plot": b"\x89PNG",
    "eval --json": b"{",
    "bench --json": b"{",
    "merge OUT": b"PK",
    "merge --inference-state": b"PK",
    "learn --inference-state": b"PK",
    "run --out": b'{"',
}


@pytest.fixture
def device() -> Iterator[Callable[[Path, int], Path]]:
    """Make a character device node of the given real device (root), or name the real one."""
    made: list[tuple[Path, int]] = []

    def make(where: Path, number: int) -> Path:
        if not ROOT:
            return Path("/dev/null" if number == NULL else "/dev/full")
        path = where / ("null" if number == NULL else "full")
        os.mknod(path, stat.S_IFCHR | 0o666, number)
        made.append((path, os.stat(path).st_ino))
        return path

    yield make
    for path, inode in made:  # still the node made, never a file renamed over it
        info = os.lstat(path)
        assert stat.S_ISCHR(info.st_mode) and info.st_ino == inode, path


def _call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _listing(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


@pytest.mark.parametrize("name", NAMES)
def test_the_full_device_is_written_through_and_fails_in_one_line(
    world, tmp_path, capsys, device, name
) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    full = device(dev, FULL)
    code, err = _call(_commands(world, tmp_path)[name](full), capsys)
    assert "Traceback" not in err, err
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlm-edge: error:") and "No space left on device" in last, err
    if ROOT:
        assert _listing(dev) == ["full"]  # no temporary file beside it, nothing renamed


@pytest.mark.parametrize("name", NAMES)
def test_the_null_device_takes_every_output(world, tmp_path, capsys, device, name) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    null = device(dev, NULL)
    code, err = _call(_commands(world, tmp_path)[name](null), capsys)
    assert code == 0 and "Traceback" not in err, err
    if ROOT:
        assert _listing(dev) == ["null"]


def test_two_outputs_on_the_null_device_are_no_conflict(world, tmp_path, capsys, device) -> None:
    null = device(tmp_path, NULL)
    argv = _commands(world, tmp_path)["eval-tta --json"](null) + ["--plot", str(null)]
    code, err = _call(argv, capsys)
    assert code == 0, err


class Reader(threading.Thread):
    """Reads a FIFO to its end (opens it for reading: the writer's open then succeeds)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.data = b""

    def run(self) -> None:
        with open(self.path, "rb") as handle:
            self.data = handle.read()


@pytest.mark.parametrize("name", NAMES)
def test_a_fifo_is_written_through_to_its_reader(world, tmp_path, capsys, name) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = Reader(fifo)
    reader.start()
    code, err = _call(_commands(world, tmp_path)[name](fifo), capsys)
    reader.join(WAIT_S)
    assert code == 0 and "Traceback" not in err, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    assert reader.data.startswith(HEADS[name]), reader.data[:40]
    if HEADS[name] == b"{":
        json.loads(reader.data)
    assert not [p for p in tmp_path.iterdir() if ".vlm-tmp-" in p.name]


def _socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what", ["a folder", "a socket", "a symbolic link loop"])
def test_other_special_outputs_are_refused_before_any_work(
    world, tmp_path, capsys, name, what
) -> None:
    out = tmp_path / "out"
    held = None
    if what == "a folder":
        out.mkdir()
    elif what == "a socket":
        held = _socket(out)
    else:
        out.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(out)
    argv = _commands(world, tmp_path)[name](out)
    # the first input (a bundle, merge's first state) is missing: any work would stop there
    argv[2 if argv[0] == "merge" else 1] = str(tmp_path / "missing")
    try:
        code, err = _call(argv, capsys)
    finally:
        if held is not None:
            held.close()
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert str(out) in lines[0] and what in lines[0], err
    assert kind_of(out)[1] == what, "the refused output was changed"


def test_a_state_may_not_be_a_fifo_or_a_device(world, tmp_path, capsys, device) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    run = ["run", str(world["bundle"]), str(world["root"] / "images"), "--quiet", "--state"]
    for target, words in ((fifo, "a FIFO"), (device(tmp_path, NULL), "a character device")):
        code, err = _call([*run, str(target)], capsys)
        assert code == 1 and "Traceback" not in err, err
        assert words in err and "not a regular file" in err, err


def _inputs_as_fifo(world: dict[str, Path], fifo: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that reads a state or example database given by the user, reading ``fifo``."""
    bundle, images, a = str(world["bundle"]), str(world["root"] / "images"), world["root"] / "a.npz"
    return {
        "run --rail-state": ["run", bundle, images, "--method", "rail", "--rail-state", str(fifo)],
        "merge": ["merge", str(tmp / "m.npz"), str(a), str(fifo)],
        "examples export": ["examples", "export", str(fifo), str(tmp / "e.npz")],
        "examples export (a folder)": ["examples", "export", str(fifo.parent), str(tmp / "f.npz")],
    }


@pytest.mark.parametrize(
    "name", ["run --rail-state", "merge", "examples export", "examples export (a folder)"]
)
def test_a_fifo_as_a_state_or_database_is_refused_not_opened(world, tmp_path, name) -> None:
    """A FIFO is never opened as an input: it would block until a writer came (SQLite's open
    even outlived Ctrl-C). Run in a child with a time limit, so that a regression fails."""
    folder = tmp_path / "states"
    (folder / "teach").mkdir(parents=True)
    fifo = folder / "teach" / "examples.sqlite"
    os.mkfifo(fifo)
    argv = _inputs_as_fifo(world, fifo, tmp_path)[name]
    if name == "examples export (a folder)":
        argv[2] = str(folder)
    done = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", *argv],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode in (1, 2) and len(lines) == 1, done.stderr
    assert "not a regular file" in lines[0], done.stderr


def test_the_decision_write_through_or_replace(tmp_path, device) -> None:
    """What the write does with each kind of target, watched on the folder it lies in."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert kind_of(tmp_path / "new")[0] == "new"
    assert kind_of(fifo) == ("stream", "a FIFO")
    regular = tmp_path / "file"
    regular.write_bytes(b"old")
    inode = regular.stat().st_ino
    atomic_write_bytes(regular, b"new")  # a regular file is replaced: a new inode
    assert regular.read_bytes() == b"new" and regular.stat().st_ino != inode
    null = device(tmp_path, NULL)
    inode = null.stat().st_ino
    assert kind_of(null) == ("stream", "a character device")
    atomic_write_bytes(null, b"x" * 100)  # a device is written: no temporary file, same node
    check_can_create(null)
    if ROOT:
        assert _listing(tmp_path) == ["file", "null", "pipe"] and null.stat().st_ino == inode


def _as_nobody(work: Callable[[], str]) -> str:
    """``work()`` in a forked child that dropped to the user nobody; its answer or error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = work()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = f"{type(exc).__name__}: {exc}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        answer = handle.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(not ROOT, reason="drops root privileges in a child")
def test_a_normal_user_writes_the_real_null_and_full_devices(tmp_path) -> None:
    def null() -> str:
        check_can_create("/dev/null")
        atomic_write_bytes("/dev/null", b"{}\n")
        return "ok"

    def full() -> str:
        check_can_create("/dev/full")
        atomic_write_bytes("/dev/full", b"{}\n")
        return "written"

    def elsewhere() -> str:
        check_can_create(tmp_path / "x.json")  # root's folder: the child is really nobody
        return "created"

    assert _as_nobody(null) == "ok"
    assert (
        _as_nobody(full)
        == f"{WriteError.__name__}: cannot write /dev/full: No space left on device"
    )
    assert "no write permission" in _as_nobody(elsewhere)


@pytest.mark.skipif(ROOT, reason="as root /dev is writable: the root tests use their own nodes")
@pytest.mark.parametrize("name", ["run --out", "eval-tta --json", "bench --json"])
def test_a_normal_user_writes_to_dev_null(world, tmp_path, capsys, name) -> None:
    code, err = _call(_commands(world, tmp_path)[name](Path("/dev/null")), capsys)
    assert code == 0, err


# ---- nothing waits for a FIFO's reader past a stop signal ------------------------------------


def _edge(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vlm_export.runtime", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def _stopped_while_waiting(process: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Wait for the "waiting for a reader" line, send ``sig``, return (status, stderr)."""
    assert process.stderr is not None
    lines: list[str] = []
    collector = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    collector.start()
    try:
        wait_until(
            lambda: (
                any("waiting for a reader" in line for line in lines) or process.poll() is not None
            ),
            "the waiting line",
        )
        assert process.poll() is None, "".join(lines)
        process.send_signal(sig)
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    collector.join(WAIT_S)
    return process.returncode, "".join(lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_out_to_a_fifo_without_reader_stops_on_a_signal(world, tmp_path, sig) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    bundle, images = str(world["bundle"]), str(world["root"] / "images")
    process = _edge("run", bundle, images, "--quiet", "--out", str(fifo), cwd=tmp_path)
    code, err = _stopped_while_waiting(process, sig)
    assert "Traceback" not in err, err
    if sig == signal.SIGINT:
        assert code == 130 and "interrupted" in err, err
    else:
        assert code == 1 and "stopped (SIGTERM) while waiting for a reader" in err, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_serve_events_to_a_fifo_without_reader_stops_on_sigterm(world, tmp_path) -> None:
    pytest.importorskip("uvicorn")
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = _edge(
        "serve",
        str(world["bundle"]),
        "--source",
        f"front={world['root'] / 'images'}",
        "--port",
        str(port),
        "--events",
        f"jsonl:{fifo}",
        cwd=tmp_path,
    )
    code, err = _stopped_while_waiting(process, signal.SIGTERM)
    assert code == 1 and "Traceback" not in err, err
    assert "stopped (SIGTERM) while waiting for a reader" in err, err


def test_dev_stdout_on_a_file_is_written_where_stdout_stands(world, tmp_path) -> None:
    """``--json /dev/stdout > FILE``: the table and then the JSON in FILE, never a new file
    renamed over the one the shell opened (which would lose what the command printed)."""
    out = tmp_path / "out.txt"
    bundle, data = str(world["bundle"]), str(world["root"] / "data")
    with open(out, "wb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        done = subprocess.run(
            [sys.executable, "-m", "vlm_export.runtime", "eval-tta", bundle, data]
            + ["--json", "/dev/stdout"],
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            timeout=WAIT_S,
        )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_ino == inode
    table, brace, rest = out.read_text().partition("\n{")
    assert "top-1 %" in table and brace
    assert "bundle" in json.loads("{" + rest)


@pytest.mark.parametrize("kind", ["folder_writes", "into"])
def test_a_folder_output_may_not_be_a_fifo(tmp_path, kind) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SpecialFileError, match="is a FIFO, not a folder"):
        check_paths([], [], **{kind: [("--out", fifo)]})


@pytest.mark.parametrize("name", NAMES)
def test_an_output_that_cannot_be_created_is_said_before_any_work(
    world, tmp_path, capsys, name
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    out = blocker / "out.json"  # its folder is a file: as root too, nothing can create it
    argv = _commands(world, tmp_path)[name](out)
    argv[2 if argv[0] == "merge" else 1] = str(tmp_path / "missing")  # work would stop here
    code, err = _call(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot create" in lines[0] and "is a file, not a folder" in lines[0], err


@pytest.mark.parametrize("command", ["info", "run"])
def test_a_command_started_without_stdout_runs_as_if_it_went_to_the_null_device(
    world, tmp_path, command
) -> None:
    """``vlm-edge info BUNDLE >&-``: Python starts with sys.stdout None; the command used to end
    in a traceback (after ``classes`` had already rewritten the bundle)."""
    argv = [command, str(world["bundle"])]
    if command == "run":
        argv.append(str(world["root"] / "images"))
    done = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", *argv],
        stderr=subprocess.PIPE,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
        preexec_fn=lambda: os.close(1),
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
