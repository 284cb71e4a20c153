"""Taught examples in SQLite (WAL, synchronous FULL): nothing answered is ever lost.

One database file in the state directory holds the examples (embedding as float32 bytes, label,
source, time, origin, JPEG thumbnail), the tombstones of deleted ids (so that an id is applied
once: a replayed add of a deleted example changes nothing) and the bundle fingerprint and
embedding width it was made for (a database of another bundle is refused).

The fingerprint to record is the image engine's (``Bundle.engine_fingerprint``), not
``Bundle.fingerprint``: the latter changes with the class list, and teaching a new label adds a
class. Embeddings depend on the engine alone, and labels are names, not class rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vlm_export.core.errors import StateError, UserError
from vlm_export.runtime.teach.examples import Example, check_id, check_label

SCHEMA_VERSION = 1
#: the database's name, in the folder TEACH_FOLDER of a ``serve --state-dir``
DB_NAME = "examples.sqlite"
TEACH_FOLDER = "teach"
_COLUMNS = "id, label, source, time_utc, origin, embedding"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    time_utc TEXT NOT NULL,
    origin TEXT NOT NULL,
    embedding BLOB NOT NULL,
    thumbnail BLOB
);
CREATE INDEX IF NOT EXISTS examples_label ON examples (label);
CREATE INDEX IF NOT EXISTS examples_source ON examples (source);
CREATE INDEX IF NOT EXISTS examples_time ON examples (time_utc, seq);
CREATE TABLE IF NOT EXISTS tombstones (id TEXT PRIMARY KEY);
"""


class ExampleStore:
    """Examples in SQLite (WAL). Thread-safe (one connection under a lock)."""

    def __init__(self, connection: sqlite3.Connection, where: str, dim: int) -> None:
        self._db = connection
        self._where = where
        self.dim = dim
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path | None, bundle_fingerprint: str, dim: int) -> ExampleStore:
        """Open (or create) the database at ``path`` (None: in memory) for this bundle and
        embedding width; StateError (one line) for another bundle's, another width's, or a
        file that is not such a database."""
        where = ":memory:" if path is None else str(path)
        if path is not None and Path(path).is_dir():
            raise StateError(f"{path} is a folder, not an example database")
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise StateError(f"{path} is not a regular file (a device, FIFO or socket)")
        try:
            connection = sqlite3.connect(
                where, check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the example database {where}: {exc}") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            _check_meta(connection, where, bundle_fingerprint, dim)
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise StateError(f"{where} is not a readable example database ({exc})") from None
        except StateError:
            connection.close()
            raise
        return cls(connection, where, dim)

    @property
    def journal_mode(self) -> str:
        """SQLite's journal mode of this database ('wal' on a file, 'memory' in memory)."""
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, example: Example) -> bool:
        """Store ``example``; False (nothing changed) if its id is held or was deleted before."""
        return self.add_all([example])[0]

    def add_all(self, examples: Sequence[Example]) -> list[bool]:
        """Store several examples in one transaction (one sync to disk: an import); for each,
        whether it was new. All are checked before any is stored: a bad one stores none."""
        rows = [self._row(example) for example in examples]
        added = []
        with self._transaction() as db:
            for row in rows:
                if db.execute("SELECT 1 FROM tombstones WHERE id = ?", (row[0],)).fetchone():
                    added.append(False)
                    continue
                cursor = db.execute(
                    f"INSERT OR IGNORE INTO examples ({_COLUMNS}, thumbnail) "
                    "VALUES (?,?,?,?,?,?,?)",
                    row,
                )
                added.append(cursor.rowcount == 1)
        return added

    def _row(self, example: Example) -> tuple:
        """The database row of ``example``; UserError for a bad id, label or embedding."""
        check_id(example.id)
        if check_label(example.label) != example.label:
            raise UserError(f"a label must not start or end with spaces: {example.label!r}")
        embedding = np.ascontiguousarray(example.embedding, dtype="<f4")
        if embedding.shape != (self.dim,):
            raise UserError(
                f"an embedding must have shape [{self.dim}], got {list(embedding.shape)}"
            )
        return (
            example.id,
            example.label,
            example.source,
            example.time_utc,
            example.origin,
            embedding.tobytes(),
            example.thumbnail,
        )

    def delete(self, example_id: str, tombstone: bool = True) -> Example | None:
        """Remove an example and leave a tombstone (also for an id not held: a delete that
        arrives before its add wins). The example removed, or None if it was not held.
        ``tombstone=False`` takes back an add that could not be completed (the id may come
        again)."""
        check_id(example_id)
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, thumbnail FROM examples WHERE id = ?", (example_id,)
            ).fetchone()
            db.execute("DELETE FROM examples WHERE id = ?", (example_id,))
            if tombstone:
                db.execute("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", (example_id,))
        return None if row is None else self._example(row)

    def known(self, example_id: str) -> bool:
        """True when ``example_id`` is held or was deleted (an add of it changes nothing)."""
        rows = self._query(
            "SELECT 1 FROM examples WHERE id = ? UNION ALL SELECT 1 FROM tombstones WHERE id = ?",
            (example_id, example_id),
        )
        return bool(rows)

    def get(self, example_id: str) -> Example | None:
        """The example of this id (with its thumbnail), or None."""
        rows = self._query(
            f"SELECT {_COLUMNS}, thumbnail FROM examples WHERE id = ?", (example_id,)
        )
        return self._example(rows[0]) if rows else None

    def page(
        self,
        *,
        label: str | None = None,
        source: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> list[Example]:
        """Examples with thumbnails, newest first (by time taught), filtered by label/source."""
        where, args = _filters(label, source)
        rows = self._query(
            f"SELECT {_COLUMNS}, thumbnail FROM examples{where} "
            "ORDER BY time_utc DESC, seq DESC LIMIT ? OFFSET ?",
            (*args, max(int(limit), 0), max(int(offset), 0)),
        )
        return [self._example(row) for row in rows]

    def count(self, label: str | None = None, source: str | None = None) -> int:
        """How many examples (of this label and/or source)."""
        where, args = _filters(label, source)
        return int(self._query(f"SELECT COUNT(*) FROM examples{where}", args)[0][0])

    def counts(self) -> dict[str, int]:
        """Examples per label, labels sorted."""
        rows = self._query("SELECT label, COUNT(*) FROM examples GROUP BY label ORDER BY label")
        return {label: int(count) for label, count in rows}

    def all(self) -> list[Example]:
        """Every example, sorted by id, without thumbnails."""
        rows = self._query(f"SELECT {_COLUMNS}, NULL FROM examples ORDER BY id")
        return [self._example(row) for row in rows]

    def ids(self) -> list[str]:
        """Every example id, sorted."""
        return [row[0] for row in self._query("SELECT id FROM examples ORDER BY id")]

    def deleted_ids(self) -> set[str]:
        """The ids deleted so far (tombstones)."""
        return {row[0] for row in self._query("SELECT id FROM tombstones")}

    def digest(self) -> str:
        """sha256 (hex) over the sorted ids, one per line: the name of the set of examples."""
        return ids_digest(self.ids())

    def close(self) -> None:
        """Close the database (a checkpoint of the WAL into the main file happens here)."""
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _example(self, row: tuple) -> Example:
        example_id, label, source, time_utc, origin, blob, thumbnail = row
        embedding = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if embedding.shape != (self.dim,):
            raise StateError(f"{self._where}: example {example_id} has a corrupt embedding")
        return Example(example_id, label, source, time_utc, embedding, origin, thumbnail)


def database_path(state_dir_or_db: str | Path) -> Path:
    """The example database a path names: a folder holding ``DB_NAME`` (the teach folder) gives
    that file; any other folder is a ``serve --state-dir``: its ``TEACH_FOLDER/DB_NAME``; a file
    path is itself."""
    path = Path(state_dir_or_db)
    if not path.is_dir():
        return path
    if (path / DB_NAME).exists():
        return path / DB_NAME
    return path / TEACH_FOLDER / DB_NAME


def recorded_meta(path: str | Path) -> tuple[str, int] | None:
    """(bundle fingerprint, dim) an existing database records, read without changing it; None
    when there is no file. StateError for a file that is not an example database."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise StateError(f"{path} is a folder, not an example database")
    if not path.is_file():  # never opened: a FIFO blocks SQLite's open, Ctrl-C included
        raise StateError(f"{path} is not a regular file (a device, FIFO or socket)")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            held = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        finally:
            connection.close()
        return str(held["bundle"]), int(held["dim"])
    except (sqlite3.Error, KeyError, ValueError) as exc:
        raise StateError(f"{path} is not a readable example database ({exc})") from None


def ids_digest(ids: list[str]) -> str:
    """sha256 (hex) over ``ids`` sorted, one per line (the digest of an empty set is sha256 of
    no bytes)."""
    return hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode()).hexdigest()


def _filters(label: str | None, source: str | None) -> tuple[str, tuple]:
    clauses, args = [], []
    if label is not None:
        clauses.append("label = ?")
        args.append(label)
    if source is not None:
        clauses.append("source = ?")
        args.append(source)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def _check_meta(db: sqlite3.Connection, where: str, fingerprint: str, dim: int) -> None:
    """Record bundle, dim and schema on first open; refuse a database made for others."""
    expected = {"schema_version": str(SCHEMA_VERSION), "bundle": fingerprint, "dim": str(dim)}
    db.execute("BEGIN IMMEDIATE")
    try:
        held = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not held:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", expected.items())
    finally:
        db.execute("COMMIT")
    if not held:
        return
    if held.get("schema_version") != expected["schema_version"]:
        raise StateError(
            f"{where} has example schema {held.get('schema_version')}, this version reads "
            f"{SCHEMA_VERSION}"
        )
    if held.get("bundle") != fingerprint:
        raise StateError(
            f"{where} holds the examples of another bundle (fingerprint {held.get('bundle')}, "
            f"this bundle is {fingerprint})"
        )
    if held.get("dim") != str(dim):
        raise StateError(
            f"{where} holds embeddings of width {held.get('dim')}, this bundle's are {dim}"
        )
