"""Hostile files and values that gave a traceback, an unbounded read or a misleading line:
``serve --config`` (not UTF-8, nested 100,000 deep, ``/dev/zero``, a FIFO), ``embed`` of an
empty path or one holding NUL, errors of the Python API (they name its parameters, never a
command-line flag), ``--drop-rates ''``, a classes.json of far more entries than the bundle's
text embeddings, and requests that are not HTTP (answered in JSON over a real socket).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakebundle import make_bundle, write_images
from polling import WAIT_S, wait_until

from vlm_export.core.errors import UserError
from vlm_export.core.json_input import count_containers
from vlm_export.runtime import cli
from vlm_export.runtime.api import open_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-files")
    bundle = make_bundle(root / "bundle", method="tca")
    write_images(root / "images", 2)
    return {"root": root, "bundle": bundle, "images": root / "images"}


def _serve_config(path: Path | str, capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(["serve", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-edge: error: --config"), err
    return lines[0]


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys) -> None:
    config = tmp_path / "serve.toml"
    config.write_bytes(b'bundle = "\xff\xfe"\n')
    assert "not UTF-8" in _serve_config(config, capsys)


def test_a_config_nested_100000_deep_is_one_line(tmp_path, capsys) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nested too deeply" in _serve_config(config, capsys)


def test_a_config_larger_than_the_cap_is_refused_unread(tmp_path, capsys) -> None:
    config = tmp_path / "serve.toml"
    with open(config, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB of zeros, not one of them read
    assert "larger than" in _serve_config(config, capsys)


def test_config_devices_and_fifos_are_never_read(tmp_path, capsys) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):
        assert "not a regular file" in _serve_config(path, capsys)


def test_a_shared_state_fifo_is_said_to_be_no_regular_file(world, tmp_path, capsys) -> None:
    pytest.importorskip("uvicorn")
    fifo = tmp_path / "state"
    os.mkfifo(fifo)
    argv = ["serve", str(world["bundle"]), "--source", f"a={world['images']}"]
    code = cli.main([*argv, "--shared-state", str(fifo)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "--shared-state" in err and "a FIFO, not a regular file" in err, err


def test_embed_of_an_empty_or_nul_path_says_what_is_wrong(world) -> None:
    with open_pipeline(world["bundle"]) as pipeline:
        with pytest.raises(UserError, match="empty path") as empty:
            pipeline.embed("")
        assert "folder" not in str(empty.value)
        with pytest.raises(UserError, match="NUL"):
            pipeline.embed("a\x00b")
        with pytest.raises(UserError, match="NUL"):
            pipeline.classify("a\x00b")


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"min_score": 2.0}, ["min_score"]),
        ({"threads": -3, "backend": "onnxruntime"}, ["threads"]),
        ({"backend": "openvino", "providers": ["cpu"]}, ["providers"]),
        ({"adapt_budget": True}, ["adapt_budget", "target_ms"]),
        ({"target_ms": 5.0}, ["target_ms"]),
    ],
)
def test_api_errors_name_its_parameters_not_flags(world, options, names) -> None:
    with pytest.raises(UserError) as refused:
        open_pipeline(world["bundle"], **options)
    message = str(refused.value)
    assert all(name in message for name in names), message
    assert "--min-score" not in message and "--threads" not in message, message
    assert "--providers" not in message and "--target-ms" not in message, message


def test_the_command_line_still_names_flags(world, capsys) -> None:
    code = cli.main(["run", str(world["bundle"]), str(world["images"]), "--min-score", "2"])
    assert code == 1 and "--min-score must be from 0 to 1" in capsys.readouterr().err


@pytest.mark.exporter  # exporting needs torch
@pytest.mark.parametrize("rates", ["", ",", " , "])
def test_an_empty_drop_rates_list_is_refused(tmp_path, capsys, rates) -> None:
    from vlm_export.export.cli import main as export_main

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    argv = ["--method", "tca", "--model", "vlm-test-tiny", "--pretrained", "none"]
    argv += ["--classes", str(classes), "--out", str(tmp_path / "b"), "--drop-rates", rates]
    code = export_main(argv)
    err = capsys.readouterr().err
    assert code != 0 and "--drop-rates is empty" in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_containers_are_counted_outside_strings() -> None:
    text = b'{"classes": [{"name": "a{[b", "domain": "x\\"{"}], "domains": ["x"]}'
    assert count_containers(text, 1) == (4, 3)  # exact over the bound: the strings skipped
    assert count_containers(text, 100)[0] <= 100


def test_a_huge_classes_json_is_refused_before_its_list_is_built(world, tmp_path) -> None:
    """1.4 M entries (about 55 MB) in a bundle of 6 classes: refused with memory near the file's
    size (the parsed list alone would take hundreds of MB)."""
    bundle = tmp_path / "bundle"
    make_bundle(bundle, method="tca")
    domain = json.loads((bundle / "classes.json").read_text())["domains"][0]
    entry = json.dumps({"name": "c", "domain": domain}, separators=(",", ":"))
    entries = ",".join([entry] * 1_400_000)
    (bundle / "classes.json").write_text(f'{{"classes":[{entries}],"domains":["{domain}"]}}')
    size = (bundle / "classes.json").stat().st_size
    script = (
        "import resource, sys\n"
        "from vlm_export.runtime.bundle import Bundle\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    Bundle.open(sys.argv[1], verify=False)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundle)], capture_output=True, text=True, check=True
    )
    message, grown = done.stdout.strip().splitlines()
    assert message.startswith("BundleError classes.json holds 1,400,003"), done.stdout
    assert int(grown) * 1024 < 2 * size, f"grew {int(grown) >> 10} MB for a {size >> 20} MB file"


# ---- requests that are not HTTP, over a real socket ------------------------------------------


@pytest.fixture
def served(world, tmp_path):
    """A real ``vlm-edge serve`` process on a free port (requests' heads and bodies have 2 s):
    its port."""
    pytest.importorskip("uvicorn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "serve.toml"
    config.write_text(f"[limits]\nupload_timeout_s = {HEAD_TIMEOUT_S}\n")
    argv = [sys.executable, "-m", "vlm_export.runtime", "serve", str(world["bundle"])]
    argv += ["--source", f"a={world['images']}", "--loop", "--port", str(port)]
    argv += ["--config", str(config)]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    try:
        wait_until(
            lambda: any("serving on" in line for line in lines) or process.poll() is not None,
            "the service to start",
        )
        assert process.poll() is None, "".join(lines)
        yield port
    finally:
        process.terminate()
        process.wait(WAIT_S)


HEAD_TIMEOUT_S = 2.0


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):  # the service closes the connection
            reply += chunk
    return reply


TLS_HELLO = bytes.fromhex("160301 00a5 0100 00a1 0303".replace(" ", "")) + bytes(64)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        TLS_HELLO,
    ],
    ids=["negative-content-length", "no-host", "tls-hello"],
)
def test_a_request_that_is_not_http_gets_json(served, raw) -> None:
    reply = _exchange(served, raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0] == "HTTP/1.1 400 Bad Request", reply
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"error": "the request is not valid HTTP"}


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "one-line-a-second"])
def test_a_head_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(served, trickle):
    lines = [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Slow: 1\r\n"] * 30
    with socket.create_connection(("127.0.0.1", served), timeout=WAIT_S) as sock:
        started = time.monotonic()
        for line in lines if trickle else lines[:2]:
            sock.sendall(line)
            if not trickle:
                break
            time.sleep(0.5)
            if select.select([sock], [], [], 0)[0]:  # the answer came: stop sending
                break
            if time.monotonic() - started > HEAD_TIMEOUT_S:  # lines came until the deadline;
                break  # a line sent as the server closes would reset the link and lose its reply
        reply = b""
        while chunk := sock.recv(65536):  # the service closes the connection
            reply += chunk
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply
    assert json.loads(body) == {"error": "the request's headers did not arrive in time"}
    assert waited >= HEAD_TIMEOUT_S  # answered at the deadline, not before (the socket's
    # own timeout, WAIT_S per read, fails the test if no answer comes at all)


def test_keep_alive_requests_are_answered_within_the_head_deadline(served) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served), timeout=WAIT_S) as sock:
        replies = sock.makefile("rb")
        for _ in range(3):  # longer together than the deadline: it is per head, not per link
            sock.sendall(request)
            status = replies.readline()
            assert status.startswith(b"HTTP/1.1 ") and b" 408 " not in status, status
            length = 0
            while (line := replies.readline()) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                length = int(value) if name.lower() == "content-length" else length
            assert json.loads(replies.read(length))
            time.sleep(HEAD_TIMEOUT_S * 0.6)
