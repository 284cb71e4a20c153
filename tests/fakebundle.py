"""A tiny but real bundle for tests and benchmarks, built without the exporter.

The image encoder is a small ONNX graph made with onnx.helper (no torch): flatten -> tanh layers ->
L2-normalised projection, with the bundle's input and output names and shapes. The anchors shift
the first hidden state (masked by anchors_valid), so anchors change the outputs as in a condensing
engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from vlm_export.core import manifest as mf
from vlm_export.runtime.engines.checks.reference import record_reference

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
DOMAINS = {"animals": ["cat", "dog", "bird"], "vehicles": ["car", "bus", "train"]}


def _encoder(
    image_size: int, layers: int, width: int, embed: int, classes: int, condensing: bool, seed: int
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    patches = (image_size // 8) ** 2
    reduction = [layers // 4 + 1, layers // 2 + 1] if condensing else []
    init = [
        numpy_helper.from_array(
            (rng.standard_normal((3 * image_size * image_size, width)) * 0.02).astype(np.float32),
            "w_in",
        ),
        numpy_helper.from_array(
            (rng.standard_normal((width, embed)) / np.sqrt(width)).astype(np.float32), "proj"
        ),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_in"], ["h_in"]),
    ]
    first = "h_in"
    if condensing:
        init.append(numpy_helper.from_array(np.array([classes, 1, 1], dtype=np.int64), "cshape"))
        nodes += [
            helper.make_node("Reshape", ["anchors_valid", "cshape"], ["valid3"]),
            helper.make_node("Mul", ["anchors", "valid3"], ["masked"]),
            helper.make_node("ReduceMean", ["masked"], ["anchor_shift"], keepdims=0),
            helper.make_node("Add", ["h_in", "anchor_shift"], ["h_shift"]),
        ]
        first = "h_shift"
    previous, stacked = first, []
    for layer in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        init.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes += [
            helper.make_node(  # named as in an exported ViT: quantize's default scope (MLPs)
                "MatMul",
                [previous, f"w{layer}"],
                [f"m{layer}"],
                name=f"/transformer/resblocks.{layer}/mlp/c_fc/MatMul",
            ),
            helper.make_node("Add", [f"m{layer}", previous], [f"r{layer}"]),
            helper.make_node("Tanh", [f"r{layer}"], [f"h{layer}"]),
            helper.make_node("Unsqueeze", [f"h{layer}", "axis1"], [f"u{layer}"]),
        ]
        previous = f"h{layer}"
        stacked.append(f"u{layer}")
    nodes += [
        helper.make_node("Concat", stacked, ["cls_per_layer"], axis=1),
        helper.make_node("MatMul", [previous, "proj"], ["raw"]),
        helper.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["raw", "norm"], ["embedding"]),
    ]
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, image_size, image_size])
    ]
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, embed]),
        helper.make_tensor_value_info("cls_per_layer", TensorProto.FLOAT, [1, layers, width]),
    ]
    io = {
        "inputs": [{"name": "image", "shape": [1, 3, image_size, image_size], "dtype": "float32"}],
        "outputs": [
            {"name": "embedding", "shape": [1, embed], "dtype": "float32"},
            {"name": "cls_per_layer", "shape": [1, layers, width], "dtype": "float32"},
        ],
    }
    if condensing:
        r = len(reduction)
        fate = np.zeros((1, r, patches), dtype=np.int32)
        fate[:, :, patches // 2 :] = mf.TOKEN_FATE["pruned"]
        init.append(numpy_helper.from_array(fate, "fate"))
        nodes.append(helper.make_node("Identity", ["fate"], ["token_fate"]))
        inputs += [
            helper.make_tensor_value_info("anchors", TensorProto.FLOAT, [classes, r, width]),
            helper.make_tensor_value_info("anchors_valid", TensorProto.FLOAT, [classes]),
        ]
        outputs.append(
            helper.make_tensor_value_info("token_fate", TensorProto.INT32, [1, r, patches])
        )
        io["inputs"] += [
            {"name": "anchors", "shape": [classes, r, width], "dtype": "float32"},
            {"name": "anchors_valid", "shape": [classes], "dtype": "float32"},
        ]
        io["outputs"].append({"name": "token_fate", "shape": [1, r, patches], "dtype": "int32"})
    graph = helper.make_graph(nodes, "fake_image_encoder", inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    io["reduction_layers"] = reduction
    io["patches"] = patches
    return model, io


def make_bundle(
    folder: str | Path,
    method: str = "tca",
    image_size: int = 32,
    layers: int = 4,
    width: int = 16,
    embed: int = 8,
    untrained: bool = False,
    seed: int = 0,
    reference: bool = False,
) -> Path:
    """Write a complete, valid bundle (6 classes in 2 domains) into ``folder`` and return it.

    ``reference`` records the reference images' embeddings, as the exporter does (the engine
    check at open then runs; without it the check is skipped, as for an older bundle).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [(name, domain) for domain, members in DOMAINS.items() for name in members]
    condensing = mf.uses_condensation(method)
    model, io = _encoder(image_size, layers, width, embed, len(names), condensing, seed)
    onnx.save(model, folder / mf.IMAGE_ENCODER_ONNX)
    rng = np.random.default_rng(seed + 1)
    text = rng.standard_normal((len(names), embed)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    np.save(folder / mf.TEXT_EMBEDDINGS, text)
    classes = {
        "classes": [{"name": name, "domain": domain} for name, domain in names],
        "domains": list(DOMAINS),
    }
    (folder / mf.CLASSES_FILE).write_text(json.dumps(classes, indent=1), encoding="utf-8")
    condensation = None
    if condensing:
        condensation = {
            "drop_rate": 0.1,
            "merge_centers": 2,
            "ranking": "mean",
            "reduction_layers": io["reduction_layers"],
            "anchor_layers": [layer - 1 for layer in io["reduction_layers"]],
            "schedule": [
                {
                    "layer": layer,
                    "tokens_in": 17,
                    "keep": 10,
                    "merge": 4,
                    "prune": 2,
                    "tokens_out": 14,
                }
                for layer in io["reduction_layers"]
            ],
            "tokens_per_block": [io["patches"] + 1] * layers,
            "first_centre": "highest_score",
        }
    manifest = {
        "format": mf.FORMAT,
        "schema_version": mf.SCHEMA_VERSION,
        "created_utc": "2026-01-01T00:00:00Z",
        "producer": {"vlm_export": "test", "onnx": onnx.__version__},
        "method": method,
        "model": {
            "name": "fake-tiny",
            "pretrained": "none" if untrained else "fake",
            "untrained": untrained,
            "activation": "gelu",
            "image_size": image_size,
            "patch_size": 8,
            "width": width,
            "layers": layers,
            "heads": 2,
            "embed_dim": embed,
            "logit_scale": 100.0,
        },
        "preprocess": {
            "size": [image_size, image_size],
            "resize_mode": "shortest",
            "interpolation": "bicubic",
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "fill_color": 0,
        },
        "engine": {
            "onnx": mf.IMAGE_ENCODER_ONNX,
            "opset": 17,
            "batch_size": 1,
            "inputs": io["inputs"],
            "outputs": io["outputs"],
            "embedding_normalized": True,
        },
        "engines": [],
        "condensation": condensation,
        "flops": {
            "convention": "1 multiply-add = 1 FLOP",
            "full_gflops": 0.004,
            "condensed_gflops": 0.003 if condensing else 0.004,
            "closed_form": True,
            "torch_counter": None,
        },
        "parity": {
            "passed": True,
            "max_abs": 1e-6,
            "median_abs": 1e-7,
            "cosine_min": 1.0,
            "cases": [],
        },
        "text": {
            "embeddings": mf.TEXT_EMBEDDINGS,
            "shape": list(text.shape),
            "templates": "test",
            "num_templates": 1,
            "normalized": True,
        },
        "labels": {"file": mf.CLASSES_FILE, "num_classes": len(names), "domains": list(DOMAINS)},
        "adaptation": {
            "tca": {
                "preset": "imagenet",
                "capacity": 3,
                "tau": 0.1,
                "lam": 3.0,
                "beta": 5.0,
                "eviction": "diversity",
                "anchor_rule": "all_classes",
                "zero_shot_factor": 100.0,
            },
            "rail": {},
        },
    }
    names = [mf.IMAGE_ENCODER_ONNX, mf.TEXT_EMBEDDINGS, mf.CLASSES_FILE]
    if reference:
        manifest["reference"] = record_reference(folder, manifest, [mf.IMAGE_ENCODER_ONNX])
        names.append(manifest["reference"]["records"][0]["file"])
    manifest["files"] = {name: mf.file_record(folder / name) for name in names}
    mf.validate_manifest(manifest)
    (folder / mf.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return folder


def _replace_encoder(folder: Path, model: onnx.ModelProto) -> None:
    """Save ``model`` as the bundle's image encoder and rehash it in the manifest."""
    onnx.checker.check_model(model)
    onnx.save(model, folder / mf.IMAGE_ENCODER_ONNX)
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"][mf.IMAGE_ENCODER_ONNX] = mf.file_record(folder / mf.IMAGE_ENCODER_ONNX)
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def collapse_encoder(folder: str | Path) -> Path:
    """Make the bundle's image encoder collapse: the image becomes ``image * 0 + 0.5`` before
    anything reads it, so every image gives the same finite embedding (it runs without error)."""
    folder = Path(folder)
    model = onnx.load(folder / mf.IMAGE_ENCODER_ONNX)
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((), np.float32), "collapse_zero"),
            numpy_helper.from_array(np.full((), 0.5, np.float32), "collapse_grey"),
        ]
    )
    for node in graph.node:
        node.input[:] = ["image_collapsed" if name == "image" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Mul", ["image", "collapse_zero"], ["image_zero"]))
    graph.node.insert(
        1, helper.make_node("Add", ["image_zero", "collapse_grey"], ["image_collapsed"])
    )
    _replace_encoder(folder, model)
    return folder


def drift_encoder(folder: str | Path, scale: float = 0.5, seed: int = 7) -> Path:
    """Perturb the projection of the bundle's image encoder: embeddings move away from the
    recorded ones (cosine well under the fp32 bound) but still differ from image to image."""
    folder = Path(folder)
    model = onnx.load(folder / mf.IMAGE_ENCODER_ONNX)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "proj":
            weight = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(seed).standard_normal(weight.shape).astype(np.float32)
            moved = weight + scale * noise * float(np.std(weight))
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(moved, "proj"))
    _replace_encoder(folder, model)
    return folder


def live_fate_encoder(folder: str | Path) -> Path:
    """Make the condensing encoder's ``token_fate`` depend on its inputs (converters fold a
    constant output away): the fixed fates while any anchor is valid, all "kept" otherwise.
    The embeddings do not change (a recorded reference stays valid)."""
    folder = Path(folder)
    model = onnx.load(folder / mf.IMAGE_ENCODER_ONNX)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.full((), 0.5, np.float32), "fate_half"))
    (identity,) = [node for node in graph.node if node.output[0] == "token_fate"]
    graph.node.remove(identity)
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["anchors_valid"], ["valid_max"], keepdims=0),
            helper.make_node("Greater", ["valid_max", "fate_half"], ["any_valid"]),
            helper.make_node("Cast", ["any_valid"], ["any_valid_int"], to=TensorProto.INT32),
            helper.make_node("Mul", ["fate", "any_valid_int"], ["token_fate"]),
        ]
    )
    _replace_encoder(folder, model)
    return folder


def write_images(folder: str | Path, count: int, seed: int = 0, suffix: str = ".jpg") -> list[Path]:
    """Write ``count`` random RGB images of varied sizes; return their paths in sorted order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        height, width = (int(v) for v in rng.integers(24, 96, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"img_{index:04d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
