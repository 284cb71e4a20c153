"""The TopK-free condensation graph (vlm-export --no-topk) condenses exactly as the TopK graph.

References: a plain Python loop that ranks scores (highest first, the lower index first among
equal ones), ONNX Runtime's own TopK, the literal eager TCA of tests/reference_tca.py, and the
TopK graph run in ONNX Runtime fp32 on the same images.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from reference_tca import reference_forward  # noqa: E402

from vlm_export.core import manifest as mf  # noqa: E402
from vlm_export.core.manifest_schema import schema_problem  # noqa: E402
from vlm_export.core.reference_images import reference_inputs  # noqa: E402
from vlm_export.export import cli  # noqa: E402
from vlm_export.export.graph.onnx_export import export_onnx, io_names  # noqa: E402
from vlm_export.export.graph.parity import _realistic_anchors  # noqa: E402
from vlm_export.models import rank_free  # noqa: E402
from vlm_export.models.condense import token_scores  # noqa: E402
from vlm_export.models.condensing_tower import (  # noqa: E402
    CondensingVisionTower,
    TokenCondenser,
    TopKFreeCondenser,
)
from vlm_export.models.loading import TEST_MODEL, load_clip  # noqa: E402
from vlm_export.models.schedule import CondensationConfig, layer_counts  # noqa: E402
from vlm_export.runtime.cli import main as edge_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = REPO / "examples" / "cifar10_classes.txt"
#: ops a TopK-free graph must not hold at all, and ops its condensing modules must not hold
NEVER = {"TopK", "GatherElements", "ScatterND", "ScatterElements", "CumSum", "NonZero"}
NEVER |= {"ArgMax", "ArgMin", "Trilu"}
#: no integer or boolean tensor inside the condensation (ncnn has none, RKNN runs them on CPU)
NOT_IN_CONDENSATION = NEVER | {"Gather", "Equal", "Where", "Greater", "Less", "Cast"}
NUM_CLASSES = 5


def loop_order(scores: list[float]) -> list[int]:
    """Literal reference: pick the highest remaining score, the lowest index among equal ones."""
    remaining = list(range(len(scores)))
    order = []
    while remaining:
        best = remaining[0]
        for index in remaining[1:]:
            if scores[index] > scores[best]:
                best = index
        order.append(best)
        remaining.remove(best)
    return order


def ort_topk_order(scores: np.ndarray) -> np.ndarray:
    """Indices [B, n] of ONNX Runtime's TopK (k = n, largest, sorted) over the last axis."""
    batch, n = scores.shape
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1, largest=1, sorted=1)
    graph = helper.make_graph(
        [node],
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n])],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, [batch, n]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, [batch, n]),
        ],
        [helper.make_tensor("k", TensorProto.INT64, [1], [n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["indices"], {"x": scores.astype(np.float32)})[0]


def _tied_scores(n: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return np.stack(
        [
            generator.integers(0, 4, n).astype(np.float32),  # few levels: ties everywhere
            generator.random(n).astype(np.float32),  # distinct
            np.full(n, 0.25, np.float32),  # all equal
        ]
    )


@pytest.mark.parametrize("n", [1, 2, 7, 50, 196])
def test_ranks_order_as_the_loop_and_onnxruntime_topk(n):
    scores = _tied_scores(n, seed=n)
    perm = rank_free.sort_matrix(torch.from_numpy(scores))
    ours = (perm @ torch.arange(n, dtype=torch.float32)).numpy().astype(np.int64)
    assert set(np.unique(perm.numpy())) <= {0.0, 1.0}
    assert np.array_equal(perm.sum(dim=1).numpy(), np.ones((3, n)))  # a permutation
    literal = np.array([loop_order(row.tolist()) for row in scores])
    assert np.array_equal(ours, literal)
    assert np.array_equal(ort_topk_order(scores), literal)
    stable = torch.sort(torch.from_numpy(scores), dim=1, descending=True, stable=True).indices
    assert np.array_equal(stable.numpy(), literal)
    # torch.topk on CPU does not promise an order among equal scores: only its values agree
    values = torch.topk(torch.from_numpy(scores), k=n, dim=1).values.numpy()
    assert np.array_equal(values, np.take_along_axis(scores, literal, axis=1))


class _Condense(torch.nn.Module):
    def __init__(self, condenser: torch.nn.Module):
        super().__init__()
        self.condenser = condenser

    def forward(self, x, cls_attn, patch_ids):
        return self.condenser(x, cls_attn, patch_ids)


def _run_onnx(module: torch.nn.Module, inputs: tuple, path: Path) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constants
        torch.onnx.export(module, inputs, str(path), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


@pytest.mark.parametrize("ranking", ["mean", "consensus"])
def test_tied_scores_condense_in_topk_order(ranking, tmp_path):
    """Tokens 0..5 repeat as 6..11, 12..17, ...: equal attention columns, so equal scores in both
    rankings; every graph keeps, merges and prunes the tokens of the loop's order."""
    heads, n, width = 3, 24, 8
    generator = torch.Generator().manual_seed(5)
    levels = torch.softmax(torch.randn(1, heads, 6, generator=generator), dim=-1) / 4
    cls_attn = levels.repeat(1, 1, n // 6)  # [1, H, n]
    x = torch.randn(1, n + 1, width, generator=generator)
    ids = torch.arange(n, dtype=torch.float32).unsqueeze(0)
    counts = layer_counts(1, n + 1, 0.2, merge_centers=2)
    scores = token_scores(cls_attn, ranking)[0].tolist()
    assert len(set(scores)) < n or ranking == "consensus"  # consensus breaks ties by index
    order = loop_order(scores)
    kept = sorted(order[: counts.keep])

    topk = _Condense(TokenCondenser(counts, ranking, n))
    free = _Condense(TopKFreeCondenser(counts, ranking, n))
    with torch.no_grad():
        eager = free(x, cls_attn, ids)
    onnx_topk = _run_onnx(topk, (x, cls_attn, ids), tmp_path / "topk.onnx")
    onnx_free = _run_onnx(free, (x, cls_attn, ids), tmp_path / "free.onnx")
    for outputs in (onnx_topk, onnx_free, [t.numpy() for t in eager]):
        fate = outputs[2][0]
        assert sorted(np.flatnonzero(fate == 0).tolist()) == kept
        assert outputs[1][0][: counts.keep].tolist() == order[: counts.keep]
        torch.testing.assert_close(
            torch.from_numpy(outputs[0][:, 1 : 1 + counts.keep]), x[:, 1:][:, order[: counts.keep]]
        )
    for ours, theirs in zip(onnx_free, onnx_topk, strict=True):
        assert np.array_equal(ours, theirs)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "free.onnx")).graph.node}
    assert not ops & NOT_IN_CONDENSATION, ops & NOT_IN_CONDENSATION


@pytest.mark.parametrize("ranking", ["mean", "consensus"])
def test_topk_free_tower_matches_the_literal_reference(tiny_clip, ranking):
    config = CondensationConfig(drop_rate=0.1, merge_centers=2, ranking=ranking, topk_free=True)
    tower = CondensingVisionTower(tiny_clip.model.visual, config, NUM_CLASSES).eval()
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    anchors = torch.randn(NUM_CLASSES, len(tower.schedule), tower.geometry["width"])
    valid = torch.tensor([0.0, 1, 0, 1, 0])
    with torch.no_grad():
        embedding, cls_stack, fate = tower(images, anchors, valid)
    for b in range(images.shape[0]):
        ref_embedding, ref_cls, ref_fate = reference_forward(
            tiny_clip.model.visual,
            images[b],
            0.1,
            2,
            ranking,
            tower.reduction_layers,
            anchors,
            valid,
        )
        assert torch.equal(fate[b], ref_fate)
        torch.testing.assert_close(cls_stack[b], ref_cls, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(embedding[b], ref_embedding, atol=2e-5, rtol=1e-4)


def comparison_images(tower: CondensingVisionTower, mean, std) -> np.ndarray:
    """The 8 images both graphs run: the 4 synthetic reference images (core.reference_images)
    and 4 Gaussian images as the export's parity check draws them (seeded)."""
    size = tower.geometry["image_size"]
    synthetic = reference_inputs((size, size), mean, std)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((4, 3, size, size), generator=generator).numpy()
    return np.concatenate([synthetic, noise]).astype(np.float32)


def _tower_outputs(path: Path, tower, images, anchors) -> list[list[np.ndarray]]:
    """Per image and anchor case (off, on): [embedding, cls_per_layer, token_fate]."""
    inputs, outputs = io_names(tower)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    for image in images:
        for valid in (np.zeros(NUM_CLASSES, np.float32), np.ones(NUM_CLASSES, np.float32)):
            anchor = anchors if valid.any() else np.zeros_like(anchors)
            feeds = dict(zip(inputs, (image[None], anchor, valid), strict=True))
            results.append(session.run(outputs, feeds))
    return results


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = (
        a.astype(np.float64).reshape(-1, a.shape[-1]),
        b.astype(np.float64).reshape(-1, b.shape[-1]),
    )
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check_graphs_agree(model: str, drop_rate: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_clip(model, "none")
    cfg = loaded.preprocess_cfg
    for ranking in ("mean", "consensus"):
        config = CondensationConfig(drop_rate=drop_rate, merge_centers=2, ranking=ranking)
        towers = [
            CondensingVisionTower(loaded.model.visual, replace(config, topk_free=free), NUM_CLASSES)
            for free in (False, True)
        ]
        anchors = _realistic_anchors(towers[0].eval(), torch.Generator().manual_seed(1)).numpy()
        images = comparison_images(towers[0], cfg["mean"], cfg["std"])
        runs = []
        for tower, name in zip(towers, ("topk", "free"), strict=True):
            graph = export_onnx(tower.eval(), tmp_path / f"{ranking}-{name}.onnx")
            runs.append(_tower_outputs(tmp_path / f"{ranking}-{name}.onnx", tower, images, anchors))
        ops = {node.op_type for node in graph.graph.node}
        assert not ops & NEVER, ops & NEVER
        condensing = {
            node.op_type
            for node in graph.graph.node
            if node.name.startswith(("/condensers.", "/anchor_select"))
        }
        assert not condensing & NOT_IN_CONDENSATION, condensing & NOT_IN_CONDENSATION
        assert len(runs[0]) == 16
        for (emb_k, cls_k, fate_k), (emb_f, cls_f, fate_f) in zip(*runs, strict=True):
            assert np.array_equal(fate_k, fate_f), "token fates differ"
            assert _cosines(emb_k, emb_f).min() >= 0.99999
            assert _cosines(cls_k, cls_f).min() >= 0.99999


def test_topk_free_graph_condenses_as_the_topk_graph_tiny(tmp_path):
    _check_graphs_agree(TEST_MODEL, 0.1, tmp_path)


@pytest.mark.slow
def test_topk_free_graph_condenses_as_the_topk_graph_vit_b_32(tmp_path):
    _check_graphs_agree("ViT-B-32", 0.035, tmp_path)


def _export(out: Path, *extra: str) -> dict:
    argv = ["--method", "tca", "--model", TEST_MODEL, "--pretrained", "none", "--quiet"]
    argv += ["--classes", str(CLASSES), "--max-classes", "12", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads((out / mf.MANIFEST_NAME).read_text())


def _info(bundle: Path, capsys) -> str:
    capsys.readouterr()
    assert edge_main(["info", str(bundle)]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tokens"))


def test_manifest_and_info_name_the_graph(tmp_path, capsys):
    plain = _export(tmp_path / "plain")
    assert plain["engine"]["condensation_graph"] == "topk"
    assert "; TopK graph" in _info(tmp_path / "plain", capsys)

    for flags in (["--no-topk"], ["--target", "rknn"], ["--target", "ncnn"]):
        out = tmp_path / "-".join(flag.strip("-") for flag in flags)
        manifest = _export(out, *flags)
        assert manifest["engine"]["condensation_graph"] == "topk-free"
        assert schema_problem(manifest) is None
        assert "TopK" not in manifest["engine"]["graph"]["operators"]
        assert "TopK-free graph" in _info(out, capsys)
    litert = _export(tmp_path / "litert", "--target", "litert")
    assert litert["engine"]["condensation_graph"] == "topk"

    # a bundle from before the field: still valid, and read as the TopK graph
    manifest_path = tmp_path / "plain" / mf.MANIFEST_NAME
    old = json.loads(manifest_path.read_text())
    del old["engine"]["condensation_graph"]
    assert schema_problem(old) is None
    manifest_path.write_text(json.dumps(old))
    assert "; TopK graph" in _info(tmp_path / "plain", capsys)
    wrong = {**plain, "engine": {**plain["engine"], "condensation_graph": "sorted"}}
    assert "condensation_graph" in str(schema_problem(wrong))


def test_ladder_rungs_are_all_topk_free(tmp_path):
    manifest = _export(tmp_path / "ladder", "--no-topk", "--drop-rates", "0,0.1")
    rungs = manifest["ladder"]["rungs"]
    assert len(rungs) == 2 and all(rung["parity"]["passed"] for rung in rungs)
    for rung in rungs:
        graph = onnx.load(str(tmp_path / "ladder" / rung["onnx"]), load_external_data=False)
        assert "TopK" not in {node.op_type for node in graph.graph.node}
