"""The bundle contract: manifest schema, file names, validation and hashing (no torch, no numpy).

A bundle is a folder::

    manifest.json          this schema (JSON, ``schema_version``)
    image_encoder.onnx     the image tower (condensing for tca), static shapes
    text_embeddings.npy    [C, E] float32, L2-normalised rows, one per class
    classes.json           {"classes": [{"name": str, "domain": str}, ...], "domains": [str, ...]}
    *.engine               TensorRT engines, if built (listed in ``engines``)

Manifest fields (all required unless marked optional)::

    format            "vlm-export-bundle"
    schema_version    int, SCHEMA_VERSION
    created_utc       ISO 8601 string
    producer          {"vlm_export": str, "torch": str, "open_clip": str, "onnx": str, ...}
    method            "zeroshot" | "tca" | "rail" | "tca+rail"
    model             {"name", "pretrained", "untrained": bool, "activation": "gelu"|"quick_gelu",
                       "image_size", "patch_size", "width", "layers", "heads", "embed_dim",
                       "logit_scale": float}
    preprocess        {"size": [H, W], "resize_mode": "shortest", "interpolation": "bicubic",
                       "mean": [3 floats], "std": [3 floats], "fill_color": int}
    engine            {"onnx": file name, "opset": int, "batch_size": int,
                       "inputs":  [{"name", "shape", "dtype"}, ...],
                       "outputs": [{"name", "shape", "dtype"}, ...],
                       "embedding_normalized": true}
                      inputs: "image" [B,3,H,W] float32; for condensing engines also
                      "anchors" [C,R,D] float32 and "anchors_valid" [C] float32 (1 = the class's
                      anchor may be injected; all zeros = ordinary attention).
                      outputs: "embedding" [B,E] (L2-normalised), "cls_per_layer" [B,L,D] (CLS at
                      the output of every block, before ln_post), and for condensing engines
                      "token_fate" [B,R,n] int32 (TOKEN_FATE codes, per original patch).
    engines           list of TensorRT engines: {"file", "tensorrt_version",
                       "compute_capability", "precision", ...} (may be empty)
    condensation      null, or {"drop_rate", "merge_centers", "ranking", "reduction_layers",
                       "anchor_layers", "schedule": [{"layer", "tokens_in", "keep", "merge",
                       "prune", "tokens_out"}, ...], "tokens_per_block": [...],
                       "first_centre": "highest_score"}
                      anchor_layers[i] = reduction_layers[i] - 1: the cls_per_layer row whose
                      per-class means are the anchors of reduction block i.
    flops             {"convention", "full_gflops", "condensed_gflops", "closed_form", "torch_counter"}
    parity            {"passed": bool, "max_abs", "median_abs", "cosine_min", "cases": [...]}
    text              {"embeddings": file name, "shape": [C, E], "templates": str,
                       "num_templates": int, "normalized": true}
    labels            {"file": file name, "num_classes": int, "domains": [str, ...]}
    adaptation        {"tca": {...reservoir defaults...}, "rail": {...adapter defaults...}}
    files             {file name: {"sha256": hex, "bytes": int}} for every other file in the bundle
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlm_export.runtime.errors import BundleError

FORMAT = "vlm-export-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_ENCODER_ONNX = "image_encoder.onnx"
TEXT_EMBEDDINGS = "text_embeddings.npy"
CLASSES_FILE = "classes.json"
METHODS = ("zeroshot", "tca", "rail", "tca+rail")
TOKEN_FATE = {"gone": -1, "kept": 0, "merged": 1, "pruned": 2}

REQUIRED_FIELDS = (
    "format",
    "schema_version",
    "created_utc",
    "producer",
    "method",
    "model",
    "preprocess",
    "engine",
    "engines",
    "condensation",
    "flops",
    "parity",
    "text",
    "labels",
    "adaptation",
    "files",
)
REQUIRED_MODEL_FIELDS = ("name", "pretrained", "untrained", "activation", "embed_dim", "layers")
REQUIRED_PREPROCESS_FIELDS = ("size", "resize_mode", "interpolation", "mean", "std")
REQUIRED_ENGINE_FIELDS = ("onnx", "opset", "batch_size", "inputs", "outputs")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """The ``files`` entry of one bundle file: sha256 and size."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def uses_condensation(method: str) -> bool:
    """True for the methods whose image tower condenses tokens (tca, tca+rail)."""
    return method in ("tca", "tca+rail")


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check a manifest's structure; raise BundleError naming the first problem."""
    if not isinstance(manifest, dict):
        raise BundleError("manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"not a vlm-export bundle (format is {manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError("manifest has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is newer than this runtime understands ({SCHEMA_VERSION}); "
            "upgrade vlm-export on the device"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(f"bundle schema {version} is older than {SCHEMA_VERSION}; re-export it")
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise BundleError(f"manifest is missing fields: {', '.join(missing)}")
    if manifest["method"] not in METHODS:
        raise BundleError(f"unknown method {manifest['method']!r} in manifest")
    for section, fields in (
        ("model", REQUIRED_MODEL_FIELDS),
        ("preprocess", REQUIRED_PREPROCESS_FIELDS),
        ("engine", REQUIRED_ENGINE_FIELDS),
    ):
        absent = [name for name in fields if name not in manifest[section]]
        if absent:
            raise BundleError(f"manifest section {section!r} is missing: {', '.join(absent)}")
    if uses_condensation(manifest["method"]) and not manifest["condensation"]:
        raise BundleError(f"method {manifest['method']} needs a condensation section")
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a bundle folder (no hash checks)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder not found: {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}: not a bundle, or a failed export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    return validate_manifest(manifest)


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists with its recorded size and sha256."""
    bundle_dir = Path(bundle_dir)
    for name, record in manifest["files"].items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {name}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(
                f"bundle file {name} is {size} bytes, manifest says {record['bytes']} (truncated?)"
            )
        if sha256_file(path) != record["sha256"]:
            raise BundleError(f"bundle file {name} does not match its sha256 (modified or corrupt)")


def bundle_fingerprint(manifest: dict[str, Any]) -> str:
    """A short id of what adaptation state depends on: model, image encoder, labels and text.

    State files record it, so a state from another bundle (other classes, other model) is refused.
    """
    files = manifest["files"]
    key = {
        "model": [manifest["model"]["name"], str(manifest["model"]["pretrained"])],
        "onnx": files.get(manifest["engine"]["onnx"], {}).get("sha256"),
        "text": files.get(manifest["text"]["embeddings"], {}).get("sha256"),
        "labels": files.get(manifest["labels"]["file"], {}).get("sha256"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
