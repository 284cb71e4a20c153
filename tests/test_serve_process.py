"""``vlm-edge serve`` as a process and with a real MQTT broker: SIGTERM / SIGINT stop cleanly
(exit 0, states saved), kill -9 at any moment (checkpoints included) leaves every state loadable,
events reach Debian's mosquitto (also after the broker was down), memory stays flat (slow)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ctrl_c import default_sigint
from fakebundle import make_bundle, write_images
from mosquitto import Broker, free_port
from polling import WAIT_S, wait_until

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
mqtt = pytest.importorskip("paho.mqtt.client")

from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.serve.config import ServeSettings  # noqa: E402
from vlm_export.runtime.serve.service import Service  # noqa: E402
from vlm_export.runtime.tca.stage import build_reservoir  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-proc")
    make_bundle(root / "bundle")
    write_images(root / "front", 4, seed=1, suffix=".png")
    write_images(root / "back", 3, seed=2, suffix=".png")
    return root


def start_serve(world: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vlm_export.runtime",
        "serve",
        str(world / "bundle"),
        "--source",
        f"front={world / 'front'}",
        "--source",
        f"back={world / 'back'}",
        "--loop",
        "--port",
        str(port),
        *extra,
    ]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=default_sigint,  # some tests send it SIGINT: Ctrl-C as from a terminal
    )
    return process, port


def wait_serving(process: subprocess.Popen, port: int) -> None:
    """Wait until the HTTP app answers (the service has started)."""

    def up() -> bool:
        assert process.poll() is None, process.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # 503 while no frame yet: it answers
        except OSError:
            return False

    wait_until(up, "the server to answer")


def loadable(path: Path, bundle: Path) -> int:
    """Entries of a state file loaded as ``vlm-edge run --state`` loads it."""
    return int(build_reservoir(Bundle.open(bundle), None, path).counts().sum())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_states_and_exits_0(world, tmp_path, sig) -> None:
    states = tmp_path / "states"
    process, port = start_serve(world, tmp_path, "--state-dir", str(states))
    try:
        wait_serving(process, port)
        process.send_signal(sig)
        _, err = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "states saved" in err and "Traceback" not in err
    for name in ("front", "back"):
        loadable(states / f"{name}.npz", world / "bundle")


def test_sigterm_while_a_live_stream_is_open_ends_it_and_exits_0(world, tmp_path) -> None:
    states = tmp_path / "states"
    process, port = start_serve(world, tmp_path, "--state-dir", str(states))
    viewer = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        wait_serving(process, port)
        viewer.request("GET", "/v1/sources/front/stream.mjpg")
        stream = viewer.getresponse()
        assert stream.status == 200 and stream.readline() == b"--frame\r\n"  # a first part
        process.send_signal(signal.SIGTERM)  # the viewer stays connected
        _, err = process.communicate(timeout=WAIT_S)
        stream.read()  # the server ended the response: the body is complete, no hang
    finally:
        viewer.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "states saved" in err and "Traceback" not in err and "CancelledError" not in err
    loadable(states / "front.npz", world / "bundle")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_a_request_body_arrives_answers_503_and_exits_0(
    world, tmp_path, sig
) -> None:
    """A client uploads a picture slowly when the service is told to stop: its request is
    answered 503 at once (it does not hold the stop for the grace period, nor end in a
    cancelled task's traceback)."""
    import socket

    process, port = start_serve(world, tmp_path)
    uploader = socket.socket()
    try:
        wait_serving(process, port)
        uploader.settimeout(WAIT_S)
        uploader.connect(("127.0.0.1", port))
        uploader.sendall(
            b"POST /v1/examples?label=cat HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG"
        )
        time.sleep(0.5)  # the body is being awaited
        process.send_signal(sig)
        reply = b""
        while chunk := uploader.recv(65536):
            reply += chunk
        _, err = process.communicate(timeout=WAIT_S)
    finally:
        uploader.close()
        if process.poll() is None:
            process.kill()
    assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
    assert b'{"error":"the service is stopping"}' in reply
    assert process.returncode == 0, err
    assert "Traceback" not in err and "CancelledError" not in err and "Cancel " not in err


def _kill_during_a_write(process: subprocess.Popen, states: Path, limit_s: float) -> bool:
    """kill -9 as soon as a checkpoint's temporary file shows (True), or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    old = set(os.listdir(states)) if states.exists() else set()  # leftovers of earlier kills
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if any(n.startswith(".") and n not in old for n in os.listdir(states)):
                process.kill()
                return True
    process.kill()
    return False


def test_kill_9_at_any_moment_leaves_every_state_loadable(world, tmp_path) -> None:
    """Checkpoints every 20 ms while frames run; the process is killed 8 times, each time as
    soon as a checkpoint is being written (or at a later moment if none is seen)."""
    states = tmp_path / "states"
    checked = hits = 0
    for round_ in range(8):
        process, port = start_serve(
            world, tmp_path, "--state-dir", str(states), "--checkpoint-every", "0.02"
        )
        try:
            wait_serving(process, port)
            time.sleep(0.03 * round_)
            hits += _kill_during_a_write(process, states, limit_s=2.0)
        finally:
            process.kill()
            process.communicate(timeout=WAIT_S)
        for name in ("front", "back"):
            path = states / f"{name}.npz"
            if path.exists():
                checked += 1
                loadable(path, world / "bundle")
    print(f"{hits} of 8 kills landed while a checkpoint was being written")
    assert checked >= 8  # states were there to check in most rounds


# ---------------------------------------------------------------------- a real MQTT broker
@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    found = Broker(tmp_path)
    try:
        yield found
    finally:
        found.stop()


class Subscriber:
    """A paho client collecting the JSON messages of ``TOPIC/#``."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{topic}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def collect(self, check: Callable[[list], bool], what: str) -> list[tuple[str, dict]]:
        got: list[tuple[str, dict]] = []

        def more() -> bool:
            while not self.messages.empty():
                got.append(self.messages.get())
            return check(got)

        wait_until(more, what)
        return got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _service(world: Path, events: list[str], **changes) -> Service:
    settings = ServeSettings(
        bundle=str(world / "bundle"),
        sources=[("front", str(world / "front")), ("back", str(world / "back"))],
        loop=True,
        events=events,
        event_every=0.2,
        max_fps=20,
        **changes,
    )
    return Service.open(settings)


def test_events_reach_mosquitto(world, broker) -> None:
    broker.start()
    subscriber = Subscriber(broker.port, "vlm")
    try:
        with _service(world, [f"mqtt://127.0.0.1:{broker.port}/vlm"]):
            got = subscriber.collect(
                lambda got: (
                    {(t, e["type"]) for t, e in got}
                    >= {
                        (f"vlm/{s}", k)
                        for s in ("front", "back")
                        for k in ("decision", "heartbeat")
                    }
                ),
                "decisions and heartbeats of both sources",
            )
    finally:
        subscriber.close()
    topic, event = next((t, e) for t, e in got if e["type"] == "decision")
    assert topic == f"vlm/{event['source']}"
    assert set(event) >= {"source", "class", "score", "topk", "time_utc", "monotonic_ms"}
    assert event["time_utc"].endswith("Z") and event["score"] == event["topk"][0]["score"]


def test_events_wait_while_the_broker_is_down(world, broker) -> None:
    """The service starts before the broker: events queue, then arrive once it is up; a broker
    restart is a reconnect in the metrics."""
    from prometheus_client import generate_latest

    with _service(world, [f"mqtt://127.0.0.1:{broker.port}/vlm"]) as service:
        wait_until(lambda: service.source_status()[0]["frames"] > 5, "frames before the broker")
        broker.start()
        subscriber = Subscriber(broker.port, "vlm")
        try:
            subscriber.collect(lambda got: len(got) >= 3, "events after the broker came up")
            broker.stop()
            broker.start()
            subscriber.close()
            subscriber = Subscriber(broker.port, "vlm")
            subscriber.collect(lambda got: len(got) >= 1, "events after the broker restarted")
        finally:
            subscriber.close()
        text = generate_latest(service.registry).decode()
    sink = f"mqtt:mqtt://127.0.0.1:{broker.port}/vlm"
    assert f'vlm_edge_event_sink_reconnects_total{{sink="{sink}"}} 1.0' in text


def test_a_full_queue_drops_the_oldest_and_counts_it(world) -> None:
    from prometheus_client import generate_latest

    from vlm_export.runtime.serve.outputs.events import MqttSink
    from vlm_export.runtime.serve.outputs.metrics import ServeMetrics

    metrics = ServeMetrics()
    sink = MqttSink(f"mqtt://127.0.0.1:{free_port()}/vlm", metrics)  # no broker there
    sink._size = 5
    try:
        for index in range(12):
            sink.put({"source": "front", "index": index})
        assert [e["index"] for e in sink._queue] == [7, 8, 9, 10, 11]
    finally:
        sink.close(timeout_s=0.1)
    assert "vlm_edge_events_dropped_total" in generate_latest(metrics.registry).decode()
    assert metrics.events_dropped.labels(sink=sink.name)._value.get() == 7


# ---------------------------------------------------------------------- soak
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_ten_minutes_two_sources_memory_flat(world, tmp_path) -> None:
    """10 minutes, 2 sources, checkpoints every 5 s, events: RSS grows under 8 MB after a
    1-minute warm-up."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    events = tmp_path / "events.jsonl"
    process, port = start_serve(
        world,
        tmp_path,
        "--state-dir",
        str(tmp_path / "states"),
        "--checkpoint-every",
        "5",
        "--events",
        f"jsonl:{events}",
        "--event-every",
        "1",
    )
    try:
        wait_serving(process, port)
        time.sleep(60)
        warm = _rss_kb(process.pid)
        samples = []
        for _ in range(9):
            time.sleep(60)
            samples.append(_rss_kb(process.pid))
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    growth_kb = max(samples) - warm
    print(f"RSS warm {warm} kB, samples {samples}, growth {growth_kb} kB")
    assert growth_kb < 8 * 1024, (warm, samples)
    assert os.path.getsize(events) > 0


def _teach_and_forget(port: int, stop: Callable[[], bool]) -> None:
    """Teach examples and delete every third one until ``stop()`` (errors once killed)."""
    base = f"http://127.0.0.1:{port}/v1/examples"
    from liveserver import image_bytes

    seed = 0
    while not stop():
        seed += 1
        request = urllib.request.Request(
            f"{base}?label={'car' if seed % 2 else 'bus'}",
            data=image_bytes(seed=seed),
            headers={"Content-Type": "image/jpeg"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                taught = json.load(reply)["id"]
            if seed % 3 == 0:
                delete = urllib.request.Request(f"{base}/{taught}", method="DELETE")
                urllib.request.urlopen(delete, timeout=10).close()
        except (OSError, http.client.HTTPException, ValueError):  # killed mid-answer
            return


def test_kill_9_while_teaching_restarts_to_the_state_of_the_database(world, tmp_path) -> None:
    """Examples are taught and deleted while checkpoints run every 20 ms; kill -9 in each round
    at another moment. Each restart serves the learner of exactly the stored examples."""
    import threading

    from vlm_export.runtime.teach.learner import TeachLearner

    states = tmp_path / "states"
    sizes = []
    for round_ in range(5):
        process, port = start_serve(
            world, tmp_path, "--state-dir", str(states), "--checkpoint-every", "0.02",
            "--teach-hidden-dim", "32",
        )  # fmt: skip
        killed = threading.Event()
        try:
            wait_serving(process, port)
            teacher = threading.Thread(target=_teach_and_forget, args=(port, killed.is_set))
            teacher.start()
            time.sleep(0.4 + 0.25 * round_)
            process.kill()
        finally:
            killed.set()
            process.kill()
            process.communicate(timeout=WAIT_S)
        teacher.join(WAIT_S)
        settings = ServeSettings(
            bundle=str(world / "bundle"),
            sources=[("front", str(world / "front"))],
            state_dir=str(states),
            teach_hidden_dim=32,
        )
        with Service.open(settings) as again:
            teaching = again.teaching
            fresh = TeachLearner.fit(teaching.store.all(), teaching.dim, 32)
            assert teaching.learner.ids == fresh.ids
            scale = max(abs(fresh.weights).max(initial=0.0), 1e-300)
            assert abs(teaching.learner.weights - fresh.weights).max(initial=0.0) <= 1e-9 * scale
            sizes.append(teaching.store.count())
    print(f"examples stored after each kill: {sizes}")
    assert sizes[-1] > 0
