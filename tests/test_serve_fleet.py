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
from vlm_export.runtime.teach.store import ExampleStore  # noqa: E402

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


def _retained(broker: Broker, example_id: str) -> dict:
    """The message the broker retains on an example's topic (what a late device receives)."""
    import json
    import queue

    got: queue.Queue = queue.Queue()
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    reader.on_message = lambda client, userdata, message: got.put(message.payload)
    reader.connect("127.0.0.1", broker.port)
    reader.subscribe(topic_of("site-a", example_id), qos=1)
    reader.loop_start()
    try:
        return json.loads(got.get(timeout=30))
    finally:
        reader.loop_stop()
        reader.disconnect()


def _acknowledged(service) -> bool:
    return not service.teaching.store.unshared()


def test_a_delete_made_while_a_device_was_off_stays_deleted(tmp_path, broker) -> None:
    """A teaches, stops; B deletes the example; A restarts. A publishes nothing again (its
    outbox is empty: the broker acknowledged the add), so the delete stays the broker's last
    word: A drops the example, and a device that joins later never learns it."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    a, b = _fleet(tmp_path, broker, "a"), _fleet(tmp_path, broker, "b")
    with b:
        with a, serving(a) as url_a:
            taught = _teach(url_a, "car", 1)
            wait_until(lambda: _converged([a, b], {taught}), "both devices to hold it")
            wait_until(lambda: _acknowledged(a), "the broker to acknowledge the add")
        with serving(b) as url_b:
            assert httpx.delete(f"{url_b}/v1/examples/{taught}", timeout=30).status_code == 200
        wait_until(lambda: _converged([b], set()), "B to unlearn it")
        wait_until(lambda: _retained(broker, taught)["op"] == "delete", "the retained delete")
        again = _fleet(tmp_path, broker, "a")
        with again:
            wait_until(lambda: _converged([again], set()), "A to take the delete at its restart")
            assert again.teaching.fleet.published == 0
        assert _retained(broker, taught)["op"] == "delete"
        late = _fleet(tmp_path, broker, "c")
        with late:
            wait_until(lambda: late.teaching.store.deleted_ids() == {taught}, "C to catch up")
            assert late.teaching.store.ids() == [] and late.teaching.learner.num_samples == 0


def test_a_delete_made_while_the_broker_was_away_reaches_the_fleet_after_a_restart(
    tmp_path, broker
) -> None:
    """The broker is down when A deletes; A stops before it returns. The delete waits in A's
    outbox and goes out at A's next start: B unlearns it too."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    a, b = _fleet(tmp_path, broker, "a"), _fleet(tmp_path, broker, "b")
    with b:
        with a, serving(a) as url_a:
            taught = _teach(url_a, "car", 1)
            wait_until(lambda: _converged([a, b], {taught}), "both devices to hold it")
            broker.stop()
            wait_until(lambda: not a.teaching.fleet.linked.is_set(), "A to see the broker go")
            assert httpx.delete(f"{url_a}/v1/examples/{taught}", timeout=30).status_code == 200
        held = ExampleStore.open(
            tmp_path / "states" / "a" / "teach" / "examples.sqlite",
            a.lanes.bundle.engine_fingerprint,
            a.teaching.dim,
        )
        assert held.unshared() == [("delete", taught)]
        held.close()
        broker.start()
        again = _fleet(tmp_path, broker, "a")
        with again:
            wait_until(lambda: _converged([b], set()), "B to unlearn the delete made offline")
            wait_until(lambda: _acknowledged(again), "the broker to acknowledge the delete")


def test_a_delete_of_an_id_not_held_changes_nothing(tmp_path, broker) -> None:
    """A DELETE answered 404 leaves no tombstone: the example arriving later from a peer is
    learned, as on every other device."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    device = _fleet(tmp_path, broker, "a")
    with device, serving(device) as url:
        own = device.teaching.store.get(_teach(url, "car", 1))
        coming = "0123456789abcdef0123456789abcdef"
        assert httpx.delete(f"{url}/v1/examples/{coming}", timeout=30).status_code == 404
        assert coming not in device.teaching.store.deleted_ids()
        peer_example = replace(own, id=coming, label="bus", origin="f" * 32)
        _publish(broker, peer_example, device.lanes.bundle.engine_fingerprint)
        wait_until(lambda: _converged([device], {own.id, coming}), "the peer's example")


def test_an_add_of_a_deleted_example_gets_its_delete_published_again(tmp_path, broker) -> None:
    """A peer publishes again an example this device deleted (it replaces the retained delete):
    the device publishes the delete again, so a late device still catches up to no example."""
    make_bundle(tmp_path / "bundle", method="tca")
    write_images(tmp_path / "cam", 3, seed=4)
    device = _fleet(tmp_path, broker, "a")
    with device, serving(device) as url:
        taught = _teach(url, "car", 1)
        example = replace(device.teaching.store.get(taught), origin="f" * 32)
        assert httpx.delete(f"{url}/v1/examples/{taught}", timeout=30).status_code == 200
        wait_until(lambda: _retained(broker, taught)["op"] == "delete", "the retained delete")
        _publish(broker, example, device.lanes.bundle.engine_fingerprint)  # resurrected
        wait_until(lambda: _retained(broker, taught)["op"] == "delete", "the delete again")
        assert device.teaching.store.ids() == [] and device.teaching.learner.num_samples == 0
        assert device.teaching.fleet.published == 3  # add, delete, the delete again


def _publish(broker: Broker, example, fingerprint: str) -> None:
    """Publish ``example``'s add as a peer would (retained, QoS 1)."""
    peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    peer.connect("127.0.0.1", broker.port)
    peer.loop_start()
    try:
        payload = encode_add(example, fingerprint, example.origin)
        topic = topic_of("site-a", example.id)
        peer.publish(topic, payload, qos=1, retain=True).wait_for_publish(30)
    finally:
        peer.loop_stop()
        peer.disconnect()
