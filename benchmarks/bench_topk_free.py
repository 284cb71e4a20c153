"""The TopK-free condensing graph (vlm-export --no-topk) against the TopK graph on ONNX Runtime.

Times batch-1 inference of both image encoders on ONNX Runtime fp32 (CPU) in interleaved rounds
and reports the TopK-free median as a ratio of the TopK median measured in the same run. Then
runs both on 8 images (the 4 synthetic reference images of ``core.reference_images`` and 4
seeded Gaussian images), each with anchors off and on, and counts the images whose token fates
(kept / merged / pruned per patch and block) are equal in both cases, with the smallest
embedding cosine.

Either exports the pair itself (the same seeded random weights, ``--pretrained none``):

    python benchmarks/bench_topk_free.py --model vlm-test-tiny [--drop-rate 0.1]

or takes two existing bundle folders of the same model and schedule (the fate comparison needs
the same weights: two random-weight exports of ``vlm-export`` differ, so it is then skipped and
only the latency is compared):

    python benchmarks/bench_topk_free.py --bundles TOPK_BUNDLE TOPK_FREE_BUNDLE

Options: ``--rounds 20 --warmup 3 --threads 2 --work DIR`` (keeps the exported pair). The result
for the model is added to benchmarks/results/topk_free.json (one entry per model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnx
import onnxruntime as ort

from vlm_export.core.manifest import read_manifest
from vlm_export.core.reference_images import reference_inputs

CLASSES = ["cat", "dog", "bird", "car", "bus", "truck", "ship", "plane", "horse", "frog"]
RESULT = common.RESULTS / "topk_free.json"


def export_pair(work: Path, model: str, drop_rate: float) -> tuple[Path, Path]:
    """TopK and TopK-free bundles of ``model`` with the same seeded random weights."""
    import torch

    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.schedule import CondensationConfig

    outs = []
    for name, free in (("topk", False), ("topk-free", True)):
        out = work / f"{model}-{name}"
        if not (out / "manifest.json").is_file():
            torch.manual_seed(0)
            config = CondensationConfig(drop_rate=drop_rate, topk_free=free)
            options = ExportOptions(
                method="tca",
                model=model,
                pretrained="none",
                domains=[("things", CLASSES)],
                templates="single",
                condensation=config,
                out=out,
                overwrite=True,
                quiet=True,
                text_encoder=False,
            )
            export_bundle(options)
        outs.append(out)
    return outs[0], outs[1]


def images(manifest: dict[str, Any]) -> np.ndarray:
    """The 8 comparison images [8, 3, H, W] as the engine takes them."""
    pre = manifest["preprocess"]
    synthetic = reference_inputs(pre["size"], pre["mean"], pre["std"])
    noise = np.random.default_rng(0).standard_normal((4, *synthetic.shape[1:]))
    return np.concatenate([synthetic, noise.astype(np.float32)])


def session(bundle: Path, manifest: dict[str, Any], threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    path = str(bundle / manifest["engine"]["onnx"])
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def anchors_from(sess: ort.InferenceSession, manifest: dict[str, Any], pictures: np.ndarray):
    """Anchors made of the engine's own CLS tokens (two images, alternating rows), all valid for
    the bundle's classes: the state a running reservoir gives."""
    shape = next(t["shape"] for t in manifest["engine"]["inputs"] if t["name"] == "anchors")
    layers = manifest["condensation"]["anchor_layers"]
    off = (np.zeros(shape, np.float32), np.zeros(shape[0], np.float32))
    stacks = [run(sess, picture, *off)[1][0][layers] for picture in pictures[:2]]
    anchors = np.zeros(shape, np.float32)
    valid = np.zeros(shape[0], np.float32)
    classes = manifest["labels"]["num_classes"]
    for row in range(classes):
        anchors[row] = stacks[row % 2] * (1.0 + 0.01 * row)
    valid[:classes] = 1.0
    return anchors, valid


def run(sess: ort.InferenceSession, picture: np.ndarray, anchors, valid) -> list[np.ndarray]:
    feeds = {"image": picture[None], "anchors": anchors, "anchors_valid": valid}
    return sess.run(["embedding", "cls_per_layer", "token_fate"], feeds)


def weights_key(path: Path) -> str:
    """A digest of the graph's parameter initializers (float tensors of >= 1 KiB), in order."""
    model = onnx.load(str(path), load_external_data=False)
    digests = sorted(
        hashlib.sha256(t.raw_data).hexdigest()
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) >= 1024
    )
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def operators(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node})


def compare(sessions, manifests, pictures) -> dict[str, Any]:
    """Fates and embeddings of both graphs on the 8 images, anchors off and on."""
    cases = [anchors_from(sessions[0], manifests[0], pictures)]
    shape = cases[0][0].shape
    cases.insert(0, (np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)))
    equal, cosines = 0, []
    for picture in pictures:
        same = True
        for anchors, valid in cases:
            (emb_a, _, fate_a), (emb_b, _, fate_b) = (
                run(s, picture, anchors, valid) for s in sessions
            )
            same &= bool(np.array_equal(fate_a, fate_b))
            a, b = emb_a.astype(np.float64).ravel(), emb_b.astype(np.float64).ravel()
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        equal += same
    return {
        "images": len(pictures),
        "token_sets_equal": equal,
        "embedding_cosine_min": min(cosines),
        "cases": "each image with anchors off and with anchors of the engine's own CLS tokens",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="export the pair of this open_clip model (random weights)")
    what.add_argument("--bundles", nargs=2, type=Path, metavar=("TOPK", "TOPK_FREE"))
    parser.add_argument("--drop-rate", type=float, default=0.035)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the exported pair here")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-topk-free-") as scratch:
        if args.bundles:
            bundles = list(args.bundles)
        else:
            work = args.work or Path(scratch)
            bundles = list(export_pair(work, args.model, args.drop_rate))
        manifests = [read_manifest(bundle) for bundle in bundles]
        graphs = [m["engine"].get("condensation_graph", "topk") for m in manifests]
        if graphs != ["topk", "topk-free"]:
            print(f"expected a TopK bundle, then a TopK-free one; got {graphs}", file=sys.stderr)
            return 2
        schedules = [m["condensation"]["schedule"] for m in manifests]
        if (
            schedules[0] != schedules[1]
            or manifests[0]["model"]["name"] != manifests[1]["model"]["name"]
        ):
            print("the two bundles differ in model or token schedule", file=sys.stderr)
            return 2
        paths = [bundle / m["engine"]["onnx"] for bundle, m in zip(bundles, manifests, strict=True)]
        sessions = [session(b, m, args.threads) for b, m in zip(bundles, manifests, strict=True)]
        pictures = images(manifests[0])
        same_weights = weights_key(paths[0]) == weights_key(paths[1])
        equality = compare(sessions, manifests, pictures) if same_weights else None
        anchors, valid = anchors_from(sessions[0], manifests[0], pictures)

        def runner(index: int):
            state = {"next": 0}  # each graph runs the 8 images in turn, the same per round

            def once() -> None:
                run(sessions[index], pictures[state["next"] % len(pictures)], anchors, valid)
                state["next"] += 1

            return once

        times = common.interleaved_rounds(
            {"topk": runner(0), "topk-free": runner(1)}, args.rounds, args.warmup, flip=True
        )
        medians = common.medians(times)

    model = manifests[0]["model"]["name"]
    entry = {
        "model": model,
        "untrained": manifests[0]["model"]["untrained"],
        "schedule": [step["tokens_out"] for step in schedules[0]],
        "drop_rate": manifests[0]["condensation"]["drop_rate"],
        "ranking": manifests[0]["condensation"]["ranking"],
        "bundles": [bundle.name for bundle in bundles] if args.bundles else "exported here",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider fp32, batch 1",
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": {name: round(value, 3) for name, value in medians.items()},
        "ratio_topk_free_to_topk": round(medians["topk-free"] / medians["topk"], 4),
        "nodes": [len(onnx.load(str(p), load_external_data=False).graph.node) for p in paths],
        "operators_topk_free": operators(paths[1]),
        "equality": equality
        or "skipped: the bundles hold different weights (export both from the same weights)",
        "machine": common.machine(),
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    report["about"] = (
        "TopK-free condensing graph (vlm-export --no-topk) against the TopK graph, ONNX Runtime "
        "fp32 CPU, batch 1: median latency ratio and token-fate equality on 8 images"
    )
    report["models"][model] = entry
    common.write_json(args.out, report)
    ratio = entry["ratio_topk_free_to_topk"]
    found = f"{equality['token_sets_equal']}/{equality['images']}" if equality else "n/a"
    print(
        f"{model}: TopK {medians['topk']:.2f} ms, TopK-free {medians['topk-free']:.2f} ms "
        f"(x{ratio:.3f}); token sets equal on {found} images"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
