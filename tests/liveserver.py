"""Test helpers for the HTTP side of ``vlm-edge serve``: a real Service on a real bundle, and its
app served by uvicorn on a free 127.0.0.1 port in a thread (real sockets, no test client)."""

from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image

from vlm_export.runtime.serve.config import Limits, ServeSettings
from vlm_export.runtime.serve.http.app import create_app
from vlm_export.runtime.serve.service import Service

#: limits small enough that tests reach them with small bodies
TEST_LIMITS = Limits(
    max_upload_bytes=300_000,
    max_upload_pixels=1_000_000,
    max_upload_side=2000,
    upload_timeout_s=1.5,
    max_classes=20,
    max_class_name_chars=40,
    max_text_batch=4,
)


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A random RGB image encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def open_service(bundle: Path, sources: dict[str, Path], state_dir: Path, **extra: Any) -> Service:
    """A started-ready Service on ``bundle`` with looping folder sources (10 fps each at most)."""
    settings = ServeSettings(
        bundle=str(bundle),
        sources=[(name, str(path)) for name, path in sources.items()],
        loop=True,
        state_dir=str(state_dir),
        quiet=True,
        limits=TEST_LIMITS,
        **{"max_fps": 10.0, **extra},
    )
    return Service.open(settings)


def settings_with(service: Service, **changes: Any) -> ServeSettings:
    """The service's settings with ``changes`` (e.g. a token) for another app on it."""
    return dataclasses.replace(service.settings, **changes)


@contextmanager
def serving(service: Service, settings: ServeSettings | None = None) -> Iterator[str]:
    """Serve ``create_app(service, settings)`` on a free loopback port; yield its base URL."""
    app = create_app(service, settings or service.settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(2000):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_for(condition: Any, what: str, tries: int = 300, pause_s: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something truthy (a bounded number of tries)."""
    for _ in range(tries):
        value = condition()
        if value:
            return value
        time.sleep(pause_s)
    raise AssertionError(f"gave up waiting for {what}")


def export_tiny(folder: Path, classes: list[str], capacity: int = 8) -> Path:
    """A TCA bundle of the registered tiny test model with its text engine (needs torch), so the
    classes can change on the device."""
    import torch

    from vlm_export.export.pipeline import ExportOptions, export_bundle
    from vlm_export.models.loading import TEST_MODEL
    from vlm_export.models.schedule import CondensationConfig

    folder.mkdir(parents=True, exist_ok=True)
    templates = folder / "templates.txt"
    templates.write_text("a photo of a {}.\n", encoding="utf-8")
    torch.manual_seed(0)
    options = ExportOptions(
        method="tca",
        model=TEST_MODEL,
        domains=[("things", classes)],
        out=folder / "bundle",
        templates=str(templates),
        condensation=CondensationConfig(drop_rate=0.1, merge_centers=2),
        max_classes=capacity,
        quiet=True,
    )
    return export_bundle(options)
