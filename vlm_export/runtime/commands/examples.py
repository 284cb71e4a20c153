"""``vlm-edge examples export|import``: a taught, labelled set moved between devices as one file.

``export STATE_DIR_OR_DB OUT.npz`` writes every example of a service's example database (its
``--state-dir``, whose ``teach/examples.sqlite`` it reads, or the database file) with the image
engine's fingerprint, atomically;
``import STATE_DIR_OR_DB IN.npz`` adds a file's examples to a database (created if missing),
each id once: examples held already, or deleted there before, are left as they are. A file of
another image engine is refused. The file also feeds ``vlm-edge learn BUNDLE FILE``. Stop the
service that uses the database before importing into it: it learns its examples when it starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm_export.core.atomic import check_can_create
from vlm_export.core.errors import StateError, UserError
from vlm_export.core.paths import PathArg
from vlm_export.runtime.commands import OUT, READ, status


def _database(text: str) -> str:
    """The database file STATE_DIR_OR_DB names (``teach.store.database_path``)."""
    from vlm_export.runtime.teach.store import database_path  # the launcher stays light

    return str(database_path(text))


DATABASE_READ = PathArg("file", path_of=_database)
DATABASE_STATE = PathArg("state", path_of=_database)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``examples`` subcommand and its ``export`` and ``import`` commands."""
    parser = subparsers.add_parser(
        "examples",
        help="export or import taught examples (embeddings and labels) as one file",
        description="Move the examples taught to a vlm-edge serve between devices, or into "
        "vlm-edge learn, as one .npz file (embeddings, labels, ids; no images).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export", help="write a database's examples to a file", description="Write every "
        "example of STATE_DIR_OR_DB (a serve --state-dir, or its teach/examples.sqlite) to OUT.",
    )  # fmt: skip
    export.add_argument(
        "database", type=DATABASE_READ, metavar="STATE_DIR_OR_DB", help="the examples to export"
    )
    export.add_argument("out", type=OUT, metavar="OUT", help="the .npz file to write")
    imported = actions.add_parser(
        "import", help="add a file's examples to a database", description="Add the examples "
        "of IN to STATE_DIR_OR_DB (created if missing), each id once.",
    )  # fmt: skip
    imported.add_argument(
        "database",
        type=DATABASE_STATE,
        metavar="STATE_DIR_OR_DB",
        help="the database to add to, created if missing (stop the service using it first)",
    )
    imported.add_argument("file", type=READ, metavar="IN", help="a file written by export")
    return parser


def handle(args: argparse.Namespace) -> int:
    """Run ``export`` or ``import``; return the exit status."""
    return _export(args) if args.action == "export" else _import(args)


def _export(args: argparse.Namespace) -> int:
    from vlm_export.runtime.teach.store import read_database
    from vlm_export.runtime.teach.transfer import write_examples

    path = Path(_database(args.database))
    check_can_create(args.out)
    fingerprint, dim, examples = read_database(path)  # read only: the database is not changed
    write_examples(args.out, examples, fingerprint, dim)
    labels = {example.label for example in examples}
    status(f"exported {len(examples)} examples of {len(labels)} labels from {path} to {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from vlm_export.runtime.teach.store import DB_NAME, TEACH_FOLDER, ExampleStore, recorded_meta
    from vlm_export.runtime.teach.transfer import read_examples

    path = Path(_database(args.database))
    if not Path(args.file).is_file():
        raise UserError(f"no such file: {args.file}")
    exported = read_examples(args.file)
    recorded = recorded_meta(path)
    if recorded is not None and recorded != (exported.fingerprint, exported.dim):
        raise StateError(
            f"{args.file} holds examples of another image engine (fingerprint "
            f"{exported.fingerprint}, width {exported.dim}) than {path} ({recorded[0]}, width "
            f"{recorded[1]}): nothing imported"
        )
    if recorded is None:
        if path.parent.name == TEACH_FOLDER and path.name == DB_NAME:  # a state dir's
            path.parent.mkdir(parents=True, exist_ok=True)
        check_can_create(path)
    store = ExampleStore.open(path, exported.fingerprint, exported.dim)
    try:  # shared: a serve --fleet on this database publishes them at its start
        new = sum(store.add_all(exported.examples, share=True))
        total = store.count()
    finally:
        store.close()
    made = "created " if recorded is None else ""
    status(
        f"imported {args.file} into {made}{path}: {new} new of {len(exported.examples)} examples "
        f"({len(exported.examples) - new} held or deleted there already); {total} examples now"
    )
    return 0
