"""``vlm-edge info BUNDLE``: the manifest in words (or as JSON with ``--json``)."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_export.core.errors import BundleError, shown
from vlm_export.core.json_text import dumps
from vlm_export.core.manifest import (
    ncnn_engines,
    onnx_engines,
    rknn_engines,
    tensorrt_engines,
    tflite_engines,
)
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import BUNDLE, add_verify_arguments, format_bytes, verify_mode
from vlm_export.runtime.engines.checks.bench_record import ladder_rows, read_record
from vlm_export.runtime.engines.checks.reference import describe_check
from vlm_export.runtime.engines.ladder.ladder import ladder_rungs
from vlm_export.runtime.engines.select import IMAGE_ROLE, engines_of_role
from vlm_export.runtime.tca.stage import check_reservoir_fits
from vlm_export.runtime.terminal import printable

LABEL_WIDTH = 12


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="describe a bundle",
        description="Describe a bundle: model, weights, method, token schedule, FLOPs, parity, "
        "classes, engines and files.",
    )
    parser.add_argument("bundle", type=BUNDLE, help="bundle folder written by vlm-export")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_verify_arguments(parser)
    return parser


def _shape(record: dict[str, Any]) -> str:
    dims = "x".join(str(v) for v in record.get("shape", []))
    return f"{record['name']} [{dims}] {record.get('dtype', '')}".rstrip()


def _model(model: dict[str, Any]) -> list[str]:
    size = model.get("image_size")
    parts = [f"{model['name']} ({model.get('activation', 'gelu')})"]
    if size:
        parts.append(f"{size}x{size} px, patch {model.get('patch_size')}")
    parts.append(
        f"{model['layers']} blocks x width {model.get('width')}, {model.get('heads')} heads, "
        f"embedding {model['embed_dim']}"
    )
    if model["untrained"]:
        weights = "UNTRAINED (random weights): predictions are meaningless"
    else:
        weights = f"pretrained {model['pretrained']}"
    return [", ".join(parts), weights]


def _tokens(condensation: dict[str, Any] | None, engine: dict[str, Any]) -> str:
    if not condensation:
        return "no condensation (every block sees all tokens)"
    schedule = condensation.get("schedule", [])
    chain = [str(schedule[0]["tokens_in"])] if schedule else []
    chain += [f"{step['tokens_out']} (block {step['layer']})" for step in schedule]
    graph = engine.get("condensation_graph", "topk")
    how = "TopK graph" if graph == "topk" else "TopK-free graph (pairwise ranks, one-hot MatMul)"
    return (
        f"{' -> '.join(chain)}; drop rate {condensation.get('drop_rate')}, "
        f"{condensation.get('merge_centers')} merge centres, {condensation.get('ranking')} "
        f"ranking; {how}"
    )


def _flops(flops: dict[str, Any]) -> str:
    full, condensed = flops.get("full_gflops"), flops.get("condensed_gflops")
    if not full:
        return "not recorded"
    if condensed is None or condensed == full:
        return f"{full:.4g} GFLOPs"
    return f"{full:.4g} GFLOPs full, {condensed:.4g} condensed ({100 * condensed / full:.1f}%)"


def _parity(parity: dict[str, Any]) -> str:
    if not parity:
        return "not checked"
    verdict = "passed" if parity.get("passed") else "FAILED"
    stats = [
        f"{name} {parity[key]:.2e}"
        for name, key in (("max abs", "max_abs"), ("median abs", "median_abs"))
        if isinstance(parity.get(key), int | float)
    ]
    if isinstance(parity.get("cosine_min"), int | float):
        stats.append(f"cosine min {parity['cosine_min']:.6f}")
    return f"{verdict}: {', '.join(stats)}" if stats else verdict


def _preprocess(pre: dict[str, Any]) -> str:
    height, width = pre["size"]
    how = pre["interpolation"]
    geometry = {
        "shortest": f"resize shorter side ({how}), centre crop {height}x{width}",
        "longest": f"resize longer side ({how}), pad to {height}x{width} "
        f"(fill {pre.get('fill_color', 0)})",
        "squash": f"resize to {height}x{width} ({how})",
    }.get(pre["resize_mode"], f"{pre['resize_mode']} to {height}x{width}")
    mean = ", ".join(f"{v:.4f}" for v in pre["mean"])
    std = ", ".join(f"{v:.4f}" for v in pre["std"])
    return f"{geometry}; mean {mean}; std {std}"


def _classes(bundle: Bundle) -> list[str]:
    per_domain = ", ".join(
        f"{domain} ({bundle.class_domains.count(domain)})" for domain in bundle.domains
    )
    shown = ", ".join(bundle.classes[:8]) + (", ..." if bundle.num_classes > 8 else "")
    plural = "s" if len(bundle.domains) != 1 else ""
    room = (bundle.class_capacity or 0) > bundle.num_classes
    capacity = f" (engine capacity {bundle.class_capacity})" if room else ""
    return [
        f"{bundle.num_classes} in {len(bundle.domains)} domain{plural}{capacity}: {per_domain}",
        shown,
    ]


def _engines(manifest: dict[str, Any]) -> list[str]:
    engine = manifest["engine"]
    lines = [f"{engine['onnx']}, opset {engine['opset']}, batch {engine['batch_size']}"]
    lines.append("in:  " + "; ".join(_shape(r) for r in engine["inputs"]))
    lines.append("out: " + "; ".join(_shape(r) for r in engine["outputs"]))
    for record in onnx_engines(manifest):
        parity = record.get("parity") or {}
        lines.append(
            f"{record.get('precision')} ONNX graph {record.get('file')}: embedding cosine min "
            f"{parity.get('embedding_cosine_min')} against the fp32 graph"
        )
    for record in ncnn_engines(manifest):
        parity = record.get("parity") or {}
        checked = parity.get("embedding_cosine_min")
        lines.append(
            f"ncnn graph {record.get('file')} + {record.get('weights')}, "
            f"{record.get('precision')}, {record.get('converter')}: "
            + (f"embedding cosine min {checked:.6f}" if checked is not None else "not compared")
            + " against ONNX Runtime (--backend ncnn)"
        )
    for record in tflite_engines(manifest):
        cosine = (record.get("parity") or {}).get("embedding_cosine_min")
        converter = record.get("converter") or {}
        tool = converter.get("tool", "?") if isinstance(converter, dict) else str(converter)
        version = converter.get(tool, "") if isinstance(converter, dict) else ""
        lines.append(
            f"LiteRT graph {record.get('file')}, {record.get('precision')}, {tool} {version}: "
            + (
                f"embedding cosine min {cosine:.6f}"
                if isinstance(cosine, float)
                else "not compared"
            )
            + " against ONNX Runtime (--backend litert)"
        )
    image_engines = [r for r in tensorrt_engines(manifest) if r.get("role") != "text_encoder"]
    for record in image_engines:
        lines.append(
            f"TensorRT {record.get('file')}: TensorRT {record.get('tensorrt_version')}, "
            f"compute capability {record.get('compute_capability')}, {record.get('precision')}"
        )
    for record in rknn_engines(manifest):
        cosine = (record.get("parity") or {}).get("embedding_cosine_min")
        shown = f"{cosine:.6f}" if isinstance(cosine, float) else "not recorded"
        lines.append(
            f"RKNN {record.get('file')}: {record.get('target')}, {record.get('precision')}, "
            f"rknn-toolkit2 {record.get('toolkit_version')}, simulator embedding cosine min "
            f"{shown} (--backend rknn)"
        )
    if not image_engines:
        lines.append("no TensorRT engines built (ONNX Runtime runs the ONNX file)")
    return lines


def _measured(bundle: Bundle) -> dict[int, list[str]]:
    """Per rung, what ``vlm-edge bench`` measured on this device: "onnxruntime fp32 p90 8.1 ms"."""
    measured: dict[int, list[str]] = {}
    for row in ladder_rows(read_record(bundle) or {}):
        engine = shown(printable(f"{row['backend']} {row['precision']}"))
        text = f"{engine} p90 {row['p90_ms']:.1f} ms"
        measured.setdefault(row["rung"], []).append(text)
    return measured


def _ladder(bundle: Bundle) -> list[str]:
    """One line per rung of a ladder: its budget, tokens, GFLOPs, parity, precisions, timings."""
    manifest = bundle.manifest
    rungs = ladder_rungs(manifest)
    if not rungs:
        return ["one token budget (vlm-export --drop-rates makes a ladder for --target-ms)"]
    weights = manifest["ladder"]["weights"]
    lines = [
        f"{len(rungs)} rungs sharing {weights['file']} ({format_bytes(weights['bytes'])}); "
        "--target-ms picks one"
    ]
    tensorrt = tensorrt_engines(manifest)
    measured = _measured(bundle)
    for rung, record in zip(rungs, manifest["ladder"]["rungs"], strict=True):
        chain = [str(record["schedule"][0]["tokens_in"])] if record["schedule"] else []
        chain += [str(step["tokens_out"]) for step in record["schedule"]]
        passed = (record.get("parity") or {}).get("passed")
        precisions = ["fp32"] + ["int8"] * bool(rung.int8)
        precisions += ["TensorRT"] * bool(engines_of_role(tensorrt, IMAGE_ROLE, rung.index))
        lines.append(
            f"rung {rung.index}: drop rate {rung.drop_rate:g}, tokens {' -> '.join(chain)}, "
            f"{rung.gflops:.4g} GFLOPs, parity {'passed' if passed else 'FAILED'}; "
            f"{', '.join(precisions)}"
            + "".join(f"; {text}" for text in measured.get(rung.index, []))
        )
    if not measured:
        lines.append("not timed on this device yet: vlm-edge bench BUNDLE times every rung")
    return lines


def _text_engine(manifest: dict[str, Any]) -> list[str]:
    section, tokenizer = manifest.get("text_encoder"), manifest.get("tokenizer")
    if not isinstance(section, dict):
        return ["none: the classes are fixed (re-export without --no-text-encoder to change them)"]
    profile = section.get("profile", {}).get("tokens", {})
    lines = [
        f"{section.get('onnx')}, opset {section.get('opset')}, context "
        f"{section.get('context_length')} tokens (each batch cut to its longest prompt)",
        "in:  " + "; ".join(_shape(r) for r in section.get("inputs", [])),
        "out: " + "; ".join(_shape(r) for r in section.get("outputs", [])),
        f"TensorRT profile tokens: min {profile.get('min')}, opt {profile.get('opt')}, "
        f"max {profile.get('max')}",
        f"parity vs open_clip: {_parity(section.get('parity') or {})}",
    ]
    text_engines = [r for r in manifest["engines"] if r.get("role") == "text_encoder"]
    lines += [f"TensorRT {r.get('file')}, {r.get('precision')}" for r in text_engines]
    if isinstance(tokenizer, dict):
        lines.append(
            f"tokenizer {tokenizer.get('kind')} ({tokenizer.get('source')}), clean "
            f"{tokenizer.get('clean')}, vocabulary {tokenizer.get('vocab')} sha256 "
            f"{str(tokenizer.get('sha256'))[:16]}"
        )
    return lines


def _adaptation(adaptation: dict[str, Any]) -> list[str]:
    lines = []
    for name, settings in adaptation.items():
        if isinstance(settings, dict) and settings:
            flat = ", ".join(f"{k} {v}" for k, v in settings.items() if not isinstance(v, dict))
            lines.append(f"{name}: {flat}")
    return lines or ["none"]


def describe(bundle: Bundle) -> list[str]:
    """The bundle in words, one string per line."""
    manifest = bundle.manifest
    rows: list[tuple[str, list[str] | str]] = [
        ("bundle", f"{bundle.path} (fingerprint {bundle.fingerprint})"),
        ("model", _model(manifest["model"])),
        ("method", bundle.method),
        ("tokens", _tokens(manifest["condensation"], manifest["engine"])),
        ("compute", _flops(manifest["flops"])),
        ("parity", _parity(manifest["parity"])),
        ("preprocess", _preprocess(manifest["preprocess"])),
        ("classes", _classes(bundle)),
        ("engine", _engines(manifest)),
        ("ladder", _ladder(bundle)),
        ("reference", describe_check(manifest)),
        ("text engine", _text_engine(manifest)),
        ("adaptation", _adaptation(manifest["adaptation"])),
        (
            "files",
            [
                f"{name}  {format_bytes(record['bytes'])}  sha256 {record['sha256'][:16]}"
                for name, record in manifest["files"].items()
            ],
        ),
        (
            "created",
            f"{manifest['created_utc']} by vlm-export {manifest['producer'].get('vlm_export')}",
        ),
    ]
    lines = []
    for label, value in rows:
        values = value if isinstance(value, list) else [value]
        for i, text in enumerate(values):
            lines.append(f"{label if i == 0 else '':<{LABEL_WIDTH}}{text}")
    return lines


def handle(args: argparse.Namespace) -> int:
    """Print the bundle description."""
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    check_reservoir_fits(bundle)  # refused here as by run, not only when the bundle runs
    if args.json:
        try:
            print(dumps(bundle.manifest, indent=2))
        except ValueError:
            raise BundleError("the manifest holds a non-finite number (NaN or infinity)") from None
    else:
        print("\n".join(describe(bundle)))
    return 0
