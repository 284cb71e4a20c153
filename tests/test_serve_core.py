"""The engine side of ``vlm-edge serve``: one engine for several sources, per-source states,
checkpoints, retries, events and metrics, with real parts (folders of PNGs, a video written with
OpenCV, the ONNX Runtime engine, real state files)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from fakebundle import make_bundle, write_images
from PIL import Image
from polling import WAIT_S, wait_until

pytest.importorskip("prometheus_client")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from vlm_export.core.errors import UserError  # noqa: E402
from vlm_export.runtime.bundle import Bundle  # noqa: E402
from vlm_export.runtime.cli import main  # noqa: E402
from vlm_export.runtime.serve.config import ServeSettings, apply_config  # noqa: E402
from vlm_export.runtime.serve.service import Service, UnknownSource  # noqa: E402
from vlm_export.runtime.tca.stage import build_reservoir, save_reservoir  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    make_bundle(root / "bundle")
    write_images(root / "front", 5, seed=1, suffix=".png")
    write_images(root / "back", 4, seed=2, suffix=".png")
    return root


def settings(world: Path, tmp_path: Path, **changes) -> ServeSettings:
    values = {
        "bundle": str(world / "bundle"),
        "sources": [("front", str(world / "front")), ("back", str(world / "back"))],
        "loop": True,
        "state_dir": str(tmp_path / "states"),
        "retry_initial_s": 0.05,
        "retry_max_s": 0.2,
        **changes,
    }
    return ServeSettings(**values)


def status_of(service: Service) -> dict[str, dict]:
    return {item["name"]: item for item in service.source_status()}


def frames_of(service: Service, name: str) -> int:
    return status_of(service)[name]["frames"]


def read_state(path: Path, bundle: Path) -> dict[str, np.ndarray]:
    """A state file loaded as ``vlm-edge run --state`` loads it; its arrays."""
    return build_reservoir(Bundle.open(bundle), None, path).state_arrays()


def entries(path: Path, bundle: Path) -> int:
    return int(read_state(path, bundle)["counts"].sum())


def test_two_sources_run_in_turn_and_save_one_state_each(world, tmp_path) -> None:
    with Service.open(settings(world, tmp_path)) as service:
        assert "2 sources in turn, one state each" in service.describe()
        assert service.describe().endswith("crop center")
        wait_until(lambda: min(frames_of(service, n) for n in ("front", "back")) >= 20, "frames")
        status = status_of(service)
        assert {s["state"] for s in status.values()} == {"running"}
        assert status["front"]["last"]["class"] in service.bundle.classes
        assert set(status["front"]["latency_ms"]) >= {"engine", "reservoir", "total"}
        assert service.failing_sources(WAIT_S) == []
    states = sorted(p.name for p in (tmp_path / "states").iterdir())
    assert states == ["back.npz", "front.npz", "teach"]  # teach/: taught examples (none here)
    assert entries(tmp_path / "states" / "front.npz", world / "bundle") > 0


@pytest.mark.parametrize("state", [b"not a state file", "other bundle", "other source"])
def test_a_source_whose_state_cannot_be_used_fails_alone(world, tmp_path, state) -> None:
    """An unreadable state, one another bundle saved, or another source's state copied over
    stops its own source (state "failed", the reason shown, /healthz names it) while the other
    sources run."""
    folder = tmp_path / "states"
    folder.mkdir()
    if state == "other bundle":  # a state of another bundle (another engine) copied in
        other = Bundle.open(make_bundle(tmp_path / "other", seed=7))
        save_reservoir(build_reservoir(other), folder / "front.npz", other)
    elif state == "other source":  # back's state copied over front's
        bundle = Bundle.open(world / "bundle")
        save_reservoir(build_reservoir(bundle), folder / "front.npz", bundle, owner="back")
    else:
        (folder / "front.npz").write_bytes(state)
    before = (folder / "front.npz").read_bytes()
    with Service.open(settings(world, tmp_path)) as service:
        wait_until(lambda: frames_of(service, "back") >= 5, "the other source's frames")
        status = status_of(service)
        assert status["front"]["state"] == "failed" and status["front"]["frames"] == 0
        assert "state cannot be used" in status["front"]["error"]
        assert status["back"]["state"] == "running"
        assert "front" in service.failing_sources(WAIT_S)
        if state == "other source":
            assert "state of 'back'" in status["front"]["error"]
    assert (folder / "front.npz").read_bytes() == before  # left as it was
    assert entries(folder / "back.npz", world / "bundle") > 0


def test_each_source_adapts_as_run_would_on_its_own(world, tmp_path, capsys) -> None:
    """Served in turn on one engine, each source ends with exactly the state ``vlm-edge run``
    leaves on that source alone: the engine always had that source's anchors."""
    with Service.open(settings(world, tmp_path, loop=False)) as service:
        wait_until(lambda: set(service.states().values()) == {"stopped"}, "both sources ended")
        assert frames_of(service, "front") == 5 and frames_of(service, "back") == 4
    for name in ("front", "back"):
        alone = tmp_path / f"{name}-run.npz"
        argv = ["run", str(world / "bundle"), str(world / name), "--state", str(alone)]
        assert main([*argv, "--out", str(tmp_path / f"{name}.jsonl")]) == 0
        served = read_state(tmp_path / "states" / f"{name}.npz", world / "bundle")
        ran = read_state(alone, world / "bundle")
        assert served.keys() == ran.keys()
        for key in ran:
            np.testing.assert_array_equal(served[key], ran[key], err_msg=f"{name}: {key}")


def test_checkpoint_then_restart_resumes(world, tmp_path) -> None:
    with Service.open(settings(world, tmp_path, checkpoint_every=0.2)):
        path = tmp_path / "states" / "front.npz"
        wait_until(lambda: path.exists() and entries(path, world / "bundle") > 0, "a checkpoint")
    saved = entries(path, world / "bundle")
    again = Service.open(settings(world, tmp_path))
    try:
        assert any(f"resumed {path}" in note for note in again.notes)
        status = status_of(again)
        assert sum(status["front"]["reservoir_fill"].values()) == saved
    finally:
        again.stop()


def test_shared_state_serves_every_source_from_one_reservoir(world, tmp_path) -> None:
    shared = tmp_path / "scene.npz"
    config = settings(world, tmp_path, state_dir=None, shared_state=str(shared))
    with Service.open(config) as service:
        assert "one shared state" in service.describe()
        wait_until(lambda: min(frames_of(service, n) for n in ("front", "back")) >= 5, "frames")
        fill = status_of(service)
        assert fill["front"]["reservoir_fill"] == fill["back"]["reservoir_fill"]
    assert entries(shared, world / "bundle") > 0
    assert not (tmp_path / "states").exists()


def test_a_failing_source_is_retried_and_never_stops_the_others(world, tmp_path) -> None:
    late = tmp_path / "late"
    config = settings(world, tmp_path)
    config.sources.append(("late", str(late)))
    with Service.open(config) as service:
        wait_until(lambda: status_of(service)["late"]["failures"] >= 3, "retries with backoff")
        late_status = status_of(service)["late"]
        assert late_status["state"] == "retrying"
        assert "source not found" in late_status["error"]
        assert frames_of(service, "front") > 0  # the others run meanwhile
        wait_until(lambda: "late" in service.failing_sources(0.01), "late reported failing")
        write_images(late, 2, seed=9, suffix=".png")  # the camera comes back
        wait_until(lambda: frames_of(service, "late") > 0, "the source reopened")
        assert status_of(service)["late"]["reconnects"] == 1
        metrics = generate_latest(service.registry).decode()
        assert 'vlm_edge_source_reconnects_total{source="late"} 1.0' in metrics


def test_a_file_that_ends_without_loop_is_reported_ended(world, tmp_path) -> None:
    video = tmp_path / "clip.mp4"
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (48, 32))
    for index in range(6):
        writer.write(np.full((32, 48, 3), index * 40, np.uint8))
    writer.release()
    config = settings(world, tmp_path, loop=False)
    config.sources = [("clip", str(video)), ("front", str(world / "front"))]
    with Service.open(config) as service:
        wait_until(lambda: service.states()["clip"] == "stopped", "the clip's end")
        assert frames_of(service, "clip") == 6
        wait_until(lambda: service.states()["front"] == "stopped", "the folder's end")


def test_classify_adapts_only_when_asked(world, tmp_path) -> None:
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    config = settings(world, tmp_path, sources=[("front", str(world / "front"))], loop=False)
    state = tmp_path / "states" / "front.npz"
    with Service.open(config) as service:
        wait_until(lambda: service.states()["front"] == "stopped", "the folder's end")
        service.checkpoint()
        before = read_state(state, world / "bundle")
        record = service.classify(image, source="front", topk=2)
        assert len(record["topk"]) == 2 and record["time_utc"].endswith("Z")
        assert "reservoir" not in record["timings_ms"]  # a look: no reservoir update
        service.checkpoint()
        for key, value in read_state(state, world / "bundle").items():
            np.testing.assert_array_equal(value, before[key], err_msg=key)
        fresh = service.classify(image)
        assert fresh["class"] in service.bundle.classes
        assert "reservoir" not in fresh["timings_ms"]
        adapted = service.classify(image, source="front", adapt=True)
        assert "reservoir" in adapted["timings_ms"]  # the image went through the update
        with pytest.raises(UnknownSource):
            service.classify(image, source="nope")
        with pytest.raises(UserError, match="adapt needs a source"):
            service.classify(image, adapt=True)
        vector = np.array(service.embed_image(image))
        assert np.isclose(np.linalg.norm(vector), 1.0)


def test_live_view_is_a_jpeg_with_a_sequence(world, tmp_path) -> None:
    with Service.open(settings(world, tmp_path, max_fps=20)) as service:
        first = service.frame("front", 0, WAIT_S)
        assert first is not None and first[1][:2] == b"\xff\xd8"
        second = service.frame("front", first[0], WAIT_S, fate=True)
        assert second is not None and second[0] > first[0]
        with pytest.raises(UnknownSource):
            service.frame("nope", 0, 0.1)
    assert service.frame("front", 10**9, 0.05) is None  # stopped: no wait


def test_metrics_parse_as_prometheus_text(world, tmp_path) -> None:
    with Service.open(settings(world, tmp_path)) as service:
        wait_until(lambda: frames_of(service, "back") >= 3, "frames")
        text = generate_latest(service.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vlm_edge_frames",
        "vlm_edge_frames_dropped",
        "vlm_edge_frame_errors",
        "vlm_edge_source_reconnects",
        "vlm_edge_stage_latency_seconds",
        "vlm_edge_reservoir_entries",
        "vlm_edge_reservoir_fill_ratio",
    ):
        assert name in families, name
    frames = {s.labels["source"]: s.value for s in families["vlm_edge_frames"].samples}
    assert frames["back"] >= 3


def test_jsonl_events_on_change_and_heartbeats(world, tmp_path) -> None:
    events = tmp_path / "events.jsonl"
    config = settings(world, tmp_path, events=[f"jsonl:{events}"], event_every=0.1)

    def lines() -> list[dict]:
        return [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []

    with Service.open(config):
        wait_until(lambda: {e["type"] for e in lines()} == {"decision", "heartbeat"}, "events")
    got = lines()
    decisions = [e for e in got if e["type"] == "decision"]
    for source in ("front", "back"):
        mine = [e["class"] for e in decisions if e["source"] == source]
        assert mine and all(a != b for a, b in zip(mine, mine[1:], strict=False))
    event = decisions[0]
    assert set(event) >= {"source", "class", "label", "score", "topk", "time_utc", "monotonic_ms"}
    assert event["score"] == event["topk"][0]["score"]


def test_settings_from_toml_and_flags(world, tmp_path) -> None:
    from vlm_export.runtime.commands import serve as command
    from vlm_export.runtime.serve.config import read_config

    config = tmp_path / "serve.toml"
    config.write_text(
        f'bundle = "{world / "bundle"}"\nport = 9001\ncheckpoint-every = 5\nloop = true\n'
        f'[sources]\nfront = "{world / "front"}"\n[limits]\nmax_upload_bytes = 1000\n'
    )
    parser = _parser()
    args = parser.parse_args(["serve", "--config", str(config), "--port", "9002"])
    chosen = command.settings_from(args, environ={"VLM_EDGE_TOKEN": "secret"})
    assert (chosen.port, chosen.checkpoint_every, chosen.loop) == (9002, 5.0, True)
    assert chosen.sources == [("front", str(world / "front"))]
    assert chosen.limits.max_upload_bytes == 1000 and chosen.token == "secret"
    assert read_config(config)["port"] == 9001
    assert chosen.source_options("front").stride == 1


def test_a_source_table_in_the_config_has_its_own_reading(world, tmp_path) -> None:
    config = settings(world, tmp_path, loop=False, stride=1)
    apply_config(
        config,
        {
            "sources": {
                "front": str(world / "front"),
                "back": {"spec": str(world / "back"), "stride": 2},
            }
        },
    )
    assert config.source_options("back").stride == 2
    with Service.open(config) as service:
        wait_until(lambda: set(service.states().values()) == {"stopped"}, "both sources ended")
        assert frames_of(service, "front") == 5 and frames_of(service, "back") == 2
    with pytest.raises(UserError, match="unknown 'strde'"):
        apply_config(ServeSettings(), {"sources": {"a": {"spec": "0", "strde": 2}}})
    with pytest.raises(UserError, match="needs spec"):
        apply_config(ServeSettings(), {"sources": {"a": {"stride": 2}}})
    bad = settings(world, tmp_path, source_reading={"back": {"stride": 0}})
    with pytest.raises(UserError, match="--stride must be at least 1"):
        bad.check()


def test_config_mistakes_are_one_line(world, tmp_path) -> None:
    with pytest.raises(UserError, match="unknown option 'prot'"):
        apply_config(ServeSettings(), {"prot": 1})
    with pytest.raises(UserError, match="wrong type"):
        apply_config(ServeSettings(), {"port": "80"})


def _parser():
    from vlm_export.runtime.cli import build_parser

    return build_parser()


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line_before_any_work(world, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("VLM_EDGE_TOKEN", raising=False)
    bundle, front = str(world / "bundle"), f"a={world / 'front'}"
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--source", front, "--source", f"a={world / 'back'}"], "given twice"),
        (["--source", front, "--state-dir", str(tmp_path / "afile")], "is a file"),
        (["--source", front, "--bind", "0.0.0.0"], "give --token"),
        (["--source", front, "--bind", "0.0.0.0", "--token", " "], "is empty"),
        (["--source", "noequals"], "NAME=SPEC"),
        (["--source", "bad/name=0"], "source name"),
        (["--source", front, "--events", "kafka://x"], "jsonl:FILE or mqtt"),
        ([], "at least one --source"),
        (["--source", front, "--min-score", "2"], "--min-score must be from 0 to 1"),
        (["--source", front, "--stride", "0"], "--stride must be at least 1"),
        (["--source", front, "--camera-size", "big"], "WIDTHxHEIGHT"),
    ]
    for extra, message in cases:
        assert main(["serve", bundle, *extra]) == 1, extra
        line = _error_line(capsys)
        assert line.startswith("vlm-edge: error: ") and message in line, (extra, line)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", bundle, "--source", front, "--port", str(port)]) == 1
        assert "cannot listen on 127.0.0.1" in _error_line(capsys)
    assert not (tmp_path / "states").exists()


def test_state_of_a_source_is_refused_as_an_input(world, tmp_path, capsys) -> None:
    """The write guard: a state file may not be one of the images a source reads."""
    images = tmp_path / "imgs"
    write_images(images, 2, suffix=".png")
    target = sorted(images.iterdir())[0]
    argv = ["serve", str(world / "bundle"), "--source", f"a={images}"]
    assert main([*argv, "--shared-state", str(target)]) == 1
    assert "which this run reads" in _error_line(capsys)


@pytest.mark.parametrize("missing", ["fastapi", "prometheus_client", "paho"])
def test_without_the_serve_extra_one_line_names_it(world, tmp_path, missing) -> None:
    """Whichever [serve] package is missing, and whatever options would import the service's
    modules (state dir, a JSONL sink), the answer is the one line naming the extra."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from vlm_export.runtime.cli import main\n"
        f"sys.exit(main(['serve', {str(world / 'bundle')!r}, '--source', "
        f"'a={world / 'front'}', '--port', '1', '--state-dir', {str(tmp_path / 's')!r}, "
        f"'--events', 'jsonl:{tmp_path / 'e.jsonl'}']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f'vlm-edge: error: vlm-edge serve needs {missing}: pip install ".[serve]" (or '
        "'vlm-export[serve]')"
    ]
    assert not (tmp_path / "s").exists() and not (tmp_path / "e.jsonl").exists()


def test_concurrent_classify_while_frames_run(world, tmp_path) -> None:
    image = Image.new("RGB", (30, 30), (10, 200, 10))
    errors: list[BaseException] = []
    with Service.open(settings(world, tmp_path)) as service:

        def client() -> None:
            try:
                for _ in range(20):
                    service.classify(image, source="front")
                    service.embed_image(image)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert frames_of(service, "front") > 0
    assert errors == []
    reservoir = build_reservoir(
        Bundle.open(world / "bundle"), None, tmp_path / "states" / "front.npz"
    )
    assert reservoir.counts().sum() > 0


def test_fps_holds_for_a_slow_engine_and_falls_to_zero_when_stalled() -> None:
    """A source decided every 4 s (two sources at 2 s a frame) shows 0.25 fps, not 0."""
    from vlm_export.runtime.serve.frames.views import STALL_S, SourceStats

    stats = SourceStats()
    for index in range(6):
        stats.times.append(100.0 + 4.0 * index)
    assert stats.fps(now=121.0) == pytest.approx(0.25)
    assert stats.fps(now=120.0 + max(STALL_S, 8.0) + 0.1) == 0.0
    single = SourceStats()
    single.times.append(5.0)
    assert single.fps(now=5.0) == 0.0


def test_sizes_are_said_as_people_say_them() -> None:
    """The 413 names 10 MiB for 10 MiB (it said 10.4858 MB)."""
    from vlm_export.runtime.serve.http.guards import byte_size

    assert byte_size(10 * 1024 * 1024) == "10 MiB"
    assert byte_size(300_000) == "293 KiB"
    assert byte_size(1536 * 1024) == "1.5 MiB"
    assert byte_size(512) == "512 B"


def test_an_event_sinks_counters_exist_before_the_first_drop(world, tmp_path) -> None:
    """vlm_edge_events_dropped_total has a series at 0 as soon as the sink starts."""
    with Service.open(settings(world, tmp_path, events=[f"jsonl:{tmp_path / 'e.jsonl'}"])) as s:
        text = generate_latest(s.registry).decode()
    dropped = [
        line for line in text.splitlines() if line.startswith("vlm_edge_events_dropped_total")
    ]
    assert len(dropped) == 1 and dropped[0].endswith(" 0.0") and 'sink="jsonl:' in dropped[0]


def test_the_service_keeps_blas_on_one_thread(world, tmp_path) -> None:
    """NumPy's and SciPy's BLAS run on one thread once the service starts: learning beside the
    engine does not oversubscribe the cores (benchmarks/bench_teach.py)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with Service.open(settings(world, tmp_path)):
        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert blas and all(i["num_threads"] == 1 for i in blas)


def test_max_fps_spaces_the_first_frames_too(world, tmp_path) -> None:
    """--max-fps 5: no two frames of a source closer than the period allows (the second frame
    came at once after the first)."""
    with Service.open(settings(world, tmp_path, sources=[("front", str(world / "front"))],
                               max_fps=5.0)) as service:  # fmt: skip
        wait_until(lambda: frames_of(service, "front") >= 4, "four frames")
        times = list(service.views.stats["front"].times)
    gaps = np.diff(times)
    assert gaps.min() >= 0.2 * 0.9, gaps
