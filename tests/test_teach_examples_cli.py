"""vlm-edge examples export|import and learn from an exported set, through the real CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle

from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.rail.primal import RIDGE, PrimalAdapter, random_projection
from vlm_export.runtime.rail.scaleout import StatisticsWorker, embedding_batches
from vlm_export.runtime.rail.state import load_learner_state
from vlm_export.runtime.teach.examples import UNKNOWN, Example, check_embedding, new_id
from vlm_export.runtime.teach.learner import TeachLearner
from vlm_export.runtime.teach.store import DB_NAME, TEACH_FOLDER, ExampleStore
from vlm_export.runtime.teach.transfer import read_examples

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "car", UNKNOWN, "forklift"]  # forklift: no class of the bundle


def edge(*argv: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    bundle_path = make_bundle(root / "bundle", method="zeroshot")
    bundle = Bundle.open(bundle_path)
    dim = bundle.text_embeddings.shape[1]
    state = root / "state"  # a serve --state-dir: the database in its teach folder
    (state / TEACH_FOLDER).mkdir(parents=True)
    store = ExampleStore.open(state / TEACH_FOLDER / DB_NAME, bundle.engine_fingerprint, dim)
    rng = np.random.default_rng(0)
    taught = [
        Example(new_id(), label, "cam", "2026-01-01T00:00:00Z",
                check_embedding(rng.standard_normal(dim), dim), "", b"\xff\xd8thumb")
        for label in LABELS
        for _ in range(6)
    ]  # fmt: skip
    for example in taught:
        assert store.add(example)
    store.close()
    return bundle_path, bundle, state, taught


def test_export_writes_every_example_bit_for_bit(setup, tmp_path):
    _, bundle, state, taught = setup
    out = tmp_path / "set.npz"
    done = edge("examples", "export", state, out)
    assert done.returncode == 0, done.stderr
    database = state / TEACH_FOLDER / DB_NAME
    assert f"exported 30 examples of 5 labels from {database} to {out}" in done.stderr
    exported = read_examples(out, bundle.engine_fingerprint)
    assert exported.fingerprint == bundle.engine_fingerprint and exported.dim == 8
    by_id = {e.id: e for e in taught}
    assert [e.id for e in exported.examples] == sorted(by_id)
    for example in exported.examples:
        original = by_id[example.id]
        assert (example.label, example.source, example.time_utc) == (
            original.label, original.source, original.time_utc)  # fmt: skip
        assert example.embedding.tobytes() == original.embedding.tobytes()
    with np.load(out, allow_pickle=False) as raw:  # plain arrays, no pickle, no thumbnails
        assert sorted(raw.files) == sorted(
            ["__meta__", "embeddings", "ids", "labels", "sources", "times", "origins"]
        )


def test_import_applies_each_id_once_and_refuses_another_engine(setup, tmp_path):
    _, bundle, state, taught = setup
    out = tmp_path / "set.npz"
    assert edge("examples", "export", state / TEACH_FOLDER, out).returncode == 0  # teach folder
    target = tmp_path / "other"  # a fresh --state-dir
    target.mkdir()
    done = edge("examples", "import", target, out)
    assert done.returncode == 0, done.stderr
    database = target / TEACH_FOLDER / DB_NAME
    assert f"into created {database}: 30 new of 30 examples" in done.stderr
    again = edge("examples", "import", database, out)  # the database file itself
    assert again.returncode == 0 and "0 new of 30 examples" in again.stderr
    store = ExampleStore.open(database, bundle.engine_fingerprint, 8)
    store.delete(taught[0].id)
    store.close()
    third = edge("examples", "import", target, out)
    assert "0 new of 30" in third.stderr  # a deleted example is not brought back
    store = ExampleStore.open(database, bundle.engine_fingerprint, 8)
    assert store.count() == 29 and taught[0].id not in store.ids()
    store.close()
    foreign = tmp_path / "foreign.sqlite"
    ExampleStore.open(foreign, "0" * 16, 8).close()
    refused = edge("examples", "import", foreign, out)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "another image engine" in refused.stderr
    missing = edge("examples", "export", tmp_path / "none.sqlite", tmp_path / "x.npz")
    assert missing.returncode == 1 and "no example database" in missing.stderr
    assert not (tmp_path / "x.npz").exists()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a file of examples")
    bad = edge("examples", "import", target, junk)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["fresh/", "fresh", "fresh.sqlite"])
def test_import_into_a_path_that_does_not_exist_yet(setup, tmp_path, name):
    """``states/`` and ``states`` name a new serve --state-dir (its teach/examples.sqlite is
    made, the serve that follows reads it), ``x.sqlite`` a new database file. The imported
    examples wait in the outbox: a serve --fleet on it shares them."""
    _, bundle, state, _ = setup
    out = tmp_path / "set.npz"
    assert edge("examples", "export", state, out).returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "vlm_export.runtime", "examples", "import", name, str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    made = tmp_path / "fresh.sqlite" if name.endswith(".sqlite") else tmp_path / "fresh"
    database = made if made.suffix else made / TEACH_FOLDER / DB_NAME
    assert database.is_file()
    store = ExampleStore.open(database, bundle.engine_fingerprint, 8)
    assert store.count() == 30 and len(store.unshared()) == 30
    store.close()


def test_learn_reads_an_exported_set(setup, tmp_path):
    bundle_path, bundle, state, taught = setup
    out = tmp_path / "set.npz"
    assert edge("examples", "export", state, out).returncode == 0
    learned = tmp_path / "rail.npz"
    done = edge(
        "learn", bundle_path, out, "--domain", "animals", "--state", learned,
        "--hidden-dim", 64, "--shots", 0,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "left out: car, forklift" in done.stderr  # car is a vehicle, forklift no class
    assert "no examples for 1 class(es) of animals: bird" in done.stderr
    assert "learned 18 exported examples (6 unknown) of 2 classes" in done.stderr
    learner = load_learner_state(learned, bundle.fingerprint)
    assert learner.num_samples == 18
    # the literal primal closed form: unknown rows have targets 0 on every class
    used = sorted((e for e in taught if e.label in ("cat", "dog", UNKNOWN)), key=lambda e: e.id)
    x = np.array([e.embedding for e in used], np.float64)
    phi = np.maximum(x @ random_projection(8, 64, 0), 0)
    targets = np.zeros((len(used), bundle.num_classes))
    for row, example in enumerate(used):
        if example.label != UNKNOWN:
            targets[row, bundle.classes.index(example.label)] = 1.0
    literal = np.linalg.solve(phi.T @ phi + RIDGE * np.eye(64), phi.T @ targets)
    scale = np.abs(literal).max()
    assert np.abs(learner.weights - literal).max() <= 1e-9 * scale
    # and the taught learner on the same examples has the same columns
    teach = TeachLearner.fit(used, 8, 64)
    for column, label in enumerate(teach.labels):
        if label != UNKNOWN:
            index = bundle.classes.index(label)
            assert np.abs(learner.weights[:, index] - teach.weights[:, column]).max() <= (
                1e-9 * scale
            )


def test_learn_refuses_a_file_that_is_no_export(setup, tmp_path):
    bundle_path, _, _, _ = setup
    image = tmp_path / "frame.jpg"
    image.write_bytes(b"\xff\xd8 not really a folder")
    done = edge("learn", bundle_path, image, "--domain", "animals", "--state", tmp_path / "s.npz")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "neither a data folder nor a file written by vlm-edge examples export" in done.stderr
    assert not (tmp_path / "s.npz").exists()


def test_learn_ray_on_an_exported_set_without_ray_is_one_line(setup, tmp_path):
    try:
        import ray  # noqa: F401

        pytest.skip("Ray is installed here: the Ray path is tested in test_rail_ray.py")
    except ImportError:
        pass
    bundle_path, _, state, _ = setup
    out = tmp_path / "set.npz"
    assert edge("examples", "export", state, out).returncode == 0
    done = edge(
        "learn", bundle_path, out, "--domain", "animals", "--state", tmp_path / "s.npz", "--ray"
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        'vlm-edge: error: --ray needs Ray on this machine and the workers: pip install ".[ray]"'
    )
    assert not (tmp_path / "s.npz").exists()


def test_ray_worker_without_engine_accumulates_exactly():
    """The Ray actor's class run in-process (no Ray): batches of computed embeddings, unknown
    rows (-1) included, give the statistics of one learner."""
    rng = np.random.default_rng(3)
    features = rng.standard_normal((9000, 8))
    labels = rng.integers(-1, 4, 9000)
    setup = {"in_dim": 8, "num_classes": 4, "hidden_dim": 32, "ridge": RIDGE, "seed": 0}
    worker = StatisticsWorker("", "", None, setup, random_projection(8, 32, 0), None)
    assert "computed embeddings" in worker.describe()
    batches = list(embedding_batches(features, labels))
    assert len(batches) == 3 and sum(len(b[1]) for b in batches) == 9000
    for batch in batches:
        worker.learn_embeddings(*batch)
    phi = np.maximum(features @ random_projection(8, 32, 0), 0)
    targets = np.zeros((9000, 4))
    targets[labels >= 0, labels[labels >= 0]] = 1.0
    gram, cross = worker.learner.gram, worker.learner.cross
    assert np.abs(gram - phi.T @ phi).max() <= 1e-12 * np.abs(gram).max()
    assert np.abs(cross - phi.T @ targets).max() <= 1e-12 * np.abs(cross).max()
    assert worker.learner.num_samples == 9000
    reference = PrimalAdapter(8, 4, 32)
    reference.accumulate(features[labels >= 0], labels[labels >= 0])
    reference.accumulate_unlabelled(features[labels < 0])
    reference.finalize()
    worker.learner.finalize()
    assert (
        np.abs(worker.learner.weights - reference.weights).max()
        <= 1e-9 * np.abs(reference.weights).max()
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("UPDATE examples SET embedding = x'010203'", "has a corrupt embedding"),
        ("UPDATE examples SET embedding = 'hello'", "has a corrupt embedding"),
        ("UPDATE examples SET label = x'ff00'", "has a corrupt text field"),
        ("UPDATE meta SET value = '-5' WHERE key = 'dim'", "its meta is corrupt"),
        ("UPDATE meta SET value = '99999999' WHERE key = 'dim'", "embedding width of 99999999"),
        ("DROP TABLE meta", "is not a readable example database"),
    ],
    ids=["short-embedding", "text-embedding", "blob-label", "negative-dim", "huge-dim", "no-meta"],
)
def test_export_of_a_damaged_database_is_one_line(tmp_path, damage, message) -> None:
    db = tmp_path / "examples.sqlite"
    store = ExampleStore.open(db, "f" * 16, 8)
    vector = check_embedding(np.arange(1, 9), 8)
    store.add(Example(new_id(), "cat", "cam", "2026-01-01T00:00:00Z", vector))
    store.close()
    raw = sqlite3.connect(db)
    raw.execute(damage)
    raw.commit()
    raw.close()
    before = db.read_bytes()
    result = edge("examples", "export", str(db), str(tmp_path / "out.npz"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.npz").exists() and db.read_bytes() == before


def test_export_reads_the_database_without_writing_it(tmp_path) -> None:
    """The export opens the database read-only: no file appears beside it and none changes
    (a read-only folder, where SQLite cannot make the WAL index, is read as immutable)."""
    folder = tmp_path / "stick"
    folder.mkdir()
    store = ExampleStore.open(folder / "examples.sqlite", "f" * 16, 8)
    vector = check_embedding(np.arange(1, 9), 8)
    store.add(Example(new_id(), "cat", "cam", "2026-01-01T00:00:00Z", vector))
    store.close()
    before = (folder / "examples.sqlite").read_bytes()
    result = edge("examples", "export", str(folder / "examples.sqlite"), str(tmp_path / "o.npz"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["examples.sqlite"]
    assert (folder / "examples.sqlite").read_bytes() == before
    assert len(read_examples(tmp_path / "o.npz").examples) == 1
