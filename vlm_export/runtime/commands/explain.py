"""``vlm-edge explain BUNDLE IMAGE... --out DIR``: one picture per image of what the engine did.

Each picture (``DIR/<image stem>.explain.png``) shows the image as the engine saw it (after
resize and crop, enlarged), the same view with its patch grid coloured by token fate at every
reduction block (kept, merged, pruned, already gone), the legend, the top-k classes with their
zero-shot scores, and the engine's GFLOPs against the full tower's.

Every image is classified on its own with method zeroshot (no adaptation state, all anchors
off), so a picture does not depend on the other images. That is also the score of the bundle's
method on one image before it has adapted (TCA's reservoir is empty, RAIL has learned nothing);
for an adapting method a line of the figure says that its adapted scores come from ``vlm-edge
run``. Each reduction block's token counts are those ``vlm-edge info`` prints, beside the patch
counts (which leave out the CLS token, the merge centres and the fused token).

A full tower (method zeroshot or rail) condenses nothing: one line says so, and the pictures
show the view and the top-k only.

An image that cannot be read gives an error line and the others are still drawn; the exit status
is then 1. Outputs never replace an input: a name that would is given a ``-2``, ``-3`` suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_export.core.atomic import atomic_file, check_can_create
from vlm_export.core.errors import BundleError, UserError
from vlm_export.core.manifest import FATE_OUTPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    INTO,
    READ,
    add_crop_argument,
    add_engine_arguments,
    open_engine,
    status,
    verify_mode,
)
from vlm_export.runtime.draw.explain import explain_figure
from vlm_export.runtime.draw.fate import engine_view_box, patch_grid
from vlm_export.runtime.io.preprocess import ImageError, load_image
from vlm_export.runtime.pipeline import FrameError, Pipeline
from vlm_export.runtime.result import FrameResult

SUFFIX = ".explain.png"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand."""
    parser = subparsers.add_parser(
        "explain",
        help="draw what the engine kept, merged and pruned of each image",
        description="Draw one PNG per IMAGE into DIR: the image as the engine saw it, its patch "
        "grid coloured by token fate at every reduction block (kept, merged, pruned, already "
        "gone), the top-k classes (zero-shot) and the engine's GFLOPs against the full tower's. "
        "A full tower condenses nothing: the pictures then show the view and the top-k only.",
    )
    parser.add_argument(
        "bundle", type=BUNDLE, metavar="BUNDLE", help="bundle folder written by vlm-export"
    )
    parser.add_argument("images", type=READ, metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument(
        "--out",
        type=INTO,
        required=True,
        metavar="DIR",
        help=f"folder for the pictures (created if needed), one <image stem>{SUFFIX} each",
    )
    parser.add_argument("--topk", type=int, default=5, help="classes drawn (default 5)")
    add_crop_argument(parser)
    add_engine_arguments(parser)
    return parser


def output_paths(images: list[Path], folder: Path) -> list[Path]:
    """``folder/<stem>.explain.png`` per image, unique, never the path of an input."""
    taken = {os.path.realpath(image) for image in images}  # realpath: no error on link loops
    paths = []
    for image in images:
        path, number = folder / f"{image.stem}{SUFFIX}", 1
        while os.path.realpath(path) in taken:
            number += 1
            path = folder / f"{image.stem}-{number}{SUFFIX}"
        taken.add(os.path.realpath(path))
        paths.append(path)
    return paths


def _check_out(text: str) -> Path:
    if not text.strip():
        raise UserError("--out is empty: give a folder")  # not the current folder by accident
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    check_can_create(out, folder=True)
    return out


def _check_grid(bundle: Bundle) -> None:
    rows, cols = patch_grid(bundle.manifest)
    patches = int(bundle.engine_io("outputs")[FATE_OUTPUT]["shape"][-1])
    if patches != rows * cols:
        raise BundleError(
            f"{FATE_OUTPUT} has {patches} patches per block, the patch grid {rows} x {cols}"
        )


#: how each adapting method adapts (the figure's line on why its scores are zero-shot)
ADAPTS = {
    "tca": "over a stream of images",
    "rail": "from a state learned with `vlm-edge learn`",
    "tca+rail": "over a stream and from a learned state",
}


def token_flow(manifest: dict) -> list[tuple[int, int]]:
    """(tokens in, tokens out) of each reduction block, as ``vlm-edge info`` prints them."""
    condensation = manifest.get("condensation") or {}
    return [(int(s["tokens_in"]), int(s["tokens_out"])) for s in condensation.get("schedule", [])]


def _gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.2g}"


def _facts(bundle: Bundle, condensing: bool) -> list[str]:
    model = bundle.manifest["model"]
    flops = bundle.manifest["flops"]
    full = float(flops["full_gflops"])
    engine = float(flops.get("condensed_gflops") or full)
    weights = "RANDOM weights" if bundle.untrained else f"weights {model['pretrained']}"
    lines = [f"{model['name']} ({weights}), bundle method {bundle.method}, scores zero-shot"]
    adapts = ADAPTS.get(bundle.method)
    if adapts:
        lines.append(
            f"{bundle.method} adapts {adapts}; on one image, before it has adapted, it scores as "
            "zero-shot: `vlm-edge run` gives the adapted scores"
        )
    if condensing:
        lines.append(
            f"engine {_gflops(engine)} GFLOPs = {100 * engine / full:.0f}% of the full tower's "
            f"{_gflops(full)} GFLOPs"
        )
    else:
        lines.append(f"full tower: {_gflops(full)} GFLOPs, no token condensation")
    return lines


def _draw(pipeline: Pipeline, image_path: Path, index: int, facts: list[str]) -> Image.Image:
    """The figure of one image; ImageError or FrameError when it cannot be made."""
    limits = pipeline.preprocessor
    image = load_image(image_path, limits.max_pixels, limits.max_aspect)
    seen = pipeline.preprocessor.resize_crop(image).convert("RGB")
    tensor = pipeline.preprocessor.normalize(np.asarray(seen))
    result: FrameResult = pipeline.process_tensor(tensor, index, str(image_path))
    _, name, score = result.topk[0]
    condensation = pipeline.bundle.manifest.get("condensation") or {}
    preprocessor = pipeline.preprocessor
    box = engine_view_box(image.size, preprocessor.size, preprocessor.resize_mode)
    return explain_figure(
        seen,
        result.topk,
        title=f"{image_path.name}: {name} (zero-shot {100 * score:.1f}%)",
        facts=facts,
        grid=patch_grid(pipeline.bundle.manifest),
        fate=result.token_fate,
        blocks=condensation.get("reduction_layers", ()),
        frame=image,
        box=box,
        tokens=token_flow(pipeline.bundle.manifest),
    )


def handle(args: argparse.Namespace) -> int:
    """Draw every image; return 1 if any could not be drawn."""
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    out = _check_out(args.out)
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    condensing = FATE_OUTPUT in bundle.engine_io("outputs")
    if condensing:
        _check_grid(bundle)
    else:
        status(
            f"bundle {bundle.path} is a full tower (method {bundle.method}): it condenses "
            "nothing; drawing each image's view and top-k only"
        )
    images = [Path(name) for name in args.images]
    targets = output_paths(images, out)
    facts = _facts(bundle, condensing)
    failed = 0
    with contextlib.ExitStack() as stack:
        backend = open_engine(bundle, args)
        stack.callback(backend.close)
        pipeline = Pipeline(bundle, backend, "zeroshot", topk=args.topk, crop=args.crop)
        pipeline.preprocessor.max_pixels = args.max_pixels
        for index, (image, target) in enumerate(zip(images, targets, strict=True)):
            try:
                figure = _draw(pipeline, image, index, facts)
            except (ImageError, FrameError) as exc:
                status(f"error: {exc}")
                failed += 1
                continue
            with atomic_file(target) as handle:
                figure.save(handle, format="PNG")
            if not args.quiet:
                status(f"{image} -> {target}")
    written = len(images) - failed
    status(f"{written} of {len(images)} pictures written to {out}")
    return 1 if failed else 0
