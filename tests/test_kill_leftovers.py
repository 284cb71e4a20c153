"""Writes into a bundle killed at any moment: 0 data loss, 0 leftovers after the next success.

``vlm-edge classes`` and ``vlm-export quantize`` run as subprocesses that die (``os._exit``, what
kill -9 leaves: no finally, no cleanup) at a chosen call: before or after a step of the write
(every ``os.replace``, ``os.fsync`` and ``os.unlink`` in turn, in the slow tests), or at a real
kill -9 after a random delay. After every kill the bundle opens with its files verified, with the
old classes or the new ones; after the next successful run of the same command the bundle holds
exactly the files its manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images

from vlm_export.core.manifest import MANIFEST_NAME, read_manifest
from vlm_export.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
KILLED = 137
#: runs a command with one function replaced by one that dies at its n-th call (before or after)
HARNESS = """
import importlib, os, sys
target, count, when, program, *argv = sys.argv[1:]
module_name, attr = target.rsplit(":", 1)
module = importlib.import_module(module_name)
real, calls = getattr(module, attr), [0]

def dying(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == int(count):
        os._exit(137)
    result = real(*args, **kwargs)
    if when == "after" and calls[0] == int(count):
        os._exit(137)
    return result

if program == "vlm-edge":
    from vlm_export.runtime.cli import main
else:
    from vlm_export.export.cli import main
setattr(module, attr, dying)
sys.exit(main(argv))
"""
LISTS = {"a": ["cat", "dog", "fox"], "b": ["owl", "cow", "hen", "yak"], "c": ["emu", "bee"]}


#: ``vlm-export`` as a subprocess
EXPORT = [
    sys.executable,
    "-c",
    "import sys; from vlm_export.export.cli import main; sys.exit(main())",
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _dying_run(target: str, count: int, when: str, *argv: object) -> int:
    command = [sys.executable, "-c", HARNESS, target, str(count), when, *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode


def _listed(bundle: Path) -> set[str]:
    return {*read_manifest(bundle)["files"], MANIFEST_NAME}


def _clean(bundle: Path) -> None:
    """Exactly the files the manifest lists: no temporary files, staging folders, unlisted
    content-named files."""
    assert set(os.listdir(bundle)) == _listed(bundle)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with a condensing tiny-model bundle (text engine, class capacity 8), three
    class lists and calibration images."""
    torch = pytest.importorskip("torch")
    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    folder = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    options = ExportOptions(
        method="tca",
        model="vlm-test-tiny",
        pretrained="none",
        domains=[("things", LISTS["a"])],
        templates="single",
        condensation=CondensationConfig(drop_rate=0.035, merge_centers=2),
        max_classes=8,
        out=folder / "exported",
        quiet=True,
    )
    export_bundle(options)
    for name, names in LISTS.items():
        (folder / f"{name}.txt").write_text("\n".join(names) + "\n")
    write_images(folder / "calibration", 8, seed=3)
    return folder


@pytest.fixture()
def bundle(world, tmp_path) -> Path:
    copy = Path(shutil.copytree(world / "exported", tmp_path / "bundle"))
    _clean(copy)
    return copy


def _classes_of(bundle: Path) -> list[str]:
    return list(Bundle.open(bundle, verify=True).classes)  # every listed file checked


def _kill_classes(bundle: Path, world: Path, points: list[tuple[str, int, str]]) -> int:
    """Kill ``classes`` at each point in turn, each run to a list the bundle does not hold; the
    bundle stays whole, with the old classes or the new. Returns how many runs were killed."""
    kills = 0
    for target, count, when in points:
        before = _classes_of(bundle)
        name = "b" if before != LISTS["b"] else "c"
        code = _dying_run(target, count, when, "vlm-edge", "classes", bundle, world / f"{name}.txt")
        assert code in (0, KILLED)
        kills += code == KILLED
        assert _classes_of(bundle) in (before, LISTS[name])
    return kills


def _finish_classes(bundle: Path, world: Path) -> None:
    """The next successful change leaves exactly the listed files."""
    done = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", "classes", str(bundle), str(world / "a.txt")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert _classes_of(bundle) == LISTS["a"]
    _clean(bundle)


WRITE = "vlm_export.runtime.text.bundle_classes:atomic_write_bytes"


@pytest.mark.slow
def test_classes_killed_between_its_writes_leaves_nothing(bundle, world) -> None:
    """Killed after each file, after a temporary file's fsync, after the manifest swap (old
    files not yet deleted) and between the deletions: the next change removes every leftover."""
    points = [(WRITE, 1, "after"), (WRITE, 2, "after"), ("os:fsync", 1, "after")]
    points += [(WRITE, 3, "after"), ("os:unlink", 1, "after")]
    assert _kill_classes(bundle, world, points) == len(points)
    assert set(os.listdir(bundle)) - _listed(bundle)  # the kills did leave something
    _finish_classes(bundle, world)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["os:replace", "os:fsync", "os:unlink"])
def test_classes_killed_at_every_step(bundle, world, step) -> None:
    """Before and after every call of ``step``, in turn, until a run is no longer killed."""
    points = [(step, count, when) for count in range(1, 40) for when in ("before", "after")]
    kills = 0
    for point in points:
        if _kill_classes(bundle, world, [point]) == 0:
            break
        kills += 1
    assert 2 < kills < len(points)  # killed at several steps, then a run got to its end
    _finish_classes(bundle, world)


@pytest.mark.slow
def test_classes_under_real_kill_9(bundle, world) -> None:
    """kill -9 at random moments of real runs, then one run to its end."""
    rng = random.Random(7)
    for trial in range(12):
        name = "b" if trial % 2 == 0 else "c"
        before = _classes_of(bundle)
        command = [sys.executable, "-m", "vlm_export.runtime", "classes"]
        proc = subprocess.Popen(
            [*command, str(bundle), str(world / f"{name}.txt")],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.5, 3.0))
        proc.kill()
        proc.wait()
        assert _classes_of(bundle) in (before, LISTS[name])
    _finish_classes(bundle, world)


# ---- quantize (and build-engine: the same staging and install) ---------------------------


def _quantize(bundle: Path, world: Path, *extra: object) -> subprocess.CompletedProcess:
    command = [*EXPORT, "quantize", str(bundle)]
    return subprocess.run(
        [*command, "--calibration", str(world / "calibration"), *map(str, extra)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )


def _engines(bundle: Path) -> list[str]:
    Bundle.open(bundle, verify=True)  # the manifest and every file it lists are whole
    return [entry["file"] for entry in read_manifest(bundle).get("engines") or []]


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        ("vlm_export.export.int8.quantize:quantize_graph", 1, "after"),  # staging folder filled
        ("vlm_export.export.int8.quantize:move_into_bundle", 1, "after"),  # moved in, not listed
        ("vlm_export.export.int8.quantize:atomic_write_bytes", 1, "after"),  # listed, staging left
    ],
)
def test_quantize_killed_leaves_nothing_after_the_next_run(bundle, world, point) -> None:
    argv = ["vlm-export", "quantize", bundle, "--calibration", world / "calibration"]
    assert _dying_run(*point, *argv) == KILLED
    _engines(bundle)
    assert any(name.startswith(".engine-") for name in os.listdir(bundle))
    done = _quantize(bundle, world, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert any(name.endswith(".int8.onnx") for name in _engines(bundle))
    _clean(bundle)


@pytest.mark.slow
def test_quantize_under_real_kill_9(bundle, world) -> None:
    rng = random.Random(11)
    for _ in range(6):
        command = [*EXPORT, "quantize", str(bundle)]
        proc = subprocess.Popen(
            [*command, "--calibration", str(world / "calibration"), "--overwrite"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(1.0, 6.0))
        proc.kill()
        proc.wait()
        _engines(bundle)
    done = _quantize(bundle, world, "--overwrite")
    assert done.returncode == 0, done.stderr
    _clean(bundle)


@pytest.mark.slow
def test_a_users_file_of_an_engine_name_is_still_refused(bundle, world) -> None:
    """Only a file that a killed run's staging record names (by sha256) is replaced."""
    name = read_manifest(bundle)["engine"]["onnx"].replace(".onnx", ".int8.onnx")
    (bundle / name).write_bytes(b"mine")
    done = _quantize(bundle, world)
    assert done.returncode == 2 and "does not list it" in done.stderr, done.stderr
    assert (bundle / name).read_bytes() == b"mine"


# ---- fast: the writer itself killed at each kind of moment; a killed install's leftovers ----

#: writes a label space of the names in argv into a fake bundle (no text engine needed)
LABEL_SPACE = """
import sys
import numpy as np
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.text import bundle_classes
from vlm_export.runtime.text.label_space import LabelSpace

bundle = Bundle.open(sys.argv[1], verify=False)  # no verification record written: the
# counted fsync and replace calls are the label-space write's own
names = sys.argv[2:]
text = np.eye(len(names), bundle.text_embeddings.shape[1], dtype=np.float32)
space = LabelSpace([("animals", n) for n in names], ["animals"], text, ("a {}.",), "one", 0)
bundle_classes.write_label_space(bundle, space)
"""


def _dying_write(target: str, count: int, when: str, folder: Path, names: list[str]) -> int:
    harness = HARNESS.split("if program ==")[0]  # the dying function, then the label space
    script = harness + "setattr(module, attr, dying)\nsys.argv[1:] = [program, *argv]\n"
    command = [sys.executable, "-c", script + LABEL_SPACE, target, str(count), when]
    done = subprocess.run(
        [*command, str(folder), *names], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode


@pytest.mark.parametrize(
    "point",
    [
        ("os:fsync", 1, "after"),  # a temporary file written, not renamed
        ("os:replace", 1, "after"),  # one new file, not listed
        ("os:replace", 3, "after"),  # the manifest swapped, the old files not deleted
        ("os:unlink", 1, "after"),  # some old files deleted
    ],
)
def test_a_killed_label_space_write_leaves_only_what_the_next_removes(tmp_path, point) -> None:
    from fakebundle import make_bundle

    from vlm_export.runtime.text import bundle_classes
    from vlm_export.runtime.text.label_space import LabelSpace

    folder = make_bundle(tmp_path / "b", method="zeroshot")
    old, first = list(Bundle.open(folder).classes), ["owl", "fox", "eel"]
    assert _dying_write(*point, folder, first) == KILLED
    opened = Bundle.open(folder, verify=True)  # whole: the old classes or the new
    assert list(opened.classes) in (old, first)
    assert set(os.listdir(folder)) != _listed(folder)  # the kill left something
    time.sleep(0.05)  # the next run starts later than the leftovers were last changed
    names = ["ant", "bee"]
    text = np.eye(2, opened.text_embeddings.shape[1], dtype=np.float32)
    space = LabelSpace([("animals", n) for n in names], ["animals"], text, ("a {}.",), "one", 2)
    bundle_classes.write_label_space(opened, space)
    assert list(Bundle.open(folder, verify=True).classes) == names
    _clean(folder)


def _killed_install(tmp_path: Path, content: bytes, recorded: bytes) -> tuple[Path, str]:
    """A bundle as a run killed between moving ``content`` in and listing it leaves it, with a
    staging record of the sha256 of ``recorded``."""
    from fakebundle import make_bundle

    folder = make_bundle(tmp_path / "b", method="tca")
    name = "image_encoder.int8.onnx"
    (folder / name).write_bytes(content)
    staging = folder / ".engine-ab_cd123"
    staging.mkdir()
    record = {"file": name, "sha256": hashlib.sha256(recorded).hexdigest()}
    (staging / "installing.json").write_text(json.dumps(record))
    past = time.time() - 60
    os.utime(staging, (past, past))
    return folder, name


def test_a_killed_install_is_replaced_and_its_staging_removed(tmp_path) -> None:
    from vlm_export.export.bundle import staging as bundle_staging

    folder, name = _killed_install(tmp_path, b"graph", b"graph")
    bundle_staging._refuse_listed(folder, read_manifest(folder), name, False, "replace")
    assert not (folder / name).exists()
    with bundle_staging._staging(folder) as staging:
        assert staging.name.startswith(".engine-")
    _clean(folder)


def test_an_unlisted_file_the_record_does_not_match_is_refused(tmp_path) -> None:
    from vlm_export.core.errors import UserError
    from vlm_export.export.bundle import staging as bundle_staging

    folder, name = _killed_install(tmp_path, b"a user's own file", b"graph")
    with pytest.raises(UserError, match="does not list it"):
        bundle_staging._refuse_listed(folder, read_manifest(folder), name, False, "replace")
    assert (folder / name).read_bytes() == b"a user's own file"
