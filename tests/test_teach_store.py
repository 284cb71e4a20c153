"""The example database: a real SQLite file in WAL mode, tombstones, filters, bundle checks, and
a writer killed with SIGKILL that loses no answered add."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlite_locker import locked_by_another_process

from vlm_export.core.errors import StateError, UserError
from vlm_export.runtime.teach.examples import (
    EXAMPLE_ID,
    MAX_LABEL_CHARS,
    Example,
    check_embedding,
    check_label,
    new_id,
    thumbnail_jpeg,
)
from vlm_export.runtime.teach.store import ExampleStore

DIM = 8
BUNDLE = "f" * 16


def example(label: str, source: str = "cam", time: str = "2026-01-01T00:00:00Z", seed: int = 0):
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return Example(new_id(), label, source, time, check_embedding(vector, DIM), "", b"\xff\xd8jpg")


def test_journal_mode_is_wal_on_a_file(tmp_path):
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    store.add(example("cat"))
    assert store.journal_mode == "wal"
    store.close()
    raw = sqlite3.connect(path)  # an independent reader of the same file
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 1
    raw.close()


def test_add_duplicate_delete_tombstone_and_reopen(tmp_path):
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    first, second = example("cat", seed=1), example("dog", seed=2)
    assert store.add(first) and store.add(second)
    assert not store.add(first)  # the same id again: applied once
    got = store.get(first.id)
    assert got.label == "cat" and got.thumbnail == first.thumbnail
    np.testing.assert_array_equal(got.embedding, first.embedding)  # float32 bit for bit
    assert got.embedding.dtype == np.float32
    removed = store.delete(first.id)
    assert removed.id == first.id and store.get(first.id) is None
    assert store.delete(first.id) is None  # absent now
    assert not store.add(first)  # a replayed add of a deleted example changes nothing
    assert store.deleted_ids() == {first.id}
    later = new_id()
    assert store.delete(later) is None  # a delete that arrives before its add wins
    assert not store.add(Example(later, "cat", "cam", "t", first.embedding))
    store.close()
    again = ExampleStore.open(path, BUNDLE, DIM)
    assert [e.id for e in again.all()] == [second.id]
    assert again.deleted_ids() == {first.id, later}
    again.close()


def test_add_all_is_one_transaction_applied_once():
    store = ExampleStore.open(None, BUNDLE, DIM)
    first, second, third = (example("cat", seed=i) for i in range(3))
    store.add(first)
    store.delete(second.id)
    assert store.add_all([first, second, third, third]) == [False, False, True, False]
    bad = Example(new_id(), "cat", "cam", "t", np.ones(DIM + 1, np.float32))
    fourth = example("dog", seed=4)
    with pytest.raises(UserError):
        store.add_all([fourth, bad])
    assert store.get(fourth.id) is None and store.count() == 2  # a bad one stores none
    store.close()


def test_page_filters_counts_and_digest(tmp_path):
    store = ExampleStore.open(tmp_path / "e.sqlite", BUNDLE, DIM)
    made = [
        example(label, source, f"2026-01-01T00:00:{second:02d}Z", seed=second)
        for second, (label, source) in enumerate(
            [("cat", "a"), ("dog", "a"), ("cat", "b"), ("unknown", "b"), ("cat", "a")]
        )
    ]
    for item in made:
        assert store.add(item)
    assert store.counts() == {"cat": 3, "dog": 1, "unknown": 1}
    assert store.count() == 5 and store.count(label="cat") == 3
    assert store.count(source="a") == 3 and store.count(label="cat", source="b") == 1
    newest_first = [item.id for item in reversed(made)]
    assert [e.id for e in store.page()] == newest_first
    assert [e.id for e in store.page(offset=1, limit=2)] == newest_first[1:3]
    assert [e.id for e in store.page(label="cat", source="a")] == [made[4].id, made[0].id]
    assert store.page(label="nothing") == []
    listed = store.all()
    assert [e.id for e in listed] == sorted(item.id for item in made)
    assert all(e.thumbnail is None for e in listed)
    ids = sorted(item.id for item in made)
    assert store.digest() == hashlib.sha256("".join(i + "\n" for i in ids).encode()).hexdigest()
    store.delete(made[0].id)
    rest = [i for i in ids if i != made[0].id]
    assert store.digest() == hashlib.sha256("".join(i + "\n" for i in rest).encode()).hexdigest()
    store.close()


def test_refuses_another_bundle_another_dim_and_a_non_database(tmp_path):
    path = tmp_path / "e.sqlite"
    ExampleStore.open(path, BUNDLE, DIM).close()
    with pytest.raises(StateError, match="another bundle"):
        ExampleStore.open(path, "0" * 16, DIM)
    with pytest.raises(StateError, match="width 8"):
        ExampleStore.open(path, BUNDLE, DIM + 1)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a readable example database"):
        ExampleStore.open(junk, BUNDLE, DIM)
    with pytest.raises(StateError, match="folder"):
        ExampleStore.open(tmp_path, BUNDLE, DIM)


def test_refuses_bad_records():
    store = ExampleStore.open(None, BUNDLE, DIM)
    good = example("cat")
    with pytest.raises(UserError, match="example id"):
        store.add(Example("X" * 32, "cat", "cam", "t", good.embedding))
    with pytest.raises(UserError, match="shape"):
        store.add(Example(new_id(), "cat", "cam", "t", np.ones(DIM + 1, np.float32)))
    with pytest.raises(UserError):
        store.add(Example(new_id(), "bad\nlabel", "cam", "t", good.embedding))
    assert store.count() == 0
    store.close()


def test_label_and_embedding_checks():
    assert check_label("  forklift ") == "forklift"
    for bad in ["", "   ", "x" * (MAX_LABEL_CHARS + 1), "a\x00b", "a\tb", 5, None]:
        with pytest.raises(UserError):
            check_label(bad)
    assert check_label("line 3 jam ✓") == "line 3 jam ✓"
    vector = check_embedding([3.0, 4.0], 2)
    assert vector.dtype == np.float32 and np.allclose(vector, [0.6, 0.8])
    for bad in [[np.nan, 1.0], [np.inf, 1.0], [0.0, 0.0], [1.0, 2.0, 3.0], [[1.0, 2.0]], "ab"]:
        with pytest.raises(UserError):
            check_embedding(bad, 2)
    assert EXAMPLE_ID.fullmatch(new_id())


def test_thumbnail_is_a_small_jpeg():
    data = thumbnail_jpeg(Image.new("RGB", (640, 320), (200, 10, 10)))
    assert data[:2] == b"\xff\xd8"
    small = Image.open(io.BytesIO(data))
    assert small.format == "JPEG" and max(small.size) == 96 and small.size == (96, 48)


def test_threads_share_one_store(tmp_path):
    store = ExampleStore.open(tmp_path / "e.sqlite", BUNDLE, DIM)
    made = [example("cat", seed=i) for i in range(80)]

    def worker(part):
        for item in part:
            assert store.add(item)
            store.count()

    threads = [threading.Thread(target=worker, args=(made[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(store.ids()) == sorted(item.id for item in made)
    store.close()


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from vlm_export.runtime.teach.examples import Example, check_embedding, new_id
    from vlm_export.runtime.teach.store import ExampleStore

    store = ExampleStore.open(sys.argv[1], "f" * 16, 8)
    rng = np.random.default_rng(0)
    held = []
    while True:
        ex = Example(new_id(), "cat", "cam", "2026-01-01T00:00:00Z",
                     check_embedding(rng.standard_normal(8), 8), "", b"x" * 2000)
        store.add(ex)
        print("add", ex.id, flush=True)
        held.append(ex.id)
        if len(held) % 3 == 0:
            gone = held.pop(0)
            store.delete(gone)
            print("del", gone, flush=True)
    """
)


def test_kill_9_loses_no_answered_add_or_delete(tmp_path):
    path = tmp_path / "e.sqlite"
    ExampleStore.open(path, BUNDLE, DIM).close()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    answered = []
    try:
        for line in child.stdout:
            if line.endswith("\n"):
                answered.append(line.split())
            if len(answered) >= 90:
                break
        child.send_signal(signal.SIGKILL)
        answered += [line.split() for line in child.stdout if line.endswith("\n")]
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
    added = [name for op, name in answered if op == "add"]
    deleted = {name for op, name in answered if op == "del"}
    assert len(deleted) >= 10 and len(added) >= 40
    store = ExampleStore.open(path, BUNDLE, DIM)
    held, tombstones = set(store.ids()), store.deleted_ids()
    assert set(added) - deleted <= held  # every add that had returned is there
    assert deleted <= tombstones and not deleted & held  # every answered delete is done
    # at most the one change in flight when killed differs, and it is whole or absent
    assert len(held - (set(added) - deleted)) <= 1 and len(tombstones - deleted) <= 1
    assert all(e.embedding.shape == (DIM,) for e in store.all())
    store.close()


def test_a_database_deleted_while_open_is_written_again_at_the_next_change(tmp_path, caplog):
    """``rm examples.sqlite*`` under a running service: the next change writes the open copy to
    the same path (nothing answered is lost), and a reopen finds every example."""
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    first, second = example("cat", seed=1), example("dog", seed=2)
    assert store.add(first)
    for name in ("examples.sqlite", "examples.sqlite-wal", "examples.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    assert store.count() == 1  # reads go on from the open copy
    with caplog.at_level("WARNING"):
        assert store.add(second)
    assert "deleted while the service ran: written again" in caplog.text
    assert path.is_file() and not list(tmp_path.glob(".*restoring"))
    assert sorted(store.ids()) == sorted([first.id, second.id])
    store.delete(first.id)
    store.close()
    again = ExampleStore.open(path, BUNDLE, DIM)
    assert again.ids() == [second.id] and again.deleted_ids() == {first.id}
    np.testing.assert_array_equal(again.get(second.id).embedding, second.embedding)
    again.close()


def test_a_database_deleted_while_open_is_written_again_when_it_closes(tmp_path):
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    kept = example("cat", seed=1)
    store.add(kept)
    path.unlink()
    store.close()  # no change came: closing writes it again
    again = ExampleStore.open(path, BUNDLE, DIM)
    assert again.ids() == [kept.id]
    again.close()


@pytest.mark.parametrize("replacement", ["another database", "a folder"])
def test_a_database_replaced_while_open_refuses_changes(tmp_path, replacement):
    from vlm_export.runtime.teach.store import StoreUnavailable

    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    kept = example("cat", seed=1)
    store.add(kept)
    for name in ("examples.sqlite-wal", "examples.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    if replacement == "a folder":
        path.unlink()
        path.mkdir()
    else:
        other = ExampleStore.open(tmp_path / "other.sqlite", BUNDLE, DIM)
        other.close()
        os.replace(tmp_path / "other.sqlite", path)
    with pytest.raises(StoreUnavailable, match="was replaced while this service ran") as err:
        store.add(example("dog", seed=2))
    assert err.value.http_status == 503
    with pytest.raises(StoreUnavailable):
        store.delete(kept.id)
    assert store.ids() == [kept.id]  # reads: the open copy
    store.close()  # says so, replaces nothing
    assert path.is_dir() == (replacement == "a folder")


def test_a_database_locked_by_another_process_refuses_a_change_and_keeps_reading(tmp_path):
    """Another process holds the write lock: a change is refused (503, one line) after the busy
    timeout, and reads answer meanwhile (they do not queue behind the waiting change)."""
    from vlm_export.runtime.teach.store import StoreUnavailable

    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    store.add(example("cat", seed=1))
    with locked_by_another_process(path):
        outcome: list[BaseException] = []
        waiting = threading.Event()

        def change() -> None:
            waiting.set()
            try:
                store.add(example("dog", seed=2))
            except StoreUnavailable as exc:
                outcome.append(exc)

        writer = threading.Thread(target=change)
        writer.start()
        waiting.wait()
        assert store.count() == 1 and store.counts() == {"cat": 1}
        writer.join()
        assert len(outcome) == 1 and "is locked by another process" in str(outcome[0])
        assert outcome[0].http_status == 503
    assert store.add(example("dog", seed=2))  # the lock is gone: the change goes through
    assert store.count() == 2
    store.close()


def test_the_outbox_holds_what_the_fleet_was_not_told():
    store = ExampleStore.open(None, BUNDLE, DIM)
    own, other, peer = example("cat", seed=1), example("dog", seed=2), example("cow", seed=3)
    assert store.add(own, share=True) and store.add(other, share=True) and store.add(peer)
    assert store.unshared() == [("add", own.id), ("add", other.id)]  # a peer's: not ours
    store.shared(own.id, "add")
    assert store.unshared() == [("add", other.id)]
    assert store.delete(other.id, share=True).id == other.id  # its add goes, its delete waits
    assert store.unshared() == [("delete", other.id)]
    store.shared(other.id, "add")  # a late ack of the add leaves the delete
    assert store.unshared() == [("delete", other.id)]
    store.shared(other.id, "delete")
    assert store.unshared() == []
    absent = new_id()
    assert store.delete(absent, share=True) is None  # not held: nothing changes
    assert absent not in store.deleted_ids() and store.unshared() == []
    assert store.delete(absent) is None and absent in store.deleted_ids()  # a peer's delete
    store.add(third := example("ant", seed=4), share=True)
    store.delete(third.id)  # the fleet deleted it first: nothing of it is left to send
    assert store.unshared() == []
    store.close()


def test_a_database_made_before_the_outbox_shares_its_own_examples_once(tmp_path):
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    own, peer = example("cat", seed=1), replace(example("dog", seed=2), origin="f" * 32)
    store.add_all([own, peer])
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE outbox")  # as the first version of the schema made it
    raw.commit()
    raw.close()
    again = ExampleStore.open(path, BUNDLE, DIM)
    assert again.unshared() == [("add", own.id)]
    again.shared(own.id, "add")
    again.close()
    assert ExampleStore.open(path, BUNDLE, DIM).unshared() == []


def test_closing_while_other_threads_read_ends_their_reads_in_one_error(tmp_path):
    """close() waits for a read in progress and later reads get StoreUnavailable (before: the
    reader's connection was closed under it, and SQLite could crash the process)."""
    from vlm_export.runtime.teach.store import StoreUnavailable

    store = ExampleStore.open(tmp_path / "e.sqlite", BUNDLE, DIM)
    store.add_all([example("cat", seed=i) for i in range(300)])
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def reader() -> None:
        started.wait()
        try:
            while True:
                store.page(limit=300)
        except StoreUnavailable as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    store.close()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 4 and all("is closed" in text for text in outcomes)
    with pytest.raises(StoreUnavailable):
        store.add(example("dog"))
    store.close()  # twice: nothing more


def test_a_refused_open_changes_nothing_so_the_outbox_migration_still_runs(tmp_path):
    path = tmp_path / "examples.sqlite"
    store = ExampleStore.open(path, BUNDLE, DIM)
    own = example("cat", seed=1)
    store.add(own)
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE outbox")  # a database made before the outbox
    raw.commit()
    raw.close()
    with pytest.raises(StateError, match="another bundle"):
        ExampleStore.open(path, "0" * 16, DIM)
    raw = sqlite3.connect(path)
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    assert "outbox" not in tables  # the refused open made nothing
    again = ExampleStore.open(path, BUNDLE, DIM)
    assert again.unshared() == [("add", own.id)]
    again.close()
