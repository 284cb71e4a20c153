"""vlm-edge learn --ray: statistics on a local Ray instance equal single-machine learning."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images

from vlm_export.runtime import cli
from vlm_export.runtime.bundle import Bundle
from vlm_export.runtime.rail.primal import PrimalAdapter
from vlm_export.runtime.rail.state import load_learner_state

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # two local Ray instances: about a minute on two cores

HIDDEN = ["--hidden-dim", "48"]


def _edge(capsys, *argv: object) -> tuple[int, list[str]]:
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ray")
    bundle = make_bundle(root / "bundle", method="tca+rail")
    for seed, (domain, name) in enumerate(
        [("animals", "cat"), ("animals", "dog"), ("animals", "bird"), ("vehicles", "car")]
    ):
        write_images(root / "data" / domain / name, 40, seed=seed)
    return bundle, root / "data"


def test_ray_learn_equals_single_machine(setup, tmp_path, capsys) -> None:
    bundle, data = setup
    local, scaled = tmp_path / "local.npz", tmp_path / "ray.npz"
    for state in (local, scaled):  # both continue the same first domain
        args = ["learn", bundle, data / "vehicles", "--domain", "vehicles", "--state", state]
        assert _edge(capsys, *args, "--shots", 0, *HIDDEN)[0] == 0
    args = ["learn", bundle, data / "animals", "--domain", "animals", "--shots", 0]
    code, err = _edge(capsys, *args, "--state", local)
    assert code == 0, err
    code, err = _edge(capsys, *args, "--state", scaled, "--ray", "--workers", 2)
    assert code == 0, err
    assert sum("Ray worker" in line for line in err) == 2
    assert any("embedded 120 images of 3 classes on Ray (2 workers)" in line for line in err)
    fingerprint = Bundle.open(bundle).fingerprint
    one, two = (load_learner_state(path, fingerprint) for path in (local, scaled))
    assert isinstance(two, PrimalAdapter) and two.num_samples == one.num_samples == 160
    np.testing.assert_array_equal(two.learned_mask, one.learned_mask)
    for name in ("gram", "cross"):
        a, b = getattr(two, name), getattr(one, name)
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), name
    assert np.abs(two.weights - one.weights).max() <= 1e-9 * np.abs(one.weights).max()
    probe = np.random.default_rng(0).normal(size=(50, one.in_dim))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    np.testing.assert_array_equal(two.predict(probe).argmax(1), one.predict(probe).argmax(1))
    # the Ray state merges with a device's state like any other
    merged = tmp_path / "merged.npz"
    assert _edge(capsys, "merge", merged, scaled, tmp_path / "device.npz")[0] == 1  # missing
    device = tmp_path / "device.npz"
    args = ["learn", bundle, data / "vehicles", "--domain", "vehicles", "--state", device]
    assert _edge(capsys, *args, "--shots", 0, *HIDDEN)[0] == 0
    code, err = _edge(capsys, "merge", merged, scaled, device)
    assert code == 0, err


def test_ray_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys) -> None:
    bundle, data = setup
    state = tmp_path / "state.npz"
    args = ["learn", bundle, data / "vehicles", "--domain", "vehicles", "--state", state]
    assert _edge(capsys, *args, "--shots", 0, *HIDDEN)[0] == 0
    before = state.read_bytes()
    animals = ["learn", bundle, data / "animals", "--domain", "animals", "--state", state]
    start = time.monotonic()
    code, err = _edge(capsys, *animals, "--ray", "127.0.0.1:9")  # nothing listens on port 9
    assert code == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in err[-1], err
    assert time.monotonic() - start < 30
    code, err = _edge(capsys, *animals, "--ray", "--route", "woodbury")
    assert code == 1 and "was learned with route cholesky" in err[-1], err
    dual = tmp_path / "dual.npz"
    code, err = _edge(
        capsys, "learn", bundle, data / "animals", "--domain", "animals", "--state", dual,
        "--form", "dual", "--ray",
    )  # fmt: skip
    assert code == 1 and "dual form learns here" in err[-1], err
    assert state.read_bytes() == before and not dual.exists()


def test_a_worker_that_dies_fails_the_run_and_the_bundle_ships(setup) -> None:
    from vlm_export.runtime.rail.scaleout import (
        RayError,
        RayStatistics,
        StatisticsWorker,
        bundle_files,
    )

    bundle_path, data = setup
    bundle = Bundle.open(bundle_path)
    learner = PrimalAdapter(bundle.text_embeddings.shape[1], bundle.num_classes, 16)
    paths = sorted((data / "animals" / "cat").iterdir())
    engine = {"backend": "onnxruntime", "providers": None, "threads": 1}
    with RayStatistics(bundle, learner, None, 2, engine) as cluster:
        ray.kill(cluster.workers[1])
        with pytest.raises(RayError, match="a Ray worker died"):
            cluster.accumulate(paths, np.zeros(len(paths), dtype=np.int64))
        # a worker on a node without the bundle at the driver's path gets it from the store
        files = ray.put(bundle_files(bundle.path))
        setup = {"in_dim": learner.in_dim, "num_classes": learner.num_classes, "hidden_dim": 16}
        elsewhere = str(bundle_path.parent / "not-on-this-node")
        worker = StatisticsWorker(elsewhere, bundle.fingerprint, files, setup, None, engine)
        assert worker.pipeline.bundle.path != bundle.path
        assert worker.pipeline.bundle.fingerprint == bundle.fingerprint
        blobs = [path.read_bytes() for path in paths[:3]]
        assert worker.learn([str(p) for p in paths[:3]], blobs, np.zeros(3, np.int64)) == 3
