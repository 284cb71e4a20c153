"""``/healthz``, metrics, events and ``/v1/sources`` of ``vlm-edge serve`` when sources fail
silently (a collapsed engine) or loudly (retrying), over real sockets (uvicorn on 127.0.0.1).

The collapsed engine is a real ONNX graph whose output is the same for every image
(``fakebundle.collapse_encoder``), in a bundle without a reference record (as one exported before
the check at open), so only the running watch can catch it.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fakebundle import collapse_encoder, make_bundle, write_images
from liveserver import open_service, serving, wait_for
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A collapsed bundle, a working one, a changing picture and a still one."""
    root = tmp_path_factory.mktemp("serve_health")
    collapsed = collapse_encoder(make_bundle(root / "collapsed", method="tca"))
    working = make_bundle(root / "working", method="tca")
    write_images(root / "moving", 4, seed=1)
    write_images(root / "moving2", 4, seed=2)
    write_images(root / "still", 1, seed=3)
    return {
        "root": root,
        "collapsed": collapsed,
        "working": working,
        "moving": root / "moving",
        "moving2": root / "moving2",
        "still": root / "still",
    }


def _metric(base: str, name: str, source: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("source") == source:
                return sample.value
    raise AssertionError(f"no {name} for {source}")


def _health(base: str) -> httpx.Response:
    return httpx.get(f"{base}/healthz")


def test_a_collapsed_source_degrades_health_and_is_reported(folders) -> None:
    """The changing picture's source collapses; the still one cannot tell and stays ok: 200
    degraded naming the first, a metric, an event with the reason, and /v1/sources says so."""
    events = folders["root"] / "events.jsonl"
    service = open_service(
        folders["collapsed"],
        {"moving": folders["moving"], "still": folders["still"]},
        folders["root"] / "states1",
        events=[f"jsonl:{events}"],
        health_max_age_s=600.0,
    )
    with service, serving(service) as base:
        degraded = wait_for(
            lambda: _health(base).json().get("status") == "degraded" and _health(base),
            "the moving source to collapse",
        )
        body = degraded.json()
        assert degraded.status_code == 200
        assert body["degraded"] == ["moving"] and body["sources"] == 2
        assert body["reasons"]["moving"].startswith("collapsed: the same embedding")
        assert _metric(base, "vlm_edge_source_collapsed", "moving") == 1.0
        assert _metric(base, "vlm_edge_source_collapsed", "still") == 0.0
        assert _metric(base, "vlm_edge_source_collapses_total", "moving") == 1.0
        sources = {s["name"]: s for s in httpx.get(f"{base}/v1/sources").json()["sources"]}
        assert "picture changed" in sources["moving"]["collapsed"]
        assert sources["still"]["collapsed"] is None
    lines = [json.loads(line) for line in events.read_text(encoding="utf-8").splitlines()]
    alerts = [event for event in lines if event["type"] == "collapsed"]
    assert [event["source"] for event in alerts] == ["moving"]
    assert "the same embedding" in alerts[0]["reason"]


def test_every_source_collapsed_is_503_with_the_reason(folders) -> None:
    service = open_service(
        folders["collapsed"],
        {"front": folders["moving"], "yard": folders["moving2"]},
        folders["root"] / "states2",
        health_max_age_s=600.0,
    )
    with service, serving(service) as base:
        response = wait_for(
            lambda: (r := _health(base)).status_code == 503 and r, "both sources to collapse"
        )
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert body["error"].startswith("every source is retrying or collapsed: ")
    assert sorted(body["failing"]) == ["front", "yard"]
    assert all(why.startswith("collapsed: ") for why in body["reasons"].values())


def test_every_source_retrying_is_503_at_once(folders) -> None:
    """No 10 s of "ok" while nothing can be read: 503 from the first answer, with the reason."""
    missing = folders["root"] / "not-there"
    service = open_service(
        folders["working"],
        {"front": missing / "a", "yard": missing / "b"},
        folders["root"] / "states3",
        health_max_age_s=600.0,
    )
    with service, serving(service) as base:
        response = _health(base)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"].startswith("every source is retrying or collapsed: ")
    assert sorted(body["failing"]) == ["front", "yard"]
    assert all(why.startswith("retrying: ") for why in body["reasons"].values())


def test_one_source_retrying_is_degraded_not_down(folders) -> None:
    service = open_service(
        folders["working"],
        {"front": folders["moving"], "yard": folders["root"] / "not-there"},
        folders["root"] / "states4",
        health_max_age_s=600.0,
    )
    with service, serving(service) as base:
        response = _health(base)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "degraded" and body["degraded"] == ["yard"]
        assert body["reasons"]["yard"].startswith("retrying: ")


def test_serve_refuses_a_drifted_engine_unless_allowed(folders, tmp_path) -> None:
    """The check at open applies to serve too; --allow-drift (flag or config key) runs it."""
    from fakebundle import drift_encoder

    from vlm_export.runtime.cli import build_parser
    from vlm_export.runtime.commands import serve as command
    from vlm_export.runtime.engines.checks.reference import EngineDriftError

    bundle = drift_encoder(make_bundle(tmp_path / "drifted", method="tca", reference=True))
    sources = {"front": folders["moving"]}
    with pytest.raises(EngineDriftError, match="drifted .* pass --allow-drift"):
        open_service(bundle, sources, tmp_path / "states")
    with open_service(bundle, sources, tmp_path / "states", allow_drift=True) as service:
        assert service.source_names() == ["front"]
    argv = ["serve", str(bundle), "--source", f"front={folders['moving']}", "--allow-drift"]
    assert command.settings_from(build_parser().parse_args(argv), environ={}).allow_drift
    config = tmp_path / "serve.toml"
    config.write_text(f'bundle = "{bundle}"\nallow-drift = true\n', encoding="utf-8")
    argv = ["serve", "--config", str(config), "--source", f"front={folders['moving']}"]
    assert command.settings_from(build_parser().parse_args(argv), environ={}).allow_drift
