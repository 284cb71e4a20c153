"""Prometheus metrics of the service, in its own registry (``GET /metrics`` renders it).

Names (all prefixed ``vlm_edge_``): ``frames_total``, ``frames_dropped_total`` (stale frames a
capture thread replaced), ``frame_errors_total``, ``source_failures_total``,
``source_reconnects_total``, ``source_up`` per source; ``source_collapsed`` (1 while the source's
engine output looks collapsed, see ``serve.frames.watch``) and ``source_collapses_total`` per
source;
``stage_latency_seconds`` histograms per source and stage; ``reservoir_entries`` per source and
class and ``reservoir_fill_ratio`` per source (read when scraped); ``events_sent_total`` /
``events_dropped_total`` per sink and ``event_sink_reconnects_total``; with ``--fleet``,
``fleet_messages_total`` per result (applied, duplicate, echo, published) and
``fleet_refused_total`` per reason (read when scraped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: seconds; from 1 ms (a tiny engine's reservoir update) to 2.5 s (ViT-L on a small CPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: reservoir fill per source: {source: ({class: entries}, capacity per class)}
FillReader = Callable[[], dict[str, tuple[dict[str, int], int]]]
#: fleet messages: ({result: count}, {refusal reason: count})
FleetReader = Callable[[], tuple[dict[str, int], dict[str, int]]]


class _ReservoirCollector(Collector):
    """Reservoir entries per class, read from the live reservoirs at scrape time."""

    def __init__(self, read: FillReader) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries = GaugeMetricFamily(
            "vlm_edge_reservoir_entries",
            "TCA reservoir entries per source and class",
            labels=["source", "class"],
        )
        ratio = GaugeMetricFamily(
            "vlm_edge_reservoir_fill_ratio",
            "TCA reservoir entries over capacity (classes x entries per class)",
            labels=["source"],
        )
        for source, (counts, capacity) in self._read().items():
            for name, count in counts.items():
                entries.add_metric([source, name], count)
            total = capacity * len(counts)
            ratio.add_metric([source], sum(counts.values()) / total if total else 0.0)
        yield entries
        yield ratio


class _FleetCollector(Collector):
    """The fleet link's message counts, read at scrape time."""

    def __init__(self, read: FleetReader) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        results, refusals = self._read()
        messages = CounterMetricFamily(
            "vlm_edge_fleet_messages",
            "Fleet messages by result: applied, duplicate, echo (received), published (sent)",
            labels=["result"],
        )
        for result, count in results.items():
            messages.add_metric([result], count)
        refused = CounterMetricFamily(
            "vlm_edge_fleet_refused", "Fleet messages refused, by reason", labels=["reason"]
        )
        for reason, count in refusals.items():
            refused.add_metric([reason], count)
        yield messages
        yield refused


class ServeMetrics:
    """The counters, gauges and histograms the service updates, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("vlm_edge_frames", "Frames classified", ["source"], registry=r)
        self.dropped = Counter(
            "vlm_edge_frames_dropped",
            "Stale frames replaced by newer ones before the engine took them",
            ["source"],
            registry=r,
        )
        self.errors = Counter(
            "vlm_edge_frame_errors",
            "Frames that could not be classified (unreadable image, bad engine output)",
            ["source"],
            registry=r,
        )
        self.failures = Counter(
            "vlm_edge_source_failures",
            "Times a source failed (could not open, stopped delivering)",
            ["source"],
            registry=r,
        )
        self.reconnects = Counter(
            "vlm_edge_source_reconnects",
            "Times a source was opened again after it failed",
            ["source"],
            registry=r,
        )
        self.up = Gauge(
            "vlm_edge_source_up", "1 while the source delivers frames", ["source"], registry=r
        )
        self.collapsed = Gauge(
            "vlm_edge_source_collapsed",
            "1 while the source's engine output is the same whatever the picture (collapsed)",
            ["source"],
            registry=r,
        )
        self.collapses = Counter(
            "vlm_edge_source_collapses",
            "Times the source's engine output collapsed (the same while the picture changed)",
            ["source"],
            registry=r,
        )
        self.latency = Histogram(
            "vlm_edge_stage_latency_seconds",
            "Time per frame in each pipeline stage",
            ["source", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events_sent = Counter(
            "vlm_edge_events_sent", "Events handed to a sink", ["sink"], registry=r
        )
        self.events_dropped = Counter(
            "vlm_edge_events_dropped",
            "Events dropped (the sink's queue was full, e.g. the broker down for long)",
            ["sink"],
            registry=r,
        )
        self.sink_reconnects = Counter(
            "vlm_edge_event_sink_reconnects",
            "Times an event sink connected again after losing its broker",
            ["sink"],
            registry=r,
        )

    def add_source(self, name: str) -> None:
        """Make a source's series exist (at 0) before its first frame."""
        for metric in (
            self.frames,
            self.dropped,
            self.errors,
            self.failures,
            self.reconnects,
            self.collapses,
        ):
            metric.labels(source=name)
        self.up.labels(source=name).set(0)
        self.collapsed.labels(source=name).set(0)

    def watch_reservoirs(self, read: FillReader) -> None:
        """Report reservoir fill from ``read`` at every scrape."""
        self.registry.register(_ReservoirCollector(read))

    def watch_fleet(self, read: FleetReader) -> None:
        """Report the fleet link's message counts from ``read`` at every scrape."""
        self.registry.register(_FleetCollector(read))
