"""A fleet learns together, exactly: devices with real SQLite stores and learners share examples
through a real mosquitto on loopback. Every device converges to one learner on the union of the
surviving examples (1e-9 relative), a late device catches up from retained messages, hostile
messages are refused and change nothing, duplicates are applied once."""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from mosquitto import Broker, free_port
from polling import wait_until

mqtt = pytest.importorskip("paho.mqtt.client")

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.runtime.teach import fleet  # noqa: E402
from vlm_export.runtime.teach.examples import Example, new_id  # noqa: E402
from vlm_export.runtime.teach.fleet import (  # noqa: E402
    FleetSync,
    Refused,
    decode,
    encode_add,
    encode_delete,
    topic_of,
)
from vlm_export.runtime.teach.learner import TeachLearner  # noqa: E402
from vlm_export.runtime.teach.store import ExampleStore  # noqa: E402

DIM = 32
HIDDEN = 48
BUNDLE = "f" * 64
TIME = "2026-12-07T04:00:00.000Z"
RELATIVE = 1e-9


def unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    vector = rng.standard_normal(dim).astype(np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def example(rng: np.random.Generator, label: str, source: str = "dock") -> Example:
    return Example(new_id(), label, source, TIME, unit(rng))


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------- the wire codec
def test_an_add_round_trips_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    sent = example(rng, "line 3 jam")
    change = decode(encode_add(sent, BUNDLE, "dev-a"), BUNDLE, DIM, sent.id)
    got = change.example
    assert change.op == "add" and change.origin == "dev-a" and got is not None
    assert (got.id, got.label, got.source, got.time_utc) == (
        sent.id,
        sent.label,
        sent.source,
        sent.time_utc,
    )
    assert got.embedding.dtype == np.float32
    assert got.embedding.tobytes() == sent.embedding.tobytes()  # no renormalising on the way
    message = json.loads(encode_add(sent, BUNDLE, "dev-a"))
    assert base64.b64decode(message["embedding"]) == sent.embedding.astype("<f4").tobytes()
    assert len(encode_add(sent, BUNDLE, "dev-a")) < 1024  # a few KB at most, never an image


def test_a_delete_round_trips() -> None:
    example_id = new_id()
    change = decode(encode_delete(example_id, BUNDLE, "dev-b", TIME), BUNDLE, DIM, example_id)
    assert (change.op, change.id, change.origin, change.example) == (
        "delete",
        example_id,
        "dev-b",
        None,
    )


def add_message(**changes: object) -> dict:
    rng = np.random.default_rng(1)
    message = json.loads(encode_add(example(rng, "forklift"), BUNDLE, "raw"))
    message.update(changes)
    return message


def vector_text(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def nan_vector() -> str:
    values = np.full(DIM, 0.1, np.float32)
    values[3] = np.nan
    return vector_text(values)


#: hostile or broken messages: (what, payload, the reason it is refused for)
MESSAGES: list[tuple[str, dict, str]] = [
    (
        "wrong dimension",
        add_message(embedding=vector_text(np.ones(DIM + 1) / 6)),
        "wrong dimension",
    ),
    ("NaN", add_message(embedding=nan_vector()), "bad embedding"),
    ("zero norm", add_message(embedding=vector_text(np.zeros(DIM))), "bad embedding"),
    ("not normalised", add_message(embedding=vector_text(np.ones(DIM))), "bad embedding"),
    ("not base64", add_message(embedding="@@@@"), "bad embedding"),
    ("forged id", add_message(id="../../" + "a" * 26), "bad id"),
    ("upper-case id", add_message(id="A" * 32), "bad id"),
    ("other bundle", add_message(bundle="0" * 64), "other bundle"),
    ("wrong version", add_message(v=2), "wrong version"),
    ("version true", add_message(v=True), "wrong version"),
    ("no version", {k: v for k, v in add_message().items() if k != "v"}, "wrong version"),
    ("unknown op", add_message(op="merge"), "bad fields"),
    ("extra field", add_message(image="..."), "bad fields"),
    ("control label", add_message(label="fork\x00lift"), "bad label"),
    ("empty label", add_message(label="  "), "bad label"),
    ("long label", add_message(label="x" * 10_000), "bad label"),
    ("label not text", add_message(label=7), "bad label"),
    ("bad time", add_message(time_utc="yesterday"), "bad fields"),
    ("bad origin", add_message(origin=""), "bad fields"),
]
HOSTILE: list[tuple[str, bytes, str]] = [
    (what, json.dumps(m).encode(), reason) for what, m, reason in MESSAGES
] + [
    ("not JSON", b"{'v': 1", "not JSON"),
    ("not UTF-8", b"\xff\xfe{}", "not JSON"),
    ("a JSON list", b"[1, 2]", "not JSON"),
    ("empty (a cleared retained message)", b"", "not JSON"),
    ("deep nesting", b"[" * 60_000, "not JSON"),
    ("over 64 KiB", json.dumps(add_message(pad="x" * 70_000)).encode(), "over 64 KiB"),
]


@pytest.mark.parametrize(("what", "payload", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_codec_refuses(what: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        decode(payload, BUNDLE, DIM)
    assert refused.value.reason == reason, what


def test_an_id_that_differs_from_its_topic_is_refused() -> None:
    sent = add_message()
    with pytest.raises(Refused, match="bad id"):
        decode(json.dumps(sent).encode(), BUNDLE, DIM, new_id())


def test_the_size_cap_is_64_kib_exactly() -> None:
    message = add_message(label="a")
    base = len(json.dumps(message).encode())
    padded = json.dumps(add_message(label="a" + " " * (fleet.MAX_MESSAGE_BYTES - base))).encode()
    assert len(padded) == fleet.MAX_MESSAGE_BYTES
    assert decode(padded, BUNDLE, DIM).example.label == "a"  # label stripped, then accepted
    with pytest.raises(Refused, match="over 64 KiB"):
        decode(padded.replace(b'"a ', b'"a  ', 1), BUNDLE, DIM)


@pytest.mark.parametrize(
    ("url", "device", "message"),
    [
        ("mqtt://127.0.0.1:x/site", "dev", "--fleet mqtt://127.0.0.1:x/site: the port is not a"),
        ("mqtt://127.0.0.1:1883", "dev", "write mqtt://HOST:PORT/TOPIC"),
        ("mqtt://127.0.0.1/site/#", "dev", "write mqtt://HOST:PORT/TOPIC"),
        ("http://127.0.0.1/site", "dev", "write mqtt://HOST:PORT/TOPIC"),
        ("mqtt://127.0.0.1/site", "", "a fleet device id must be a string of 1 to"),
        ("mqtt://127.0.0.1/site", "dev\n", "must not hold control characters"),
    ],
)
def test_a_bad_fleet_option_is_one_line(url: str, device: str, message: str) -> None:
    with pytest.raises(UserError) as error:
        FleetSync(url, device, BUNDLE, DIM, on_add=print, on_delete=print)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------- devices on a broker
class Device:
    """One device as the service wires it: a SQLite store, a learner, a FleetSync."""

    def __init__(self, name: str, folder: Path, url: str, bundle: str = BUNDLE) -> None:
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self.store = ExampleStore.open(folder / "examples.sqlite", bundle, DIM)
        self.learner = TeachLearner(DIM, HIDDEN, seed=0)
        self.lock = threading.Lock()
        self.sync = FleetSync(url, name, bundle, DIM, self._on_add, self._on_delete)
        self.closed = False

    def _on_add(self, example: Example) -> bool:
        with self.lock:
            if not self.store.add(example):
                return False
            self.learner.apply(added=[example])
            return True

    def _on_delete(self, example_id: str) -> bool:
        with self.lock:
            if self.store.delete(example_id) is None:
                return False
            self.learner.apply(removed=[example_id])
            return True

    def start(self) -> Device:
        self.sync.start()
        wait_until(self.sync.linked.is_set, f"{self.name} to reach the broker")
        return self

    def teach(self, example: Example) -> None:
        assert self._on_add(example)
        self.sync.publish_add(example)

    def forget(self, example_id: str) -> None:
        assert self._on_delete(example_id)
        self.sync.publish_delete(example_id)

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.store.ids())

    def holds(self, ids: set[str]) -> bool:
        with self.lock:
            return set(self.store.ids()) == ids and set(self.learner.ids) == ids

    def weights(self) -> tuple[list[str], np.ndarray]:
        with self.lock:
            return list(self.learner.labels), self.learner.weights.copy()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sync.close()
            self.store.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    found = Broker(tmp_path_factory.mktemp("mosquitto"))
    found.start()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture()
def site(broker: Broker) -> str:
    """A fresh topic prefix per test: retained messages of one test never reach another."""
    return f"mqtt://127.0.0.1:{broker.port}/site-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def devices(tmp_path: Path, site: str) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(name: str, **changes: object) -> Device:
        device = Device(name, tmp_path / name, site, **changes)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


def assert_converged(fleet_devices: list[Device], surviving: list[Example]) -> float:
    """Each device's W equals a fresh learner on ``surviving`` (1e-9 relative); the largest
    relative difference."""
    reference = TeachLearner.fit(surviving, DIM, HIDDEN, seed=0)
    worst = 0.0
    for device in fleet_devices:
        labels, weights = device.weights()
        assert labels == reference.labels, device.name
        difference = relative_difference(weights, reference.weights)
        assert difference <= RELATIVE, (device.name, difference)
        worst = max(worst, difference)
    return worst


def test_three_devices_converge_exactly_and_a_late_one_catches_up(devices) -> None:
    rng = np.random.default_rng(7)
    a, b, c = (devices(name).start() for name in ("dev-a", "dev-b", "dev-c"))
    taught = {
        a: [example(rng, "forklift", "dock") for _ in range(4)],
        b: [example(rng, "pallet", "aisle") for _ in range(3)]
        + [example(rng, "unknown", "aisle") for _ in range(2)],
        c: [example(rng, "line 3 jam", "belt") for _ in range(3)],
    }
    for device, examples in taught.items():
        for item in examples:
            device.teach(item)
    everything = {e.id: e for examples in taught.values() for e in examples}
    for device in (a, b, c):
        wait_until(lambda d=device: d.holds(set(everything)), f"{device.name} to hold all 12")
    before = assert_converged([a, b, c], list(everything.values()))

    # deletes, also of another device's examples
    gone = [taught[a][0].id, taught[b][3].id, taught[c][1].id]
    b.forget(gone[0])  # b deletes one of a's
    c.forget(gone[1])  # c deletes one of b's "unknown"
    c.forget(gone[2])  # c deletes one of its own
    surviving = [e for i, e in everything.items() if i not in gone]
    for device in (a, b, c):
        wait_until(lambda d=device: d.holds({e.id for e in surviving}), f"{device.name} deletes")
    after = assert_converged([a, b, c], surviving)
    assert a.ids() == b.ids() == c.ids() == {e.id for e in surviving}
    for device in (a, b, c):
        assert device.store.deleted_ids() >= set(gone)
        assert device.sync.refused == 0 and device.sync.refusals == {}
    # what arrived is bit for bit what was taught (no renormalising on the way)
    held = {e.id: e for e in c.store.all()}
    for item in taught[a][1:]:
        assert held[item.id].embedding.tobytes() == item.embedding.tobytes()
        assert held[item.id].origin == "dev-a"
    assert {e.origin for e in a.store.all() if e.id in {x.id for x in taught[a]}} == {""}
    # each device applied the others' adds and deletes, and saw its own come back
    assert a.sync.applied == 8 + 3 and b.sync.applied == 7 + 2 and c.sync.applied == 9 + 1
    assert a.sync.echoes == 4 and b.sync.echoes == 5 + 1 and c.sync.echoes == 3 + 2

    late = devices("dev-late").start()
    wait_until(lambda: late.holds({e.id for e in surviving}), "the late device to catch up")
    late_difference = assert_converged([late], surviving)
    assert late.store.deleted_ids() >= set(gone) and late.sync.refused == 0
    print(
        f"\nfleet convergence: max relative difference to one learner on the union: "
        f"{before:.3g} (12 examples), {after:.3g} (after 3 deletes), "
        f"late device {late_difference:.3g}"
    )


def raw_client(site: str) -> mqtt.Client:
    port = int(site.split(":")[2].split("/")[0])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish_raw(client: mqtt.Client, topic: str, payload: bytes, retain: bool = True) -> None:
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)


def test_hostile_messages_are_refused_counted_and_logged_once(devices, site, caplog) -> None:
    rng = np.random.default_rng(3)
    prefix = site.rsplit("/", 1)[1]
    a = devices("dev-a").start()
    kept = example(rng, "forklift")
    a.teach(kept)
    wait_until(lambda: a.sync.echoes == 1, "dev-a's own add to come back")
    labels, weights = a.weights()
    raw = raw_client(site)
    caplog.set_level(logging.WARNING, logger="vlm_export.runtime.teach.fleet")
    try:
        for index, (_what, payload, _reason) in enumerate(HOSTILE):
            try:
                topic_id = str(json.loads(payload)["id"])
            except (ValueError, KeyError, TypeError, RecursionError):
                topic_id = new_id()
            if not fleet.EXAMPLE_ID.fullmatch(topic_id):
                topic_id = f"not-an-id-{index}"
            publish_raw(raw, topic_of(prefix, topic_id), payload)
        forged = add_message()  # a valid add, on the topic of another id
        publish_raw(raw, topic_of(prefix, new_id()), json.dumps(forged).encode())
        publish_raw(raw, topic_of(prefix, new_id()), b"\x00" * 70_000, retain=False)
        expected = len(HOSTILE) + 2
        wait_until(lambda: a.sync.refused == expected, f"{expected} refusals")
        # a late device meets the retained ones too, and refuses them as well
        late = devices("dev-late").start()
        wait_until(lambda: late.ids() == {kept.id}, "the late device to get the one good add")
        # retained: all but the empty payload (which clears its topic) and the non-retained one
        retained = sum(1 for _what, payload, _reason in HOSTILE if payload) + 1
        wait_until(lambda: late.sync.refused == retained, "the late device's refusals")
    finally:
        raw.loop_stop()
        raw.disconnect()
    assert a.ids() == {kept.id} and a.holds({kept.id})
    assert a.weights()[0] == labels and np.array_equal(a.weights()[1], weights)  # nothing changed
    assert a.sync.applied == 0 and a.sync.duplicates == 0
    reasons = {}
    for _what, _payload, reason in HOSTILE:
        reasons[reason] = reasons.get(reason, 0) + 1
    reasons["bad id"] += 1
    reasons["over 64 KiB"] += 1
    assert a.sync.refusals == reasons
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("fleet")]
    assert len(lines) == 2 * len(reasons), lines  # once per reason, per device
    assert all(line.startswith("fleet: refused a message on ") for line in lines)
    assert not any("Traceback" in line for line in lines)


def test_duplicates_are_applied_once(devices, site) -> None:
    rng = np.random.default_rng(4)
    prefix = site.rsplit("/", 1)[1]
    a = devices("dev-a").start()
    b = devices("dev-b").start()
    item = example(rng, "pallet")
    payload = encode_add(item, BUNDLE, "dev-raw")
    raw = raw_client(site)
    try:
        publish_raw(raw, topic_of(prefix, item.id), payload)
        publish_raw(raw, topic_of(prefix, item.id), payload)
        publish_raw(raw, topic_of(prefix, item.id), payload, retain=False)
        wait_until(lambda: b.holds({item.id}), "dev-b to hold the example")
        b.sync.publish_add(item)  # a device republishing what it holds: the same message
        wait_until(lambda: a.sync.applied + a.sync.duplicates == 4, "four copies at dev-a")
    finally:
        raw.loop_stop()
        raw.disconnect()
    seen = b.sync
    wait_until(lambda: seen.applied + seen.duplicates + seen.echoes == 4, "four at dev-b")
    assert (a.sync.applied, a.sync.duplicates, a.sync.echoes) == (1, 3, 0)
    assert (seen.applied, seen.duplicates, seen.echoes) == (1, 2, 1)  # its own copy: an echo
    for device in (a, b):
        assert device.holds({item.id}) and device.learner.num_samples == 1
    # a delete, then the add again: the tombstone wins, on every device
    a.forget(item.id)
    wait_until(lambda: b.holds(set()), "dev-b to apply the delete")
    duplicates = b.sync.duplicates
    raw = raw_client(site)
    try:
        publish_raw(raw, topic_of(prefix, item.id), payload, retain=False)
        wait_until(lambda: b.sync.duplicates == duplicates + 1, "the replayed add at dev-b")
    finally:
        raw.loop_stop()
        raw.disconnect()
    assert a.holds(set()) and b.holds(set())


def test_publishes_wait_for_the_broker_and_close_delivers(devices, tmp_path) -> None:
    """The broker is restarted while a device teaches: paho reconnects, resubscribes and sends
    what waited; a teach right before close still reaches the fleet."""
    (tmp_path / "own").mkdir()
    own = Broker(tmp_path / "own")
    own.start()
    url = f"mqtt://127.0.0.1:{own.port}/site-r"
    rng = np.random.default_rng(5)
    a = Device("dev-a", tmp_path / "a", url).start()
    b = Device("dev-b", tmp_path / "b", url).start()
    try:
        own.stop()
        wait_until(lambda: not a.sync.linked.is_set(), "dev-a to see the broker gone")
        offline = example(rng, "forklift")
        a.teach(offline)  # queued by paho while the broker is away
        own.start()
        wait_until(lambda: b.holds({offline.id}), "the queued add after the broker restart")
        last = example(rng, "forklift")
        a.teach(last)
        a.close()  # waits for the broker's acknowledgement
        wait_until(lambda: b.holds({offline.id, last.id}), "the add published before close")
        assert_converged([b], [offline, last])
    finally:
        a.close()
        b.close()
        own.stop()


def test_no_broker_is_no_hang(tmp_path) -> None:
    """Start and close without a broker: nothing blocks, nothing is applied."""
    device = Device("dev-a", tmp_path, f"mqtt://127.0.0.1:{free_port()}/site")
    device.sync.start()
    device.sync.publish_add(example(np.random.default_rng(6), "forklift"))
    device.close()
    assert device.sync.applied == 0 and not device.sync.linked.is_set()


def test_a_failing_callback_is_counted_and_the_link_stays_up(devices, site) -> None:
    """An exception in the service's callback (say, a full disk) is one refusal, not a dead
    network thread: later messages still arrive."""
    rng = np.random.default_rng(8)
    got: list[str] = []

    def on_add(item: Example) -> bool:
        if item.label == "boom":
            raise OSError(28, "No space left on device")
        got.append(item.id)
        return True

    sync = FleetSync(site, "dev-b", BUNDLE, DIM, on_add=on_add, on_delete=print)
    sync.start()
    try:
        a = devices("dev-a").start()
        a.teach(example(rng, "boom"))
        good = example(rng, "forklift")
        a.teach(good)
        wait_until(lambda: got == [good.id], "the add after the failing one")
        assert sync.refusals == {"could not apply": 1} and sync.applied == 1
    finally:
        sync.close()


def test_a_device_on_another_bundle_is_refused_both_ways(devices) -> None:
    """A device still serving another bundle shares the site: neither learns the other's
    examples (their embeddings mean different things), both say why."""
    rng = np.random.default_rng(9)
    a = devices("dev-a").start()
    old = devices("dev-old", bundle="0" * 64).start()
    mine, theirs = example(rng, "forklift"), example(rng, "pallet")
    a.teach(mine)
    old.teach(theirs)
    wait_until(lambda: a.sync.refused == 1 and old.sync.refused == 1, "one refusal each")
    wait_until(lambda: a.sync.echoes == 1 and old.sync.echoes == 1, "both echoes")
    assert a.ids() == {mine.id} and old.ids() == {theirs.id}
    assert a.sync.refusals == old.sync.refusals == {"other bundle": 1}
