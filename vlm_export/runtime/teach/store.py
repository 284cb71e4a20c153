"""Taught examples in SQLite (WAL, synchronous FULL): nothing answered is ever lost.

One database file in the state directory holds the examples (embedding as float32 bytes, label,
source, time, origin, JPEG thumbnail), the tombstones of deleted ids (so that an id is applied
once: a replayed add of a deleted example changes nothing) and the bundle fingerprint and
embedding width it was made for (a database of another bundle is refused).

It also keeps the outbox: what this device still has to tell its fleet (its own adds and deletes,
and imported examples, until the broker acknowledged them), so a change made while the broker was
away, or before a crash, reaches the fleet at the next start, and only those are sent again.

The file is watched while it is open: deleted under a running service, it is written again from
the open copy at the next change (nothing answered is lost); replaced by another file or folder,
changes are refused (StoreUnavailable, HTTP 503) until the service is restarted. A write that
waits more than ``BUSY_TIMEOUT_S`` for another process's lock is refused the same way; reads use
their own connection and never wait behind a write.

The fingerprint to record is the image engine's (``Bundle.engine_fingerprint``), not
``Bundle.fingerprint``: the latter changes with the class list, and teaching a new label adds a
class. Embeddings depend on the engine alone, and labels are names, not class rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vlm_export.core.errors import StateError, UserError, shown, shown_path
from vlm_export.runtime.teach.examples import Example, check_id, check_label

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: the widest embedding a database may record (CLIP's are 512 to 1024)
MAX_DIM = 16384
#: how long a change waits for another process's lock on the database before it is refused
BUSY_TIMEOUT_S = 5.0
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
CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, op TEXT NOT NULL);
"""


class StoreUnavailable(StateError):
    """The database cannot take a change now: locked by another process, replaced under the
    service, or not writable (HTTP 503)."""

    http_status = 503


class ExampleStore:
    """Examples in SQLite (WAL). Thread-safe: changes on one connection under a lock, reads on a
    second one (a file) under their own."""

    def __init__(self, path: Path | None, bundle_fingerprint: str, dim: int) -> None:
        self.path = path
        self.dim = dim
        self._where = ":memory:" if path is None else str(path)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._db = self._reader = self._connect()
        try:
            _prepare(self._db, self._where, bundle_fingerprint, dim)
            if path is None:  # one connection in memory: reads take the write lock too
                self._read_lock = self._lock
            else:
                self._reader = self._connect()
        except sqlite3.DatabaseError as exc:
            self._close_connections()
            raise StateError(f"{self._where} is not a readable example database ({exc})") from None
        except BaseException:
            self._close_connections()
            raise
        self._identity = None if path is None else _identity(path)

    @classmethod
    def open(cls, path: str | Path | None, bundle_fingerprint: str, dim: int) -> ExampleStore:
        """Open (or create) the database at ``path`` (None: in memory) for this bundle and
        embedding width; StateError (one line) for another bundle's, another width's, or a
        file that is not such a database."""
        if path is not None and Path(path).is_dir():
            raise StateError(f"{path} is a folder, not an example database")
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise StateError(f"{path} is not a regular file (a device, FIFO or socket)")
        return cls(None if path is None else Path(path), bundle_fingerprint, dim)

    def _connect(self) -> sqlite3.Connection:
        """A connection in WAL mode, synchronous FULL, waiting BUSY_TIMEOUT_S for locks."""
        try:
            connection = sqlite3.connect(
                self._where, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the example database {self._where}: {exc}") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise StateError(f"{self._where} is not a readable example database ({exc})") from None
        return connection

    def _close_connections(self) -> None:
        if self._reader is not self._db:
            self._reader.close()
        self._db.close()

    @property
    def journal_mode(self) -> str:
        """SQLite's journal mode of this database ('wal' on a file, 'memory' in memory)."""
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One change: the file checked (written again if it was deleted), the write lock taken
        (StoreUnavailable after BUSY_TIMEOUT_S), committed or rolled back as a whole."""
        with self._lock:
            self._check_open()
            self._check_file()
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise self._unavailable(exc) from None
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._db.execute("ROLLBACK")
                raise self._unavailable(exc) from None

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        where = shown_path(self._where)
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreUnavailable(
                f"the example database {where} is locked by another process (waited "
                f"{BUSY_TIMEOUT_S:g} s): nothing changed, try again"
            )
        return StoreUnavailable(
            f"cannot write the example database {where} ({exc}): nothing changed"
        )

    def _check_file(self) -> None:
        """Under the write lock: the database file is still the one opened. Deleted: written
        again here from the open copy. Replaced: StoreUnavailable."""
        if self.path is None:
            return
        try:
            identity = _identity(self.path)
        except FileNotFoundError:
            self._write_again()
            return
        except OSError as exc:
            raise StoreUnavailable(f"cannot reach {shown_path(self.path)} ({exc})") from None
        if identity != self._identity:
            raise StoreUnavailable(
                f"{shown_path(self.path)} was replaced while this service ran: nothing "
                "changed; restart the service to use the new file, or put the old one back"
            )

    def _write_again(self) -> None:
        """The file was deleted under the open connections: copy the open database to a new
        file at the same path (SQLite's backup, then an atomic rename) and reopen it."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.restoring")
        partial.unlink(missing_ok=True)
        with self._read_lock:
            try:
                target = sqlite3.connect(partial)
                try:
                    self._db.backup(target)
                    target.execute("PRAGMA journal_mode=WAL")
                finally:
                    target.close()
                self._close_connections()  # removes the deleted database's -wal and -shm
                os.replace(partial, self.path)
                self._db = self._connect()
                self._reader = self._connect()
            except (OSError, sqlite3.Error) as exc:
                partial.unlink(missing_ok=True)
                raise StoreUnavailable(
                    f"{shown_path(self.path)} was deleted while this service ran and cannot be "
                    f"written again ({exc})"
                ) from None
            self._identity = _identity(self.path)
        count = self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        log.warning(
            "the example database %s was deleted while the service ran: written again from "
            "the open copy (%d examples)",
            shown_path(self.path),
            count,
        )

    def add(self, example: Example, share: bool = False) -> bool:
        """Store ``example``; False (nothing changed) if its id is held or was deleted before.
        ``share``: this device's fleet is to be told (an outbox row, until ``shared``)."""
        return self.add_all([example], share)[0]

    def add_all(self, examples: Sequence[Example], share: bool = False) -> list[bool]:
        """Store several examples in one transaction (one sync to disk: an import); for each,
        whether it was new. All are checked before any is stored: a bad one stores none.
        ``share``: the new ones go to the outbox too."""
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
                if share and cursor.rowcount == 1:
                    db.execute("INSERT OR REPLACE INTO outbox (id, op) VALUES (?, 'add')", row[:1])
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

    def delete(
        self, example_id: str, tombstone: bool = True, share: bool = False
    ) -> Example | None:
        """Remove an example and leave a tombstone (also for an id not held: a delete that
        arrives before its add wins). The example removed, or None if it was not held.
        ``tombstone=False`` takes back an add that could not be completed (the id may come
        again). An add still in the outbox goes; ``share``: a held example's delete goes to the
        outbox (a delete of an id not held changes nothing then: no tombstone either)."""
        check_id(example_id)
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, thumbnail FROM examples WHERE id = ?", (example_id,)
            ).fetchone()
            if share and row is None:
                return None
            db.execute("DELETE FROM examples WHERE id = ?", (example_id,))
            db.execute("DELETE FROM outbox WHERE id = ?", (example_id,))
            if tombstone:
                db.execute("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", (example_id,))
            if share:
                db.execute("INSERT INTO outbox (id, op) VALUES (?, 'delete')", (example_id,))
        return None if row is None else self._example(row)

    def relabel(self, label: str, new_label: str) -> int:
        """Give every example of ``label`` the label ``new_label``; how many changed."""
        check_label(new_label)
        with self._transaction() as db:
            return db.execute(
                "UPDATE examples SET label = ? WHERE label = ?", (new_label, label)
            ).rowcount

    def unshared(self) -> list[tuple[str, str]]:
        """The outbox, oldest first: (op, id) of each change the fleet has not acknowledged
        ("add" of a held example, or "delete")."""
        return [(op, i) for op, i in self._query("SELECT op, id FROM outbox ORDER BY rowid")]

    def shared(self, example_id: str, op: str) -> None:
        """The fleet acknowledged ``op`` of ``example_id``: its outbox row goes (unless a later
        change of the id replaced it)."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ? AND op = ?", (example_id, op))

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
        """Close the database (a checkpoint of the WAL into the main file happens here); a
        database file deleted meanwhile is written again first. Later calls: StoreUnavailable."""
        with self._lock:
            if self._closed:
                return
            try:
                self._check_file()
            except StoreUnavailable as exc:
                log.warning("%s", exc)
            with self._read_lock if self._read_lock is not self._lock else contextlib.nullcontext():
                self._closed = True
                self._close_connections()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._read_lock:
            self._check_open()
            return self._reader.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the example database {shown_path(self._where)} is closed")

    def _example(self, row: tuple) -> Example:
        return _row_example(row, self.dim, self._where)


def _row_example(row: tuple, dim: int, where: str) -> Example:
    """The example a database row holds; StateError (one line) for a row that is not one (a
    field of another type, an embedding of another length)."""
    example_id, label, source, time_utc, origin, blob, thumbnail = row
    texts = (example_id, label, source, time_utc, origin)
    if not all(isinstance(text, str) for text in texts):
        raise StateError(f"{where}: example {shown(repr(example_id))} has a corrupt text field")
    if not isinstance(blob, bytes) or len(blob) != 4 * dim:
        raise StateError(f"{where}: example {shown(example_id)} has a corrupt embedding")
    if thumbnail is not None and not isinstance(thumbnail, bytes):
        raise StateError(f"{where}: example {shown(example_id)} has a corrupt thumbnail")
    embedding = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return Example(example_id, label, source, time_utc, embedding, origin, thumbnail)


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of the file at ``path``: which file it is."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def database_path(state_dir_or_db: str | Path) -> Path:
    """The example database a path names: a folder holding ``DB_NAME`` (the teach folder) gives
    that file; any other folder is a ``serve --state-dir``: its ``TEACH_FOLDER/DB_NAME``; a file
    is itself. A path that does not exist yet names a state dir when it ends in a separator or
    has no suffix (``states/``, ``states``), else a database file (``examples.sqlite``)."""
    text = str(state_dir_or_db)
    path = Path(text)
    if path.is_dir():
        return path / DB_NAME if (path / DB_NAME).exists() else path / TEACH_FOLDER / DB_NAME
    if path.exists() or (path.suffix and not text.endswith(("/", os.sep))):
        return path
    return path / TEACH_FOLDER / DB_NAME


def recorded_meta(path: str | Path) -> tuple[str, int] | None:
    """(bundle fingerprint, dim) an existing database records, read without changing it; None
    when there is no file. StateError for a file that is not an example database."""
    path = Path(path)
    if not path.exists():
        return None
    with _read_only(path) as connection:
        return _meta_of(connection, path)


def read_database(path: str | Path) -> tuple[str, int, list[Example]]:
    """(bundle fingerprint, dim, every example sorted by id without thumbnails) of an existing
    database, read without writing to it (read-only media too); StateError for a missing,
    corrupt or foreign file."""
    path = Path(path)
    if not path.exists():
        raise StateError(f"no example database at {path}")
    with _read_only(path) as connection:
        fingerprint, dim = _meta_of(connection, path)
        rows = connection.execute(f"SELECT {_COLUMNS}, NULL FROM examples ORDER BY id").fetchall()
    return fingerprint, dim, [_row_example(row, dim, str(path)) for row in rows]


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the database at ``path`` that makes no file beside it: a
    database no one has open (no WAL index beside it) is read as immutable, one in use through
    its WAL. StateError for what is no database."""
    if path.is_dir():
        raise StateError(f"{path} is a folder, not an example database")
    if not path.is_file():  # never opened: a FIFO blocks SQLite's open, Ctrl-C included
        raise StateError(f"{path} is not a regular file (a device, FIFO or socket)")
    in_use = path.with_name(path.name + "-shm").exists()
    wal = path.with_name(path.name + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0
    mode = "mode=ro" if in_use or pending else "immutable=1"
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
    except sqlite3.Error as exc:
        raise StateError(f"{path} is not a readable example database ({exc})") from None
    try:
        yield connection
    except sqlite3.Error as exc:
        raise StateError(f"{path} is not a readable example database ({exc})") from None
    finally:
        connection.close()


def _meta_of(connection: sqlite3.Connection, path: Path) -> tuple[str, int]:
    """(bundle fingerprint, dim) a database records; StateError when they are not such."""
    held = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    bundle, dim = held.get("bundle"), held.get("dim")
    if not isinstance(bundle, str) or not isinstance(dim, str) or not dim.isdigit():
        raise StateError(f"{path} is not a readable example database (its meta is corrupt)")
    if not 0 < int(dim) <= MAX_DIM:
        raise StateError(f"{path} records an embedding width of {dim}: corrupt")
    return bundle, int(dim)


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


def _prepare(db: sqlite3.Connection, where: str, fingerprint: str, dim: int) -> None:
    """In one transaction: make the tables, record bundle, dim and schema on first open (and
    refuse a database made for others, changing nothing), and give a database made before the
    outbox its outbox (this device's own examples are shared again)."""
    expected = {"schema_version": str(SCHEMA_VERSION), "bundle": fingerprint, "dim": str(dim)}
    db.execute("BEGIN IMMEDIATE")
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        held = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if held:
            _check_meta(held, expected, where)
        else:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", expected.items())
        if "examples" in tables and "outbox" not in tables:
            db.execute(
                "INSERT INTO outbox (id, op) SELECT id, 'add' FROM examples WHERE origin = ''"
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _check_meta(held: dict[str, str], expected: dict[str, str], where: str) -> None:
    """Refuse a database recorded (``held``) for another schema, bundle or width."""
    if held.get("schema_version") != expected["schema_version"]:
        raise StateError(
            f"{where} has example schema {held.get('schema_version')}, this version reads "
            f"{SCHEMA_VERSION}"
        )
    if held.get("bundle") != expected["bundle"]:
        raise StateError(
            f"{where} holds the examples of another bundle (fingerprint {held.get('bundle')}, "
            f"this bundle is {expected['bundle']})"
        )
    if held.get("dim") != expected["dim"]:
        raise StateError(
            f"{where} holds embeddings of width {held.get('dim')}, this bundle's are "
            f"{expected['dim']}"
        )
