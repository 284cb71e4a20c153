"""The ``vlm-export`` command: export an open_clip CLIP as a self-describing edge bundle."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vlm_export.core import live_line
from vlm_export.core.errors import UserError, describe_os_error
from vlm_export.core.interrupts import exit_status_of, sigterm_interrupts, work_written
from vlm_export.core.paths import PathArg, guard_arguments
from vlm_export.core.pipes import EXIT_BROKEN_PIPE, stdout_to_devnull
from vlm_export.export.int8.calibration import image_paths
from vlm_export.export.int8.quantize_cmd import add_quantize_arguments, run_quantize_step
from vlm_export.export.tensorrt.engine_cmd import (
    add_tensorrt_arguments,
    build_engine_main,
    preflight_tensorrt,
    run_tensorrt_step,
)
from vlm_export.runtime.log import one_line_messages

EXAMPLES = """examples:
  vlm-export --method tca --model ViT-B-16 --pretrained openai \\
      --classes classes.txt --templates imagenet80 --out bundles/vitb16-tca
  vlm-export --method tca --model ViT-B-16 --pretrained none --classes classes.txt \\
      --target-gflops 12 --out bundles/demo          # random weights: for demos and tests
  vlm-export --method tca+rail --model ViT-B-16 --pretrained ./ViT-B-16.pt \\
      --domain pets=pets.txt --domain cars=cars.txt --out bundles/xtail
  vlm-export build-engine bundles/vitb16-tca --precision fp16   # on the device
  vlm-export quantize bundles/vitb16-tca --calibration calib/    # add an INT8 graph
  vlm-export build-ncnn bundles/vitb16-tca                       # add an ncnn graph
  vlm-export build-rknn bundles/vitb16-tca --target rk3588       # a Rockchip NPU graph
  vlm-export build-litert bundles/vitb16-tca                     # add a LiteRT .tflite graph
"""


#: --target choices; the runtimes in TOPK_FREE_TARGETS have no TopK, so they get --no-topk's graph
TARGETS = ("onnx", "rknn", "ncnn", "litert")
TOPK_FREE_TARGETS = ("rknn", "ncnn")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"expected comma-separated block indices, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-export",
        description=(
            "Trace an open_clip CLIP image tower, with TCA token condensation to a static budget, "
            "into ONNX (and TensorRT engines), plus text embeddings and a manifest, as one bundle "
            "folder that the torch-free runtime (vlm-edge) runs."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to export")
    what.add_argument(
        "--method",
        choices=["zeroshot", "tca", "rail", "tca+rail"],
        default="tca",
        help="zeroshot/rail: the full tower; tca, tca+rail: the condensing tower (default: tca)",
    )
    what.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    what.add_argument(
        "--pretrained",
        type=PathArg("file"),
        default="openai",
        help="open_clip pretrained tag (downloaded), a local checkpoint file, or 'none' for "
        "random weights (default: openai)",
    )
    what.add_argument(
        "--pretrained-tag",
        metavar="TAG",
        help="the open_clip tag whose weights the --pretrained FILE holds (e.g. openai): the "
        "model is built and its images prepared as that tag's (QuickGELU for openai); needed "
        "when the file does not say",
    )
    what.add_argument(
        "--force-quick-gelu",
        action="store_true",
        help="use QuickGELU whatever the weights say",
    )
    what.add_argument(
        "--classes",
        type=PathArg("file", Path),
        help="class list: one name per line (or a JSON list)",
    )
    what.add_argument(
        "--domain",
        type=PathArg("file", path_of=lambda value: value.partition("=")[2].strip()),
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a domain's class list, repeatable (rail, tca+rail); the label space is their union",
    )
    what.add_argument(
        "--dataset",
        help="a paper dataset (imagenet, imagenet_a, dtd, eurosat, ...): its classes, template set "
        "and TCA preset together (explicit --templates / --tca-preset still win)",
    )
    what.add_argument(
        "--templates",
        type=PathArg("file"),
        help="built-in template set (imagenet80, single, eurosat, ...; see --list-templates) or a "
        "file with one template per line containing {} (default: imagenet80; single for rail)",
    )
    tca = parser.add_argument_group("token condensation (tca, tca+rail)")
    tca.add_argument("--drop-rate", type=float, help="per-layer drop rate r (default 0.035)")
    tca.add_argument(
        "--drop-rates",
        metavar="R0,R1,...",
        help="a ladder of token budgets: one condensing engine per drop rate in one bundle, the "
        "weights stored once (e.g. 0,0.035,0.06,0.1; 0 keeps every token); vlm-edge run "
        "--target-ms picks a rung by measured latency",
    )
    tca.add_argument("--merge-centers", type=int, default=2, help="merge centres K (default 2)")
    tca.add_argument(
        "--ranking",
        choices=["mean", "consensus"],
        default="mean",
        help="token ranking: head-mean attention (released code) or rank consensus",
    )
    tca.add_argument(
        "--no-topk",
        dest="topk_free",
        action="store_true",
        help="build the condensation without TopK and gathers (pairwise ranks, one-hot MatMul), "
        "for NPU runtimes that lack them; same tokens and embeddings (--target rknn/ncnn imply it)",
    )
    tca.add_argument(
        "--reduction-layers",
        type=_layers,
        help="comma-separated block indices (default: L/4, L/2, 3L/4, e.g. 3,6,9)",
    )
    tca.add_argument(
        "--target-gflops",
        type=float,
        help="pick the largest token budget whose GFLOPs meet this (overrides r)",
    )
    tca.add_argument(
        "--tca-preset",
        help="reservoir hyperparameters (M, tau, lambda, beta) of a dataset preset (default: "
        "the --dataset's, else imagenet)",
    )
    tca.add_argument("--eviction", choices=["diversity", "entropy"], default="diversity")
    tca.add_argument(
        "--anchor-rule",
        choices=["all_classes", "per_class"],
        default="all_classes",
        help="when anchors switch on: once every class has 2 entries (reference), or "
        "per class as soon as it has one",
    )
    tca.add_argument(
        "--max-classes",
        type=int,
        metavar="N",
        help="class capacity of the condensing engine: the device may change its class list to "
        "up to N classes without a re-export (default: 1000, or the class count if larger)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--opset",
        type=int,
        default=17,
        choices=[16, 17],
        help="ONNX opset: 17 (default; TensorRT >= 8.6) or 16 (for older ONNX consumers)",
    )
    out.add_argument(
        "--target",
        choices=TARGETS,
        default="onnx",
        help="the runtime the graph is for: onnx (default), litert (keeps TopK), or rknn / ncnn "
        "(no TopK: the --no-topk graph)",
    )
    out.add_argument("--batch-size", type=int, default=1, help="static batch of the engine (1)")
    out.add_argument("--out", type=PathArg("folder", Path), help="bundle folder to create")
    out.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    out.add_argument("--quiet", action="store_true", help="no progress output")
    out.add_argument(
        "--no-text-encoder",
        dest="text_encoder",
        action="store_false",
        help="leave the text engine (text_encoder.onnx) and tokenizer out of the bundle; without "
        "them the device cannot change its classes",
    )
    out.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where torch computes the text embeddings: cpu (default) or cuda (a workstation GPU)",
    )
    add_tensorrt_arguments(parser)
    add_quantize_arguments(parser.add_argument_group("INT8"))
    info = parser.add_argument_group("information")
    info.add_argument(
        "--list-models",
        action="store_true",
        help="list the open_clip models whose image tower exports (ViTs) and exit",
    )
    info.add_argument("--list-templates", action="store_true", help="list template sets and exit")
    return parser


def _domains(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    from vlm_export.runtime.datasets.registry import get_dataset
    from vlm_export.runtime.text.class_lists import parse_domain_args, read_class_list

    if args.classes and args.domain:
        raise UserError("give either --classes or --domain NAME=FILE, not both")
    if args.dataset:
        if args.domain:
            raise UserError("give either --dataset or --domain NAME=FILE, not both")
        spec = get_dataset(args.dataset)
        if args.classes:
            return [(spec.name, read_class_list(args.classes))]
        return [(spec.name, spec.classes)]
    if args.domain:
        return parse_domain_args(args.domain)
    if args.classes is None:
        raise UserError("no classes given: pass --classes FILE (or --domain NAME=FILE)")
    return [(args.classes.stem, read_class_list(args.classes))]


def check_arguments(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The argument errors that need no model, found before torch is imported; the domains.

    Output folder, class lists (none given, empty: ``read_class_list``), model name (from
    open_clip's config files), templates, TCA preset, and pretrained weights that would have to
    be downloaded without network (open_clip's table read without torch).
    """
    from vlm_export.core.manifest import uses_condensation
    from vlm_export.export.bundle.writer import check_output_folder
    from vlm_export.export.presets import check_sizes, tca_settings
    from vlm_export.models.names import check_model_name
    from vlm_export.runtime.datasets.registry import get_dataset
    from vlm_export.runtime.text.templates import load_templates

    if args.out is None:
        raise UserError("--out DIR is required")
    check_output_folder(args.out, args.overwrite)
    check_sizes(args.max_classes, args.batch_size)
    if not uses_condensation(args.method):
        given = [
            flag
            for flag, value in (
                ("--drop-rate", args.drop_rate),
                ("--target-gflops", args.target_gflops),
            )
            if value is not None
        ]
        if given:
            raise UserError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} method tca or "
                f"tca+rail (exporting {args.method}, "
                "which keeps every token)"
            )
    if args.dataset:  # the dataset's templates and preset, unless given
        spec = get_dataset(args.dataset)
        args.templates = args.templates or spec.templates
        args.tca_preset = args.tca_preset or spec.tca_preset
    args.tca_preset = args.tca_preset or "imagenet"
    domains = _domains(args)
    check_model_name(args.model)
    if args.templates is not None:
        load_templates(args.templates)
    tca_settings(args.tca_preset, args.eviction, args.anchor_rule)
    _check_weights_reachable(args.model, args.pretrained)
    _check_pretrained_tag(args.model, args.pretrained, args.pretrained_tag)
    return domains


def _check_weights_reachable(model: str, pretrained: str) -> None:
    """A pretrained tag whose weights are neither cached nor downloadable: one line, now."""
    from vlm_export.models.offline import pretrained_cfg_without_torch, weights_problem

    if pretrained.lower() == "none" or Path(pretrained).expanduser().is_file():
        return
    cfg = pretrained_cfg_without_torch(model.removesuffix("-quickgelu"), pretrained)
    problem = weights_problem(model, pretrained, cfg) if cfg else None
    if problem:
        raise UserError(problem)


def _check_pretrained_tag(model: str, pretrained: str, tag: str | None) -> None:
    """--pretrained-tag goes with a checkpoint file and names a tag of the model."""
    from vlm_export.models.offline import pretrained_cfg_without_torch

    if tag is None:
        return
    if pretrained.lower() == "none" or not Path(pretrained).expanduser().is_file():
        raise UserError(
            f"--pretrained-tag names the tag of the weights in a local checkpoint file "
            f"(--pretrained FILE); {pretrained!r} is not one"
        )
    found = [
        pretrained_cfg_without_torch(name, tag)
        for name in (model, model.removesuffix("-quickgelu"))
    ]
    if all(cfg == {} for cfg in found):  # None: not readable here, load_clip checks it later
        raise UserError(f"{model} has no pretrained tag {tag!r} (--pretrained-tag)")


def _check_paths(args: argparse.Namespace) -> None:
    """The write guard: the bundle folder (replaced as a whole by --overwrite) may not hold an
    input file, nor be or lie inside one (core.paths)."""
    guard_arguments(build_parser(), args)


def run(args: argparse.Namespace) -> int:
    if args.list_templates:
        from vlm_export.runtime.text.templates import template_set_names

        print("\n".join(template_set_names()))
        return 0
    if args.list_models:
        from vlm_export.models.names import exportable_model_names

        names, others = exportable_model_names()
        print("\n".join(names))
        sys.stdout.flush()  # a closed pipe (| head) shows here, inside main's handling
        if others:
            print(
                f"vlm-export: {others} other open_clip models are not listed: their image towers "
                "are not CLS-pooled ViTs (ResNet, timm, attention or average pooling)",
                file=sys.stderr,
            )
        return 0
    _check_paths(args)  # first: an --out that holds an input is the more useful line
    missing = [name for name in ("torch", "open_clip") if importlib.util.find_spec(name) is None]
    if missing:  # a device install: quantize works there, exporting does not
        raise UserError(
            f"exporting needs {' and '.join(missing)} (the workstation side): pip install "
            '".[export]" on a workstation; on the device, vlm-export quantize and build-engine work'
        )
    domains = check_arguments(args)
    from vlm_export.export.graph.ladder import parse_drop_rates
    from vlm_export.export.pipeline import ExportOptions, export_bundle  # imports torch
    from vlm_export.models.schedule import CondensationConfig

    drop_rates = parse_drop_rates(args.drop_rates) if args.drop_rates is not None else None
    if drop_rates and args.drop_rate is not None:
        raise UserError("give either --drop-rate or --drop-rates, not both")

    options = ExportOptions(
        method=args.method,
        model=args.model,
        pretrained=args.pretrained,
        domains=domains,
        templates=args.templates,
        condensation=CondensationConfig(
            drop_rate=0.035 if args.drop_rate is None else args.drop_rate,
            merge_centers=args.merge_centers,
            ranking=args.ranking,
            reduction_layers=args.reduction_layers,
            topk_free=args.topk_free or args.target in TOPK_FREE_TARGETS,
        ),
        target_gflops=args.target_gflops,
        opset=args.opset,
        batch_size=args.batch_size,
        out=args.out,
        overwrite=args.overwrite,
        force_quick_gelu=args.force_quick_gelu,
        pretrained_tag=args.pretrained_tag,
        tca_preset=args.tca_preset,
        eviction=args.eviction,
        anchor_rule=args.anchor_rule,
        quiet=args.quiet,
        max_classes=args.max_classes,
        text_encoder=args.text_encoder,
        device=args.device,
        drop_rates=drop_rates,
    )
    if args.batch_size > 1:
        print(
            f"vlm-export: note: a batch-{args.batch_size} engine is for your own batched "
            "integration; vlm-edge's per-frame pipeline runs batch-1 bundles",
            file=sys.stderr,
        )
    preflight_tensorrt(args)
    if args.int8_calibration is not None:
        image_paths(args.int8_calibration)  # an empty or missing folder fails before the export

    def add_engines(folder: Path) -> None:  # to the complete bundle, before it is moved in
        run_tensorrt_step(args, folder, shown_as=args.out)
        run_quantize_step(args, folder, shown_as=args.out)

    adds_engines = getattr(args, "tensorrt", False) or args.int8_calibration is not None
    # once the bundle is in place, an interrupt no longer stops anything: it is said as written
    out = export_bundle(options, add_engines if adds_engines else None, placed=work_written)
    if options.pretrained.lower() == "none":
        print(
            "vlm-export: WARNING: this bundle holds RANDOM (untrained) weights: its predictions "
            "are meaningless; use it for tests and demos only",
            file=sys.stderr,
        )
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vlm-export``: one line and status 2 on errors, 130 on Ctrl-C."""
    # a Ctrl-C during torch's import may come back as another error; SIGTERM cleans up as
    # Ctrl-C does (no temporary folder left behind) and exits 143
    with sigterm_interrupts() as terminated:
        code = exit_status_of(lambda: _main(argv), "vlm-export: interrupted; nothing was written")
    return 128 + signal.SIGTERM if terminated and code == 130 else code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_messages("vlm-export"):
        return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    try:
        if argv[:1] == ["build-engine"]:
            return build_engine_main(argv[1:])
        if argv[:1] == ["build-ncnn"]:
            from vlm_export.export.ncnn.cmd import build_ncnn_main

            return build_ncnn_main(argv[1:])
        if argv[:1] == ["build-rknn"]:
            from vlm_export.export.rknn.cmd import build_rknn_main

            return build_rknn_main(argv[1:])
        if argv[:1] == ["quantize"]:
            from vlm_export.export.int8.quantize_cmd import quantize_main

            return quantize_main(argv[1:])
        if argv[:1] == ["build-litert"]:
            from vlm_export.export.litert.cmd import build_litert_main

            return build_litert_main(argv[1:])
        args = build_parser().parse_args(argv)
        return run(args)
    except UserError as exc:
        live_line.end()  # a progress bar showing: the error starts a line of its own
        print(f"vlm-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        live_line.end()
        print("vlm-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (vlm-export --list-models | head)
        stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a permission or I/O error that no step turned into a line
        live_line.end()
        print(f"vlm-export: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
