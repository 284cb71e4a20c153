"""MQTT links of the service: ``mqtt://HOST:PORT/TOPIC`` addresses and paho-mqtt 2.x clients that
reconnect on their own. Used by the decision events (``--events``) and the fleet (``--fleet``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vlm_export.core.errors import UserError, shown

KEEPALIVE_S = 30
DEFAULT_PORT = 1883


@dataclass(frozen=True)
class MqttAddress:
    """A broker and a topic (the events' topic, or the fleet's prefix)."""

    host: str
    port: int
    topic: str


def parse_mqtt_url(url: str, option: str) -> MqttAddress:
    """The broker and topic of ``mqtt://HOST:PORT/TOPIC``; UserError (one line, naming
    ``option``) for a bad port, no host, or no topic or one with ``#`` or ``+``."""
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UserError(f"{option} {shown(url)}: the port is not a number") from None
    topic = parts.path.strip("/")
    # urlsplit takes "#..." as a fragment and "?..." as a query: neither belongs in a topic
    wildcard = "#" in url or "+" in topic or bool(parts.query)
    if parts.scheme != "mqtt" or not parts.hostname or not topic or wildcard:
        raise UserError(
            f"{option} {shown(url)}: write mqtt://HOST:PORT/TOPIC (a topic without # or +)"
        )
    return MqttAddress(parts.hostname, port, topic)


def paho_client(option: str, client_id: str = "") -> Any:
    """A paho-mqtt 2.x client that, once connected (:func:`connect`), reconnects by itself
    (1 s to 30 s apart); UserError when paho-mqtt is not installed."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise UserError(
            f'{option} needs paho-mqtt, which is not installed: pip install ".[serve]"'
        ) from None
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect(client: Any, address: MqttAddress) -> None:
    """Connect in the background: paho's network thread connects, and reconnects after a loss."""
    client.connect_async(address.host, address.port, keepalive=KEEPALIVE_S)
    client.loop_start()
