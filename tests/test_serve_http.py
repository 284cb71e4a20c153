"""The HTTP API of ``vlm-edge serve`` over real sockets: a real Service on a real bundle (two
looping folder sources), its app served by uvicorn on 127.0.0.1, httpx and raw sockets as clients.
Every endpoint's happy path, and hostile input for each: bad, truncated and oversized images,
bodies that are too large or never end, bad JSON, wrong credentials, path-like names."""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import struct
import threading
import zlib

import httpx
import pytest
from fakebundle import make_bundle, write_images
from liveserver import export_tiny, image_bytes, open_service, serving, settings_with, wait_for
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from vlm_export.runtime.serve.http.auth import COOKIE

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A running Service on a tiny TCA bundle with the sources ``front`` and ``yard``."""
    root = tmp_path_factory.mktemp("serve_http")
    bundle = make_bundle(root / "bundle", method="tca")
    write_images(root / "front", 4, seed=1)
    write_images(root / "yard", 4, seed=2)
    service = open_service(
        bundle, {"front": root / "front", "yard": root / "yard"}, root / "states"
    )
    with service:
        yield service


@pytest.fixture(scope="module")
def url(service):
    with serving(service) as base:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, "both sources live")
        yield base


@pytest.fixture(scope="module")
def secured(service):
    """The same service behind a token."""
    with serving(service, settings_with(service, token=TOKEN)) as base:
        yield base


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data cut short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _error(response: httpx.Response, status: int) -> str:
    """Assert a JSON error reply with ``status``; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


def _raw(url: str, request: bytes, stall_after: bool = False) -> bytes:
    """Send ``request`` on a raw socket; return all the server answers before it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:  # the server closed the connection
                return b"".join(chunks)
            chunks.append(data)


# ---------------------------------------------------------------------------------- health
def test_healthz_ok(url) -> None:
    response = httpx.get(f"{url}/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_healthz_names_failing_sources(service, url) -> None:
    """With a max age no source can meet, the health check is 503 and names both sources."""
    with serving(service, settings_with(service, health_max_age_s=1e-9)) as base:
        response = httpx.get(f"{base}/healthz")
    message = _error(response, 503)
    assert "front" in message and "yard" in message
    assert sorted(response.json()["failing"]) == ["front", "yard"]


# ---------------------------------------------------------------------------------- sources
def test_sources_report_every_source_and_advance(url) -> None:
    first = {s["name"]: s for s in httpx.get(f"{url}/v1/sources").json()["sources"]}
    assert sorted(first) == ["front", "yard"]
    for source in first.values():
        assert {"state", "fps", "latency_ms", "frames", "dropped", "reconnects", "last"} <= set(
            source
        )

    def advanced():
        now = {s["name"]: s for s in httpx.get(f"{url}/v1/sources").json()["sources"]}
        return all(now[n]["frames"] > first[n]["frames"] for n in first) and now

    now = wait_for(advanced, "frames on both sources")
    for source in now.values():
        assert source["last"]["class"] in ("cat", "dog", "bird", "car", "bus", "train")
        assert source["latency_ms"] and all("p95" in v for v in source["latency_ms"].values())


# ---------------------------------------------------------------------------------- classify
@pytest.mark.parametrize("fmt,kind", [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_classify_raw_body(url, fmt, kind) -> None:
    response = httpx.post(
        f"{url}/v1/classify?topk=2", content=image_bytes(fmt=fmt), headers={"content-type": kind}
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["class"] in ("cat", "dog", "bird", "car", "bus", "train")
    assert len(record["topk"]) == 2 and record["time_utc"].endswith("Z")


def test_classify_multipart_and_source(url) -> None:
    files = {"image": ("x.png", image_bytes(fmt="PNG"), "image/png")}
    plain = httpx.post(f"{url}/v1/classify", files=files)
    with_source = httpx.post(f"{url}/v1/classify?source=front&adapt=true", files=files)
    assert plain.status_code == with_source.status_code == 200
    assert with_source.json()["source"] == "front"


def test_classify_hostile_queries(url) -> None:
    body, headers = image_bytes(), {"content-type": "image/jpeg"}
    post = lambda query: httpx.post(f"{url}/v1/classify{query}", content=body, headers=headers)  # noqa: E731
    assert "topk" in _error(post("?topk=0"), 422)
    assert "topk" in _error(post("?topk=many"), 422)
    assert "source" in _error(post("?adapt=true"), 400)
    assert "nowhere" in _error(post("?source=nowhere"), 404)
    for name in ("../../etc/passwd", "/etc/passwd", "C:\\Windows", "x" * 5000):
        message = _error(post(f"?source={httpx.QueryParams({'s': name})['s']}"), 404)
        assert len(message) < 200


@pytest.mark.parametrize(
    "body,kind,status,words",
    [
        (b"", "image/jpeg", 400, "empty"),
        (b"not an image at all", "image/jpeg", 400, "not a JPEG or PNG"),
        (image_bytes()[:300], "image/jpeg", 400, "cannot"),
        (image_bytes(fmt="PNG")[:120], "image/png", 400, "cannot"),
        (image_bytes(fmt="GIF"), "image/png", 400, "not a JPEG or PNG"),
        (image_bytes(), "text/plain", 415, "Content-Type"),
        (_png_header(30000, 30000), "image/png", 413, "megapixels"),
        (_png_header(5000, 10), "image/png", 413, "a side"),
        (_png_header(0x7FFFFFFF, 0x7FFFFFFF), "image/png", 413, ""),
    ],
)
def test_classify_bad_images(url, body, kind, status, words) -> None:
    response = httpx.post(f"{url}/v1/classify", content=body, headers={"content-type": kind})
    assert words in _error(response, status)


def test_multipart_without_image_field(url) -> None:
    response = httpx.post(f"{url}/v1/classify", files={"picture": ("a.jpg", image_bytes())})
    assert "'image'" in _error(response, 400)


def test_declared_huge_body_refused_before_reading(url) -> None:
    """A Content-Length above the limit is answered 413 at once, the body never read."""
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = _raw(url, head + b"\xff\xd8" * 8)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"error"' in answer


def test_chunked_body_cut_at_the_limit(url) -> None:
    """A chunked body (no Content-Length) is counted as it arrives and refused at the limit."""

    def chunks():
        for _ in range(100):
            yield b"\0" * 65536

    response = httpx.post(
        f"{url}/v1/classify", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert "larger than the limit" in _error(response, 413)


def test_stalled_body_is_cut_off(url) -> None:
    """Headers, a few bytes, then nothing: 408 after the read deadline, connection closed."""
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    answer = _raw(url, head + b"\xff\xd8\xff\xe0")
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within" in answer
    assert httpx.get(f"{url}/healthz").status_code == 200  # the others are served meanwhile


def test_stalled_bodies_do_not_block_others(url) -> None:
    """While several clients stall, the API keeps answering."""
    threads = [
        threading.Thread(
            target=_raw,
            args=(url, b"PUT /v1/classes HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n["),
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    assert httpx.get(f"{url}/v1/sources").status_code == 200
    for thread in threads:
        thread.join(30)


# ---------------------------------------------------------------------------------- embed
def test_embed_image(url) -> None:
    response = httpx.post(
        f"{url}/v1/embed/image",
        content=image_bytes(fmt="PNG"),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == len(body["embedding"]) == 8
    assert math.isclose(math.fsum(v * v for v in body["embedding"]), 1.0, rel_tol=1e-5)


def test_embed_image_bad_body(url) -> None:
    response = httpx.post(
        f"{url}/v1/embed/image", content=b"\x89PNG\r\n", headers={"content-type": "image/png"}
    )
    _error(response, 400)


@pytest.mark.parametrize(
    "body,kind,status,words",
    [
        (b"[1, 2]", "application/json", 400, "list of strings"),
        (b'{"texts": ["a"]}', "application/json", 400, "list of strings"),
        (b"[]", "application/json", 400, "empty"),
        (b'["a", ', "application/json", 400, "not valid JSON"),
        (b"\xff\xfe[]", "application/json", 400, "UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "application/json", 400, "nested"),
        (json.dumps(["a"] * 5).encode(), "application/json", 413, "limit of 4"),
        (json.dumps(["a" * 41]).encode(), "application/json", 413, "characters"),
        (b'["\\ud800"]', "application/json", 400, "surrogate"),
        (b'["a"]', "text/plain", 415, "JSON"),
    ],
)
def test_embed_text_hostile(url, body, kind, status, words) -> None:
    response = httpx.post(f"{url}/v1/embed/text", content=body, headers={"content-type": kind})
    assert words in _error(response, status)


def test_embed_text_without_text_engine_is_one_line(url) -> None:
    """The fake bundle has no text engine: a JSON 400, not a 500."""
    response = httpx.post(f"{url}/v1/embed/text", json=["a photo of a cat"])
    _error(response, 400)


# ---------------------------------------------------------------------------------- classes
def test_get_classes(url) -> None:
    body = httpx.get(f"{url}/v1/classes").json()
    assert body["classes"] == ["cat", "dog", "bird", "car", "bus", "train"]


@pytest.mark.parametrize(
    "payload,status,words",
    [
        ({"names": ["a"]}, 400, "unknown field"),
        ({"templates": "single"}, 400, "'classes'"),
        ({"classes": ["a"], "templates": "/etc/passwd"}, 400, "built-in template set"),
        ({"classes": ["a"], "templates": 3}, 400, "templates"),
        ("cat", 400, "list of strings"),
        ([""], 400, "empty"),
        (["x"] * 21, 413, "limit of 20"),
        (["y" * 41], 413, "characters"),
    ],
)
def test_put_classes_hostile(url, payload, status, words) -> None:
    before = httpx.get(f"{url}/v1/classes").json()
    assert words in _error(httpx.put(f"{url}/v1/classes", json=payload), status)
    assert httpx.get(f"{url}/v1/classes").json() == before


def test_put_classes_lone_surrogate(url) -> None:
    before = httpx.get(f"{url}/v1/classes").json()
    response = httpx.put(
        f"{url}/v1/classes",
        content=b'["cat", "\\udc80x"]',
        headers={"content-type": "application/json"},
    )
    assert "lone surrogate" in _error(response, 400)
    assert httpx.get(f"{url}/v1/classes").json() == before


def test_put_classes_without_text_engine_is_one_line(url) -> None:
    before = httpx.get(f"{url}/v1/classes").json()
    _error(httpx.put(f"{url}/v1/classes", json=["zebra", "yak"]), 400)
    assert httpx.get(f"{url}/v1/classes").json() == before


# ---------------------------------------------------------------------------------- stream
def _parts(url: str, path: str, count: int) -> list[tuple[int, bytes]]:
    """Read ``count`` parts of an MJPEG stream: (X-Frame-Seq, JPEG bytes)."""
    parts = []
    with httpx.stream("GET", f"{url}{path}", timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        buffer = b""
        for data in response.iter_bytes():
            buffer += data
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                fields = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line
                )
                length = int(fields["Content-Length"])
                if len(rest) < length + 2:
                    break
                parts.append((int(fields["X-Frame-Seq"]), rest[:length]))
                buffer = rest[length + 2 :]
            if len(parts) >= count:
                return parts
    return parts


@pytest.mark.parametrize("query", ["", "?fate=true"])
def test_stream_delivers_new_frames(url, query) -> None:
    parts = _parts(url, f"/v1/sources/yard/stream.mjpg{query}", 3)
    seqs = [seq for seq, _ in parts]
    assert len(parts) == 3 and seqs == sorted(set(seqs))
    for _, jpeg in parts:
        assert Image.open(io.BytesIO(jpeg)).format == "JPEG"


def test_snapshot(url) -> None:
    response = httpx.get(f"{url}/v1/sources/front/frame.jpg")
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
    assert int(response.headers["x-frame-seq"]) >= 1


@pytest.mark.parametrize(
    "path",
    [
        "/v1/sources/nowhere/stream.mjpg",
        "/v1/sources/..%2F..%2Fetc%2Fpasswd/stream.mjpg",
        "/v1/sources/%2Fetc%2Fpasswd/frame.jpg",
        "/static/..%2F..%2Fservice.py",
        "/static/../app.py",
        "/static/index.html",
        "/nope",
    ],
)
def test_unknown_and_path_like_paths(url, path) -> None:
    _error(httpx.get(f"{url}{path}"), 404)


# ---------------------------------------------------------------------------------- misc
def test_method_not_allowed_is_json(url) -> None:
    assert "DELETE" in _error(httpx.delete(f"{url}/v1/classes"), 405)


def test_page_and_static_files(url) -> None:
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<title>vlm-edge serve</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        response = httpx.get(f"{url}/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_metrics_parse_as_prometheus_text(url) -> None:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert families
    sources = {
        sample.labels.get("source")
        for family in families.values()
        for sample in family.samples
        if "source" in sample.labels
    }
    assert {"front", "yard"} <= sources


def test_openapi_lists_every_v1_route(url) -> None:
    from vlm_export.runtime.serve.http.app import ROUTERS

    document = httpx.get(f"{url}/openapi.json").json()
    routes = {route.path for module in ROUTERS for route in module.router.routes}
    routes = {path for path in routes if path.startswith("/v1")}
    assert routes and routes <= set(document["paths"])
    assert {"/healthz", "/metrics"} <= set(document["paths"])
    classify = document["paths"]["/v1/classify"]["post"]
    assert "image/jpeg" in classify["requestBody"]["content"]


def test_no_cors_by_default(url) -> None:
    response = httpx.get(f"{url}/v1/sources", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cross_site_write_refused(url) -> None:
    """A page on another site cannot make the service adapt (HTML forms post across sites)."""
    response = httpx.post(
        f"{url}/v1/classify?source=front&adapt=true",
        files={"image": ("a.jpg", image_bytes(), "image/jpeg")},
        headers={"Origin": "http://evil.example"},
    )
    _error(response, 403)


def test_unexpected_exception_is_json_500_and_one_log_line(url, service, caplog) -> None:
    """A bug behind an endpoint: the client gets JSON, the log one line and no traceback."""
    original = service.source_status

    def broken():
        raise RuntimeError("boom in source_status")

    service.source_status = broken
    try:
        with caplog.at_level(logging.ERROR, logger="vlm_export"):
            response = httpx.get(f"{url}/v1/sources")
    finally:
        service.source_status = original
    message = _error(response, 500)
    assert "boom" not in message
    records = [r for r in caplog.records if "boom in source_status" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert "\n" not in records[0].getMessage()


# ---------------------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/sources"),
        ("GET", "/v1/classes"),
        ("PUT", "/v1/classes"),
        ("POST", "/v1/classify"),
        ("POST", "/v1/embed/image"),
        ("POST", "/v1/embed/text"),
        ("GET", "/v1/sources/front/stream.mjpg"),
        ("GET", "/v1/sources/front/frame.jpg"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {"Cookie": f"{COOKIE}=forged"},
        {"Cookie": f"{COOKIE}=9999999999.abc.{'0' * 64}"},
    ],
)
def test_every_endpoint_needs_the_credential(secured, method, path, headers) -> None:
    response = httpx.request(method, f"{secured}{path}", headers=headers, json=["zebra"])
    assert "credential" in _error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_bearer_token_and_public_paths(secured) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    document = httpx.get(f"{secured}/openapi.json", headers=auth).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/v1/classes"]["put"]["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]
    assert httpx.get(f"{secured}/v1/sources", headers=auth).status_code == 200
    assert httpx.get(f"{secured}/metrics", headers=auth).status_code == 200
    assert httpx.get(f"{secured}/healthz").status_code == 200
    assert httpx.get(f"{secured}/").status_code == 200  # the page shell: it shows the login form


def test_login_sets_a_strict_http_only_cookie(secured) -> None:
    wrong = httpx.post(f"{secured}/login", json={"token": "nope"})
    _error(wrong, 401)
    assert "set-cookie" not in wrong.headers
    surrogate = b'{"token": "\\ud800"}'
    _error(httpx.post(f"{secured}/login", content=surrogate), 401)
    _error(httpx.post(f"{secured}/login", json=["not", "an", "object"]), 401)
    right = httpx.post(f"{secured}/login", json={"token": TOKEN})
    assert right.status_code == 204
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    value = right.cookies[COOKIE]
    with httpx.Client(cookies={COOKIE: value}) as client:
        assert client.get(f"{secured}/v1/sources").status_code == 200
        assert client.get(f"{secured}/v1/sources/front/frame.jpg").status_code == 200
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    _error(httpx.get(f"{secured}/v1/sources", cookies={COOKIE: tampered}), 401)
    form = httpx.post(f"{secured}/login", data={"token": TOKEN})
    assert form.status_code == 204 and COOKIE in form.cookies


# ---------------------------------------------------------------------------------- text engine
@pytest.fixture(scope="module")
def texted(tmp_path_factory):
    """A running Service on an exported tiny bundle with a text engine (classes can change),
    served open and behind a token: (open URL, secured URL, service)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("serve_text")
    bundle = export_tiny(root / "export", ["cat", "dog", "bird"])
    write_images(root / "a", 3, seed=3)
    write_images(root / "b", 3, seed=4)
    service = open_service(bundle, {"a": root / "a", "b": root / "b"}, root / "states")
    secured_settings = settings_with(service, token=TOKEN)
    with service, serving(service) as base, serving(service, secured_settings) as secure:
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, "sources live")
        yield base, secure, service


def _labels(url: str) -> dict[str, tuple[int, str | None]]:
    """Each source's frame count and last class."""
    sources = httpx.get(f"{url}/v1/sources").json()["sources"]
    return {s["name"]: (s["frames"], s["last"] and s["last"]["class"]) for s in sources}


def _decisions_follow(url: str, names: list[str]) -> None:
    """Wait until every source has decided, on new frames, among ``names``."""
    start = _labels(url)

    def follows():
        now = _labels(url)
        return all(now[n][0] > start[n][0] and now[n][1] in names for n in now)

    wait_for(follows, f"decisions among {names}")


def test_embed_text(texted) -> None:
    url, _, _ = texted
    response = httpx.post(f"{url}/v1/embed/text", json=["a photo of a cat", "a dog", "a dog"])
    assert response.status_code == 200, response.text
    vectors = response.json()["embeddings"]
    assert len(vectors) == 3 and response.json()["dim"] == len(vectors[0])
    for vector in vectors:
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert vectors[1] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)


def test_put_classes_changes_the_decisions(texted) -> None:
    url, _, _ = texted
    names = ["zebra", "yak", "owl"]
    response = httpx.put(f"{url}/v1/classes", json=names)
    assert response.status_code == 200, response.text
    assert response.json()["classes"] == names and "dropped_entries" in response.json()
    assert httpx.get(f"{url}/v1/classes").json()["classes"] == names
    _decisions_follow(url, names)
    response = httpx.put(
        f"{url}/v1/classes", json={"classes": ["cat", "dog"], "templates": "single"}
    )
    assert response.status_code == 200, response.text
    assert httpx.get(f"{url}/v1/classes").json() == {
        "classes": ["cat", "dog"],
        "templates": "single",
    }
    _decisions_follow(url, ["cat", "dog"])


@pytest.mark.parametrize(
    "payload,words",
    [(["cat", "cat"], "twice"), ([f"c{i}" for i in range(9)], "")],
)
def test_put_classes_refused_by_the_service_changes_nothing(texted, payload, words) -> None:
    url, _, _ = texted
    before = httpx.get(f"{url}/v1/classes").json()
    assert words in _error(httpx.put(f"{url}/v1/classes", json=payload), 400)
    assert httpx.get(f"{url}/v1/classes").json() == before


def test_put_classes_with_a_wrong_token_changes_nothing(texted) -> None:
    url, secure, _ = texted
    before = httpx.get(f"{url}/v1/classes").json()
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = httpx.put(f"{secure}/v1/classes", json=["ferret"], headers=headers)
        _error(response, 401)
    assert httpx.get(f"{url}/v1/classes").json() == before
    ok = httpx.put(
        f"{secure}/v1/classes", json=before["classes"], headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert ok.status_code == 200, ok.text


def test_concurrent_class_changes_while_frames_run(texted) -> None:
    """Eight clients replace the classes at once while both sources run: every change succeeds
    or is refused as a whole, the last one stands, and the frames go on with it."""
    url, _, _ = texted
    lists = [[f"thing{i}", f"other{i}", "cat"][: 2 + i % 2] for i in range(8)]
    before_errors = {
        s["name"]: s["errors"] for s in httpx.get(f"{url}/v1/sources").json()["sources"]
    }
    statuses: list[int] = []

    def put(names):
        statuses.append(httpx.put(f"{url}/v1/classes", json=names, timeout=60).status_code)

    threads = [threading.Thread(target=put, args=(names,)) for names in lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [200] * len(lists)
    final = httpx.get(f"{url}/v1/classes").json()["classes"]
    assert final in lists
    _decisions_follow(url, final)
    after = {s["name"]: s["errors"] for s in httpx.get(f"{url}/v1/sources").json()["sources"]}
    assert after == before_errors


@pytest.mark.parametrize(
    "target,path",
    [
        ("secured", "/v1/classify"),  # refused by the credential check
        ("url", "/v1/classify?adapt=true"),  # refused by the route before it reads the body
        ("url", "/nowhere"),  # no route
    ],
)
def test_refused_before_the_body_closes_the_connection(request, target, path) -> None:
    """An answer given without reading the body closes the connection, so a client that then
    stalls does not hold it open."""
    base = request.getfixturevalue(target)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 5000\r\n\r\n"
    ).encode()
    answer = _raw(base, head)
    assert answer.split(b" ", 2)[1] in (b"400", b"401", b"404")
    assert b"connection: close" in answer.lower()


def test_configured_cors_origin(service) -> None:
    """An origin listed in cors_origins gets CORS answers and may write; others may not."""
    allowed = "http://dashboard.example"
    with serving(service, settings_with(service, cors_origins=[allowed])) as base:
        preflight = httpx.options(
            f"{base}/v1/classes",
            headers={"Origin": allowed, "Access-Control-Request-Method": "PUT"},
        )
        assert preflight.headers["access-control-allow-origin"] == allowed
        for method in ("GET", "HEAD"):  # with a credential a HEAD is preflighted too
            preflight = httpx.options(
                f"{base}/v1/sources",
                headers={
                    "Origin": allowed,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert preflight.status_code == 200, (method, preflight.text)
        files = {"image": ("a.jpg", image_bytes(), "image/jpeg")}
        ok = httpx.post(f"{base}/v1/classify", files=files, headers={"Origin": allowed})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        other = httpx.post(
            f"{base}/v1/classify", files=files, headers={"Origin": "http://evil.example"}
        )
        _error(other, 403)


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/metrics", "/v1/sources", "/v1/classes", "/", "/v1/sources/front/frame.jpg"],
)
def test_head_answers_as_get_without_the_body(url, path) -> None:
    """Uptime checkers and `curl -I` ask HEAD: the GET reply's status and type, no body."""
    got = httpx.get(f"{url}{path}")
    head = httpx.head(f"{url}{path}")
    assert head.status_code == got.status_code == 200, (path, head.status_code)
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.content == b""


def test_head_of_a_live_stream_ends_at_its_head_and_streams_nothing(url, monkeypatch) -> None:
    """Its head at once, and nothing goes on producing frames for it afterwards (the server runs
    in this process: the stream's frame waits are counted); the connection stays usable."""
    import time

    from vlm_export.runtime.serve.http.routes import stream

    waits = []
    original = stream.next_frame

    async def counted(*args, **kwargs):
        waits.append(time.monotonic())
        return await original(*args, **kwargs)

    monkeypatch.setattr(stream, "next_frame", counted)
    with httpx.Client(timeout=10) as client:  # one keep-alive connection for all of them
        for _ in range(5):
            head = client.head(f"{url}/v1/sources/yard/stream.mjpg")
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-type"].startswith("multipart/x-mixed-replace")
        assert client.get(f"{url}/healthz").status_code == 200  # the connection goes on
    for _ in range(20):  # a HEAD's stream may take a moment to be torn down on a busy machine
        done = len(waits)
        time.sleep(stream.WAIT_S)
        if len(waits) == done:
            break
    time.sleep(3 * stream.WAIT_S)  # a stream left running waits for a frame every WAIT_S
    assert len(waits) == done, f"{len(waits) - done} frame waits after the HEAD requests"
    monkeypatch.undo()
    assert len(_parts(url, "/v1/sources/yard/stream.mjpg", 2)) == 2
    assert httpx.head(f"{url}/v1/sources/nowhere/stream.mjpg").status_code == 404
