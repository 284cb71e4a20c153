"""``vlm-edge learn BUNDLE DATA_DIR [--domain NAME] --state FILE``: RAIL learns one domain.

DATA_DIR is class-per-folder, ``DATA_DIR/<class>/<images>``, each folder a class of the domain in
the bundle, or holds one folder per domain, ``DATA_DIR/<domain>/<class>/<images>`` (see
runtime.rail.dataset). --domain may be left out when the bundle has one domain. The first --shots
images of each class, in file-name order, are embedded by the bundle's engine (a condensing
engine runs with all anchors invalid, so these are the plain tower's features) and learned with
their global class indices. An existing --state is loaded and learning continues (the next
domain); classes it has already learned are refused, since their images would count twice. The
learner state, and the predict-only inference state if asked, are written atomically; on any
error the state files are left as they were.

DATA_DIR may instead be a file written by ``vlm-edge examples export``: its embeddings are
learned as they are (no engine runs), each example with the class of its label's name in the
domain; ``unknown`` examples add to G with targets 0 on every class (primal cholesky route), and
labels that are not classes of the domain are left out, with a note. --shots takes the first N
examples of each class by id.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import UserError
from vlm_export.core.labels import describe_change, labels_meta, saved_labels
from vlm_export.core.manifest import EMBEDDING_OUTPUT
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.commands import (
    BUNDLE,
    OUT,
    STATE,
    add_engine_arguments,
    media_tree,
    open_engine,
    status,
    verify_mode,
)
from vlm_export.runtime.commands._rail import (
    add_primal_arguments,
    add_shots_argument,
    check_shots,
    file_identity,
    learner_options,
    saving_unchanged,
    show_progress,
)
from vlm_export.runtime.engines.factory import capped_threads
from vlm_export.runtime.pipeline import Pipeline
from vlm_export.runtime.rail import footprint
from vlm_export.runtime.rail.dataset import (
    LabelledEmbeddings,
    LabelledImages,
    read_layout,
    training_images,
)
from vlm_export.runtime.rail.dual import DualAdapter
from vlm_export.runtime.rail.embed import embed_images
from vlm_export.runtime.rail.models import (
    FORMS,
    LearnerOptions,
    check_loaded,
    describe,
    new_learner,
    state_header,
)
from vlm_export.runtime.rail.primal import PrimalAdapter
from vlm_export.runtime.rail.relabel import follow_learner_labels
from vlm_export.runtime.rail.state import (
    Learner,
    load_learner_state,
    primal_sizes,
    save_inference_state,
    save_learner_state,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``learn`` subcommand."""
    parser = subparsers.add_parser(
        "learn",
        help="learn a domain's classes with RAIL from labelled images",
        description="Learn one domain with RAIL from class-per-folder images "
        "(DATA_DIR/<class>/<images>, or DATA_DIR/<domain>/<class>/<images>), continuing --state "
        "if it exists.",
    )
    parser.add_argument(
        "bundle", type=BUNDLE, metavar="BUNDLE", help="bundle folder written by vlm-export"
    )
    parser.add_argument(
        "data_dir",
        type=media_tree(3),
        metavar="DATA_DIR",
        help="class-per-folder images: DATA_DIR/<class>/<images> or DATA_DIR/<domain>/<class>/..."
        ", or a file written by vlm-edge examples export (embeddings: no engine runs)",
    )
    parser.add_argument(
        "--domain", help="the bundle domain of these classes (default: the bundle's only one)"
    )
    parser.add_argument(
        "--state",
        type=STATE,
        required=True,
        metavar="FILE",
        help="learner state file: continued if it exists, else started",
    )
    parser.add_argument(
        "--inference-state",
        type=OUT,
        metavar="FILE",
        help="also write the predict-only state (float32, no d_h x d_h matrix) for vlm-edge run",
    )
    add_shots_argument(parser, "every image")
    parser.add_argument(
        "--form",
        choices=FORMS,
        help="RAIL form of a new state (default primal: one d_h x d_h matrix, whatever the "
        "number of samples N). dual keeps every sample and an N x N matrix (8 N^2 bytes, about "
        "4 copies while it grows): right for up to a few thousand samples; past N ~ d_h "
        "(15000: the 16-shot 1,100-class reference has N = 17,600) primal is smaller and "
        "faster. A dual learn that would not fit in memory is refused",
    )
    add_primal_arguments(parser)
    add_engine_arguments(parser)
    scale = parser.add_argument_group(
        'scale-out on Ray (primal, cholesky route; pip install ".[ray]")'
    )
    scale.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="compute G and B on a Ray cluster: engine actors embed and accumulate, a tree "
        "reduction sums; the state is the one a single-machine learn writes. ADDRESS of a "
        "running cluster (ray start --head prints it; 'auto' on a cluster node), none: a "
        "local Ray instance",
    )
    scale.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="engine actors (default: one per CPU, or per GPU when the backend uses GPUs)",
    )
    return parser


def _learner(bundle: Bundle, path: str, options: LearnerOptions) -> Learner:
    """The state at ``path`` if it exists (options must agree with it), else a new learner.

    Either way a primal learner whose d_h x d_h matrix would not fit is refused first.
    """
    if Path(path).exists():
        sizes = primal_sizes(path)
        if sizes is not None:
            footprint.check_primal(f"continuing {path}", *sizes)
        header = state_header(path) or {}
        learner = load_learner_state(path, bundle.fingerprint, bundle.engine_fingerprint)
        saved, labels = saved_labels(header, path), bundle.labels
        if saved is not None and saved != labels:  # the bundle's classes changed since
            learner = follow_learner_labels(learner, saved, labels, path)
            status(f"{path} follows the bundle's classes by name: {describe_change(saved, labels)}")
        check_loaded(learner, options, path)
        status(f"continuing {path}: {describe(learner)}")
        return learner
    return new_learner(bundle, options.form or "primal", options)


def _domain(bundle: Bundle, domain: str | None) -> str:
    """--domain, or the bundle's only domain when it is left out."""
    if domain is not None:
        bundle.domain_class_indices(domain)  # an unknown domain is refused here
        return domain
    if len(bundle.domains) != 1:
        shown = ", ".join(name[:80] for name in bundle.domains[:10])
        raise UserError(
            f"the bundle has {len(bundle.domains)} domains ({shown}): name one with --domain"
        )
    status(f"domain {bundle.domains[0]} (the bundle's only one)")
    return bundle.domains[0]


def _check_new_classes(
    bundle: Bundle,
    learner: Learner,
    data: LabelledImages | LabelledEmbeddings,
    domain: str,
    state: str,
) -> None:
    """Refuse classes the state has learned already; note the domain's classes left out."""
    again = [bundle.classes[i] for i in data.classes if learner.learned_mask[i]]
    if again:
        raise UserError(
            f"{state} has already learned {', '.join(again)} (domain {domain}); their images "
            "would count twice: leave those folders out or start a new state file"
        )
    indices = [int(i) for i in bundle.domain_class_indices(domain)]
    absent = [bundle.classes[i] for i in indices if i not in data.classes]
    if absent:
        what = "folder" if isinstance(data, LabelledImages) else "examples"
        status(f"note: no {what} for {len(absent)} class(es) of {domain}: {', '.join(absent)}")


def _learn_on_ray(
    bundle: Bundle, learner: Learner, data: LabelledImages, args: argparse.Namespace
) -> str:
    """Embed and accumulate ``data`` on Ray workers, add G and B to ``learner``; say where."""
    if not isinstance(learner, PrimalAdapter):
        raise UserError("--ray computes the primal form's statistics; the dual form learns here")
    from vlm_export.runtime.rail.scaleout import RayStatistics

    engine = {
        "backend": args.backend,
        "providers": args.providers.split(",") if args.providers else None,
        # a local Ray instance shares this machine's cores; a cluster's nodes have their own
        "threads": capped_threads(args.threads) if not args.ray else args.threads,
    }
    with RayStatistics(bundle, learner, args.ray or None, args.workers, engine, status) as cluster:
        cluster.accumulate(data.paths, data.labels)
        cluster.reduce_into(learner)
        return f"Ray ({len(cluster.workers)} workers)"


def _learn_exported(bundle: Bundle, learner: Learner, args: argparse.Namespace) -> None:
    """Learn the examples of an ``examples export`` file (DATA_DIR), on Ray with --ray."""
    from vlm_export.runtime.teach.transfer import training_examples

    data = training_examples(bundle, Path(args.data_dir), args.domain, args.shots, status)
    _check_new_classes(bundle, learner, data, args.domain, args.state)
    if isinstance(learner, DualAdapter):
        footprint.check_dual(learner.in_dim, learner.num_classes, learner.num_samples + len(data))
    unknown = int((data.labels < 0).sum())
    if unknown and not (isinstance(learner, PrimalAdapter) and learner.route == "cholesky"):
        status(f"note: {unknown} 'unknown' examples left out (they need the primal cholesky route)")
        data = data.known()
    start = time.perf_counter()
    if args.ray is not None:
        if not isinstance(learner, PrimalAdapter):
            raise UserError(
                "--ray computes the primal form's statistics; the dual form learns here"
            )
        from vlm_export.runtime.rail.scaleout import RayStatistics

        with RayStatistics(bundle, learner, args.ray or None, args.workers, None, status) as ray:
            ray.accumulate_embeddings(data.features, data.labels)
            ray.reduce_into(learner)
            where = f"Ray ({len(ray.workers)} workers)"
    else:
        known = data.known()
        learner.partial_fit(known.features, known.labels)
        if unknown:
            learner.accumulate_unlabelled(data.features[data.labels < 0])
        where = "this machine"
    status(
        f"learned {len(data)} exported examples ({unknown} unknown) of {len(data.classes)} "
        f"classes on {where} in {time.perf_counter() - start:.1f} s"
    )


def handle(args: argparse.Namespace) -> int:
    """Embed the domain's shots, learn them, save the state(s); return the exit status."""
    check_shots(args.shots)
    if args.workers is not None and args.ray is None:
        raise UserError("--workers sets the number of Ray workers: it needs --ray")
    for path in filter(None, (args.state, args.inference_state)):
        check_can_create(path)  # before minutes of embedding and solving, not after
    bundle = Bundle.open(args.bundle, verify=verify_mode(args))
    loaded = file_identity(args.state)  # before reading: a save by another run shows at ours
    learner = _learner(bundle, args.state, learner_options(args, args.form))
    args.domain = _domain(bundle, args.domain)
    if Path(args.data_dir).is_file():
        _learn_exported(bundle, learner, args)
    else:
        _learn_images(bundle, learner, args)
    if not getattr(learner, "solved", True):  # seconds to minutes of LAPACK (Ctrl-C: at once)
        width = getattr(learner, "feature_dim", None)
        system = f" {width:,} x {width:,}" if width else ""
        status(f"solving the{system} ridge system")
    learner.finalize()
    follow = labels_meta(bundle.engine_fingerprint, bundle.labels)
    with saving_unchanged(args.state, loaded, "learning"):  # the primary state first
        save_learner_state(args.state, learner, bundle.fingerprint, follow)
    status(f"learned domain {args.domain}; {args.state}: {describe(learner)}")
    if args.inference_state:
        save_inference_state(args.inference_state, learner, bundle.fingerprint, follow)
        status(f"inference state saved to {args.inference_state}")
    return 0


def _learn_images(bundle: Bundle, learner: Learner, args: argparse.Namespace) -> None:
    """Embed the domain's image shots with the bundle's engine (on Ray with --ray), learn them."""
    layout = read_layout(bundle, Path(args.data_dir), [args.domain])
    status(layout.describe())
    data = training_images(bundle, args.domain, layout.folder(args.domain), args.shots)
    _check_new_classes(bundle, learner, data, args.domain, args.state)
    if isinstance(learner, DualAdapter):
        footprint.check_dual(learner.in_dim, learner.num_classes, learner.num_samples + len(data))
    start = time.perf_counter()
    if args.ray is not None:
        where = _learn_on_ray(bundle, learner, data, args)
    else:
        with contextlib.ExitStack() as stack:
            backend = open_engine(bundle, args)
            stack.callback(backend.close)
            pipeline = Pipeline(bundle, backend, "zeroshot")
            pipeline.preprocessor.max_pixels = args.max_pixels
            features, _ = embed_images(pipeline, data.paths, EMBEDDING_OUTPUT, show_progress(args))
        learner.partial_fit(features, data.labels)
        where = backend.description
    status(
        f"embedded {len(data)} images of {len(data.classes)} classes on {where} "
        f"in {time.perf_counter() - start:.1f} s"
    )
