"""Debian's mosquitto on a free loopback port, for the tests that need a real MQTT broker."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from polling import WAIT_S, wait_until

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_or_skip() -> str:
    """The mosquitto binary; skips the test (one line) where it is not installed."""
    found = MOSQUITTO if Path(MOSQUITTO).exists() else shutil.which("mosquitto")
    if found is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return found


class Broker:
    """A mosquitto on a free loopback port, its config in a temporary folder (anonymous, no
    persistence: a restart forgets retained messages)."""

    def __init__(self, folder: Path) -> None:
        self.binary = mosquitto_or_skip()
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until it listens."""
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, "mosquitto exited"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until(listening, "mosquitto to listen")

    def stop(self) -> None:
        """Stop it (SIGTERM) if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT_S)
