"""``vlm-edge merge OUT STATE STATE...``: the exact joint RAIL learner of several devices' states.

Primal (cholesky route) states add their statistics G and B and are solved once; dual states join
their samples by block updates. Either way the result equals one device having learned all the
data (spec/rail.md section 2). All states must share form and hyperparameters (same seed, d_h,
ridge or gamma) and come from the same bundle: every state records its bundle's fingerprint, all
must agree, and with --bundle they must also be that bundle's, or be of its image engine with
other classes (before or after ``vlm-edge classes``): those follow its classes by name. OUT is
written atomically and may not be one of the inputs.
"""

from __future__ import annotations

import argparse
from typing import Any

from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import StateError, UserError
from vlm_export.core.labels import labels_meta, saved_labels
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import BUNDLE, OUT, READ, add_verify_arguments, status, verify_mode
from vlm_export.runtime.commands._rail import file_identity, same_file, saving_unchanged
from vlm_export.runtime.rail import footprint
from vlm_export.runtime.rail.models import describe, state_header
from vlm_export.runtime.rail.state import (
    load_learner_state,
    merge_learner_files,
    primal_sizes,
    save_inference_state,
    save_learner_state,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``merge`` subcommand."""
    parser = subparsers.add_parser(
        "merge",
        help="merge RAIL learner states from several devices into the joint learner",
        description="Merge RAIL learner states learned from the same bundle and seed on several "
        "devices into OUT, the exact joint learner.",
    )
    parser.add_argument("out", type=OUT, metavar="OUT", help="the merged learner state to write")
    parser.add_argument(
        "states", type=READ, nargs="+", metavar="STATE", help="learner states to merge"
    )
    parser.add_argument(
        "--bundle",
        type=BUNDLE,
        help="the bundle the states are for: each must come from it, or from its image engine "
        "with other classes (before or after `vlm-edge classes`: followed by class name)",
    )
    parser.add_argument(
        "--inference-state",
        type=OUT,
        metavar="FILE",
        help="also write the merged predict-only state",
    )
    add_verify_arguments(parser, what="--bundle's")
    return parser


def _check_states(args: argparse.Namespace) -> None:
    if len(args.states) < 2:
        raise UserError("merge needs at least two learner states")
    for index, state in enumerate(args.states):  # outputs: the write guard (core.paths)
        for other in args.states[:index]:
            if same_file(other, state):
                raise UserError(f"{state} is given twice (its samples would count twice)")


def _first_fingerprint(path: str) -> str:
    """The bundle fingerprint the first state records (without --bundle all must carry it)."""
    header = state_header(path)
    if header is None or not isinstance(header.get("bundle"), str):
        load_learner_state(path, None)  # says what is wrong with the file
        raise StateError(f"{path} records no bundle fingerprint")
    return header["bundle"]


def _check_origins(args: argparse.Namespace, fingerprint: str, bundle: Bundle | None) -> None:
    """Refuse, from the headers alone, a state of another bundle (with --bundle: of another image
    engine, or one that does not record its labels)."""
    reference = f"bundle {args.bundle}" if bundle else args.states[0]
    for path in args.states:
        header = state_header(path) or {}
        found = header.get("bundle", fingerprint)
        if found == fingerprint:
            continue
        engine = header.get("engine")
        if bundle is not None and engine == bundle.engine_fingerprint and "labels" in header:
            continue  # the same engine with other classes: it follows the bundle's by name
        hint = ""
        if bundle is None and engine is not None and engine == _engine_of(args.states[0]):
            hint = "; its image engine is the same: give --bundle BUNDLE to merge by class name"
        raise StateError(
            f"{path} was made with another bundle (fingerprint {found}) than {reference} "
            f"({fingerprint}){hint}"
        )


def _engine_of(path: str) -> str | None:
    engine = (state_header(path) or {}).get("engine")
    return engine if isinstance(engine, str) else None


def _label_fields(path: str) -> dict[str, Any]:
    """The engine fingerprint and labels a state records, refused when corrupt as ``run``
    refuses them (from the header alone), so that OUT never records what no reader takes."""
    header = state_header(path) or {}
    labels = saved_labels(header, path)
    if labels is None:  # a state saved before labels were recorded
        return {}
    classes = header.get("num_classes")  # not a count: loading the state refuses it
    if type(classes) is int and len(labels) != classes:
        raise StateError(f"{path} records {len(labels)} labels for {classes} classes")
    fields: dict[str, Any] = {"labels": [[domain, name] for domain, name in labels]}
    engine = header.get("engine")
    if engine is not None:
        if not isinstance(engine, str):
            raise StateError(f"{path} has a corrupt header (field 'engine')")
        fields["engine"] = engine
    return fields


def _check_memory(path: str) -> None:
    """Refuse, before loading, a primal merge whose d_h x d_h matrix would not fit."""
    sizes = primal_sizes(path)
    if sizes is not None:
        footprint.check_primal(f"merging {path}", *sizes)


def handle(args: argparse.Namespace) -> int:
    """Load, check, merge and write; return the exit status."""
    _check_states(args)
    for path in filter(None, (args.out, args.inference_state)):
        check_can_create(path)
    existing = file_identity(args.out)  # a save over OUT by another run meanwhile is refused
    bundle = Bundle.open(args.bundle, verify=verify_mode(args)) if args.bundle else None
    fingerprint = bundle.fingerprint if bundle else _first_fingerprint(args.states[0])
    _check_origins(args, fingerprint, bundle)  # headers only: before loading anything
    _check_memory(args.states[0])
    # one d_h x d_h matrix in memory: the first state's; the others' are added from their files
    if bundle is not None:
        engine, labels = bundle.engine_fingerprint, bundle.labels
        merged = merge_learner_files(args.states, fingerprint, engine, labels)
        follow = labels_meta(engine, labels)
    else:
        follow = _label_fields(args.states[0])  # the same bundle's: OUT records them too
        merged = merge_learner_files(args.states, fingerprint)
    with saving_unchanged(args.out, existing, "merging"):
        save_learner_state(args.out, merged, fingerprint, follow)
    status(f"merged {len(args.states)} learner states into {args.out}: {describe(merged)}")
    if args.inference_state:
        save_inference_state(args.inference_state, merged, fingerprint, follow)
        status(f"inference state saved to {args.inference_state}")
    return 0
