"""``vlm-export quantize BUNDLE --calibration DIR``: add a statically quantized INT8 graph (QDQ).

ONNX Runtime's ``quantize_static`` writes QuantizeLinear/DequantizeLinear pairs around the
matrix products (QDQ form: what ONNX Runtime, OpenVINO and TensorRT's explicit quantization all
read), with per-channel int8 weights and uint8 activations whose ranges come from the user's own
images, preprocessed exactly as the device will (the bundle's preprocessing; anchors zero and
invalid). Only products with weights (MatMul, Gemm, Conv) within the chosen scope are quantized
(default: the MLPs; see SCOPES), and none under the condensing tower's
``CONDENSATION_NODE_PREFIXES``: ranking, merging, anchor selection, attention scores, LayerNorm
and softmax stay float.

The gate: the INT8 graph and the bundle's fp32 graph (both in ONNX Runtime CPU) on the
calibration images and on held-out images (``--held-out DIR``, else every 5th calibration image
is held out of calibration). Every embedding cosine must reach ``MIN_COSINE``; the mean, top-1
agreement on the bundle's classes and token-fate agreement are recorded. A failing graph is not
written; a passing one is moved into the bundle and recorded in ``engines`` (``format`` "onnx",
``precision`` "int8", sha256, parity) with the manifest written atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.core import live_line
from vlm_export.core.atomic import atomic_write_bytes
from vlm_export.core.errors import UserError
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import (
    ANCHORS_INPUT,
    ANCHORS_VALID_INPUT,
    CONDENSATION_NODE_PREFIXES,
    EMBEDDING_OUTPUT,
    FATE_OUTPUT,
    IMAGE_INPUT,
    MANIFEST_NAME,
    ONNX_ENGINE_FORMAT,
    TEXT_EMBEDDINGS,
    file_record,
    read_manifest,
)
from vlm_export.core.paths import PathArg, guard_arguments
from vlm_export.export.engine_cmd import (
    BUNDLE_RW,
    _refuse_listed,
    _staging,
    move_into_bundle,
    record_engine,
)
from vlm_export.export.progress import Progress
from vlm_export.runtime.engines.parity import REFERENCE, BundleGraph, cls_like_anchors
from vlm_export.runtime.io.preprocess import ImageError, Preprocessor, load_image
from vlm_export.runtime.io.sources import is_image_file

MIN_COSINE = 0.99
#: what quantization needs besides the device runtime: no torch (pyproject's [quantize] extra)
QUANTIZE_INSTALL_HINT = 'pip install ".[quantize]" (onnx; no torch), with [cpu] or [gpu] installed'
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
PASS_THROUGH_OPS = frozenset({"Transpose", "Identity", "Reshape", "Cast"})
#: which weight products are quantized: the MLPs (two thirds of a ViT's matrix FLOPs, and the
#: least sensitive), every transformer-block product (adds the attention projections, which also
#: feed the token ranking), or all (adds the patch embedding and the final projection)
SCOPES = ("mlp", "blocks", "all")
DEFAULT_SCOPE = "mlp"
SCOPE_MARKERS = {"mlp": ("/mlp/",), "blocks": ("/mlp/", "/attn/", "/out_proj")}
HELD_OUT_EVERY = 5  # without --held-out: every 5th calibration image is held out
ANCHORS_ON_IMAGES = 4  # held-out images also run with anchors on (CLS-like, every class valid)

log = logging.getLogger(__name__)


class CalibrationError(UserError):
    """The calibration images are missing, empty or unreadable."""


class QuantizationGateError(UserError):
    """The INT8 graph differs from the fp32 graph beyond the gate; it was not written."""


def int8_file_name(onnx_name: str) -> str:
    """``image_encoder.int8.onnx`` for ``image_encoder.onnx``."""
    return f"{Path(onnx_name).stem}.int8.onnx"


def image_paths(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (sorted); CalibrationError when none or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}")
    try:
        paths = sorted(
            p for p in folder.iterdir() if not p.name.startswith(".") and is_image_file(p)
        )
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration folder {folder}: {exc}") from None
    if not paths:
        raise CalibrationError(f"no images in calibration folder {folder}")
    return paths


def preprocess_all(paths: Sequence[Path], preprocess: Preprocessor) -> list[np.ndarray]:
    """Each readable image as a [1, 3, H, W] array; unreadable ones are skipped with a warning."""
    arrays, skipped = [], []
    for path in paths:
        try:
            arrays.append(preprocess(load_image(path))[None].astype(np.float32))
        except ImageError as exc:
            skipped.append(str(exc))
    if skipped and arrays:
        log.warning("%d calibration image(s) skipped: %s", len(skipped), skipped[0])
    if not arrays:
        raise CalibrationError(f"none of the {len(paths)} calibration images can be read")
    return arrays


def split_held_out(images: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every HELD_OUT_EVERY-th image held out (at least one kept for calibration)."""
    if len(images) < 2:
        return images, []
    held = [img for i, img in enumerate(images) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [img for i, img in enumerate(images) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, held


def engine_feeds(manifest: dict[str, Any], image: np.ndarray) -> dict[str, np.ndarray]:
    """The engine inputs for one image: anchors zero and invalid for a condensing engine."""
    feeds = {IMAGE_INPUT: image}
    for record in manifest["engine"]["inputs"]:
        if record["name"] in (ANCHORS_INPUT, ANCHORS_VALID_INPUT):
            feeds[record["name"]] = np.zeros(record["shape"], np.float32)
    return feeds


def calibration_reader(
    manifest: dict[str, Any],
    images: list[np.ndarray],
    on_image: Callable[[int, int], None] | None = None,
) -> Any:
    """An onnxruntime CalibrationDataReader over ``images`` (imports onnxruntime only now);
    ``on_image(done, total)`` after each image handed out."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds ``images[start:end]``; ``set_range`` lets ONNX Runtime calibrate in strides."""

        def __init__(self) -> None:
            self._given = 0
            self.set_range(0, len(images))

        def __len__(self) -> int:
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(
                [engine_feeds(manifest, image) for image in images[start_index:end_index]]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._feeds, None)
            if feed is not None and on_image is not None:
                self._given += 1
                on_image(min(self._given, len(images)), len(images))
            return feed

    return Reader()


def _reads_weights(node: Any, initializers: set[str], producers: dict[str, Any]) -> bool:
    """True when the node's second input is a weight: an initializer, perhaps transposed."""
    if len(node.input) < 2:
        return False
    name = node.input[1]
    for _ in range(3):
        if name in initializers:
            return True
        source = producers.get(name)
        if source is None or source.op_type not in PASS_THROUGH_OPS or not source.input:
            return False
        name = source.input[0]
    return False


def in_scope(name: str, scope: str) -> bool:
    """True when the node ``name`` (a product with weights) belongs to the quantization scope."""
    if scope == "all":
        return True
    markers = SCOPE_MARKERS[scope]
    return any(marker in name for marker in markers)


def quantized_node_names(onnx_path: Path, scope: str = DEFAULT_SCOPE) -> list[str]:
    """The nodes to quantize: products with weights (MatMul, Gemm, Conv) outside the condensation,
    within ``scope`` (see SCOPES).

    Products of two activations (attention scores, attention times values) stay float, so the
    softmax reads float scores; so does everything under the condensation's name prefixes.
    None in scope is a UserError: ONNX Runtime reads an empty list as "quantize every node".
    """
    if scope not in SCOPES:
        raise UserError(f"unknown quantization scope {scope!r} (choose from {', '.join(SCOPES)})")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except (DecodeError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "truncated or corrupt"
        raise UserError(f"{onnx_path} is not a readable ONNX model ({reason})") from None
    initializers = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    names = [
        node.name
        for node in graph.node
        if node.op_type in QUANTIZED_OPS
        and not node.name.startswith(CONDENSATION_NODE_PREFIXES)
        and _reads_weights(node, initializers, producers)
        and in_scope(node.name, scope)
    ]
    if not names:
        hint = "" if scope == SCOPES[-1] else f" (try --scope {SCOPES[-1]})"
        raise UserError(f"{onnx_path.name} has no weight products in scope {scope!r}{hint}")
    return names


def quantize_graph(
    onnx_path: Path,
    out_path: Path,
    manifest: dict[str, Any],
    images: list[np.ndarray],
    scope: str = DEFAULT_SCOPE,
    on_image: Callable[[int, int], None] | None = None,
) -> None:
    """Write the QDQ INT8 graph of ``onnx_path`` calibrated on ``images`` to ``out_path``
    (``on_image(done, total)`` as calibration goes)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's advice on pre-processing, as root warnings
    try:
        quantize_static(
            str(onnx_path),
            str(out_path),
            calibration_reader(manifest, images, on_image),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=quantized_node_names(onnx_path, scope),
            calibrate_method=CalibrationMethod.MinMax,
            # ranges merged after every image: one image's intermediate tensors in memory at a time
            extra_options={"CalibStridedMinMax": 1},
        )
    finally:
        root.setLevel(level)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b.astype(np.float64), axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denominator, 1e-300)


@dataclass
class GateStats:
    """Per-image embedding cosines, top-1 agreements and token-fate agreements of one image set."""

    cosines: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    fates: list[float] = field(default_factory=list)

    def add(self, got: dict[str, np.ndarray], want: dict[str, np.ndarray], text: np.ndarray):
        self.cosines.extend(_cosines(got[EMBEDDING_OUTPUT], want[EMBEDDING_OUTPUT]).tolist())
        top_got = np.argmax(got[EMBEDDING_OUTPUT] @ text.T, axis=1)
        top_want = np.argmax(want[EMBEDDING_OUTPUT] @ text.T, axis=1)
        self.top1.extend((top_got == top_want).tolist())
        if FATE_OUTPUT in want:
            self.fates.append(float(np.mean(got[FATE_OUTPUT] == want[FATE_OUTPUT])))

    def summary(self) -> dict[str, Any]:
        if not self.cosines:
            return {"images": 0}
        return {
            "images": len(self.top1),
            "embedding_cosine_min": float(np.min(self.cosines)),
            "embedding_cosine_mean": float(np.mean(self.cosines)),
            "top1_agreement": float(np.mean(self.top1)),
            "token_fate_agreement_mean": float(np.mean(self.fates)) if self.fates else None,
            "token_fate_agreement_min": float(np.min(self.fates)) if self.fates else None,
        }


def gate_report(
    bundle_dir: Path,
    manifest: dict[str, Any],
    int8_path: Path,
    calibration: list[np.ndarray],
    held_out: list[np.ndarray],
) -> dict[str, Any]:
    """The INT8 graph against the fp32 graph (ONNX Runtime CPU) on both image sets."""
    from vlm_export.runtime.engines.onnxruntime_backend import OnnxRuntimeBackend

    text = np.load(bundle_dir / manifest["text"].get("embeddings", TEXT_EMBEDDINGS))
    int8_manifest = {**manifest, "engine": {**manifest["engine"], "onnx": int8_path.name}}
    cpu = ["CPUExecutionProvider"]
    reference = OnnxRuntimeBackend(BundleGraph(bundle_dir, manifest), providers=cpu)  # type: ignore[arg-type]
    engine = OnnxRuntimeBackend(BundleGraph(int8_path.parent, int8_manifest), providers=cpu)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    sets = {"calibration": GateStats(), "held_out": GateStats(), "held_out_anchors_on": GateStats()}
    try:
        for name, images in (("calibration", calibration), ("held_out", held_out)):
            for index, image in enumerate(images):
                want = reference.infer(image)
                sets[name].add(engine.infer(image), want, text)
                if name == "held_out" and index < ANCHORS_ON_IMAGES and engine.condensing:
                    shape = reference.bound_anchors()[0].shape
                    anchors = cls_like_anchors(want, shape, manifest, rng)
                    valid = np.ones(shape[0], np.float32)
                    for backend in (reference, engine):
                        backend.set_anchors(anchors, valid)
                    sets["held_out_anchors_on"].add(
                        engine.infer(image), reference.infer(image), text
                    )
                    off = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
                    for backend in (reference, engine):
                        backend.set_anchors(*off)
    finally:
        engine.close()
        reference.close()
    summaries = {name: stats.summary() for name, stats in sets.items()}
    cosines = [c for stats in sets.values() for c in stats.cosines]
    finite = bool(np.all(np.isfinite(cosines)))
    return {
        "reference": REFERENCE + " fp32 graph",
        "precision": "int8",
        "thresholds": {"embedding_cosine_min": MIN_COSINE},
        "embedding_cosine_min": float(np.min(cosines)),
        "embedding_cosine_mean": float(np.mean(cosines)),
        "passed": finite and float(np.min(cosines)) >= MIN_COSINE,
        **summaries,
    }


def describe_gate(report: dict[str, Any]) -> str:
    """The gate's numbers in one line."""
    parts = [
        f"embedding cosine min {report['embedding_cosine_min']:.5f} mean "
        f"{report['embedding_cosine_mean']:.5f} (need >= {MIN_COSINE})"
    ]
    for name in ("calibration", "held_out"):
        stats = report[name]
        if stats.get("images"):
            part = f"{name} {stats['images']} images: top-1 agreement {stats['top1_agreement']:.3f}"
            if stats.get("token_fate_agreement_mean") is not None:
                part += f", token fate agreement {stats['token_fate_agreement_mean']:.4f}"
            parts.append(part)
    return "; ".join(parts)


@dataclass(frozen=True)
class GraphRecord:
    """A quantized ONNX graph of the bundle, as its ``engines`` record (see core.manifest)."""

    file: str
    sha256: str
    nbytes: int
    quantization: dict[str, Any]
    parity: dict[str, Any]
    precision: str = "int8"

    def to_manifest(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": ONNX_ENGINE_FORMAT,
            "precision": self.precision,
            "quantization": self.quantization,
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "parity": self.parity,
        }


def require_quantization_tools() -> None:
    """UserError, one line saying what to install, when onnx or ONNX Runtime is missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"vlm-export quantize needs {' and '.join(missing)}: {QUANTIZE_INSTALL_HINT}"
        )


def quantize_bundle(
    bundle_dir: str | Path,
    calibration: str | Path,
    held_out: str | Path | None = None,
    overwrite: bool = False,
    scope: str = DEFAULT_SCOPE,
    progress: Progress | None = None,
) -> GraphRecord:
    """Calibrate, quantize and gate; add the passing INT8 graph to the bundle (else raise).

    ``progress`` (two steps: quantize, compare) reports the work once the inputs are checked.
    """
    progress = progress or Progress(2, quiet=True)
    require_quantization_tools()
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    name = int8_file_name(manifest["engine"]["onnx"])
    _refuse_listed(bundle_dir, manifest, name, overwrite, "replace")
    quantized_node_names(bundle_dir / manifest["engine"]["onnx"], scope)  # bad or empty scope: now
    preprocess = Preprocessor.from_manifest(manifest)
    images = preprocess_all(image_paths(calibration), preprocess)
    if held_out is not None:
        held = preprocess_all(image_paths(held_out), preprocess)
    else:
        images, held = split_held_out(images)
    onnx_path = bundle_dir / manifest["engine"]["onnx"]
    with _staging(bundle_dir) as staging:
        staged = staging / name
        progress.step(f"calibrating and quantizing the image encoder ({len(images)} images)")
        quantize_graph(onnx_path, staged, manifest, images, scope, progress.bar)
        for leftover in staging.glob("*-inferred.onnx"):  # onnxruntime's scratch files
            leftover.unlink()
        progress.done(f"scope {scope}")
        progress.step(
            f"comparing with the fp32 graph ({len(images)} calibration, {len(held)} held-out "
            "images)"
        )
        report = gate_report(bundle_dir, manifest, staged, images, held)
        progress.done("passed" if report["passed"] else "failed")
        if not report["passed"]:
            raise QuantizationGateError(
                f"the INT8 graph was not added to the bundle: {describe_gate(report)}"
            )
        copied = file_record(staged)
        record = GraphRecord(
            file=name,
            sha256=copied["sha256"],
            nbytes=copied["bytes"],
            quantization={
                "tool": "onnxruntime.quantization.quantize_static",
                "format": "QDQ",
                "scope": scope,
                "weights": "int8 per-channel",
                "activations": "uint8 per-tensor",
                "calibration": "minmax",
                "calibration_images": len(images),
                "held_out_images": len(held),
                "float": "condensation, anchor selection, attention scores, LayerNorm, softmax, "
                "elementwise ops, weight products outside the scope",
            },
            parity=report,
        )
        move_into_bundle(staged, bundle_dir, name, record.sha256)
        manifest = record_engine(manifest, record)  # type: ignore[arg-type]
        atomic_write_bytes(
            bundle_dir / MANIFEST_NAME, (dumps(manifest, indent=2) + "\n").encode("utf-8")
        )
    return record


def describe_record(record: GraphRecord, bundle_dir: str | Path) -> str:
    """One line about an INT8 graph added to a bundle: what was written, where, how close."""
    return (
        f"added {record.file} to {bundle_dir}: int8 QDQ, {record.nbytes / 2**20:.1f} MiB; "
        f"against the fp32 graph: {describe_gate(record.parity)}"
    )


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's --int8-calibration option."""
    parser.add_argument(
        "--int8-calibration",
        type=PathArg("tree", Path),
        metavar="DIR",
        help="also add an INT8 graph calibrated on the images in DIR (as `vlm-export quantize`; "
        "100-500 images from the deployment camera, spread over the classes)",
    )


def run_quantize_step(args: argparse.Namespace, bundle_dir: str | Path) -> GraphRecord | None:
    """After an export with --int8-calibration: quantize, gate, record; else do nothing."""
    if getattr(args, "int8_calibration", None) is None:
        return None
    progress = Progress(2, quiet=getattr(args, "quiet", False))
    record = quantize_bundle(bundle_dir, args.int8_calibration, overwrite=True, progress=progress)
    print(describe_record(record, bundle_dir))
    return record


def quantize_parser() -> argparse.ArgumentParser:
    """The parser of ``vlm-export quantize``."""
    parser = argparse.ArgumentParser(
        prog="vlm-export quantize",
        description=(
            "Add a statically quantized INT8 image encoder (ONNX, QDQ form) to a bundle,\n"
            "calibrated on your images with the bundle's own preprocessing. Condensation,\n"
            "anchor selection, LayerNorm and softmax stay float. The graph is compared with\n"
            f"the fp32 graph on calibration and held-out images (embedding cosine >= {MIN_COSINE}\n"
            "for every image; top-1 agreement on the bundle's classes reported) and is not\n"
            "written if it fails. Run it with `vlm-edge run --precision int8`."
        ),
        epilog=(
            "Bring 100-500 images from the deployment camera, spread over the classes.\n"
            "example:\n  vlm-export quantize bundles/vitb16-tca --calibration calib/ "
            "--held-out holdout/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=BUNDLE_RW, metavar="BUNDLE", help="bundle folder")
    parser.add_argument(
        "--calibration",
        type=PathArg("tree", Path),
        required=True,
        metavar="DIR",
        help="calibration images",
    )
    parser.add_argument(
        "--held-out",
        type=PathArg("tree", Path),
        metavar="DIR",
        help=f"images for the gate only (default: every {HELD_OUT_EVERY}th calibration image is "
        "held out of calibration)",
    )
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default=DEFAULT_SCOPE,
        help="which weight products become int8: mlp (default; the MLPs, two thirds of the "
        "FLOPs), blocks (every transformer-block projection), all (also the patch embedding and "
        "the final projection); the wider, the faster and the further from fp32",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an INT8 graph the bundle already has"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def quantize_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlm-export quantize``; 0 on success, 2 with a one-line error on stderr."""
    parser = quantize_parser()
    args = parser.parse_args(argv)
    try:
        guard_arguments(parser, args)  # before any work
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            progress = Progress(2, quiet=args.quiet)
            record = quantize_bundle(
                args.bundle, args.calibration, args.held_out, args.overwrite, args.scope, progress
            )
    except UserError as exc:
        live_line.end()  # the calibration bar, cut short: the error starts a line of its own
        print(f"vlm-export quantize: error: {exc}", file=sys.stderr)
        return 2
    print(describe_record(record, args.bundle))
    return 0
