"""A fleet learns together: devices serving one bundle share what they are taught over MQTT.

Every change is one JSON message, retained, QoS 1, on ``PREFIX/examples/<id>``::

    {"v": 1, "op": "add", "id": "<32 hex>", "bundle": "<bundle fingerprint>",
     "origin": "<device id>", "label": "forklift", "source": "dock", "time_utc": "...Z",
     "embedding": "<base64 of the float32 little-endian embedding>"}
    {"v": 1, "op": "delete", "id": "<32 hex>", "bundle": "...", "origin": "...", "time_utc": "...Z"}

A delete replaces the add on the same topic, so a device that was off receives, on subscribing,
the last word on every example (catch-up through retained messages). Images never travel: an add
is the embedding (a few KB) and the label. The learner is a pure function of the set of examples,
so devices that applied the same adds and deletes hold the same state.

A message is refused (counted in ``refused`` and ``refusals``, logged once per reason, never
handed on) when it is over 64 KiB, not JSON, of another version, has missing, extra or mistyped
fields, a bad id or one that differs from its topic, another bundle's fingerprint, an embedding of
the wrong dimension, non-finite, of zero norm or not L2-normalised, or a bad label. These checks
stop mistakes (a device with another bundle, a broken publisher); only a broker that nothing
else can reach keeps out a peer that must not teach at all.

Wiring (the service): one ``FleetSync`` per service, on the service's store and learner::

    sync = FleetSync(url, device_id, bundle_fingerprint, dim, on_add=..., on_delete=...)
    sync.start()                    # after the store is open; retained messages arrive at once
    ... after a local teach:        store.add(example); sync.publish_add(example)
    ... after a local delete:       if store.delete(example_id): sync.publish_delete(example_id)
    ... at start:                   publish what the store's outbox still holds
    sync.close()                    # before closing the store

``on_add(example)`` / ``on_delete(example_id)`` run on paho's network thread, one message at a
time: they should store the change (``store.add`` / ``store.delete``) and queue it for the
learner's next batch rather than solve there. They may return False for "nothing changed" (a
duplicate add, a delete of an id not held; e.g. ``return store.add(example)``), which is counted
in ``duplicates`` instead of ``applied``. A device's own messages come back from the broker (and
after a restart with the same device id): they are handed on too, so a store that lost one gets
it back, and counted in ``echoes``. ``store.add`` returning False for a known or deleted id (its
tombstone) is what makes every example applied once. A callback that raises ``Refused`` (the
device's own limits) is counted under its reason; any other exception is logged once and counted
as refused ("could not apply"); the link stays up.

Publishes made while the broker is away wait in paho's queue and go out on reconnect; ``close``
waits a moment for the unacknowledged ones; ``on_shared(example_id, op)`` (optional) is called
once the broker acknowledged one. A change that was never acknowledged (the broker away until
the process stopped, a crash between the store and the publish) is kept by the caller (the
store's outbox) and published again at the next start; only those: an add published again after
a peer deleted the example would replace the retained delete. A device that receives an add of an
id it deleted publishes the delete again, so the retained word on every example stays the delete
(a late device catches up to the same set).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from vlm_export.core.errors import UserError, shown
from vlm_export.runtime.mqtt import connect, paho_client, parse_mqtt_url
from vlm_export.runtime.teach.examples import (
    EXAMPLE_ID,
    Example,
    check_embedding,
    check_label,
)

log = logging.getLogger(__name__)

WIRE_VERSION = 1
#: a message over this size is refused unread (an add is 3 KB at dimension 512, 6 KB at 1024)
MAX_MESSAGE_BYTES = 64 * 1024
#: origin and source: at most this many characters
MAX_TEXT_CHARS = 200
#: an embedding's L2 norm must be within this of 1 (every device stores normalised embeddings;
#: the bits received are the bits learned, so devices agree exactly)
UNIT_NORM_TOLERANCE = 1e-3
QOS = 1
ADD_FIELDS = frozenset(
    {"v", "op", "id", "bundle", "origin", "label", "source", "time_utc", "embedding"}
)
DELETE_FIELDS = frozenset({"v", "op", "id", "bundle", "origin", "time_utc"})
#: how long ``close`` waits for the broker to acknowledge what was published
CLOSE_WAIT_S = 5.0


class Refused(Exception):
    """A fleet message that is not applied: ``reason`` (a short fixed phrase) and ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Change:
    """A decoded message: an add (with its example) or a delete."""

    op: str
    id: str
    origin: str
    time_utc: str
    example: Example | None = None


def topic_of(prefix: str, example_id: str) -> str:
    """The topic of an example's messages."""
    return f"{prefix}/examples/{example_id}"


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds (``...T12:00:00.000Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_text(value: object, what: str) -> str:
    """``value`` if it is a string of 1 to MAX_TEXT_CHARS characters without control characters;
    UserError otherwise (device ids, origins and sources)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT_CHARS:
        raise UserError(f"{what} must be a string of 1 to {MAX_TEXT_CHARS} characters")
    if any(unicodedata.category(char).startswith("C") for char in value):
        raise UserError(f"{what} must not hold control characters: {shown(value)!r}")
    return value


def encode_add(example: Example, bundle_fingerprint: str, origin: str) -> bytes:
    """The add message of ``example`` (``origin``: the device that taught it, when the example's
    own ``origin`` is "", i.e. this device)."""
    vector = np.ascontiguousarray(example.embedding, dtype="<f4")
    message = {
        "v": WIRE_VERSION,
        "op": "add",
        "id": example.id,
        "bundle": bundle_fingerprint,
        "origin": example.origin or origin,
        "label": example.label,
        "source": example.source,
        "time_utc": example.time_utc,
        "embedding": base64.b64encode(vector.tobytes()).decode("ascii"),
    }
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_delete(example_id: str, bundle_fingerprint: str, origin: str, time_utc: str) -> bytes:
    """The delete message of ``example_id``, sent by ``origin`` at ``time_utc``."""
    message = {
        "v": WIRE_VERSION,
        "op": "delete",
        "id": example_id,
        "bundle": bundle_fingerprint,
        "origin": origin,
        "time_utc": time_utc,
    }
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode(
    payload: bytes, bundle_fingerprint: str, dim: int, topic_id: str | None = None
) -> Change:
    """The change a message carries; Refused when any check fails (``topic_id``: the id its
    topic names, which the message's id must equal)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Refused("over 64 KiB", f"{len(payload):,} bytes")
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused("not JSON") from None
    if not isinstance(message, dict):
        raise Refused("not JSON", "not an object")
    version = message.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise Refused("wrong version", shown(repr(version)))
    op = message.get("op")
    fields = {"add": ADD_FIELDS, "delete": DELETE_FIELDS}.get(op) if isinstance(op, str) else None
    if fields is None:
        raise Refused("bad fields", f"op {shown(repr(op))}")
    if set(message) != fields:
        odd = sorted(set(message) ^ fields)
        raise Refused("bad fields", f"{op} with missing or extra fields {shown(odd)}")
    example_id = message["id"]
    if not isinstance(example_id, str) or not EXAMPLE_ID.fullmatch(example_id):
        raise Refused("bad id", shown(repr(example_id)))
    if topic_id is not None and example_id != topic_id:
        raise Refused("bad id", f"{example_id} on the topic of {shown(topic_id)}")
    if message["bundle"] != bundle_fingerprint:
        raise Refused("other bundle", shown(repr(message["bundle"])))
    try:
        origin = check_text(message["origin"], "origin")
        time_utc = check_time(message["time_utc"])
    except UserError as exc:
        raise Refused("bad fields", str(exc)) from None
    if op == "delete":
        return Change("delete", example_id, origin, time_utc)
    try:
        label = check_label(message["label"])
    except UserError as exc:
        raise Refused("bad label", str(exc)) from None
    try:
        source = check_text(message["source"], "source")
    except UserError as exc:
        raise Refused("bad fields", str(exc)) from None
    embedding = decode_embedding(message["embedding"], dim)
    example = Example(example_id, label, source, time_utc, embedding, origin=origin)
    return Change("add", example_id, origin, time_utc, example)


def check_time(value: object) -> str:
    """``value`` if it is an ISO 8601 time (as sent); UserError otherwise."""
    if not isinstance(value, str) or len(value) > 40:
        raise UserError("time_utc must be an ISO 8601 string")
    try:
        datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise UserError(f"time_utc is not an ISO 8601 time: {shown(value)!r}") from None
    return value


def decode_embedding(text: object, dim: int) -> np.ndarray:
    """The float32 [dim] embedding of a base64 field, bit for bit as sent; Refused for bad
    base64, the wrong dimension, NaN/inf, zero norm or a norm away from 1."""
    if not isinstance(text, str):
        raise Refused("bad embedding", "not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("bad embedding", "not base64") from None
    if len(raw) != 4 * dim:
        raise Refused("wrong dimension", f"{len(raw) / 4:g} values, the bundle's are {dim}")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    try:
        check_embedding(vector, dim)
    except UserError as exc:
        raise Refused("bad embedding", str(exc)) from None
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
        raise Refused("bad embedding", f"not L2-normalised (norm {norm:.6g})")
    return vector


class FleetSync:
    """This device's link to the fleet: publishes its adds and deletes, hands every valid message
    of the fleet (its own echoes included) to ``on_add`` / ``on_delete`` (see the module's
    docstring for the wiring). ``url``: ``mqtt://HOST:PORT/PREFIX``."""

    def __init__(
        self,
        url: str,
        device_id: str,
        bundle_fingerprint: str,
        dim: int,
        on_add: Callable[[Example], object],
        on_delete: Callable[[str], object],
        on_shared: Callable[[str, str], object] | None = None,
    ) -> None:
        self.address = parse_mqtt_url(url, "--fleet")
        self.device_id = check_text(device_id, "a fleet device id")
        if 4 * dim * 4 // 3 + 4096 > MAX_MESSAGE_BYTES:
            raise UserError(f"--fleet: embeddings of dimension {dim} do not fit a fleet message")
        self.bundle_fingerprint = bundle_fingerprint
        self.dim = dim
        self.prefix = self.address.topic
        self.on_add = on_add
        self.on_delete = on_delete
        self.on_shared = on_shared
        self.applied = 0
        self.duplicates = 0
        self.echoes = 0
        self.refused = 0
        self.refusals: dict[str, int] = {}
        self.published = 0
        self.linked = threading.Event()
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._unacked: dict[int, tuple[str, str]] = {}  # message id: (example id, op)
        self._acked_early: set[int] = set()
        self._client = paho_client("--fleet")
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """({result: messages}, {refusal reason: messages}) so far, for metrics."""
        results = {
            "applied": self.applied,
            "duplicate": self.duplicates,
            "echo": self.echoes,
            "published": self.published,
        }
        return results, dict(self.refusals)

    @property
    def topic_filter(self) -> str:
        """What this device subscribes to: every example's topic."""
        return topic_of(self.prefix, "+")

    def start(self) -> None:
        """Connect in the background; on every (re)connect subscribe, which brings the retained
        messages (catch-up)."""
        connect(self._client, self.address)

    def publish_add(self, example: Example) -> None:
        """Share an example this device was taught (retained, QoS 1; queued while offline)."""
        payload = encode_add(example, self.bundle_fingerprint, self.device_id)
        self._publish(example.id, "add", payload)

    def publish_delete(self, example_id: str, time_utc: str | None = None) -> None:
        """Share the deletion of an example (any device's); it replaces the retained add."""
        stamp = time_utc or utc_now()
        payload = encode_delete(example_id, self.bundle_fingerprint, self.device_id, stamp)
        self._publish(example_id, "delete", payload)

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Wait up to ``timeout_s`` for the broker to acknowledge what was published (while
        linked), then disconnect; no callback runs after this returns."""
        deadline = time.monotonic() + timeout_s
        while self.linked.is_set() and self._outstanding() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._client.disconnect()
        self._client.loop_stop()

    # --------------------------------------------------------------- paho's network thread
    def _publish(self, example_id: str, op: str, payload: bytes) -> None:
        topic = topic_of(self.prefix, example_id)
        info = self._client.publish(topic, payload, qos=QOS, retain=True)
        with self._lock:
            acked = info.mid in self._acked_early
            if acked:
                self._acked_early.discard(info.mid)
            else:
                self._unacked[info.mid] = (example_id, op)
            self.published += 1
        if acked:
            self._shared(example_id, op)

    def _shared(self, example_id: str, op: str) -> None:
        """The broker holds ``op`` of ``example_id``: tell ``on_shared``."""
        if self.on_shared is None:
            return
        try:
            self.on_shared(example_id, op)
        except Exception as exc:  # noqa: BLE001 - the link must outlive a failing callback
            self._warn_once("shared", "could not record a publish: %s: %s", type(exc).__name__, exc)

    def _outstanding(self) -> int:
        with self._lock:
            return len(self._unacked)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            change = self._unacked.pop(mid, None)
            if change is None:  # acknowledged before ``_publish`` recorded it
                self._acked_early.add(mid)
        if change is not None:
            self._shared(*change)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._warn_once("connect", "the broker refused the connection: %s", reason)
            return
        client.subscribe(self.topic_filter, qos=QOS)
        self.linked.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any):
        if any(getattr(reason, "is_failure", False) for reason in reasons):
            self._warn_once(
                "subscribe", "the broker refused the subscription to %s", self.topic_filter
            )

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any):
        self.linked.clear()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic_id = message.topic.rsplit("/", 1)[-1]
        try:
            change = decode(message.payload, self.bundle_fingerprint, self.dim, topic_id)
        except Refused as refused:
            self._refuse(refused.reason, refused.detail, message.topic)
            return
        own = change.origin == self.device_id
        try:
            if change.example is not None:
                example = change.example
                if own:  # "" is "this device" in the store
                    example = replace(example, origin="")
                result = self.on_add(example)
            else:
                result = self.on_delete(change.id)
        except Refused as refused:  # the device's own limits (counted, as the other reasons)
            self._refuse(refused.reason, refused.detail, message.topic)
            return
        except Exception as exc:  # noqa: BLE001 - the link must outlive a failing callback
            self._refuse("could not apply", f"{type(exc).__name__}: {exc}", message.topic)
            return
        if own:
            self.echoes += 1
        elif result is False:
            self.duplicates += 1
        else:
            self.applied += 1

    def _refuse(self, reason: str, detail: str, topic: str) -> None:
        self.refused += 1
        count = self.refusals.get(reason, 0) + 1
        self.refusals[reason] = count
        if count == 1:
            log.warning(
                "fleet: refused a message on %s (%s%s); further ones for this reason are only "
                "counted",
                shown(topic),
                reason,
                f": {detail}" if detail else "",
            )

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("fleet: " + message, *args)
