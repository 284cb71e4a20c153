"""The whole export: model -> condensing tower -> text embeddings -> ONNX -> checks -> bundle."""

from __future__ import annotations

import datetime as dt
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import vlm_export
from vlm_export.core.errors import UserError
from vlm_export.core.manifest import (
    CLASSES_FILE,
    FORMAT,
    IMAGE_ENCODER_ONNX,
    METHODS,
    SCHEMA_VERSION,
    TEXT_EMBEDDINGS,
    uses_condensation,
)
from vlm_export.export.bundle.writer import (
    check_output_folder,
    write_array,
    write_bundle,
    write_json,
)
from vlm_export.export.graph.ladder import rung_file, rung_problem, share_weights
from vlm_export.export.graph.onnx_export import export_onnx, graph_summary, io_spec
from vlm_export.export.graph.parity import check_parity
from vlm_export.export.graph.text_embeddings import encode_class_texts
from vlm_export.export.graph.text_engine import (
    export_text_engine,
    text_engine_problem,
    warn_skipped,
)
from vlm_export.export.graph.trt_ops import assert_tensorrt_compatible
from vlm_export.export.presets import RAIL_DEFAULTS, check_sizes, tca_settings
from vlm_export.export.progress import Progress
from vlm_export.models.condensing_tower import CondensingVisionTower
from vlm_export.models.flops import closed_form_gflops, drop_rate_for_gflops, flops_report
from vlm_export.models.loading import LoadedClip, config_geometry, load_clip
from vlm_export.models.schedule import (
    CondensationConfig,
    ScheduleError,
    anchor_layers,
    token_schedule,
)
from vlm_export.runtime.engines.checks.reference import record_reference
from vlm_export.runtime.text.class_lists import shared_class_names, union_labels
from vlm_export.runtime.text.templates import load_templates

DEFAULT_TEMPLATES = {
    "zeroshot": "imagenet80",
    "tca": "imagenet80",
    "rail": "single",
    "tca+rail": "single",
}


@dataclass
class ExportOptions:
    """Everything ``vlm-export`` decides; see the command's --help for each field."""

    method: str
    model: str
    domains: list[tuple[str, list[str]]]
    out: Path
    pretrained: str = "none"
    templates: str | None = None
    condensation: CondensationConfig = field(default_factory=CondensationConfig)
    target_gflops: float | None = None
    opset: int = 17
    batch_size: int = 1
    overwrite: bool = False
    force_quick_gelu: bool = False
    #: the open_clip tag whose weights a local checkpoint file holds (its activation, quick_gelu)
    pretrained_tag: str | None = None
    tca_preset: str = "imagenet"
    eviction: str = "diversity"
    anchor_rule: str = "all_classes"
    quiet: bool = False
    max_classes: int | None = None
    text_encoder: bool = True
    device: str = "cpu"
    #: a ladder of budgets (--drop-rates): one condensing graph per rate, largest budget first
    drop_rates: list[float] | None = None


DEVICES = ("cpu", "cuda")


#: class capacity of condensing engines when --max-classes is not given (at least the class count)
DEFAULT_CLASS_CAPACITY = 1000


def class_capacity(options: ExportOptions, num_classes: int) -> int:
    """Rows of the condensing engine's anchors input: --max-classes, else max(1000, classes)."""
    if options.max_classes is None:
        return max(DEFAULT_CLASS_CAPACITY, num_classes)
    if options.max_classes < num_classes:
        raise UserError(
            f"--max-classes {options.max_classes} is below the {num_classes} classes exported"
        )
    return options.max_classes


def _check_options(options: ExportOptions) -> None:
    if options.method not in METHODS:
        raise UserError(f"unknown method {options.method!r}; choose from {', '.join(METHODS)}")
    if not options.domains or not any(classes for _, classes in options.domains):
        raise UserError("no classes given: pass --classes FILE (or --domain NAME=FILE for rail)")
    check_sizes(options.max_classes, options.batch_size)
    class_capacity(options, sum(len(classes) for _, classes in options.domains))
    check_output_folder(options.out, options.overwrite)
    tca_settings(options.tca_preset, options.eviction, options.anchor_rule)  # an unknown preset
    if options.device not in DEVICES:
        raise UserError(f"unknown device {options.device!r}; choose from {', '.join(DEVICES)}")
    if options.drop_rates and not uses_condensation(options.method):
        raise UserError(f"--drop-rates needs method tca or tca+rail (exporting {options.method})")
    if options.drop_rates and list(options.drop_rates) != sorted(set(options.drop_rates)):
        raise UserError("--drop-rates must be distinct and increasing (largest budget first)")
    if options.drop_rates and options.target_gflops is not None:
        raise UserError("give either --drop-rates or --target-gflops, not both")
    gflops = options.target_gflops
    if gflops is not None and not (math.isfinite(gflops) and gflops > 0):
        raise UserError(f"--target-gflops must be a positive number, got {gflops}")
    _check_token_schedule(options)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver); "
            "use --device cpu"
        )


def _check_token_schedule(options: ExportOptions) -> None:
    """Refuse an impossible token budget before the model loads (its weights can take minutes),
    from the geometry its config gives; the tower checks it again once built."""
    geometry = config_geometry(options.model) if uses_condensation(options.method) else None
    if geometry is None or options.target_gflops is not None:
        return
    for index, rate in enumerate(options.drop_rates or [options.condensation.drop_rate]):
        try:
            token_schedule(*geometry, replace(options.condensation, drop_rate=rate))
        except ScheduleError as exc:
            raise (rung_problem(index, rate, exc) if options.drop_rates else exc) from None


def _model_section(loaded: LoadedClip, tower: CondensingVisionTower) -> dict[str, Any]:
    geometry = tower.geometry
    return {
        "name": loaded.name,
        "pretrained": loaded.pretrained,
        "untrained": loaded.untrained,
        "activation": loaded.activation,
        "activation_source": loaded.activation_source,
        **({"pretrained_tag": loaded.pretrained_tag} if loaded.pretrained_tag else {}),
        **({"random_seed": loaded.random_seed} if loaded.random_seed is not None else {}),
        "image_size": geometry["image_size"],
        "patch_size": geometry["patch_size"],
        "width": geometry["width"],
        "layers": geometry["layers"],
        "heads": geometry["heads"],
        "num_patches": geometry["num_patches"],
        "embed_dim": geometry["embed_dim"],
        "logit_scale": float(loaded.model.logit_scale.detach().exp()),
    }


def _preprocess_section(cfg: dict[str, Any]) -> dict[str, Any]:
    size = cfg["size"]
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    return {
        "size": size,
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "fill_color": int(cfg.get("fill_color", 0)),
    }


def _condensation_section(tower: CondensingVisionTower) -> dict[str, Any] | None:
    if not tower.condensing:
        return None
    config = tower.config
    return {
        "drop_rate": config.drop_rate,
        "merge_centers": config.merge_centers,
        "ranking": config.ranking,
        "reduction_layers": tower.reduction_layers,
        "anchor_layers": anchor_layers(tower.reduction_layers),
        "schedule": [counts.as_dict() for counts in tower.schedule],
        "tokens_per_block": tower.tokens_per_block,
        "first_centre": "highest_score",
        "anchor_mask_bias": -1.0e4,
        "class_capacity": tower.num_classes,
    }


def _condensation_graph(tower: CondensingVisionTower) -> dict[str, str]:
    """``engine.condensation_graph`` of a condensing engine: "topk" or "topk-free" (--no-topk)."""
    return {"condensation_graph": tower.config.graph} if tower.condensing else {}


def _producer() -> dict[str, str]:
    import open_clip

    return {
        "vlm_export": vlm_export.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def build_tower(
    loaded: LoadedClip, options: ExportOptions, num_classes: int
) -> CondensingVisionTower:
    """The tower for the method: condensing (drop rate from --target-gflops if given, anchors for
    ``class_capacity`` classes) or full."""
    if not uses_condensation(options.method):
        return CondensingVisionTower(loaded.model.visual, None)
    config = options.condensation
    if options.target_gflops is not None:
        rate = drop_rate_for_gflops(loaded.model.visual, config, options.target_gflops)
        config = replace(config, drop_rate=rate)
    capacity = class_capacity(options, num_classes)
    return CondensingVisionTower(loaded.model.visual, config, capacity).eval()


def _ladder_section(
    towers: list[CondensingVisionTower], parities: list[dict[str, Any]], weights: Any
) -> dict[str, Any]:
    """The manifest's ``ladder`` section (absent for a one-engine bundle)."""
    if weights is None:
        return {}
    rungs = [
        _rung_record(index, tower, parity, closed_form_gflops(tower))
        for index, (tower, parity) in enumerate(zip(towers, parities, strict=True))
    ]
    return {"ladder": {"weights": weights, "rungs": rungs}}


def build_rungs(
    loaded: LoadedClip, options: ExportOptions, num_classes: int
) -> list[CondensingVisionTower]:
    """One condensing tower per --drop-rates rate (the first is the bundle's engine); without
    --drop-rates the one tower of ``build_tower``. An impossible rate names its rung and block."""
    if not options.drop_rates:
        return [build_tower(loaded, options, num_classes)]
    capacity = class_capacity(options, num_classes)
    towers = []
    for index, rate in enumerate(options.drop_rates):
        config = replace(options.condensation, drop_rate=rate)
        try:
            towers.append(CondensingVisionTower(loaded.model.visual, config, capacity).eval())
        except ScheduleError as exc:
            raise rung_problem(index, rate, exc) from None
    return towers


def _rung_record(
    index: int, tower: CondensingVisionTower, parity: dict[str, Any], gflops: float
) -> dict[str, Any]:
    return {
        "drop_rate": tower.config.drop_rate,
        "onnx": rung_file(index),
        "schedule": [counts.as_dict() for counts in tower.schedule],
        "tokens_per_block": tower.tokens_per_block,
        "gflops": round(gflops, 4),
        "parity": {
            key: parity[key]
            for key in (
                "passed",
                "cosine_min",
                "cls_cosine_min",
                "max_abs",
                "token_fate_agreement_min",
            )
        },
    }


def _export_rungs(
    towers: list[CondensingVisionTower], folder: Path, options: ExportOptions, progress: Progress
) -> tuple[onnx.ModelProto, Any, list[dict[str, Any]], dict[str, Any] | None]:
    """Export and check every rung; (graph, operator report, parity reports, weights record).

    With more than one rung the graphs share one external-data weights file, and parity runs on
    the graphs as written (reading that file), so it covers the sharing."""
    first = report = None
    for index, tower in enumerate(towers):  # one graph in memory at a time (ViT-B: 350 MB each)
        graph = export_onnx(tower, folder / rung_file(index), options.opset, options.batch_size)
        checked = assert_tensorrt_compatible(graph, options.opset)
        if index == 0:
            first, report = graph, checked
        del graph
    weights = None
    if len(towers) > 1:
        weights = share_weights([folder / rung_file(i) for i in range(len(towers))])
    what = f"{len(towers)} rungs, " if len(towers) > 1 else ""
    progress.done(f"{what}{len(first.graph.node)} nodes, TensorRT operator check passed")
    progress.step("parity: ONNX Runtime vs PyTorch")
    parities = [
        check_parity(tower, folder / rung_file(index), options.batch_size)
        for index, tower in enumerate(towers)
    ]
    return first, report, parities, weights


def export_bundle(
    options: ExportOptions,
    finish: Callable[[Path], None] | None = None,
    placed: Callable[[], None] | None = None,
) -> Path:
    """Run the export and write the bundle; raise a UserError subclass on any user mistake.

    ``finish(folder)`` adds to the complete bundle before it is moved into place (the INT8 graph,
    TensorRT engines): should it fail, no bundle is written (see ``write_bundle``). ``placed()``
    is called the moment the bundle stands at ``options.out``."""
    _check_options(options)
    template_spec = options.templates or DEFAULT_TEMPLATES[options.method]
    templates = load_templates(template_spec)
    labels = union_labels(options.domains)
    class_names = [label.name for label in labels]
    progress = Progress(6 + int(options.text_encoder), quiet=options.quiet)

    progress.step(f"loading {options.model} ({options.pretrained})")
    loaded = load_clip(
        options.model, options.pretrained, options.force_quick_gelu, options.pretrained_tag
    )
    progress.done("RANDOM WEIGHTS (untrained)" if loaded.untrained else loaded.pretrained)

    progress.step("building the image tower and counting FLOPs")
    towers = build_rungs(loaded, options, len(class_names))
    tower = towers[0]
    full = tower if not tower.condensing else CondensingVisionTower(loaded.model.visual, None)
    flops = flops_report(full, tower if tower.condensing else None)
    progress.done(f"{flops['full_gflops']:.2f} -> {flops['condensed_gflops']:.2f} GFLOPs")

    progress.step(
        f"text embeddings: {len(class_names)} classes x {len(templates)} templates "
        f"({options.device})"
    )
    loaded.model.to(options.device)
    try:
        text = encode_class_texts(
            loaded.model, loaded.tokenizer, class_names, templates, progress=progress.bar
        )
    finally:
        loaded.model.to("cpu")
    progress.done()
    text_problem = text_engine_problem(loaded.model, loaded.tokenizer)
    if options.text_encoder and text_problem:
        progress.step("text engine")
        warn_skipped(options.model, text_problem)
        progress.done("left out")
    with_text_engine = options.text_encoder and text_problem is None

    def populate(folder: Path) -> dict[str, Any]:
        progress.step(f"exporting ONNX (opset {options.opset})")
        graph, ops_report, parities, weights = _export_rungs(towers, folder, options, progress)
        parity = parities[0]
        progress.done(f"cosine {parity['cosine_min']:.7f}, max abs {parity['max_abs']:.1e}")
        text_sections: dict[str, Any] = {}
        if with_text_engine:
            progress.step("text engine: ONNX, TensorRT operator check, parity vs open_clip")
            text_sections = export_text_engine(
                folder, loaded.model, loaded.tokenizer, options.opset
            )
            text_parity = text_sections["text_encoder"]["parity"]
            progress.done(
                f"cosine {text_parity['cosine_min']:.7f}, max abs {text_parity['max_abs']:.1e}"
            )
        progress.step("writing the bundle")
        write_array(folder / TEXT_EMBEDDINGS, text.astype(np.float32))
        domains = [name for name, _ in options.domains]
        write_json(
            folder / CLASSES_FILE,
            {
                "classes": [{"name": label.name, "domain": label.domain} for label in labels],
                "domains": domains,
            },
        )
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "producer": _producer(),
            "method": options.method,
            "model": _model_section(loaded, tower),
            "preprocess": _preprocess_section(loaded.preprocess_cfg),
            "engine": {
                "onnx": IMAGE_ENCODER_ONNX,
                "opset": options.opset,
                "batch_size": options.batch_size,
                **io_spec(tower, options.batch_size),
                "embedding_normalized": True,
                **_condensation_graph(tower),
                "graph": graph_summary(graph),
                "tensorrt_operator_check": {"passed": ops_report.ok, "notes": ops_report.notes},
            },
            "engines": [],
            "condensation": _condensation_section(tower),
            "flops": flops,
            "parity": parity,
            "text": {
                "embeddings": TEXT_EMBEDDINGS,
                "shape": list(text.shape),
                "templates": template_spec,
                "num_templates": len(templates),
                "template_strings": list(templates),
                "normalized": True,
            },
            "labels": {
                "file": CLASSES_FILE,
                "num_classes": len(class_names),
                "domains": domains,
                "shared_names": shared_class_names(options.domains),
            },
            "adaptation": {
                "tca": tca_settings(options.tca_preset, options.eviction, options.anchor_rule),
                "rail": RAIL_DEFAULTS,
            },
            **text_sections,
            **_ladder_section(towers, parities, weights),
        }
        graphs = [rung_file(index) for index in range(len(towers))]
        manifest["reference"] = record_reference(folder, manifest, graphs)
        return manifest

    out = write_bundle(options.out, options.overwrite, populate, finish, placed)
    progress.done(str(out))
    return out
