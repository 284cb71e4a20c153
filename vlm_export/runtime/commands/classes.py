"""``vlm-edge classes BUNDLE CLASSES_FILE``: replace the bundle's classes on the device.

The bundle's text engine embeds the new class names with the bundle's templates (or
``--templates``), exactly as ``vlm-export`` would; the new text embeddings, class list and manifest
replace the old ones atomically (the engines stay as they are). A condensing engine takes up to its
class capacity (``vlm-export --max-classes``). Adaptation states follow their classes by name.
"""

from __future__ import annotations

import argparse
import sys

from vlm_export.core import live_line
from vlm_export.core.labels import describe_change
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import BUNDLE_RW, READ, add_verify_arguments, status, verify_mode
from vlm_export.runtime.text.bundle_classes import check_readable, write_label_space
from vlm_export.runtime.text.class_lists import read_class_list
from vlm_export.runtime.text.label_space import (
    LabelSpace,
    choose_templates,
    embed_label_space,
    new_labels,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``classes`` subcommand."""
    parser = subparsers.add_parser(
        "classes",
        help="replace the bundle's classes (text engine on the device, no re-export)",
        description="Replace BUNDLE's label space with the classes of CLASSES_FILE, in place and "
        "atomically: the bundle's text engine embeds them with the bundle's templates (or "
        "--templates). TCA and RAIL states keep their rows by class name.",
    )
    parser.add_argument("bundle", type=BUNDLE_RW, help="bundle folder written by vlm-export")
    parser.add_argument("classes", type=READ, help="class list: one name per line (or a JSON list)")
    add_label_space_arguments(parser, domain=True)
    add_verify_arguments(parser)
    return parser


def add_label_space_arguments(parser: argparse._ActionsContainer, domain: bool) -> None:
    """--templates (and --domain), as ``classes`` and ``run --classes`` take them."""
    parser.add_argument(
        "--templates",
        type=READ,
        metavar="NAME|FILE",
        help="prompt templates: a built-in set or a file, one template with {} per line "
        "(default: the bundle's)",
    )
    if domain:
        parser.add_argument(
            "--domain",
            metavar="NAME",
            help="the domain whose classes the file replaces (or a new one); needed for bundles "
            "of several domains (default: the bundle's only domain)",
        )
    parser.add_argument(
        "--text-backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="what runs the text engine (default auto)",
    )


def compute_label_space(
    bundle: Bundle,
    classes_file: str,
    templates: str | None,
    domain: str | None,
    text_backend: str = "auto",
) -> LabelSpace:
    """Read the class file and embed it for ``bundle`` (one-line UserErrors for bad input)."""
    from vlm_export.runtime.text.encoder import TextEncoder

    names = read_class_list(classes_file)
    encoder = TextEncoder.open(bundle, text_backend)  # checks the text engine and vocabulary
    chosen, spec = choose_templates(bundle, templates)
    labels, domains = new_labels(bundle, names, domain)
    check_readable(labels, domains)  # the loader's limits, before minutes of embedding
    return embed_label_space(bundle, labels, domains, chosen, spec, encoder, _progress())


def _progress():
    """A stderr progress line of prompts embedded (when stderr is a terminal), else None."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        live_line.draw(f"vlm-edge: {done}/{total} prompts embedded")
        if done == total:
            live_line.finish()

    return show


def handle(args: argparse.Namespace) -> int:
    """Compute the new label space, then swap it into the bundle."""
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    space = compute_label_space(
        bundle, args.classes, args.templates, args.domain, args.text_backend
    )
    write_label_space(bundle, space)
    change = describe_change(bundle.labels, space.labels)
    templates = f"{len(space.templates)} templates '{space.template_spec}'"
    status(
        f"wrote {len(space.labels)} classes into {args.bundle} ({change}; {space.embedded} "
        f"embedded with {templates})"
    )
    capacity = bundle.class_capacity
    if capacity is not None:
        status(f"class capacity of the engine: {len(space.labels)} of {capacity} used")
    return 0
