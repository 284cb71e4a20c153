"""``vlm-edge classes`` and ``run --classes`` on bundles exported from the tiny model: the text
embeddings equal the exporter's, the device path runs without torch, bad input leaves the bundle
byte-identical."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from test_bundle_classes import snapshot

torch = pytest.importorskip("torch")

from vlm_export.core.manifest import read_manifest  # noqa: E402
from vlm_export.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from vlm_export.models.loading import TEST_MODEL  # noqa: E402
from vlm_export.models.schedule import CondensationConfig  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.cli import main  # noqa: E402
from vlm_export.runtime.tca.reservoir import ROW_ORDER  # noqa: E402

EXPORTED = ["cat", "dog", "bird"]
NEW = ["dog", "red fox", "cat", "sea_lion", "golden retriever"]
TEMPLATES = "a photo of a {}.\na blurry photo of the {}.\nart of the {}.\n"
CAPACITY = 8


def _export(out: Path, method: str, classes: list[str], templates: str, **extra) -> Path:
    torch.manual_seed(0)  # the same random weights in every export
    options = ExportOptions(
        method=method,
        model=TEST_MODEL,
        domains=[("things", classes)],
        out=out,
        templates=templates,
        condensation=CondensationConfig(drop_rate=0.1, merge_centers=2),
        max_classes=CAPACITY,
        quiet=True,
        **extra,
    )
    return export_bundle(options)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classes")
    (folder / "templates.txt").write_text(TEMPLATES)
    return _export(folder / "tca", "tca", EXPORTED, str(folder / "templates.txt"))


@pytest.fixture()
def bundle(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_embeddings_equal_the_exporters(bundle, exported, tmp_path, capsys) -> None:
    templates = exported.parent / "templates.txt"
    classes = _file(tmp_path, "new.txt", "\n".join(NEW))
    assert main(["classes", str(bundle), str(classes), "--templates", str(templates)]) == 0
    err = capsys.readouterr().err
    assert f"wrote 5 classes into {bundle} " in err and "(2 classes kept, 3 new, 1 dropped" in err
    reference = _export(tmp_path / "ref", "zeroshot", NEW, str(templates), text_encoder=False)
    got, want = Bundle.open(bundle), Bundle.open(reference)
    assert got.classes == NEW and got.domains == ["things"]
    assert np.abs(got.text_embeddings - want.text_embeddings).max() <= 1e-5
    manifest = read_manifest(bundle)
    assert manifest["labels"]["num_classes"] == 5 and manifest["text"]["num_templates"] == 3
    assert manifest["condensation"]["class_capacity"] == CAPACITY
    inputs = {entry["name"]: entry["shape"] for entry in manifest["engine"]["inputs"]}
    assert inputs["anchors"] == [CAPACITY, 3, 64] and inputs["anchors_valid"] == [CAPACITY]


def _bad(args: list[str], bundle: Path, capsys, message: str) -> None:
    before = snapshot(bundle)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert snapshot(bundle) == before, "the bundle must be left byte-identical"


def test_bad_input_is_one_line_and_leaves_the_bundle(bundle, tmp_path, capsys) -> None:
    b = str(bundle)
    empty = _file(tmp_path, "empty.txt", "# nothing\n\n")
    _bad(["classes", b, str(empty)], bundle, capsys, "holds no class names")
    twice = _file(tmp_path, "twice.txt", "cat\nsea lion\nSea_Lion\n")
    _bad(["classes", b, str(twice)], bundle, capsys, "more than once")
    many = _file(tmp_path, "many.txt", "\n".join(f"class {i}" for i in range(CAPACITY + 1)))
    _bad(["classes", b, str(many)], bundle, capsys, "9 classes exceed the engine's class capacity")
    good = _file(tmp_path, "good.txt", "owl\n")
    no_slot = _file(tmp_path, "t.txt", "a photo of a thing.\n")
    _bad(["classes", b, str(good), "--templates", str(no_slot)], bundle, capsys, "{}")
    vocab = read_manifest(bundle)["tokenizer"]["vocab"]
    original = (bundle / vocab).read_bytes()
    (bundle / vocab).write_bytes(original[:-10] + bytes(10))  # same size, other content
    _bad(["classes", b, str(good), "--no-verify"], bundle, capsys, "sha256")
    (bundle / vocab).write_bytes(original)
    plain = make_bundle(tmp_path / "plain", method="tca")  # exported without a text engine
    _bad(["classes", str(plain), str(good)], plain, capsys, "text engine")


def test_a_long_prompt_is_cut_with_a_warning_naming_the_class(bundle, tmp_path, capsys) -> None:
    long = "very " * 80 + "long class"
    classes = _file(tmp_path, "long.txt", f"cat\n{long}\n")
    assert main(["classes", str(bundle), str(classes)]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "very very" in err
    assert Bundle.open(bundle).classes == ["cat", long]


CHILD = textwrap.dedent(
    """
    import json, sys

    BLOCKED = ("torch", "torchvision", "open_clip", "onnx", "onnxscript")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in the device runtime: {name}")
            return None

    sys.meta_path.insert(0, Block())
    from vlm_export.runtime.cli import main

    bundle, classes, images, out = sys.argv[1:5]
    codes = [
        main(["classes", bundle, classes]),
        main(["run", bundle, images, "--method", "tca", "--out", out, "--quiet",
              "--state", out + ".state.npz"]),
    ]
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    print(json.dumps({"codes": codes, "loaded": loaded}))
    """
)


def test_device_grows_the_class_list_without_torch(bundle, tmp_path) -> None:
    classes = _file(tmp_path, "new.txt", "\n".join(NEW))
    write_images(tmp_path / "images", 4)
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(bundle),
            str(classes),
            str(tmp_path / "images"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0], "loaded": []}, done.stderr
    assert Bundle.open(bundle).classes == NEW  # more classes than exported, within capacity
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    assert all(r["class"] in NEW and len(r["topk"]) == 5 for r in records)


def test_run_with_classes_leaves_the_bundle(bundle, tmp_path, capsys) -> None:
    classes = _file(tmp_path, "new.txt", "\n".join(NEW))
    write_images(tmp_path / "images", 2)
    before = snapshot(bundle)
    out = tmp_path / "r.jsonl"
    args = ["run", str(bundle), str(tmp_path / "images"), "--classes", str(classes)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert snapshot(bundle) == before
    assert {json.loads(line)["class"] for line in out.read_text().splitlines()} <= set(NEW)


def test_reservoir_state_follows_the_new_classes(bundle, tmp_path, capsys) -> None:
    from vlm_export.runtime.tca.stage import build_reservoir

    write_images(tmp_path / "images", 6)
    state = tmp_path / "state.npz"
    run = ["run", str(bundle), str(tmp_path / "images"), "--method", "tca", "--quiet"]
    assert main([*run, "--state", str(state), "--out", str(tmp_path / "a.jsonl")]) == 0
    before = build_reservoir(Bundle.open(bundle), state=state)
    assert before.counts().sum() > 0
    assert main(["classes", str(bundle), str(_file(tmp_path, "n.txt", "\n".join(NEW)))]) == 0
    after = build_reservoir(Bundle.open(bundle), state=state)
    old_rows = {name: i for i, name in enumerate(EXPORTED)}
    for i, name in enumerate(NEW):
        j = old_rows.get(name)
        count = 0 if j is None else before.counts()[j]
        assert after.counts()[i] == count, name
        if j is not None:
            for key, array in after.state_arrays().items():
                if key == ROW_ORDER:  # where the rows sit in memory: packed anew, not class state
                    continue
                np.testing.assert_array_equal(array[i], before.state_arrays()[key][j])
    # a run with the changed classes says how many entries of the removed class it dropped
    dropped = int(before.counts()[EXPORTED.index("bird")])
    capsys.readouterr()
    resumed = [*run[:-1], "--state", str(state), "--out", str(tmp_path / "b.jsonl")]
    assert main(resumed) == 0
    line = f"dropped {dropped} reservoir entries of classes the bundle no longer has"
    assert dropped > 0 and line in capsys.readouterr().err


def test_a_bench_record_outlives_a_change_of_classes(bundle, tmp_path, capsys) -> None:
    """bench times the image engine alone: after `classes` its record still picks the engine
    (--backend auto), and a record of another engine is still ignored."""
    from vlm_export.runtime.engines.checks.bench_record import best_recorded, record_path

    bench = ["bench", str(bundle), "--backends", "onnxruntime", "--precisions", "fp32"]
    assert main([*bench, "--rounds", "2", "--warmup", "0"]) == 0
    recorded = best_recorded(Bundle.open(bundle))
    assert recorded is not None and recorded.backend == "onnxruntime"
    before = Bundle.open(bundle)
    assert main(["classes", str(bundle), str(_file(tmp_path, "n.txt", "\n".join(NEW)))]) == 0
    after = Bundle.open(bundle)
    assert after.fingerprint != before.fingerprint
    assert after.engine_fingerprint == before.engine_fingerprint
    assert best_recorded(after) == recorded

    write_images(tmp_path / "images", 2)
    capsys.readouterr()
    run = ["run", str(bundle), str(tmp_path / "images"), "--backend", "auto", "--quiet"]
    assert main(run) == 0
    assert "auto chose onnxruntime fp32: fastest that passed parity in bench." in (
        capsys.readouterr().err
    )

    path = record_path(bundle)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "engine": "0" * 16}))  # another engine's timings
    assert best_recorded(after) is None
    del record["engine"]  # a record from before records named their engine: by the bundle
    path.write_text(json.dumps(record))
    assert best_recorded(after) is None
    assert best_recorded(before) == recorded


def test_a_learner_state_goes_on_learning_after_a_change_of_classes(bundle, tmp_path, capsys):
    """learn, then `classes`, then learn into the same state: it follows the classes by name
    (before, it was refused as a state of another bundle)."""
    from vlm_export.runtime.rail.state import load_learner_state

    for seed, name in enumerate(["cat", "dog", "red fox"]):
        write_images(tmp_path / ("first" if name != "red fox" else "later") / name, 3, seed=seed)
    state = tmp_path / "learner.npz"
    learn = ["learn", str(bundle), "--state", str(state), "--shots", "3", "--hidden-dim", "64"]
    assert main([*learn[:2], str(tmp_path / "first"), *learn[2:]]) == 0
    assert main(["classes", str(bundle), str(_file(tmp_path, "n.txt", "\n".join(NEW)))]) == 0
    capsys.readouterr()
    assert main([*learn[:2], str(tmp_path / "later"), *learn[2:]]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "follows the bundle's classes by name: 2 classes kept, 3 new, 1 dropped" in err
    after = Bundle.open(bundle)
    learner = load_learner_state(state, after.fingerprint)
    assert learner.num_samples == 9 and learner.num_classes == len(NEW)
    learned = {name for name, seen in zip(after.classes, learner.learned_mask, strict=True) if seen}
    assert learned == {"cat", "dog", "red fox"}


def test_states_from_before_and_after_a_change_of_classes_merge_by_name(bundle, tmp_path, capsys):
    """A device that changed its classes merges with one that did not (--bundle names the label
    space): the result is the learner of all their samples over the bundle's classes."""
    from vlm_export.runtime.rail.state import load_learner_state

    for seed, name in enumerate(["cat", "dog", "red fox"]):
        write_images(tmp_path / ("old" if name != "red fox" else "new") / name, 3, seed=seed)
        write_images(tmp_path / "all" / name, 3, seed=seed)
    learn = ["--shots", "3", "--hidden-dim", "64"]
    before, after, joint = (tmp_path / f"{name}.npz" for name in ("before", "after", "joint"))
    assert main(["learn", str(bundle), str(tmp_path / "old"), "--state", str(before), *learn]) == 0
    assert main(["classes", str(bundle), str(_file(tmp_path, "n.txt", "\n".join(NEW)))]) == 0
    assert main(["learn", str(bundle), str(tmp_path / "new"), "--state", str(after), *learn]) == 0
    assert main(["learn", str(bundle), str(tmp_path / "all"), "--state", str(joint), *learn]) == 0
    capsys.readouterr()

    merged = tmp_path / "merged.npz"
    assert main(["merge", str(merged), str(before), str(after)]) == 1
    assert "give --bundle BUNDLE to merge by class name" in capsys.readouterr().err
    assert not merged.exists()
    assert main(["merge", str(merged), str(before), str(after), "--bundle", str(bundle)]) == 0
    fingerprint = Bundle.open(bundle).fingerprint
    got, want = (load_learner_state(path, fingerprint) for path in (merged, joint))
    assert got.num_samples == want.num_samples == 9
    assert got.learned_mask.tolist() == want.learned_mask.tolist()
    np.testing.assert_allclose(got.gram, want.gram, atol=1e-9)
    np.testing.assert_allclose(got.weights, want.weights, atol=1e-9)
