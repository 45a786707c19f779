"""Prometheus metrics of one server (its own registry, so several servers can live in one process), served at
`/metrics` in the text exposition format."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

TTFA_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """Requests by API and stop reason, generated frames (rate() of `csm_frames_total` is frames/s), TTFA and RTF
    histograms, errors by code, and live gauges and engine counters read from the scheduler at scrape time: engine
    frames (compiled frame calls), rows computed (the row buckets' sizes summed: rows / frames is the mean bucket)
    and prefill calls (requests admitted together share one)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, active: Callable[[], int], queued: Callable[[], int], connections: Callable[[], int],
                 engine_counts: Callable[[], dict[str, int]] = dict):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_EngineCounters(engine_counts))
        Gauge("csm_requests_active", "responses in an engine slot", registry=r).set_function(active)
        Gauge("csm_requests_queued", "responses waiting for an engine slot", registry=r).set_function(queued)
        Gauge("csm_websocket_connections", "open WebSocket connections", registry=r).set_function(connections)
        self.requests = Counter("csm_requests", "finished responses", ["api", "stop_reason"], registry=r)
        self.frames = Counter("csm_frames", "generated audio frames (80 ms each)", registry=r)
        self.ttfa = Histogram("csm_ttfa_seconds", "request to first audio frame", buckets=TTFA_BUCKETS_S,
                              registry=r)
        self.rtf = Histogram("csm_rtf", "generation time / audio time per response", buckets=RTF_BUCKETS,
                             registry=r)
        self.errors = Counter("csm_errors", "errors answered, by code", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    """`csm_engine_<name>_total` for each count the scheduler reports (frames, rows, prefills)."""

    HELP: ClassVar[dict[str, str]] = {"frames": "compiled serving-frame calls", "rows": "rows computed over all frames (row buckets)",
            "prefills": "prefill calls (requests admitted together share one)"}

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        for name, value in self.counts().items():
            yield CounterMetricFamily(f"csm_engine_{name}", self.HELP.get(name, name), value=value)
