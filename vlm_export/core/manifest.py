"""The bundle contract: manifest schema, file names, validation and hashing (no torch, no numpy).

A bundle is a folder::

    manifest.json          this schema (JSON, ``schema_version``)
    image_encoder.onnx     the image tower (condensing for tca), static shapes
    text_embeddings.npy    [C, E] float32, L2-normalised rows, one per class
    classes.json           {"classes": [{"name": str, "domain": str}, ...], "domains": [str, ...]}
    text_encoder.onnx      the text tower (optional: left out by --no-text-encoder), free axes
    bpe_simple_vocab_16e6.txt.gz   the tokenizer's vocabulary (with the text engine)
    *.engine               TensorRT engines, if built (listed in ``engines``)
    *.rknn                 Rockchip NPU graphs, if built (listed in ``engines``)

The manifest's JSON Schema, ``manifest.schema.json`` next to this module, documents every field
(types, ranges, a description each); a summary (all required unless marked optional)::

    format            "vlm-export-bundle"
    schema_version    int, SCHEMA_VERSION
    created_utc       ISO 8601 string
    producer          {"vlm_export": str, "torch": str, "open_clip": str, "onnx": str, ...}
    method            "zeroshot" | "tca" | "rail" | "tca+rail"
    model             {"name", "pretrained", "untrained": bool, "activation": "gelu"|"quick_gelu",
                       "activation_source" (optional), "pretrained_tag" (optional),
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
                       "compute_capability", "precision", "origin": "built"|"registered",
                       "sha256", "parity": {...engine vs ONNX Runtime CPU...}, ...} (may be empty),
                      and quantized ONNX graphs: {"file", "format": "onnx", "precision": "int8",
                       "quantization": {...}, "built_utc", "sha256", "bytes", "parity": {...}}
                       (any backend that reads ONNX runs them; TensorRT records have no "format"),
                      and ncnn graphs: {"file": .param, "weights": .bin, "format": "ncnn",
                       "precision": "fp32", "blobs", "rounded_outputs", "parity", ...}
                      and RKNN graphs: {"file", "format": "rknn", "target": "rk3588",
                       "precision": "fp16", "toolkit_version", "outputs", "sha256", "parity"}
                      and LiteRT graphs: {"file", "format": "tflite", "precision": "fp32",
                       "layout": "nchw"|"nhwc", "converter": {...}, "sha256", "bytes",
                       "operators", "parity": {...}} (the litert backend runs them)
                      and OpenVINO INT8 IRs (NNCF): {"file": the .xml, "format": "openvino",
                       "weights": {"file": the .bin, "sha256", "bytes"}, ...as ONNX graphs}
                      "role": "text_encoder" marks an engine of the text tower (absent: image)
    condensation      null, or {"drop_rate", "merge_centers", "ranking", "reduction_layers",
                       "anchor_layers", "schedule": [{"layer", "tokens_in", "keep", "merge",
                       "prune", "tokens_out"}, ...], "tokens_per_block": [...],
                       "first_centre": "highest_score", "class_capacity": K (optional)}
                      anchor_layers[i] = reduction_layers[i] - 1: the cls_per_layer row whose
                      per-class means are the anchors of reduction block i. class_capacity K is
                      the rows of the anchors input: any C <= K classes run on the engine (rows
                      C..K-1 zero and invalid); without it K = C.
    flops             {"convention", "full_gflops", "condensed_gflops", "closed_form",
                       "torch_counter"}
    parity            {"passed": bool, "max_abs", "median_abs", "cosine_min", "cases": [...]}
    text              {"embeddings": file name, "shape": [C, E], "templates": str,
                       "num_templates": int, "normalized": true,
                       "template_strings": [str, ...] (optional: the templates themselves)}
    labels            {"file": file name, "num_classes": int, "domains": [str, ...]}
    text_encoder      optional (with tokenizer): {"onnx": file name, "opset", "context_length",
                       "min_length", "inputs"/"outputs" (shapes may name free axes: "batch",
                       "length"), "profile", "pooling", "geometry", "parity", ...}
    tokenizer         optional (with text_encoder): {"kind": "clip_bpe", "vocab": file name,
                       "sha256", "clean", "context_length", "source"}
    ladder            optional (--drop-rates): {"weights": {"file", "bytes", "tensors"}, "rungs":
                       [{"drop_rate", "onnx", "schedule", "tokens_per_block", "gflops",
                       "parity"}, ...]}: one graph per rung, largest budget first (rung 0 is
                       engine.onnx), all reading their weights from the one shared file
    reference         optional: {"images": N, "generator", "seed", "runtime", "records": [{"graph":
                       ONNX file, "file": .npy file [N, E], "precision": "fp32"}, ...]}: the
                       embeddings of the fixed reference images (core.reference_images) per
                       fp32 graph, which an engine is checked against when it opens
    adaptation        {"tca": {...reservoir defaults...}, "rail": {...adapter defaults...}}
    files             {file name: {"sha256": hex, "bytes": int}} for every other file in the bundle;
                      names are plain file names inside the bundle folder (no "/", "\\" or "..")

The engine's tensor names are the constants below (IMAGE_INPUT ... FATE_OUTPUT): the one contract
between the exporter, the manifest and the backends.

Two levels of checks: ``validate_manifest`` (run by ``read_manifest`` and the exporter) checks the
manifest against the schema (one line naming the field path: "manifest.json: text.embeddings:
expected a file name (string), got a list"), then unique tensor names and a condensation section
for condensing methods; ``read_manifest`` caps size and nesting before parsing;
``validate_runtime_contract`` (run by
``Bundle.open``) adds the cross-field consistency the device pipeline relies on: the image input
matches batch size and preprocess size, the text and label counts agree, and a condensing engine's
anchors fit its condensation section and CLS output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PureWindowsPath
from typing import Any

from vlm_export.core.errors import BundleError
from vlm_export.core.json_input import read_json
from vlm_export.core.manifest_schema import describe_value, schema_problem

FORMAT = "vlm-export-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_ENCODER_ONNX = "image_encoder.onnx"
TEXT_EMBEDDINGS = "text_embeddings.npy"
CLASSES_FILE = "classes.json"
METHODS = ("zeroshot", "tca", "rail", "tca+rail")
TOKEN_FATE = {"gone": -1, "kept": 0, "merged": 1, "pruned": 2}

#: engine tensor names (inputs, then outputs)
IMAGE_INPUT = "image"
ANCHORS_INPUT = "anchors"
ANCHORS_VALID_INPUT = "anchors_valid"
EMBEDDING_OUTPUT = "embedding"
CLS_OUTPUT = "cls_per_layer"
FATE_OUTPUT = "token_fate"
#: ONNX node-name prefixes of the condensing image engine's ranking, merging and anchor choice
#: (modules TokenCondenser, AnchorSelector, AnchoredScores; later calls numbered ``_1``, ...):
#: kept fp32 in TensorRT fp16 builds and OpenVINO bf16, left float in INT8 graphs
CONDENSATION_NODE_PREFIXES = ("/condensers.", "/anchor_select", "/anchored_scores")
#: text engine tensor names
TOKENS_INPUT = "tokens"
TEXT_EMBEDDING_OUTPUT = "text_embedding"
TEXT_ENCODER_ONNX = "text_encoder.onnx"

#: largest manifest read (real ones are a few kB; the cap keeps a hostile file out of memory)
MAX_MANIFEST_BYTES = 8 << 20


#: ``format`` of an ``engines`` record that is an ONNX graph (a quantized one), not a TensorRT plan
ONNX_ENGINE_FORMAT = "onnx"
#: ``format`` of an ``engines`` record that is an ncnn graph (``file`` the .param, ``weights``
#: the .bin), written by ``vlm-export build-ncnn``
NCNN_ENGINE_FORMAT = "ncnn"


def tensorrt_engines(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``engines`` records that are TensorRT engines (no ``format``, or "tensorrt")."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format", "tensorrt") == "tensorrt"
    ]


def onnx_engines(manifest: dict[str, Any], precision: str | None = None) -> list[dict[str, Any]]:
    """The ``engines`` records that are ONNX graphs (of ``precision`` if given)."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format") == ONNX_ENGINE_FORMAT
        and (precision is None or record.get("precision") == precision)
    ]


def ncnn_engines(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``engines`` records that are ncnn graphs (the last one is the newest)."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format") == NCNN_ENGINE_FORMAT
    ]


#: ``format`` of an ``engines`` record that is a Rockchip RKNN graph (``vlm-export build-rknn``)
RKNN_ENGINE_FORMAT = "rknn"


def rknn_engines(manifest: dict[str, Any], target: str | None = None) -> list[dict[str, Any]]:
    """The ``engines`` records that are RKNN graphs (for the SoC ``target`` if given)."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format") == RKNN_ENGINE_FORMAT
        and (target is None or record.get("target") == target)
    ]


#: ``format`` of an ``engines`` record that is a LiteRT (TensorFlow Lite) graph
TFLITE_ENGINE_FORMAT = "tflite"


def tflite_engines(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``engines`` records that are LiteRT ``.tflite`` graphs (vlm-export build-litert)."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format") == TFLITE_ENGINE_FORMAT
    ]


#: ``format`` of an ``engines`` record that is an OpenVINO IR: ``file`` the ``.xml``, ``weights``
#: the ``.bin`` record ({"file", "sha256", "bytes"}); both files are listed in ``files``
OPENVINO_ENGINE_FORMAT = "openvino"


def openvino_engines(
    manifest: dict[str, Any], precision: str | None = None
) -> list[dict[str, Any]]:
    """The ``engines`` records that are OpenVINO IRs (of ``precision`` if given)."""
    return [
        record
        for record in manifest.get("engines") or []
        if record.get("format") == OPENVINO_ENGINE_FORMAT
        and (precision is None or record.get("precision") == precision)
    ]


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


def is_plain_name(name: Any) -> bool:
    """True for a name that stays inside the bundle folder: no folders, no "..", not absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".")
        and "/" not in name
        and "\\" not in name
        and ".." not in name
        and "\0" not in name
        and not PureWindowsPath(name).drive
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v > 0 for v in value)


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check a manifest against ``manifest.schema.json``, then the cross-field rules of reading it.

    Raises BundleError with one line naming the field path and what is wrong. Format and schema
    version are checked first (so an old or newer bundle is named as such), then the schema,
    then: the tensor names of each engine list are unique, and condensing methods have a
    condensation section. ``validate_runtime_contract`` adds the rules of running it.
    """
    if not isinstance(manifest, dict):
        raise BundleError(
            f"{MANIFEST_NAME}: expected a JSON object, got {describe_value(manifest)}"
        )
    if manifest.get("format") != FORMAT:
        raise BundleError(f"not a vlm-export bundle (format is {manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if not _is_int(version):
        raise BundleError(
            f"{MANIFEST_NAME}: schema_version: expected an integer, got {describe_value(version)}"
        )
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {version} is newer than this runtime understands ({SCHEMA_VERSION}); "
            "upgrade vlm-export on the device"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(f"bundle schema {version} is older than {SCHEMA_VERSION}; re-export it")
    problem = schema_problem(manifest)
    if problem:
        raise BundleError(f"{MANIFEST_NAME}: {problem}")
    for kind in ("inputs", "outputs"):
        names = [record["name"] for record in manifest["engine"][kind]]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise BundleError(f"{MANIFEST_NAME}: engine.{kind}: lists {', '.join(twice)} twice")
    if uses_condensation(manifest["method"]) and not manifest["condensation"]:
        raise BundleError(f"method {manifest['method']} needs a condensation section")
    _check_text_engine(manifest)
    return manifest


def _check_text_engine(manifest: dict[str, Any]) -> None:
    """The optional text_encoder and tokenizer sections: both or neither, files listed."""
    section, tokenizer = manifest.get("text_encoder"), manifest.get("tokenizer")
    if section is None and tokenizer is None:
        return
    if not isinstance(section, dict) or not isinstance(tokenizer, dict):
        raise BundleError("manifest needs both a text_encoder and a tokenizer section, or neither")
    for where, field in (("text_encoder", "onnx"), ("tokenizer", "vocab")):
        name = manifest[where].get(field)
        if not is_plain_name(name) or name not in manifest["files"]:
            raise BundleError(f"manifest {where}.{field} {name!r} is not a listed bundle file")
    context = section.get("context_length")
    if not _is_int(context) or context < 2:
        raise BundleError(f"manifest text_encoder.context_length {context!r} is not an int >= 2")


def _tensor_shapes(manifest: dict[str, Any], kind: str) -> dict[str, list[int]]:
    return {record["name"]: record["shape"] for record in manifest["engine"][kind]}


def _expect_shape(name: str, shape: list[int] | None, expected: list[int], why: str) -> None:
    if shape is None:
        raise BundleError(f"manifest engine has no {name!r} tensor ({why})")
    if shape != expected:
        raise BundleError(
            f"manifest engine tensor {name!r} has shape {shape}, expected {expected} ({why})"
        )


def _count(section: dict[str, Any], field: str, where: str) -> int:
    value = section.get(field)
    if not _is_int(value) or value < 1:
        raise BundleError(f"manifest {where}.{field} {value!r} is not a positive integer")
    return value


def validate_runtime_contract(manifest: dict[str, Any]) -> dict[str, Any]:
    """The cross-field checks of what the device pipeline feeds and reads (after validation).

    Image input [B, 3, H, W] with B = engine.batch_size and (H, W) = preprocess.size; outputs
    embedding [B, E]; text.shape [C, E] with C = labels.num_classes when given; for condensing
    methods: condensation.anchor_layers and reduction_layers (int lists of the same length R),
    outputs cls_per_layer [B, L, D] with anchor layers in 0..L-1, inputs anchors [C, R, D] and
    anchors_valid [C], and token_fate (if listed) [B, R, n].
    """
    batch = manifest["engine"]["batch_size"]
    inputs, outputs = _tensor_shapes(manifest, "inputs"), _tensor_shapes(manifest, "outputs")
    image = inputs.get(IMAGE_INPUT)
    size = manifest["preprocess"]["size"]
    if not _is_shape(size) or len(size) != 2:
        raise BundleError(f"manifest preprocess.size {size!r} is not [height, width]")
    _expect_shape(IMAGE_INPUT, image, [batch, 3, *size], "batch_size, 3, preprocess size")
    embedding = outputs.get(EMBEDDING_OUTPUT)
    if embedding is None or len(embedding) != 2 or embedding[0] != batch:
        raise BundleError(
            f"manifest engine output {EMBEDDING_OUTPUT!r} has shape {embedding}, expected "
            f"[{batch}, embed_dim]"
        )
    text_shape = manifest["text"].get("shape")
    if not _is_shape(text_shape) or len(text_shape) != 2:
        raise BundleError(f"manifest text.shape {text_shape!r} is not [classes, embed_dim]")
    if text_shape[1] != embedding[1]:
        raise BundleError(
            f"manifest text.shape {text_shape} does not fit {EMBEDDING_OUTPUT} {embedding}"
        )
    condensing = uses_condensation(manifest["method"])
    feedable = {IMAGE_INPUT, ANCHORS_INPUT, ANCHORS_VALID_INPUT} if condensing else {IMAGE_INPUT}
    unfed = sorted(set(inputs) - feedable)
    if unfed:
        raise BundleError(
            f"manifest engine has inputs the runtime does not feed for method "
            f"{manifest['method']}: {', '.join(unfed)}"
        )
    labels = manifest["labels"]
    if "num_classes" in labels or condensing:
        classes = _count(labels, "num_classes", "labels")
        if classes != text_shape[0]:
            raise BundleError(
                f"manifest labels.num_classes is {classes}, text.shape has {text_shape[0]} rows"
            )
    if not condensing:
        return manifest
    condensation = manifest["condensation"]
    if not isinstance(condensation, dict):
        raise BundleError("manifest condensation section is not an object")
    layer_lists = {}
    for field in ("anchor_layers", "reduction_layers"):
        layers = condensation.get(field)
        if not isinstance(layers, list) or not layers or not all(_is_int(v) for v in layers):
            raise BundleError(f"manifest condensation.{field} {layers!r} is not a list of ints")
        layer_lists[field] = layers
    reductions = len(layer_lists["reduction_layers"])
    if len(layer_lists["anchor_layers"]) != reductions:
        raise BundleError(
            f"manifest condensation has {len(layer_lists['anchor_layers'])} anchor_layers for "
            f"{reductions} reduction_layers"
        )
    cls = outputs.get(CLS_OUTPUT)
    if cls is None or len(cls) != 3 or cls[0] != batch:
        raise BundleError(
            f"manifest engine output {CLS_OUTPUT!r} has shape {cls}, expected [{batch}, layers, "
            "width]"
        )
    _, num_layers, width = cls
    outside = [v for v in layer_lists["anchor_layers"] if not 0 <= v < num_layers]
    if outside:
        raise BundleError(
            f"manifest condensation.anchor_layers {outside} are outside the {num_layers} rows of "
            f"{CLS_OUTPUT}"
        )
    capacity = classes
    if "class_capacity" in condensation:
        capacity = _count(condensation, "class_capacity", "condensation")
        if capacity < classes:
            raise BundleError(
                f"bundle has {classes} classes, more than its engine's class capacity {capacity}"
            )
    why = f"capacity {capacity}, {reductions} reduction layers, width {width} of {CLS_OUTPUT}"
    _expect_shape(ANCHORS_INPUT, inputs.get(ANCHORS_INPUT), [capacity, reductions, width], why)
    _expect_shape(ANCHORS_VALID_INPUT, inputs.get(ANCHORS_VALID_INPUT), [capacity], why)
    fate = outputs.get(FATE_OUTPUT)
    if fate is not None and (len(fate) != 3 or fate[:2] != [batch, reductions]):
        raise BundleError(
            f"manifest engine output {FATE_OUTPUT!r} has shape {fate}, expected "
            f"[{batch}, {reductions}, patches]"
        )
    return manifest


def class_capacity(manifest: dict[str, Any]) -> int | None:
    """Most classes the bundle's condensing engine takes (its anchors rows); None: no limit."""
    if not uses_condensation(manifest["method"]):
        return None
    condensation = manifest["condensation"]
    return int(condensation.get("class_capacity", manifest["labels"]["num_classes"]))


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a bundle folder (no hash checks)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        if bundle_dir.exists():
            raise BundleError(f"{bundle_dir} is a file, not a bundle folder")
        raise BundleError(f"bundle folder not found: {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}: not a bundle, or a failed export")
    manifest = read_json(path, MAX_MANIFEST_BYTES, BundleError, what=str(path))
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


def _ladder_weights_key(manifest: dict[str, Any]) -> dict[str, Any]:
    """A ladder's shared weights file joins the fingerprints (its graphs do not hold the weights);
    nothing for a one-engine bundle, whose fingerprints stay as they were."""
    ladder = manifest.get("ladder")
    if not isinstance(ladder, dict):
        return {}
    name = (ladder.get("weights") or {}).get("file")
    return {"weights": manifest["files"].get(name, {}).get("sha256")}


def engine_fingerprint(manifest: dict[str, Any]) -> str:
    """A short id of the image engine alone (model and ONNX file, not the classes).

    Adaptation states record it with their labels: after the bundle's classes change (same
    engine, new fingerprint) a state keeps its rows by label instead of being refused.
    """
    key = {
        "model": [manifest["model"]["name"], str(manifest["model"]["pretrained"])],
        "onnx": manifest["files"].get(manifest["engine"]["onnx"], {}).get("sha256"),
        **_ladder_weights_key(manifest),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def bundle_fingerprint(manifest: dict[str, Any]) -> str:
    """A short id of what adaptation state depends on: model, image encoder, labels and text.

    State files record it, so a state from another bundle (other classes, other model) is refused,
    unless it records its labels and the same ``engine_fingerprint`` (see ``core.labels``).
    """
    files = manifest["files"]
    key = {
        "model": [manifest["model"]["name"], str(manifest["model"]["pretrained"])],
        "onnx": files.get(manifest["engine"]["onnx"], {}).get("sha256"),
        "text": files.get(manifest["text"]["embeddings"], {}).get("sha256"),
        "labels": files.get(manifest["labels"]["file"], {}).get("sha256"),
        **_ladder_weights_key(manifest),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
