"""Three ``vlm-edge serve`` services on one bundle and a real mosquitto on loopback: what any of
them is taught over HTTP, all of them learn (embeddings and labels travel, never images), deletes
included; they converge to one learner on the union of the examples, to 1e-9 relative, and a
fourth that starts late catches up from the broker's retained messages."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from liveserver import image_bytes, open_service, serving
from mosquitto import Broker
from polling import wait_until

mqtt = pytest.importorskip("paho.mqtt.client")
pytest.importorskip("prometheus_client")

from vlm_export.runtime.teach.fleet import encode_add, topic_of  # noqa: E402
from vlm_export.runtime.teach.learner import TeachLearner  # noqa: E402

HIDDEN = 48


@pytest.fixture()
def broker(tmp_path):
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def _fleet(tmp_path: Path, broker: Broker, name: str):
    bundle = tmp_path / "bundles" / name
    if not bundle.exists():
        shutil.copytree(tmp_path / "bundle", bundle)  # the same bundle on every device
    return open_service(
        bundle,
        {"cam": tmp_path / "cam"},
        tmp_path / "states" / name,
        teach_hidden_dim=HIDDEN,
        fleet=f"mqtt://127.0.0.1:{broker.port}/site-a",
    )


def _teach(url: str, label: str, seed: int) -> str:
    reply = httpx.post(
        f"{url}/v1/examples",
        params={"label": label},
        content=image_bytes(seed=seed),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def _union_learner(services) -> TeachLearner:
    teaching = services[0].teaching
    return TeachLearner.fit(teaching.store.all(), teaching.dim, HIDDEN)


def _converged(services, ids: set[str]) -> bool:
    return all(
        set(s.teaching.learner.ids) == ids and not s.teaching.queue.pending for s in services
    )


def test_three_services_learn_together_exactly(tmp_path, broker) -> None:
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    services = [_fleet(tmp_path, broker, name) for name in ("a", "b", "c")]
    with services[0], services[1], services[2]:
        with serving(services[0]) as a, serving(services[1]) as b, serving(services[2]) as c:
            taught = {
                _teach(a, "car", 1), _teach(a, "bus", 2), _teach(b, "car", 3),
                _teach(b, "unknown", 4), _teach(c, "train", 5), _teach(c, "bus", 6),
            }  # fmt: skip
            wait_until(lambda: _converged(services, taught), "every device to hold all six")
            gone = sorted(taught)[:2]  # deleted on another device than the one that taught it
            assert httpx.delete(f"{b}/v1/examples/{gone[0]}", timeout=30).status_code == 200
            assert httpx.delete(f"{c}/v1/examples/{gone[1]}", timeout=30).status_code == 200
            surviving = taught - set(gone)
            wait_until(lambda: _converged(services, surviving), "the deletes everywhere")
        reference = _union_learner(services)
        assert set(reference.ids) == surviving
        worst = 0.0
        for service in services:
            learner = service.teaching.learner
            assert learner.ids == reference.ids and learner.labels == reference.labels
            scale = np.abs(reference.weights).max()
            worst = max(worst, float(np.abs(learner.weights - reference.weights).max() / scale))
            assert set(service.teaching.store.ids()) == surviving
            assert service.teaching.store.deleted_ids() >= set(gone)
        print(f"three services agree with one learner on the union to {worst:.1e} relative")
        assert worst <= 1e-9
        late = _fleet(tmp_path, broker, "d")  # was off: catches up from retained messages
        with late:
            wait_until(lambda: _converged([late], surviving), "the late device to catch up")
            learner = late.teaching.learner
            assert np.abs(learner.weights - reference.weights).max() <= 1e-9 * scale


def test_a_peer_cannot_push_a_device_past_its_example_limit(tmp_path, broker) -> None:
    """Adds from the fleet count against --teach-max-examples as local ones do: beyond it they
    are refused and counted (reason "not stored here"), the device keeps serving and learns
    exactly what it holds."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    teacher = _fleet(tmp_path, broker, "a")
    small = _fleet(tmp_path, broker, "b")
    small.teaching.max_examples = 2
    teacher.teaching.max_examples = 5  # full after its own five: their echoes are no refusals
    with teacher, small:
        with serving(teacher) as a:
            taught = {_teach(a, "car", seed) for seed in range(5)}
            wait_until(lambda: _converged([teacher], taught), "the teacher to learn five")
            wait_until(lambda: teacher.teaching.fleet.echoes >= 5, "the teacher's echoes")
            assert teacher.teaching.fleet.refused == 0
            fleet = small.teaching.fleet
            wait_until(lambda: fleet.refused >= 3, "the small device to refuse three")
            with serving(small) as b:
                metrics = httpx.get(f"{b}/metrics").text
        held = set(small.teaching.store.ids())
        assert len(held) == 2 and held <= taught
        assert fleet.refusals == {"not stored here": 3}
        assert 'vlm_edge_fleet_refused_total{reason="not stored here"} 3.0' in metrics
        assert 'vlm_edge_fleet_messages_total{result="applied"} 2.0' in metrics
        wait_until(lambda: _converged([small], held), "the small device to learn its two")


def test_an_add_that_reuses_a_held_id_for_other_content_is_refused(tmp_path, broker) -> None:
    """A broken or hostile publisher that sends another label under a held id: the device keeps
    what it holds and counts the message ("conflicts with a held example"); a true duplicate
    stays a duplicate."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    device = _fleet(tmp_path, broker, "a")
    with device, serving(device) as a:
        held_id = _teach(a, "car", 1)
        fleet = device.teaching.fleet
        wait_until(lambda: fleet.echoes >= 1, "the device's own add to come back")
        held = device.teaching.store.get(held_id)
        peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        peer.connect("127.0.0.1", broker.port)
        peer.loop_start()
        try:
            topic = topic_of("site-a", held_id)
            for label in ("car", "bus"):  # the same content, then other content
                other = replace(held, label=label, origin="f" * 32)
                payload = encode_add(other, device.lanes.bundle.engine_fingerprint, "f" * 32)
                peer.publish(topic, payload, qos=1).wait_for_publish(30)
            wait_until(lambda: fleet.refused >= 1, "the conflicting add to be refused")
        finally:
            peer.loop_stop()
            peer.disconnect()
        assert fleet.refusals == {"conflicts with a held example": 1} and fleet.duplicates >= 1
        assert device.teaching.store.get(held_id).label == "car"
        assert device.teaching.learner.labels == ["car"]
