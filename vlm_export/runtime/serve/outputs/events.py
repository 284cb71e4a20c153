"""Decision events: a line of JSON when a source's decision changes, and a heartbeat.

``--events jsonl:FILE`` appends one JSON object per line (whole lines, flushed); ``--events
mqtt://HOST:PORT/TOPIC`` publishes each event to TOPIC/SOURCE (paho-mqtt, QoS 1). Each sink
has its own thread and a bounded queue: the frame loop never waits on a disk or a broker; while
the broker is down events wait in the queue, the oldest dropped (and counted) when it is full.

An event (docs/serve.md)::

    {"type": "decision" | "heartbeat", "source": "front", "class": "cat", "label": 3,
     "domain": "pets", "score": 0.91, "topk": [{"index": 3, "class": "cat", "score": 0.91}, ...],
     "index": 1234, "time_utc": "2026-01-01T12:00:00.123Z", "monotonic_ms": 5321.5,
     "state": "running"}

A heartbeat without any decision yet has ``class``, ``label``, ``score`` null and ``topk`` [].
When a source's engine output collapses (``serve.frames.watch``) an event of type ``"collapsed"`` is
sent with a ``reason``, and one of type ``"recovered"`` when its output varies again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from vlm_export.core.errors import UserError, shown, shown_path
from vlm_export.core.json_text import dumps
from vlm_export.core.special_files import open_output
from vlm_export.runtime.mqtt import connect, paho_client, parse_mqtt_url
from vlm_export.runtime.pipeline import utc_now
from vlm_export.runtime.serve.outputs.metrics import ServeMetrics

log = logging.getLogger(__name__)

QUEUE_EVENTS = 10_000


def make_event(kind: str, source: str, record: dict[str, Any] | None, state: str) -> dict:
    """An event from a frame record (None: no decision yet)."""
    record = record or {}
    topk = record.get("topk") or []
    return {
        "type": kind,
        "source": source,
        "class": record.get("class"),
        "label": record.get("label"),
        "domain": record.get("domain"),
        "score": topk[0]["score"] if topk else None,
        "topk": topk,
        "index": record.get("index"),
        "time_utc": record.get("time_utc") or utc_now(),
        "monotonic_ms": round(time.monotonic() * 1000.0, 3),
        "state": state,
    }


class QueuedSink(ABC):
    """A sink thread draining a bounded queue; ``deliver`` sends one event or returns False."""

    name = "sink"

    def __init__(self, metrics: ServeMetrics, size: int = QUEUE_EVENTS) -> None:
        self.metrics = metrics
        self._queue: collections.deque[dict] = collections.deque()
        self._size = size
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"vlm-{self.name}", daemon=True)

    def start(self) -> None:
        """Start the delivery thread (the sink's counters exist, at 0, from now on)."""
        for counter in (self.metrics.events_sent, self.metrics.events_dropped):
            counter.labels(sink=self.name)
        self._thread.start()

    def put(self, event: dict) -> None:
        """Queue an event; when the queue is full the oldest is dropped and counted."""
        with self._cond:
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self.metrics.events_dropped.labels(sink=self.name).inc()
            self._queue.append(event)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                event = self._queue[0]
            if self.deliver(event):
                with self._cond:
                    if self._queue and self._queue[0] is event:
                        self._queue.popleft()
                self.metrics.events_sent.labels(sink=self.name).inc()
            elif self._stopping:
                return
            else:
                self.wait_for_link()

    @abstractmethod
    def deliver(self, event: dict) -> bool:
        """Send one event; False when it could not be sent now (it stays queued)."""

    def wait_for_link(self) -> None:
        """Wait a moment before trying again (a sink with a connection waits for it)."""
        time.sleep(0.5)

    def close(self, timeout_s: float = 2.0) -> None:
        """Deliver what is queued (up to ``timeout_s``), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


class JsonlSink(QueuedSink):
    """Appends events to a file, one JSON object per line."""

    def __init__(self, path: str, metrics: ServeMetrics) -> None:
        self.name = f"jsonl:{shown_path(path)}"
        super().__init__(metrics)
        self.path = Path(path)
        try:
            self._handle = open_output(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise UserError(f"cannot write --events {shown_path(path)}: {exc.strerror}") from None

    def deliver(self, event: dict) -> bool:
        try:
            self._handle.write(dumps(event) + "\n")
            self._handle.flush()
            return True
        except OSError as exc:
            log.warning("events file %s: %s", shown_path(self.path), exc.strerror or exc)
            return False

    def wait_for_link(self) -> None:
        time.sleep(5.0)  # a full disk: try again later, the queue bounds what waits

    def close(self, timeout_s: float = 2.0) -> None:
        super().close(timeout_s)
        with contextlib.suppress(OSError):
            self._handle.close()


class MqttSink(QueuedSink):
    """Publishes events to ``TOPIC/SOURCE`` on an MQTT broker; reconnects on its own."""

    def __init__(self, url: str, metrics: ServeMetrics, client_id: str = "") -> None:
        self.name = f"mqtt:{shown(url)}"
        super().__init__(metrics)
        address = parse_mqtt_url(url, "--events")
        self.topic = address.topic
        self._linked = threading.Event()
        self._connected_once = False
        self._client = paho_client("--events", client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        connect(self._client, address)  # connects and reconnects on paho's network thread

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        if self._connected_once:
            self.metrics.sink_reconnects.labels(sink=self.name).inc()
        self._connected_once = True
        self._linked.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any):
        self._linked.clear()

    def deliver(self, event: dict) -> bool:
        if not self._linked.is_set():
            return False
        topic = f"{self.topic}/{event['source']}"
        info = self._client.publish(topic, dumps(event), qos=1)
        return info.rc == 0  # MQTT_ERR_SUCCESS

    def wait_for_link(self) -> None:
        self._linked.wait(1.0)

    def close(self, timeout_s: float = 2.0) -> None:
        super().close(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()


def open_sink(spec: str, metrics: ServeMetrics) -> QueuedSink:
    """A sink for ``--events SPEC``: ``jsonl:FILE`` or ``mqtt://HOST:PORT/TOPIC``."""
    if spec.startswith("jsonl:") and spec[len("jsonl:") :].strip():
        return JsonlSink(spec[len("jsonl:") :], metrics)
    if spec.startswith("mqtt://"):
        return MqttSink(spec, metrics)
    raise UserError(f"--events {shown(spec)!r}: give jsonl:FILE or mqtt://HOST:PORT/TOPIC")


def jsonl_path(spec: str) -> str | None:
    """The file of a ``jsonl:FILE`` spec (for the write guard), else None."""
    return spec[len("jsonl:") :] if spec.startswith("jsonl:") else None


class Events:
    """Turns frame records into events for every sink: on a change of decision, and heartbeats
    every ``every_s`` seconds (one per source, its last decision)."""

    def __init__(self, sinks: list[QueuedSink], every_s: float) -> None:
        self.sinks = sinks
        self.every_s = every_s
        self._last: dict[str, dict | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._states: Any = None

    def start(self, states: Any) -> None:
        """Start the sinks and the heartbeat thread (``states()``: {source: state})."""
        if not self.sinks:
            return
        self._states = states
        for sink in self.sinks:
            sink.start()
        self._thread = threading.Thread(target=self._beat, name="vlm-heartbeat", daemon=True)
        self._thread.start()

    def decision(self, source: str, record: dict[str, Any]) -> None:
        """A frame's record: an event when its class differs from the source's last one."""
        if not self.sinks or "class" not in record:
            return
        with self._lock:
            last = self._last.get(source)
            self._last[source] = record
        if last is None or (last["class"], last.get("domain")) != (
            record["class"],
            record.get("domain"),
        ):
            self._emit(make_event("decision", source, record, "running"))

    def alert(self, source: str, kind: str, reason: str | None = None) -> None:
        """A ``collapsed`` (with its ``reason``) or ``recovered`` event for ``source``."""
        if not self.sinks:
            return
        with self._lock:
            last = self._last.get(source)
        self._emit({**make_event(kind, source, last, "running"), "reason": reason})

    def _emit(self, event: dict) -> None:
        for sink in self.sinks:
            sink.put(event)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            states = self._states()
            with self._lock:
                last = dict(self._last)
            for source, state in states.items():
                self._emit(make_event("heartbeat", source, last.get(source), state))

    def close(self) -> None:
        """Stop the heartbeats, then deliver what is queued and close the sinks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        for sink in self.sinks:
            sink.close()
