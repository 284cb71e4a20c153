"""The write guard (core.paths) over every command line: no output is, or lies inside, an input.

The output options are found on the parsers themselves (argparse ``type`` a PathArg of kind out,
into, folder or state), so an output option added later is tested without editing this file:
each is pointed at every input of a working command line (the bundle folder, its manifest and
another bundle file, a source image or folder, a data folder, a state, a class list) and at a
new name inside each input folder, and must be refused with one line before any work, every
input byte-identical. A path option left without a PathArg fails ``test_every_path_option``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.core.paths import PathArg, PathConflict, declared_paths, role_of
from vlm_export.export import cli as export_cli
from vlm_export.export.int8.quantize_cmd import quantize_parser
from vlm_export.export.litert.cmd import build_litert_parser
from vlm_export.export.ncnn.cmd import build_ncnn_parser
from vlm_export.export.rknn.cmd import build_rknn_parser
from vlm_export.export.tensorrt.engine_cmd import build_engine_parser
from vlm_export.runtime import api, cli

RAIL = ["--shots", "2", "--hidden-dim", "16"]
WRITE_KINDS = ("out", "into", "folder", "state")
#: value options that are not paths (names, lists, numbers parsed by a function)
NON_PATH = {
    "--backends",
    "--precisions",
    "--domain",  # vlm-edge: a domain name (vlm-export's --domain NAME=FILE is a PathArg)
    "--order",
    "--providers",
    "--max-pixels",
    "--dataset",
    "--ray",
    "--model",
    "--reduction-layers",
    "--tca-preset",
    "--camera-size",  # WIDTHxHEIGHT
    "--drop-rates",  # a comma-separated list of numbers
    "--bind",  # vlm-edge serve: an address
    "--token",  # vlm-edge serve: a secret
    "--seed",  # eval-tta: a whole number >= 0 (its own parser)
    "--min-score",  # vlm-edge serve: a number from 0 to 1 or 'auto' (its own parser)
    "--fleet",  # vlm-edge serve: an mqtt:// URL
    "--pretrained-tag",  # vlm-export: an open_clip pretrained tag (openai, laion2b_...)
}


def _export_main(argv: list[str]) -> int:
    return export_cli.main(argv)


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser, Callable[[list[str]], int]]]:
    """(command, its parser, the main that runs argv) for every command line of the project."""
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub, cli.main
    yield "vlm-export", export_cli.build_parser(), _export_main
    yield "build-engine", build_engine_parser(), _export_main
    yield "build-ncnn", build_ncnn_parser(), _export_main
    yield "quantize", quantize_parser(), _export_main
    yield "build-rknn", build_rknn_parser(), _export_main
    yield "build-litert", build_litert_parser(), _export_main


def _value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]


OUTPUTS = [
    (command, role_of(action))
    for command, parser, _ in parsers()
    for action in _value_actions(parser)
    if isinstance(action.type, PathArg) and action.type.kind in WRITE_KINDS
]


def test_every_path_option_is_declared_to_the_guard() -> None:
    """A value option is a PathArg, a number, a choice, or a known non-path: a new path option
    cannot slip past the guard undeclared."""
    undeclared = [
        (command, role_of(action))
        for command, parser, _ in parsers()
        for action in _value_actions(parser)
        if not isinstance(action.type, PathArg)
        and action.choices is None
        and action.type not in (int, float)
        and role_of(action) not in NON_PATH
    ]
    assert undeclared == []
    assert len(OUTPUTS) >= 17  # the outputs of today; more are tested as they come


def _hashes(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: files by sha256, folders and links by name."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_symlink() or path.is_dir():
                found[str(path)] = "link" if path.is_symlink() else "folder"
            elif path.exists():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guard")
    bundle = make_bundle(root / "bundle", method="tca+rail")
    images = root / "images"
    write_images(images, 3)
    data = root / "data"
    for seed, name in enumerate(("cat", "dog", "bird")):
        write_images(data / name, 3, seed=seed)
        write_images(root / "xtail" / "animals" / name, 3, seed=seed)
    learner = root / "learner.npz"
    argv = ["learn", bundle, data, "--domain", "animals", "--state", learner, *RAIL]
    assert cli.main([str(a) for a in argv]) == 0
    classes = root / "classes.txt"
    classes.write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    return {"root": root, "bundle": bundle, "images": images, "data": data, "learner": learner}


def _bases(w: dict[str, Path], tmp: Path) -> dict[str, list[object]]:
    """Arguments (after the command's name) of a working run of each command with outputs."""
    b, images, data = w["bundle"], w["images"], w["data"]
    return {
        "run": [b, images, "--out", tmp / "o.jsonl"],
        "eval": [b, w["root"] / "xtail", "--order", "animals", *RAIL],
        "eval-tta": [b, data],
        "explain": [b, images / "img_0000.jpg", "--out", tmp / "pictures"],
        "learn": [b, data, "--domain", "animals", "--state", tmp / "s.npz", *RAIL],
        "merge": [tmp / "m.npz", w["learner"], w["learner"], "--bundle", b],
        "bench": [b, "--images", images],
        "vlm-export": ["--method", "zeroshot", "--model", "vlm-test-tiny", "--pretrained", "none"]
        + ["--classes", w["root"] / "classes.txt", "--templates", w["root"] / "templates.txt"]
        + ["--out", tmp / "new"],
        "build-engine": [b],
        "build-ncnn": [b],
        "serve": [b, "--source", f"cam={images}"],
    }


def _targets(parser: argparse.ArgumentParser, argv: list[str]) -> list[tuple[str, Path]]:
    """Every input of the command line: each read path, two files of each input folder (a
    bundle's manifest first), and a new name inside each input folder."""
    reads = declared_paths(parser, parser.parse_args(argv)).reads
    targets: list[tuple[str, Path]] = []
    for role in dict.fromkeys(role for role, _ in reads):
        paths = [Path(p) for r, p in reads if r == role]
        folders = [p for p in paths if p.is_dir()]
        files = sorted(p for p in paths if not p.is_dir())
        files.sort(key=lambda p: p.name != "manifest.json")
        targets += [(role, p) for p in folders + files[:2]]
        targets += [(role, folder / "new-output") for folder in folders]
    return targets


def _with_output(parser, argv: list[str], option: str, target: Path) -> list[str]:
    action = next(a for a in parser._actions if role_of(a) == option)
    if not action.option_strings:  # a positional: replace its value
        value = str(getattr(parser.parse_args(argv), action.dest))
        return [str(target) if arg == value else arg for arg in argv]
    for flag in action.option_strings:
        if flag in argv:
            at = argv.index(flag) + 1
            return [*argv[:at], str(target), *argv[at + 1 :]]
    return [*argv, option, str(target)]


@pytest.mark.parametrize(("command", "option"), OUTPUTS)
def test_no_output_option_may_land_on_an_input(world, tmp_path, capsys, command, option):
    commands = {name: (parser, main) for name, parser, main in parsers()}
    bases = _bases(world, tmp_path)
    assert command in bases, f"give {command} a working command line in _bases"
    parser, main = commands[command]
    base = [str(arg) for arg in bases[command]]
    prefix = [] if command == "vlm-export" else [command]
    targets = [(role, path) for role, path in _targets(parser, base) if role != option]
    assert len(targets) >= 2  # a state's own file is its own in-and-out: not a conflict
    for role, target in targets:
        before = _hashes(world["root"])
        argv = prefix + _with_output(parser, base, option, target)
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and "error:" in err[0], (argv, err)
        assert option in err[0] and role in err[0], (argv, err)
        assert _hashes(world["root"]) == before, f"{argv} changed an input"


def _run(argv: list[object], capsys) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _refused(world, argv: list[object], capsys, *words: str) -> None:
    before = _hashes(world["root"])
    code, err = _run(argv, capsys)
    assert code == 1 and len(err) == 1 and all(word in err[0] for word in words), err
    assert _hashes(world["root"]) == before


def test_the_issue_cases_are_refused(world, tmp_path, capsys) -> None:
    b, images, data = world["bundle"], world["images"], world["data"]
    image = images / "img_0001.jpg"
    state = tmp_path / "s.npz"
    for argv, words in [
        (["eval-tta", b, data, "--json", b / "manifest.json"], ["--json", "BUNDLE"]),
        (["bench", b, "--json", b / "manifest.json"], ["--json", "BUNDLE"]),
        (["eval-tta", b, data, "--plot", b / "classes.json"], ["--plot", "BUNDLE"]),
        (["eval-tta", b, data, "--json", data / "cat" / "img_0000.jpg"], ["--json", "DATA"]),
        (["bench", b, "--images", images, "--json", image], ["--json", "--images"]),
        (["explain", b, image, "--out", b], ["--out", "BUNDLE"]),
        (["run", b, images, "--save-annotated", b], ["--save-annotated", "BUNDLE"]),
        (["run", b, images, "--save-annotated", images], ["--save-annotated", "SOURCE"]),
        (["run", b, image, "--save-annotated", images], ["--save-annotated", "among the inputs"]),
        (["run", b, images, "--save-annotated", state, "--state", state], ["--state"]),
        (["run", b, images, "--out", b / "sub" / "o.jsonl"], ["is inside BUNDLE"]),
        (["eval", b, data, "--order", "animals", "--plot", b / "p.png"], ["--plot", "BUNDLE"]),
    ]:
        _refused(world, argv, capsys, *words)
    assert not state.exists()


def test_outputs_through_links_are_refused(world, tmp_path, capsys) -> None:
    b = world["bundle"]
    inside = tmp_path / "into-bundle"
    inside.symlink_to(b, target_is_directory=True)
    hard = tmp_path / "hard.json"
    os.link(b / "classes.json", hard)
    for argv in [
        ["explain", b, world["images"] / "img_0000.jpg", "--out", inside],
        ["run", b, world["images"], "--out", inside / "o.jsonl"],
        ["bench", b, "--json", hard],
    ]:
        _refused(world, argv, capsys, "BUNDLE")


def test_classes_refuses_a_bundle_linked_from_outside(world, tmp_path, capsys) -> None:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for path in world["bundle"].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    outside = tmp_path / "elsewhere.json"
    (copy / "manifest.json").rename(outside)
    (copy / "manifest.json").symlink_to(outside)
    (tmp_path / "new.txt").write_text("cat\nfox\n")
    before = _hashes(tmp_path)
    code, err = _run(["classes", copy, tmp_path / "new.txt"], capsys)
    assert code == 1 and len(err) == 1 and "outside the bundle" in err[0], err
    assert _hashes(tmp_path) == before
    for argv in (
        ["quantize", copy, "--calibration", world["images"]],
        ["build-engine", copy],
        ["build-ncnn", copy],
        ["build-rknn", copy],
        ["build-litert", copy],
    ):
        assert export_cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside the bundle" in err[0], err
    assert _hashes(tmp_path) == before


def test_the_python_api_guards_its_state(world, tmp_path) -> None:
    b = world["bundle"]
    before = _hashes(world["root"])
    for state in (b / "manifest.json", b / "new.npz", world["learner"]):
        with pytest.raises(PathConflict):
            api.open_pipeline(b, "tca+rail", state=state, rail_state=world["learner"])
    with api.open_pipeline(b, "tca", backend="onnxruntime") as pipeline:
        pipeline.classify(np.zeros((32, 32, 3), np.uint8), channels="RGB")
        for path in (b / "text_embeddings.npy", b / "new.npz", b):
            with pytest.raises(PathConflict):
                pipeline.save_state(path)
        pipeline.save_state(tmp_path / "ok.npz")
    assert _hashes(world["root"]) == before and (tmp_path / "ok.npz").is_file()


def _label_space(bundle, names: list[str]):
    from vlm_export.runtime.text.label_space import LabelSpace

    text = np.eye(len(names), bundle.text_embeddings.shape[1], dtype=np.float32)
    return LabelSpace([("animals", n) for n in names], ["animals"], text, ("a {}.",), "one", 0)


def test_library_bundle_writers_refuse_links_to_outside(tmp_path) -> None:
    from vlm_export.export.bundle import staging as bundle_staging
    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.text.bundle_classes import write_label_space

    folder = make_bundle(tmp_path / "b", method="zeroshot")
    outside = tmp_path / "outside.json"
    (folder / "manifest.json").rename(outside)
    (folder / "manifest.json").symlink_to(outside)
    before = _hashes(tmp_path)
    bundle = Bundle.open(folder)
    with pytest.raises(PathConflict, match="outside the bundle"):
        write_label_space(bundle, _label_space(bundle, ["owl", "fox"]))
    with pytest.raises(PathConflict, match="outside the bundle"), bundle_staging._staging(folder):
        pass
    assert _hashes(tmp_path) == before


def test_a_hard_linked_copy_of_a_bundle_keeps_its_content(tmp_path) -> None:
    """Bundle writes rename new files over names, never write into a shared file: a hard-linked
    copy (cp -al) of the bundle stays as it was."""
    from vlm_export.runtime.bundle import Bundle
    from vlm_export.runtime.text.bundle_classes import write_label_space

    folder = make_bundle(tmp_path / "b", method="zeroshot")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        os.link(path, copy / path.name)
    before = _hashes(copy)
    bundle = Bundle.open(folder)
    write_label_space(bundle, _label_space(bundle, ["owl", "fox"]))
    assert list(Bundle.open(folder, verify=True).classes) == ["owl", "fox"]
    assert _hashes(copy) == before and Bundle.open(copy, verify=True).classes != ["owl", "fox"]
