"""``vlm-edge explain`` (its score, its token counts) and the lines saying what commands wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands.explain import _facts, token_flow
from vlm_export.runtime.engines.factory import open_backend
from vlm_export.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def tca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tca") / "bundle", method="tca")


def test_one_image_scores_as_zero_shot_before_tca_adapts(tca_dir, tmp_path) -> None:
    """What the figure says: on one image, with nothing adapted yet, tca scores as zero-shot."""
    bundle = Bundle.open(tca_dir)
    (image,) = write_images(tmp_path, 1, seed=3)
    scores = {}
    for method in ("zeroshot", "tca"):
        pipeline = Pipeline(bundle, open_backend(bundle, "onnxruntime"), method, topk=6)
        scores[method] = pipeline.process(image, adapt=False).topk
    assert [c for c, _, _ in scores["tca"]] == [c for c, _, _ in scores["zeroshot"]]
    for (_, _, a), (_, _, b) in zip(scores["tca"], scores["zeroshot"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize(("method", "adapts"), [("zeroshot", False), ("tca", True), ("rail", True)])
def test_the_figure_names_its_scores_and_where_adapted_ones_come_from(
    tmp_path, method, adapts
) -> None:
    bundle = Bundle.open(make_bundle(tmp_path / method, method=method))
    facts = _facts(bundle, bundle.manifest.get("condensation") is not None)
    assert "scores zero-shot" in facts[0]
    said = [line for line in facts if "`vlm-edge run` gives the adapted scores" in line]
    assert len(said) == (1 if adapts else 0)


def test_explain_token_counts_are_those_info_prints(tca_dir, capsys) -> None:
    assert cli.main(["info", str(tca_dir)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens"))
    chain = [int(n) for n in re.findall(r"(\d+)(?: \(block \d+\))?(?: ->|;)", line)]
    flow = token_flow(Bundle.open(tca_dir).manifest)
    assert len(flow) == len(chain) - 1 >= 1
    assert flow[0][0] == chain[0]  # info: the first block's input, then every block's output
    assert [tokens_out for _, tokens_out in flow] == chain[1:]


def test_run_save_annotated_says_what_it_wrote_and_where(tca_dir, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    write_images(images, 3, seed=4)
    out = tmp_path / "annotated"
    argv = ["run", str(tca_dir), str(images), "--out", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--save-annotated", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"vlm-edge: 3 annotated images written to {out}" in err
    assert len(list(out.glob("*.png"))) == 3
