"""Teaching a running service by example, over real sockets: POST /v1/examples (an uploaded image
or a frame a source decided, by its seq), GET (pages, thumbnails), DELETE (exact unlearning), the
decisions that follow, the SQLite store in the state directory, and hostile input.

The reference for every learner state is a fresh ``TeachLearner.fit`` on the examples the store
holds (itself proven equal to the primal RAIL closed form in tests/test_teach_learner.py)."""

from __future__ import annotations

import dataclasses
import io
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from liveserver import export_tiny, image_bytes, open_service, serving, wait_for
from PIL import Image
from sqlite_locker import locked_by_another_process

pytest.importorskip("prometheus_client")

from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.serve.frames.recent import RECENT_FRAMES  # noqa: E402
from vlm_export.runtime.serve.teaching.queue import MAX_PENDING  # noqa: E402
from vlm_export.runtime.teach.examples import Example, new_id  # noqa: E402
from vlm_export.runtime.teach.learner import TeachLearner  # noqa: E402
from vlm_export.runtime.teach.store import ExampleStore  # noqa: E402

HIDDEN = 64


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


def _fresh(service) -> TeachLearner:
    """A fresh learner on what the store holds (the reference)."""
    teaching = service.teaching
    return TeachLearner.fit(teaching.store.all(), teaching.dim, teaching.hidden_dim)


def _assert_exact(service) -> None:
    learner, fresh = service.teaching.learner, _fresh(service)
    assert learner.ids == fresh.ids
    assert learner.labels == fresh.labels
    assert _relative(learner.weights, fresh.weights) <= 1e-9


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_teach")
    bundle = make_bundle(root / "bundle", method="tca")
    write_images(root / "front", 5, seed=1)
    write_images(root / "yard", 5, seed=2)
    service = open_service(
        bundle,
        {"front": root / "front", "yard": root / "yard"},
        root / "states",
        teach_hidden_dim=HIDDEN,
    )
    with service, serving(service) as url:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, "both sources live")
        yield service, url, root


def tinted(color: tuple[int, int, int], seed: int) -> bytes:
    """A JPEG of one colour with noise: images of one colour look alike to any engine."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-30, 30, (48, 64, 3))
    pixels = np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


RED, BLUE = (200, 40, 40), (40, 40, 200)


def _teach_upload(url: str, label: str, seed: int, image: bytes | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/examples",
        params={"label": label},
        content=image or image_bytes(seed=seed),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )


def test_taught_examples_decide_and_delete_is_exact(served) -> None:
    service, url, root = served
    answers = []
    for seed, label in [(10, "car"), (11, "car"), (12, "bus"), (13, "bus"), (14, "car")]:
        reply = _teach_upload(url, label, seed)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    assert [a["class_examples"] for a in answers] == [1, 2, 1, 2, 3]
    assert all(len(a["id"]) == 32 and a["learned_ms"] >= 0 for a in answers)
    _assert_exact(service)
    # an image like a taught one is decided as its label (the teach gate opens on it)
    decided = httpx.post(
        f"{url}/v1/classify",
        content=image_bytes(seed=12),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    ).json()
    assert decided["class"] == "bus"
    # the same through the multipart form
    multipart = httpx.post(
        f"{url}/v1/examples",
        files={"image": ("x.png", image_bytes(seed=15, fmt="PNG"), "image/png")},
        data={"label": "train"},
        timeout=30,
    )
    assert multipart.status_code == 200, multipart.text
    listed = httpx.get(f"{url}/v1/examples", params={"label": "car"}).json()
    assert listed["total"] == 3 and listed["counts"]["bus"] == 2
    assert listed["learned"] == 6
    thumb = httpx.get(url + listed["examples"][0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    # exact unlearning: the state equals the state learned without the example
    gone = answers[2]["id"]
    reply = httpx.delete(f"{url}/v1/examples/{gone}", timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["class_examples"] == 1
    assert gone not in service.teaching.learner.ids
    _assert_exact(service)
    assert httpx.delete(f"{url}/v1/examples/{gone}").status_code == 404
    # the store is a real SQLite database in WAL mode in the state directory
    database = root / "states" / "teach" / "examples.sqlite"
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 5


def test_a_frame_is_labelled_by_its_seq(served) -> None:
    service, url, _ = served
    seq = wait_for(
        lambda: next(s["seq"] for s in httpx.get(f"{url}/v1/sources").json()["sources"]
                     if s["name"] == "yard") or None,
        "a decided frame",
    )  # fmt: skip
    kept = {r.seq: r.embedding for r in service.teaching.recent.kept("yard")}
    reply = httpx.post(
        f"{url}/v1/examples", json={"source": "yard", "seq": seq, "label": "dog"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    example = service.teaching.store.get(reply.json()["id"])
    assert example.source == "yard" and example.label == "dog"
    if seq in kept:  # the embedding of exactly that frame
        np.testing.assert_array_equal(example.embedding, kept[seq])
    assert example.thumbnail and example.thumbnail[:2] == b"\xff\xd8"
    _assert_exact(service)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"source": "nowhere", "seq": 1, "label": "dog"}, 404, "no source"),
        ({"source": "front", "seq": 10**9, "label": "dog"}, 404, "no frame"),
        ({"source": "front", "seq": 0, "label": "dog"}, 400, "sequence number"),
        ({"source": "front", "seq": "1", "label": "dog"}, 400, "sequence number"),
        ({"source": "front", "seq": 1, "label": ""}, 400, "empty"),
        ({"source": "front", "seq": 1, "label": "x" * 10_000}, 400, "at most"),
        ({"source": "front", "seq": 1, "label": "a\x00b"}, 400, "control"),
        ({"source": "front", "seq": 1, "label": 7}, 400, "string"),
        ({"source": "front", "seq": 1}, 400, "needs label"),
        ({"source": "front", "seq": 1, "label": "dog", "path": "/etc"}, 400, "unknown field"),
        ([1, 2], 400, "send"),
    ],
)
def test_bad_teach_requests_get_one_json_error_and_change_nothing(served, body, status, words):
    service, url, _ = served
    before = service.teaching.store.digest()
    reply = httpx.post(f"{url}/v1/examples", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]
    assert service.teaching.store.digest() == before


def test_a_seq_that_left_the_buffer_is_410(served) -> None:
    service, url, _ = served
    wait_for(
        lambda: (
            len(service.teaching.recent.kept("front")) == RECENT_FRAMES
            and service.teaching.recent.kept("front")[0].seq > 1
        ),
        "more frames than the buffer keeps",
        tries=600,
    )
    reply = httpx.post(
        f"{url}/v1/examples", json={"source": "front", "seq": 1, "label": "dog"}, timeout=30
    )
    assert reply.status_code == 410, reply.text
    assert "left the buffer" in reply.json()["error"]


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/v1/examples/not-an-id", "DELETE", 400),
        ("/v1/examples/" + "0" * 32, "DELETE", 404),
        ("/v1/examples/" + "0" * 32 + "/thumbnail.jpg", "GET", 404),
        ("/v1/examples?limit=100000", "GET", 422),
    ],
)
def test_bad_ids_and_pages(served, path, method, status) -> None:
    _, url, _ = served
    reply = httpx.request(method, url + path, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")


def test_uploads_without_a_label_or_too_large_are_refused(served) -> None:
    service, url, _ = served
    before = service.teaching.store.digest()
    plain = httpx.post(
        f"{url}/v1/examples", content=image_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    assert plain.status_code == 400 and "label" in plain.json()["error"]
    form = httpx.post(f"{url}/v1/examples", files={"image": ("a.jpg", image_bytes(), "image/jpeg")})
    assert form.status_code == 400 and "label" in form.json()["error"]
    huge = httpx.post(
        f"{url}/v1/examples",
        params={"label": "dog"},
        content=image_bytes(size=(2100, 10)),
        headers={"Content-Type": "image/jpeg"},
    )
    assert huge.status_code == 413
    assert service.teaching.store.digest() == before


def test_a_flood_is_answered_429_and_nothing_is_half_learned(served) -> None:
    service, url, _ = served
    teaching = service.teaching
    replies: list[httpx.Response] = []
    lock = threading.Lock()

    def post(seed: int) -> None:
        reply = _teach_upload(url, "train", 100 + seed)
        with lock:
            replies.append(reply)

    with teaching._learner_lock:  # the learner is busy: changes pile up
        # one change is in the blocked batch, MAX_PENDING wait: the rest are answered 429
        threads = [threading.Thread(target=post, args=(i,)) for i in range(MAX_PENDING + 8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(replies) >= 5, "the requests over the queue's bound")
    for thread in threads:
        thread.join(60)
    busy = [r for r in replies if r.status_code == 429]
    assert busy and all(r.headers["retry-after"] == "1" for r in busy)
    assert all(r.status_code in (200, 429) for r in replies)
    assert teaching.learner.num_samples == teaching.store.count()
    _assert_exact(service)


def test_restart_resumes_the_same_state_and_rebuilds_a_stale_one(served, tmp_path) -> None:
    service, url, root = served
    for seed, label in ((70, "car"), (71, "bus")):  # whatever ran before, examples are stored
        assert _teach_upload(url, label, seed).status_code == 200
    probe = image_bytes(seed=12)
    before = httpx.post(
        f"{url}/v1/classify", content=probe, headers={"Content-Type": "image/jpeg"}, timeout=30
    ).json()
    service.checkpoint()
    assert (root / "states" / "teach" / "teach.npz").exists()
    copy = tmp_path / "states"
    shutil.copytree(root / "states", copy)
    for case in ("resumed", "stale", "missing"):
        if case == "stale":  # a crash between the store and the checkpoint: the state is behind
            store = ExampleStore.open(
                copy / "teach" / "examples.sqlite", service.bundle.engine_fingerprint, 8
            )
            late = service.teaching.store.all()[0]
            store.add(Example(new_id(), "bus", "front", late.time_utc, late.embedding[::-1]))
            store.close()
        if case == "missing":
            (copy / "teach" / "teach.npz").unlink()
        again = open_service(
            Path(service.settings.bundle), {"front": root / "front"}, copy, teach_hidden_dim=HIDDEN
        )
        with again:
            _assert_exact(again)
            notes = " ".join(again.notes)
            assert ("rebuilt from the database" in notes) == (case == "stale")
            assert ("no learner state" in notes) == (case == "missing")
            if case == "resumed":  # the same decisions as before the restart
                scores = again.classify(Image.open(io.BytesIO(probe)))
                assert scores["class"] == before["class"]
                assert abs(scores["topk"][0]["score"] - before["topk"][0]["score"]) <= 1e-5


@pytest.mark.exporter
def test_five_examples_of_a_new_label_make_a_class_that_wins(tmp_path) -> None:
    """A label that is no class becomes one (domain "taught", text engine); five examples of it
    change the decision on images like them; "line 3 jam" works as well as "forklift"."""
    pytest.importorskip("torch")
    bundle = export_tiny(tmp_path / "export", ["cat", "dog", "red fox"])
    write_images(tmp_path / "front", 3, seed=1)
    service = open_service(bundle, {"front": tmp_path / "front"}, tmp_path / "states",
                           teach_hidden_dim=HIDDEN)  # fmt: skip
    with service, serving(service) as url:
        probe = tinted(RED, seed=99)
        before = httpx.post(
            f"{url}/v1/classify", content=probe, headers={"Content-Type": "image/jpeg"}
        ).json()
        assert before["class"] in ("cat", "dog", "red fox")
        for label in ("forklift", "line 3 jam"):
            for seed in range(5):
                color = RED if label == "forklift" else BLUE
                reply = _teach_upload(url, label, seed, tinted(color, seed))
                assert reply.status_code == 200, reply.text
            assert reply.json()["class_examples"] == 5
        classes = httpx.get(f"{url}/v1/classes").json()["classes"]
        assert classes == ["cat", "dog", "red fox", "forklift", "line 3 jam"]
        after = httpx.post(
            f"{url}/v1/classify", content=probe, headers={"Content-Type": "image/jpeg"}
        ).json()
        assert (after["class"], after["domain"]) == ("forklift", "taught")
        jam = httpx.post(
            f"{url}/v1/classify", content=tinted(BLUE, seed=98),
            headers={"Content-Type": "image/jpeg"},
        ).json()  # fmt: skip
        assert jam["class"] == "line 3 jam"
        _assert_exact(service)


def test_a_zero_shot_bundle_is_taught_too(tmp_path) -> None:
    """A full tower (method zeroshot): teaching adds RAIL's fusion to zero-shot; the examples
    live in --state-dir (which then holds only teach/) and survive a restart."""
    bundle = make_bundle(tmp_path / "bundle", method="zeroshot")
    write_images(tmp_path / "cam", 3, seed=1)
    service = open_service(bundle, {"cam": tmp_path / "cam"}, tmp_path / "states",
                           teach_hidden_dim=HIDDEN)  # fmt: skip
    assert service.method == "zeroshot"
    with service, serving(service) as url:
        for seed in range(3):
            assert _teach_upload(url, "train", seed, tinted(RED, seed)).status_code == 200
        decided = httpx.post(
            f"{url}/v1/classify", content=tinted(RED, 9), headers={"Content-Type": "image/jpeg"}
        ).json()
        assert decided["class"] == "train"
        _assert_exact(service)
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["teach"]
    again = open_service(bundle, {"cam": tmp_path / "cam"}, tmp_path / "states",
                         teach_hidden_dim=HIDDEN)  # fmt: skip
    with again:
        assert again.teaching.learner.num_samples == 3
        _assert_exact(again)


def test_min_score_auto_is_chosen_from_the_examples(tmp_path) -> None:
    """--min-score auto: the threshold that rejects 90% of the unknown examples (leave-one-out)
    is chosen after each batch, said in GET /v1/examples, and used for the decisions."""
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=1)
    service = open_service(bundle, {"cam": tmp_path / "cam"}, tmp_path / "states",
                           teach_hidden_dim=HIDDEN, min_score_auto=True)  # fmt: skip
    with service, serving(service) as url:
        listed = httpx.get(f"{url}/v1/examples").json()
        assert listed["min_score"] is None  # nothing taught: none chosen
        for seed in range(6):
            assert _teach_upload(url, "bus", seed, tinted(RED, seed)).status_code == 200
            assert _teach_upload(url, "unknown", seed, tinted(BLUE, seed)).status_code == 200
        listed = httpx.get(f"{url}/v1/examples").json()
        assert listed["min_score"] is not None and "rejects" in listed["calibration"]
        chosen = listed["min_score"]
        decided = httpx.post(
            f"{url}/v1/classify", content=tinted(RED, 50), headers={"Content-Type": "image/jpeg"}
        ).json()
        assert decided["class"] == "bus"
        lane = service.lanes.unique()[0]
        assert lane.pipeline.min_score == pytest.approx(chosen)
        assert service.teaching.calibration.rejected_unknown >= 0.9
        # a request without a source, on a pipeline made after a class change, uses it too
        with service.lanes.lock:
            service.lanes.replace_bundle(Bundle.open(bundle, verify=False))
            assert service.lanes.zeroshot().pipeline.min_score == pytest.approx(chosen)


def test_the_example_limit_holds_under_concurrent_teaching(tmp_path) -> None:
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=1)
    service = open_service(bundle, {"cam": tmp_path / "cam"}, tmp_path / "states",
                           teach_hidden_dim=HIDDEN, teach_max_examples=5)  # fmt: skip
    with service, serving(service) as url:
        statuses: list[int] = []
        start = threading.Barrier(12)

        def post(seed: int) -> None:
            start.wait()
            statuses.append(_teach_upload(url, "car", seed).status_code)

        threads = [threading.Thread(target=post, args=(seed,)) for seed in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [200] * 5 + [409] * 7
        assert service.teaching.store.count() == 5
        refused = _teach_upload(url, "car", 99)
        assert refused.status_code == 409 and "5 examples are stored" in refused.json()["error"]
        _assert_exact(service)


@pytest.mark.parametrize(
    "label",
    ["\u200b", "\u202edog", "a\ufffdb", "\ue000", "\u200d"],
    ids=["zero-width", "bidi-override", "undecodable", "private-use", "joiner-only"],
)
def test_invisible_labels_are_refused(served, label) -> None:
    service, url, _ = served
    held = service.teaching.store.count()
    reply = _teach_upload(url, label, 3)
    assert reply.status_code == 400 and list(reply.json()) == ["error"]
    assert service.teaching.store.count() == held


@pytest.mark.exporter
def test_taught_classes_follow_their_examples_and_leave_the_class_list_editable(tmp_path):
    """A taught label makes a class; its case does not make another (``Forklift`` is
    ``forklift``, ``UNKNOWN`` is ``unknown``); PUT /v1/classes replaces the bundle's own classes
    and keeps the taught ones; deleting a taught class's last example removes the class; a label
    over the class limit is refused without storing anything."""
    pytest.importorskip("torch")
    bundle = export_tiny(tmp_path / "export", ["cat", "dog"])
    write_images(tmp_path / "front", 3, seed=1)
    service = open_service(bundle, {"front": tmp_path / "front"}, tmp_path / "states",
                           teach_hidden_dim=HIDDEN)  # fmt: skip
    with service, serving(service) as url:
        first = _teach_upload(url, "forklift", 1, tinted(RED, 1)).json()
        second = _teach_upload(url, "Forklift", 2, tinted(RED, 2)).json()
        assert (second["label"], second["class_examples"]) == ("forklift", 2)
        assert _teach_upload(url, "UNKNOWN", 3).json()["label"] == "unknown"
        assert httpx.get(f"{url}/v1/classes").json()["classes"] == ["cat", "dog", "forklift"]
        put = httpx.put(f"{url}/v1/classes", json=["cat", "dog", "bird"], timeout=60)
        assert put.status_code == 200, put.text
        assert put.json()["classes"] == ["cat", "dog", "bird", "forklift"]
        for example in (first, second):
            assert httpx.delete(f"{url}/v1/examples/{example['id']}", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/classes").json()["classes"] == ["cat", "dog", "bird"]
        _assert_exact(service)

        for name in ("Forklift", "unknown", "UNKNOWN"):  # a taught class, the reserved label
            first = _teach_upload(url, "forklift", 5, tinted(RED, 5)).json()
            clash = httpx.put(f"{url}/v1/classes", json=["cat", "dog", name], timeout=60)
            assert clash.status_code == 400 and "leave it out" in clash.json()["error"], name
            httpx.delete(f"{url}/v1/examples/{first['id']}", timeout=30)
        # a new label taught under three spellings at once makes one class
        statuses: list[int] = []
        start = threading.Barrier(9)

        def teach(index: int) -> None:
            start.wait()
            label = ("crate", "Crate", "CRATE")[index % 3]
            statuses.append(_teach_upload(url, label, 20 + index, tinted(BLUE, index)).status_code)

        threads = [threading.Thread(target=teach, args=(index,)) for index in range(9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 9
        classes = httpx.get(f"{url}/v1/classes").json()["classes"]
        assert [c for c in classes if c.casefold() == "crate"] == [classes[-1]]  # one class
        assert httpx.get(f"{url}/v1/examples", params={"label": "CRATE"}).json()["total"] == 9
        for example in httpx.get(f"{url}/v1/examples", params={"limit": 50}).json()["examples"]:
            httpx.delete(f"{url}/v1/examples/{example['id']}", timeout=30)
        assert httpx.get(f"{url}/v1/classes").json()["classes"] == ["cat", "dog", "bird"]

        service.settings.limits = dataclasses.replace(service.settings.limits, max_classes=3)
        held = service.teaching.store.count()
        full = _teach_upload(url, "pallet", 4)
        assert full.status_code == 409 and "at most 3" in full.json()["error"]
        assert service.teaching.store.count() == held
        assert httpx.get(f"{url}/v1/classes").json()["classes"] == ["cat", "dog", "bird"]


@pytest.mark.exporter
def test_at_start_stored_labels_and_the_classes_agree(tmp_path) -> None:
    """Examples stored without their class (a kill -9 between the two, or an import from a
    device with other classes) make their class at start; a label spelled otherwise takes the
    class's spelling; a taught class whose examples are gone stays (the bundle may be shared
    with a service that holds others). The learner is the fresh one on what is stored."""
    pytest.importorskip("torch")
    bundle = export_tiny(tmp_path / "export", ["cat", "dog", "red fox"])
    write_images(tmp_path / "front", 3, seed=1)
    states = tmp_path / "states"
    service = open_service(bundle, {"front": tmp_path / "front"}, states, teach_hidden_dim=HIDDEN)
    with service, serving(service) as url:
        for seed in range(3):
            assert _teach_upload(url, "cat", seed, tinted(BLUE, seed)).status_code == 200
        orphan = _teach_upload(url, "wheelbarrow", 7, tinted(BLUE, 7)).json()["id"]
        embedding = service.teaching.store.get(orphan).embedding
        fingerprint = service.bundle.engine_fingerprint
        dim = service.teaching.dim
    store = ExampleStore.open(states / "teach" / "examples.sqlite", fingerprint, dim)
    store.delete(orphan)  # the taught class "wheelbarrow" is left without examples
    for seed in range(4):  # stored, never made classes; one spelled as the class "cat"
        label = "Cat" if seed == 3 else "forklift"
        vector = tinted_embedding(embedding, seed)
        store.add(Example(new_id(), label, "front", "2026-01-01T00:00:00Z", vector), share=True)
    store.close()
    again = open_service(bundle, {"front": tmp_path / "front"}, states, teach_hidden_dim=HIDDEN)
    with again, serving(again) as url:
        notes = " ".join(again.notes)
        assert "'forklift' (3 examples) made a class" in notes
        assert "1 examples of 'Cat' now 'cat'" in notes
        assert "wheelbarrow" not in notes
        classes = httpx.get(f"{url}/v1/classes").json()["classes"]
        assert classes == ["cat", "dog", "red fox", "wheelbarrow", "forklift"]
        assert again.teaching.store.counts() == {"cat": 4, "forklift": 3}
        _assert_exact(again)
        assert set(again.teaching.learner.labels) == {"cat", "forklift"}


def tinted_embedding(base: np.ndarray, seed: int) -> np.ndarray:
    """A unit vector near ``base`` (an embedding like a taught one)."""
    vector = base + 0.05 * np.random.default_rng(seed).standard_normal(base.shape)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _taught_once(tmp_path: Path):
    """A TCA bundle, a camera folder and a state dir where one example ("car") was taught."""
    bundle = make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=1)
    states = tmp_path / "states"
    service = open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN)
    with service, serving(service) as url:
        first = _teach_upload(url, "car", 1).json()["id"]
    return bundle, states, first


def test_a_missing_database_beside_a_learner_state_stops_the_start(tmp_path) -> None:
    """The learner state records examples and their database is gone: the service refuses to
    start (one line saying what to do) rather than forget them."""
    from vlm_export.core.errors import StateError

    bundle, states, _ = _taught_once(tmp_path)
    for name in ("examples.sqlite", "examples.sqlite-wal", "examples.sqlite-shm"):
        (states / "teach" / name).unlink(missing_ok=True)
    with pytest.raises(StateError, match="holds 1 taught examples and their database"):
        open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN)
    assert not (states / "teach" / "examples.sqlite").exists()  # no empty one made
    (states / "teach" / "teach.npz").unlink()  # as the message says: start with none
    with open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN) as s:
        assert s.teaching.learner.num_samples == 0


def test_a_database_deleted_under_the_service_keeps_every_example(tmp_path) -> None:
    bundle, states, first = _taught_once(tmp_path)
    service = open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN)
    with service, serving(service) as url:
        for name in ("examples.sqlite", "examples.sqlite-wal", "examples.sqlite-shm"):
            (states / "teach" / name).unlink(missing_ok=True)
        second = _teach_upload(url, "bus", 2).json()["id"]
        assert (states / "teach" / "examples.sqlite").is_file()
    again = open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN)
    with again:
        assert sorted(again.teaching.store.ids()) == sorted([first, second])
        _assert_exact(again)


def test_a_database_locked_by_another_process_answers_503_and_the_list_answers(
    tmp_path,
) -> None:
    bundle, states, _ = _taught_once(tmp_path)
    service = open_service(bundle, {"cam": tmp_path / "cam"}, states, teach_hidden_dim=HIDDEN)
    with service, serving(service) as url:
        with locked_by_another_process(states / "teach" / "examples.sqlite"):
            replies: list[httpx.Response] = []
            teacher = threading.Thread(target=lambda: replies.append(_teach_upload(url, "bus", 2)))
            teacher.start()
            listed = httpx.get(f"{url}/v1/examples", timeout=30)
            assert listed.status_code == 200 and listed.json()["counts"] == {"car": 1}
            teacher.join()
        reply = replies[0]
        assert reply.status_code == 503 and list(reply.json()) == ["error"]
        assert "locked by another process" in reply.json()["error"]
        assert _teach_upload(url, "bus", 3).status_code == 200
        assert service.teaching.store.counts() == {"bus": 1, "car": 1}
        _assert_exact(service)
