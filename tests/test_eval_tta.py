"""``vlm-edge eval-tta``: the seeded stream, the metrics against literal formulas, resuming, the
agreement with ``vlm-edge run --method tca`` over the same order, layouts and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakebundle import DOMAINS, make_bundle, write_images
from PIL import Image

from vlm_export.core.state_file import load_state, save_state
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.cli import main
from vlm_export.runtime.datasets.layouts import EvalSetError, load_test_set
from vlm_export.runtime.datasets.registry import get_dataset
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.evaluation import (
    STATE_KIND,
    STATE_SCHEMA_VERSION,
    EvalStream,
    MethodStream,
    stream_order,
)
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.tca.calibration import expected_calibration_error, reliability_bins


def _literal_ece(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    total, n = 0.0, len(confidences)
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if low < c <= high]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - confidence)
    return total


def test_ece_matches_the_literal_formula_on_a_hand_made_case() -> None:
    confidences = [0.95, 0.91, 0.55, 0.52, 0.30, 0.99, 0.70, 0.1334]
    correct = [True, False, True, False, False, True, True, False]
    # bins (0.9, 0.9333]: 0.91 wrong; (0.9333, 0.9667]: 0.95 right; (0.9667, 1]: 0.99 right;
    # (0.5333, 0.6]: 0.55 right; (0.4667, 0.5333]: 0.52 wrong; (0.2667, 0.3333]: 0.30 wrong;
    # (0.6667, 0.7333]: 0.70 right; (0.1333, 0.2]: 0.1334 wrong -> every sample alone in its bin
    by_hand = (0.91 + 0.05 + 0.01 + 0.45 + 0.52 + 0.30 + 0.30 + 0.1334) / 8
    assert expected_calibration_error(np.array(confidences), np.array(correct)) == pytest.approx(
        by_hand, abs=1e-12
    )
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 500)
    hits = rng.uniform(0, 1, 500) < conf
    assert expected_calibration_error(conf, hits) == pytest.approx(
        _literal_ece(conf.tolist(), hits.tolist()), abs=1e-12
    )
    table = reliability_bins(np.array([1.0, 0.0, 1 / 15]), np.array([True, False, True]))
    assert table.counts[-1] == 1 and table.counts[0] == 2  # 0 and the upper edge 1/15 in bin 0


def test_stream_order_is_seeded_and_a_permutation() -> None:
    a, b = stream_order(50, 3), stream_order(50, 3)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, stream_order(50, 4))


@pytest.fixture(scope="module")
def tta_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tta")
    bundle = make_bundle(root / "bundle")
    names = [c["name"] for c in json.loads((bundle / "classes.json").read_text())["classes"]]
    for i, name in enumerate(names):
        write_images(root / "data" / name, 5, seed=10 + i)
    return bundle, root / "data"


def _run_json(args: list[str], out: Path) -> dict:
    assert main(["eval-tta", *args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_tca_decisions_equal_vlm_edge_run_over_the_same_order(
    tta_data: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle_dir, data = tta_data
    bundle = Bundle.open(bundle_dir)
    test = load_test_set(bundle, data, None)
    order = stream_order(len(test), 7)
    ordered = tmp_path / "ordered"
    ordered.mkdir()
    for position, index in enumerate(order):
        shutil.copy(test.paths[index], ordered / f"{position:04d}{test.paths[index].suffix}")
    out = tmp_path / "run.jsonl"
    assert (
        main(
            ["run", str(bundle_dir), str(ordered), "--method", "tca", "--out", str(out), "--quiet"]
        )
        == 0
    )
    run_labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]

    methods = [MethodStream.start("tca", Pipeline(bundle, open_backend(bundle), "tca"), len(order))]
    stream = EvalStream(test.paths, test.labels, order, methods)
    stream.run()
    assert methods[0].predictions.tolist() == run_labels

    result = _run_json([str(bundle_dir), str(data), "--seed", "7"], tmp_path / "r.json")
    expected = np.mean(np.array(run_labels) == test.labels[order])
    assert result["results"]["tca"]["top1"] == pytest.approx(expected)
    assert result["images"] == len(order) == 30


def _saved_stream(bundle_dir: Path, data: Path, until: int, state: Path) -> Path:
    """``state`` after streaming the first ``until`` images (zero-shot and TCA), as eval-tta
    saves it when interrupted."""
    bundle = Bundle.open(bundle_dir)
    test = load_test_set(bundle, data, None)
    order = stream_order(len(test), 1)
    methods = [
        MethodStream.start(name, Pipeline(bundle, open_backend(bundle), name), len(order))
        for name in ("zeroshot", "tca")
    ]
    stream = EvalStream(test.paths, test.labels, order, methods)
    stream.run(until=until)
    stream.save(state, bundle.fingerprint)
    return state


def test_a_resumed_stream_reports_what_an_uninterrupted_one_does(
    tta_data: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle_dir, data = tta_data
    whole = _run_json([str(bundle_dir), str(data)], tmp_path / "whole.json")
    state = _saved_stream(bundle_dir, data, 13, tmp_path / "state.npz")
    resumed = _run_json(
        [str(bundle_dir), str(data), "--state", str(state)], tmp_path / "resumed.json"
    )
    for method in ("zeroshot", "tca"):
        for key in ("top1", "ece", "per_class"):
            assert resumed["results"][method][key] == whole["results"][method][key]
    # a state of another stream is refused
    code = main(["eval-tta", str(bundle_dir), str(data), "--seed", "2", "--state", str(state)])
    assert code == 1


def test_json_plot_and_table(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle_dir, data = tta_data
    plot = tmp_path / "reliability.png"
    code = main(
        ["eval-tta", str(bundle_dir), str(data), "--plot", str(plot), "--per-class", "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "TCA" in out and "ECE %" in out and "cat" in out
    with Image.open(plot) as image:
        assert image.size[0] > 600 and image.format == "PNG"


def test_a_domain_per_folder_root_reads_the_same_images(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DATA/<domain>/<class>/ (as learn and eval read it) holds the same labelled images as
    DATA/<class>/: zero-shot decides each alone, so its results agree; each run names its layout."""
    bundle_dir, data = tta_data
    domains = tmp_path / "domains"
    for domain, members in DOMAINS.items():
        for name in members:
            shutil.copytree(data / name, domains / domain / name)
    results = []
    for root, layout in ((data, "ROOT/CLASS"), (domains, "ROOT/DOMAIN/CLASS: 2 domain folder")):
        out = tmp_path / "r.json"
        assert main(["eval-tta", str(bundle_dir), str(root), "--json", str(out)]) == 0
        assert f"vlm-edge: layout {layout}" in capsys.readouterr().err
        results.append(json.loads(out.read_text()))
    assert results[0]["images"] == results[1]["images"] == 30
    flat, by_domain = (r["results"]["zeroshot"] for r in results)
    assert flat["top1"] == by_domain["top1"] and flat["per_class"] == by_domain["per_class"]


def test_unknown_empty_and_unreadable(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle_dir, data = tta_data
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    write_images(mixed / "zebra", 2)
    (mixed / "horse").mkdir()
    (mixed / "cat" / "broken.jpg").write_bytes(b"not an image")
    assert main(["eval-tta", str(bundle_dir), str(mixed)]) == 1
    refused = capsys.readouterr().err
    assert "not classes of the bundle" in refused and "vlm-edge classes" in refused
    result = _run_json([str(bundle_dir), str(mixed), "--ignore-unknown"], tmp_path / "r.json")
    err = capsys.readouterr().err
    assert "horse" in err and "zebra" in err and "Traceback" not in err
    assert len(result["unreadable"]) == 1 and result["images"] == 31
    assert result["results"]["tca"]["images"] == 30


def test_bad_input_is_one_line(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle_dir, data = tta_data
    full = make_bundle(tmp_path / "full", method="zeroshot")
    cases = [
        [str(full), str(data)],  # no condensation
        [str(bundle_dir), str(tmp_path / "missing")],
        [str(bundle_dir), str(data), "--dataset", "imagenet-z"],
        [str(bundle_dir), str(data), "--dataset", "dtd"],  # another dataset's classes
        [str(bundle_dir), str(data), "--json", str(tmp_path)],  # a folder
        [str(bundle_dir), str(data), "--limit", "0"],
        [str(bundle_dir), str(data), "--baseline", str(bundle_dir)],  # condenses: no baseline
    ]
    for args in cases:
        assert main(["eval-tta", *args]) in (1, 2), args
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().count("\n") == 0, (args, err)


def test_imagenet_a_synset_folders_map_to_the_bundle_by_dataset_index(tmp_path: Path) -> None:
    spec = get_dataset("imagenet_a")

    class FakeBundle:
        classes = spec.classes
        num_classes = len(spec.classes)

    for wnid in spec.folders[:3]:
        write_images(tmp_path / "imagenet-a" / wnid, 2)
    test = load_test_set(FakeBundle(), tmp_path, spec)  # type: ignore[arg-type]
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]
    coop = tmp_path / "dtd"
    for name in ("banded", "zigzagged"):
        write_images(coop / "images" / name, 1)
    split = {
        "test": [
            [f"{n}/{p.name}", 0, n]
            for n in ("banded", "zigzagged")
            for p in sorted((coop / "images" / n).iterdir())
        ]
    }
    (coop / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))

    class DtdBundle:
        classes = get_dataset("dtd").classes
        num_classes = 47

    test = load_test_set(DtdBundle(), coop, get_dataset("dtd"))  # type: ignore[arg-type]
    assert test.labels.tolist() == [0, 46]
    with pytest.raises(EvalSetError, match="not classes of the bundle"):
        load_test_set(FakeBundle(), coop, get_dataset("dtd"))  # type: ignore[arg-type]


def test_fgvc_aircraft_test_list_maps_variants_by_the_shipped_list(tmp_path: Path) -> None:
    """The official archive's layout (data/images_variant_test.txt, data/images/<id>.jpg): each
    listed variant is the shipped list's class of that name; an unlisted variant is unknown."""
    spec = get_dataset("fgvc_aircraft")
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    write_images(data / "images", 3)
    ids = sorted(p.stem for p in (data / "images").iterdir())
    lines = [f"{ids[0]} 707-320", f"{ids[1]} F/A-18", f"{ids[2]} Yak-42"]
    (data / "images_variant_test.txt").write_text("\n".join(lines) + "\n")

    class AircraftBundle:
        classes = spec.classes
        num_classes = 100

    test = load_test_set(AircraftBundle(), data.parent, spec)  # type: ignore[arg-type]
    assert sorted(test.labels.tolist()) == [0, spec.classes.index("F/A-18"), 99]
    (data / "images_variant_test.txt").write_text(f"{ids[0]} Concorde\n" + "\n".join(lines))
    with pytest.raises(EvalSetError, match="Concorde"):
        load_test_set(AircraftBundle(), data.parent, spec)  # type: ignore[arg-type]


def test_fgvc_aircraft_odd_test_lists(tmp_path: Path) -> None:
    """CRLF, a byte order mark, blank lines, tabs and trailing spaces read as the plain list;
    a non-UTF-8 file, a line without a variant and a list whose images are elsewhere are one
    EvalSetError each (they were a traceback, or images silently lost)."""
    spec = get_dataset("fgvc_aircraft")
    data = tmp_path / "data"
    ids = [p.stem for p in write_images(data / "images", 3)]
    listing = data / "images_variant_test.txt"

    class AircraftBundle:
        classes = spec.classes
        num_classes = 100

    def labels_of(raw: bytes) -> list[int]:
        listing.write_bytes(raw)
        test = load_test_set(AircraftBundle(), tmp_path, spec)  # type: ignore[arg-type]
        assert [p.name for p in test.paths] == [f"{i}.jpg" for i in ids] and not test.unknown
        return test.labels.tolist()

    expected = [0, spec.classes.index("F/A-18"), spec.classes.index("BAE 146-200")]
    plain = f"{ids[0]} 707-320\n{ids[1]} F/A-18\n{ids[2]} BAE 146-200\n"
    assert labels_of(plain.encode()) == expected
    assert labels_of(plain.replace("\n", "\r\n").encode()) == expected
    assert labels_of(b"\xef\xbb\xbf" + plain.encode()) == expected
    odd = f"\n{ids[0]}\t707-320  \n\n{ids[1]}  F/A-18\r\n   \n{ids[2]} BAE 146-200 \n\n"
    assert labels_of(odd.encode()) == expected
    bad = {
        plain.encode() + b"9999 Caf\xe9\n": "is not UTF-8 text",
        f"{plain}{ids[0]}\n".encode(): "line 4: expected",
        b"\n\n": "lists no test images",
        b"1234567 707-320\n" + plain.encode(): "lists 1234567.jpg, which is not in",
    }
    for raw, message in bad.items():
        listing.write_bytes(raw)
        with pytest.raises(EvalSetError, match=message):
            load_test_set(AircraftBundle(), tmp_path, spec)  # type: ignore[arg-type]


def test_an_interrupted_run_keeps_the_outputs_of_a_whole_one(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    """Ctrl-C part way: --json and --plot of an earlier whole run stay as they were (results of
    part of the set would pass for the whole); a set of unreadable images is an error."""
    import os
    import signal

    bundle_dir, data = tta_data
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    whole = _run_json([str(bundle_dir), str(data), "--plot", str(plot)], out)
    pictured = plot.read_bytes()
    original = EvalStream.run

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the command's handler notes it; the run stops
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EvalStream, "run", interrupted)
    argv = ["eval-tta", str(bundle_dir), str(data), "--json", str(out), "--plot", str(plot)]
    assert main([*argv, "--save-every", "5", "--quiet"]) == 130
    assert "written when the whole test set is done" in capsys.readouterr().err
    assert json.loads(out.read_text()) == whole and plot.read_bytes() == pictured
    monkeypatch.undo()
    unreadable = tmp_path / "unreadable"
    (unreadable / "cat").mkdir(parents=True)
    (unreadable / "cat" / "a.png").write_bytes(b"x")
    assert (
        main(["eval-tta", str(bundle_dir), str(unreadable), "--json", str(tmp_path / "u.json")])
        == 1
    )
    assert "no test image could be read" in capsys.readouterr().err
    assert not (tmp_path / "u.json").exists()


def test_a_damaged_state_is_refused_in_one_line_before_streaming(
    tta_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Header fields of the wrong type (a bool is no position), errors past the position,
    predictions that are no class, NaN confidences: one line naming the state, no result."""
    bundle_dir, data = tta_data
    bundle = Bundle.open(bundle_dir)
    state = _saved_stream(bundle_dir, data, 5, tmp_path / "state.npz")
    arrays, meta = load_state(state, STATE_KIND, STATE_SCHEMA_VERSION, bundle.fingerprint)
    fields = {k: v for k, v in meta.items() if k not in ("kind", "schema_version", "bundle")}
    confidences = arrays["zeroshot.confidences"].copy()
    confidences[2] = np.nan
    predictions = arrays["tca.predictions"].copy()
    predictions[1] = bundle.num_classes
    for index, (change, message) in enumerate(
        [
            ({"seconds": 1}, "has a corrupt header (field 'seconds')"),
            ({"seconds": {"zeroshot": True, "tca": 1.0}}, "corrupt header (field 'seconds')"),
            ({"seconds": {"zeroshot": 10**400, "tca": 1.0}}, "corrupt header (field 'seconds')"),
            ({"errors": 5}, "has a corrupt header (field 'errors')"),
            ({"errors": [[7, "beyond the position"]]}, "corrupt header (field 'errors')"),
            ({"position": True}, "has an invalid position True"),
            ({"zeroshot.confidences": confidences}, "zeroshot confidences are not finite"),
            ({"tca.predictions": predictions}, "the tca predictions are not classes"),
        ]
    ):
        changed = {**arrays, **{k: v for k, v in change.items() if k in arrays}}
        header = {**fields, **{k: v for k, v in change.items() if k not in arrays}}
        bad = tmp_path / f"bad{index}.npz"
        save_state(bad, STATE_KIND, STATE_SCHEMA_VERSION, bundle.fingerprint, changed, header)
        before = bad.read_bytes()
        out = tmp_path / "out.json"
        argv = [str(bundle_dir), str(data), "--state", str(bad), "--json", str(out), "--quiet"]
        assert main(["eval-tta", *argv]) == 1, change
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"vlm-edge: error: {bad}") and message in err[-1], err
        assert not any("Traceback" in line for line in err)
        assert bad.read_bytes() == before and not out.exists()
