"""A ladder of token budgets in one bundle (vlm-export --drop-rates) on the tiny model: weights
stored once, each rung decides as a bundle exported at that rate alone, one reservoir for all
rungs, bench records every rung, run --target-ms / --adapt-budget pick and switch rungs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fakebundle import write_images
from PIL import Image

torch = pytest.importorskip("torch")

from vlm_export.core.errors import BundleError, UserError  # noqa: E402
from vlm_export.core.manifest import read_manifest, verify_files  # noqa: E402
from vlm_export.export.cli import main as export_main  # noqa: E402
from vlm_export.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from vlm_export.models.loading import TEST_MODEL  # noqa: E402
from vlm_export.models.schedule import CondensationConfig  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.cli import main as edge_main  # noqa: E402
from vlm_export.runtime.engines.factory import open_backend  # noqa: E402
from vlm_export.runtime.engines.ladder.ladder import open_ladder  # noqa: E402
from vlm_export.runtime.pipeline import Pipeline  # noqa: E402
from vlm_export.runtime.tca.stage import build_reservoir  # noqa: E402

RATES = [0.0, 0.035, 0.1]
CLASSES = ["cat", "dog", "bird"]


def _export(out: Path, rate: float | None = None, rates: list[float] | None = None) -> Path:
    torch.manual_seed(0)  # the same random weights in every export
    options = ExportOptions(
        method="tca",
        model=TEST_MODEL,
        domains=[("things", CLASSES)],
        out=out,
        templates="single",
        condensation=CondensationConfig(drop_rate=0.035 if rate is None else rate),
        max_classes=8,
        anchor_rule="per_class",  # anchors switch on after a few frames
        quiet=True,
        text_encoder=False,
        drop_rates=rates,
    )
    return export_bundle(options)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("ladder")
    ladder = _export(folder / "ladder", rates=RATES)
    singles = [_export(folder / f"single{i}", rate=rate) for i, rate in enumerate(RATES)]
    return ladder, singles


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"), 12)


def test_ladder_manifest_lists_every_rung_and_stores_the_weights_once(bundles):
    ladder, singles = bundles
    manifest = read_manifest(ladder)
    verify_files(ladder, manifest)
    rungs = manifest["ladder"]["rungs"]
    assert [rung["drop_rate"] for rung in rungs] == RATES
    assert rungs[0]["onnx"] == manifest["engine"]["onnx"] == "image_encoder.onnx"
    assert rungs[0]["tokens_per_block"] == [65] * 4, "rung 0 keeps every token"
    assert [rung["schedule"][-1]["tokens_out"] for rung in rungs] == [65, 53, 29]
    assert rungs[0]["gflops"] > rungs[1]["gflops"] > rungs[2]["gflops"]
    assert all(rung["parity"]["passed"] for rung in rungs)
    weights = manifest["ladder"]["weights"]
    graph_bytes = sum(manifest["files"][rung["onnx"]]["bytes"] for rung in rungs)
    ladder_bytes = graph_bytes + manifest["files"][weights["file"]]["bytes"]
    single_bytes = (singles[1] / "image_encoder.onnx").stat().st_size
    assert ladder_bytes < 1.6 * single_bytes, "three rungs take about one engine's room"
    assert weights["tensors"] == len(weights["table"]) > 0
    anchors = [e["shape"] for e in manifest["engine"]["inputs"] if e["name"] == "anchors"]
    assert anchors == [[8, 3, 64]]


def test_a_tampered_weights_file_is_refused(bundles, tmp_path):
    copy = Path(shutil.copytree(bundles[0], tmp_path / "bundle"))
    with open(copy / "image_encoder.weights", "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\x01\x02\x03\x04")
    with pytest.raises(BundleError, match="image_encoder.weights does not match its sha256"):
        Bundle.open(copy)


def _decisions(bundle: Bundle, engine, images: list[Path]):
    pipeline = Pipeline(bundle, engine, "tca", build_reservoir(bundle))
    results = [pipeline.process(str(path), index) for index, path in enumerate(images)]
    assert pipeline.reservoir.anchors()[1].any(), "the anchors were injected in later frames"
    return results


@pytest.mark.parametrize("rung", range(len(RATES)))
def test_each_rung_decides_as_a_bundle_exported_at_that_rate_alone(bundles, images, rung):
    ladder_path, singles = bundles
    ladder, single = Bundle.open(ladder_path), Bundle.open(singles[rung])
    engine = open_ladder(ladder, "onnxruntime")
    engine.select(rung)
    got = _decisions(ladder, engine, images)
    want = _decisions(single, open_backend(single, "onnxruntime"), images)
    for a, b in zip(got, want, strict=True):
        assert a.label == b.label
        assert a.drop_rate == RATES[rung] and b.drop_rate is None
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_array_equal(a.token_fate, b.token_fate)


def test_one_reservoir_serves_every_rung(bundles, images):
    """Switching rungs hands the reservoir's current anchors to the rung that takes over."""
    bundle = Bundle.open(bundles[0])
    ladder = open_ladder(bundle, "onnxruntime")
    pipeline = Pipeline(bundle, ladder, "tca", build_reservoir(bundle))
    rates = []
    for index, path in enumerate(images):
        ladder.select(index % len(RATES))
        rates.append(pipeline.process(str(path), index).drop_rate)
        anchors, valid = pipeline.reservoir.anchors()
        bound, bound_valid = ladder.engines[ladder.active].bound_anchors()
        np.testing.assert_array_equal(bound, anchors)
        np.testing.assert_array_equal(bound_valid, valid)
    assert rates == [RATES[i % len(RATES)] for i in range(len(images))]
    assert valid.any()


def test_an_impossible_rate_is_refused_naming_rung_and_block(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    argv = ["--model", TEST_MODEL, "--pretrained", "none", "--templates", "single", "--quiet"]
    argv += ["--classes", str(classes), "--out", str(tmp_path / "out")]
    assert export_main([*argv, "--drop-rates", "0,0.035,0.45"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm-export: error: --drop-rates rung 2 (drop rate 0.45)")
    assert "impossible token budget at block" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert export_main([*argv, "--drop-rates", "0.1", "--no-text-encoder"]) == 2
    assert "at least two rates" in capsys.readouterr().err
    assert export_main([*argv, "--drop-rates", "0,0.1", "--drop-rate", "0.1"]) == 2
    assert "not both" in capsys.readouterr().err


def _run(argv, capsys):
    code = edge_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_records_rungs_and_run_picks_one_by_target(bundles, images, tmp_path, capsys):
    bundle = Path(shutil.copytree(bundles[0], tmp_path / "bundle"))
    source = str(images[0].parent)
    code, _, err = _run(["run", str(bundle), source, "--target-ms", "50"], capsys)
    assert code == 1 and "run `vlm-edge bench BUNDLE` first" in err
    assert len(err.strip().splitlines()) == 2  # the untrained-weights warning, then the line
    code, out, _ = _run(["info", str(bundle)], capsys)
    ladder = out[out.index("\nladder ") :].splitlines()[1 : len(RATES) + 3]
    assert code == 0 and ladder[0].split()[1:3] == [str(len(RATES)), "rungs"]
    for index, rate in enumerate(RATES):
        assert ladder[1 + index].split()[:5] == ["rung", f"{index}:", "drop", "rate", f"{rate:g},"]
        assert ladder[1 + index].endswith("parity passed; fp32")
    assert ladder[-1].endswith(
        "not timed on this device yet: vlm-edge bench BUNDLE times every rung"
    )
    bench = ["bench", str(bundle), "--backends", "onnxruntime", "--precisions", "fp32"]
    code, out, _ = _run([*bench, "--rounds", "2", "--warmup", "0"], capsys)
    assert code == 0 and "ladder rungs" in out
    assert "onnxruntime fp32: all rungs added" in out
    assert "(the rungs share one packed copy of the weights)" in out
    record = json.loads(next(bundle.glob("bench.*.json")).read_text())
    rows = record["ladder"]
    assert [row["drop_rate"] for row in rows] == RATES
    assert {row["sharing"] for row in rows} == {"prepacked"}
    assert all(row["p90_ms"] > 0 and row["median_ms"] > 0 for row in rows)
    code, out, _ = _run(["info", str(bundle)], capsys)
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("ladder ")) + 1
    for row in rows:  # info shows what bench measured, rung by rung
        assert f"onnxruntime fp32 p90 {row['p90_ms']:.1f} ms" in lines[first + row["rung"]]
    assert "not timed on this device yet" not in out
    code, out, err = _run(
        ["run", str(bundle), source, "--target-ms", "1e6", "--format", "jsonl"], capsys
    )
    assert code == 0 and "rung 0 (drop rate 0) is the largest budget whose p90" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(images) and {r["drop_rate"] for r in records} == {0.0}
    argv = ["run", str(bundle), source, "--target-ms", "1e-6", "--adapt-budget", "--format"]
    code, out, err = _run([*argv, "jsonl"], capsys)
    assert code == 0 and "no rung meets --target-ms 1e-06: running the smallest budget" in err
    fastest = min(range(len(rows)), key=lambda i: (rows[i]["p90_ms"], i))  # recorded, not timed
    assert f"rung {fastest} (drop rate {RATES[fastest]:g}, p90" in err
    assert {json.loads(line)["drop_rate"] for line in out.splitlines()} == {RATES[fastest]}


def test_budget_options_need_a_ladder_and_a_target(bundles, images, capsys):
    single, source = str(bundles[1][1]), str(images[0].parent)
    code, _, err = _run(["run", single, source, "--target-ms", "10"], capsys)
    assert code == 1 and "--target-ms needs a ladder bundle" in err
    code, _, err = _run(["run", str(bundles[0]), source, "--adapt-budget"], capsys)
    assert code == 1 and "need --target-ms MS" in err
    for target in ("0", "-5", "nan", "inf"):  # inf would meet on every rung: no frame rate
        code, _, err = _run(["run", str(bundles[0]), source, "--target-ms", target], capsys)
        assert code == 1 and "must be a positive number of milliseconds" in err, (target, err)


def test_api_target_with_measure_and_adapt(bundles, images, tmp_path):
    from vlm_export.runtime import api

    bundle = Path(shutil.copytree(bundles[0], tmp_path / "bundle"))
    with api.open_pipeline(bundle, target_ms=1e6, adapt_budget=True, measure=True) as pipeline:
        assert "rung 0" in pipeline.budget.reason and "measured now" in pipeline.budget.reason
        results = [pipeline.classify(path) for path in images[:4]]
    assert [result.drop_rate for result in results] == [0.0] * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["ladder"]["rungs"][1].update(onnx="../x.onnx"), "ladder.rungs[1].onnx"),
        (lambda m: m["ladder"]["rungs"][2].update(drop_rate=1.5), "ladder.rungs[2].drop_rate"),
        (lambda m: m["ladder"].pop("weights"), "ladder"),
        (lambda m: m["ladder"].update(rungs=m["ladder"]["rungs"][:1]), "ladder.rungs"),
    ],
)
def test_schema_checks_the_ladder_section(bundles, change, message):
    from vlm_export.core.manifest import validate_manifest

    manifest = read_manifest(bundles[0])
    change(manifest)
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_manifest(manifest)


def test_unlisted_rung_file_is_refused_by_the_runtime(bundles):
    from vlm_export.runtime.engines.ladder.ladder import ladder_rungs

    manifest = read_manifest(bundles[0])
    del manifest["files"]["image_encoder.rung2.onnx"]
    with pytest.raises(BundleError, match="unlisted files: image_encoder.rung2.onnx"):
        ladder_rungs(manifest)


def test_serve_runs_a_ladder_by_target_with_one_budget_for_all_sources(bundles, images, tmp_path):
    """`vlm-edge serve --target-ms --adapt-budget --measure`: one budget over every source, its
    rung in every decision (the service's frames are those of `run`)."""
    pytest.importorskip("fastapi")
    from vlm_export.runtime.serve.config import ServeSettings
    from vlm_export.runtime.serve.service import Service

    ladder, _ = bundles
    folder = images[0].parent
    config = ServeSettings(
        bundle=str(ladder),
        sources=[("a", str(folder)), ("b", str(folder))],
        loop=True,
        target_ms=1e6,
        adapt_budget=True,
        measure=True,
    )
    with Service.open(config) as service:
        assert service.budget is not None and "rung 0" in service.budget.reason
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = {item["name"]: item for item in service.source_status()}
            if all(status[name]["frames"] >= 3 for name in "ab"):
                break
            time.sleep(0.05)
        assert all(status[name]["frames"] >= 3 for name in "ab")
        assert service.classify(Image.open(images[0]))["drop_rate"] in RATES
    with Service.open(ServeSettings(bundle=str(ladder), sources=[("a", str(folder))])) as plain:
        assert plain.budget is None  # no target: the ladder's rungs open, rung 0 runs
        assert plain.classify(Image.open(images[0]))["drop_rate"] == 0.0


def test_serve_budget_options_are_checked_before_any_work(bundles, images, tmp_path):
    pytest.importorskip("fastapi")
    from vlm_export.runtime.serve.config import ServeSettings
    from vlm_export.runtime.serve.service import Service

    folder = str(images[0].parent)
    bad = ServeSettings(bundle=str(bundles[0]), sources=[("a", folder)], target_ms=-1)
    with pytest.raises(UserError, match="--target-ms must be more than 0"):
        Service.open(bad)
    single = ServeSettings(bundle=str(bundles[1][1]), sources=[("a", folder)], target_ms=50)
    with pytest.raises(UserError, match="needs a ladder bundle"):
        Service.open(single)


GOOD_ROWS = [
    {"backend": "onnxruntime", "precision": "fp32", "rung": i, "p90_ms": 10.0 - i, "drop_rate": r}
    for i, r in enumerate(RATES)
]
HOSTILE_RECORDS = {
    "rung a string": {"ladder": [{**GOOD_ROWS[0], "rung": "x"}, *GOOD_ROWS[1:]]},
    "rung null": {"ladder": [{**GOOD_ROWS[0], "rung": None}, *GOOD_ROWS[1:]]},
    "rung a list": {"ladder": [{**GOOD_ROWS[0], "rung": [1]}, *GOOD_ROWS[1:]]},
    "rung missing": {"ladder": [{k: v for k, v in GOOD_ROWS[0].items() if k != "rung"}]},
    "rung twice": {"ladder": [GOOD_ROWS[0], GOOD_ROWS[0], GOOD_ROWS[2]]},
    "rung 1.5": {"ladder": [GOOD_ROWS[0], {**GOOD_ROWS[1], "rung": 1.5}, GOOD_ROWS[2]]},
    "p90 beyond float": {"ladder": [{**GOOD_ROWS[0], "p90_ms": 10**400}, *GOOD_ROWS[1:]]},
    "p90 negative": {"ladder": [{**GOOD_ROWS[0], "p90_ms": -1}, *GOOD_ROWS[1:]]},
    "ladder a number": {"ladder": 5},
    "backend missing": {
        "ladder": [{k: v for k, v in r.items() if k != "backend"} for r in GOOD_ROWS]
    },
    "results a number": {"results": 5},
    "median a string": {
        "results": [
            {"backend": "onnxruntime", "precision": "fp32", "passed": True, "median_ms": "x"}
        ]
    },  # fmt: skip
    "median beyond float": {
        "results": [
            {"backend": "onnxruntime", "precision": "fp32", "passed": True, "median_ms": 10**400}
        ]
    },  # fmt: skip
    "result without backend": {
        "results": [{"precision": "fp32", "passed": True, "median_ms": 3.0}]
    },  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_a_bench_record_that_cannot_be_meant_is_never_a_traceback(
    bundles, images, tmp_path, capsys, case
):
    """info, --target-ms and --backend auto read only the rows a record can mean; a ladder whose
    rows do not name each rung once asks for bench again."""
    from vlm_export.runtime.engines.checks.bench_record import RECORD_FORMAT, record_path

    bundle = Path(shutil.copytree(bundles[0], tmp_path / "bundle"))
    opened = Bundle.open(bundle)
    record = {"format": RECORD_FORMAT, "engine": opened.engine_fingerprint, **HOSTILE_RECORDS[case]}
    record_path(bundle).write_text(json.dumps(record))
    source = str(images[0].parent)
    for argv in (
        ["info", str(bundle)],
        ["run", str(bundle), source, "--target-ms", "1e6", "--quiet"],
        ["run", str(bundle), source, "--backend", "auto", "--quiet"],
    ):
        code, _, err = _run(argv, capsys)
        assert "Traceback" not in err and code in (0, 1), (argv, err)
        if "--target-ms" in argv:  # no case leaves a timing for each rung
            assert code == 1 and "run `vlm-edge bench BUNDLE` first" in err, (case, err)


def test_auto_skips_a_recorded_engine_this_tool_cannot_name(bundles, images, tmp_path, capsys):
    """A faster row with a backend or precision no engine has (or control characters in it) is
    not the choice: the fastest row this tool can open is."""
    from vlm_export.runtime.engines.checks.bench_record import RECORD_FORMAT, record_path

    bundle = Path(shutil.copytree(bundles[1][0], tmp_path / "single"))
    rows = [
        {"backend": "onnxruntime", "precision": "fp32", "passed": True, "median_ms": 9.0},
        {"backend": "bogus", "precision": "fp32", "passed": True, "median_ms": 1.0},
        {"backend": "onnxruntime", "precision": "fp99", "passed": True, "median_ms": 1.0},
        {
            "backend": "open\x1b[2Jvino\nforged",
            "precision": "fp32",
            "passed": True,
            "median_ms": 1.0,
        },
    ]
    record = {
        "format": RECORD_FORMAT,
        "engine": Bundle.open(bundle).engine_fingerprint,
        "results": rows,
    }
    record_path(bundle).write_text(json.dumps(record))
    argv = ["run", str(bundle), str(images[0].parent), "--backend", "auto", "--quiet"]
    code, _, err = _run(argv, capsys)
    assert code == 0 and "auto chose onnxruntime fp32: fastest that passed parity" in err, err
    assert "\x1b" not in err and "cannot be opened now" not in err
