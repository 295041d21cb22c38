"""Prometheus metrics: RED per service and per call edge, counted as spans are published,
and the health of the server and its agents, read when scraped."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

from deeptrace.capture.records import SAMPLE_SHIFT_MAX
from deeptrace.capture.spans import SAMPLING_WEIGHT

disable_created_metrics()  # a `_created` twin per series doubles the scrape for nothing a dashboard uses

# Seconds: from a cache hit to a slow page.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, health: Callable[[], dict[str, float]], agents: Callable[[], list]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("deeptrace_service_requests", "Requests a service answered (SERVER spans).",
                                ["service", "operation"], registry=self.registry)  # fmt: skip
        self.errors = Counter("deeptrace_service_errors", "Requests a service answered with an error.",
                              ["service", "operation"], registry=self.registry)  # fmt: skip
        self.duration = Histogram("deeptrace_service_duration_seconds", "Time a service took to answer.",
                                  ["service"], buckets=BUCKETS, registry=self.registry)  # fmt: skip
        self.calls = Counter("deeptrace_edge_calls", "Calls from one service to another (CLIENT spans).",
                             ["source", "target"], registry=self.registry)  # fmt: skip
        self.call_errors = Counter("deeptrace_edge_errors", "Calls that failed.", ["source", "target"],
                                   registry=self.registry)  # fmt: skip
        self.call_duration = Histogram("deeptrace_edge_duration_seconds", "Call latency seen by the caller.",
                                       ["source", "target"], buckets=BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(_Health(health, agents))

    def observe(self, spans: list[dict]) -> None:
        """Count each span as the exchanges it stands for: one, or its sampling.weight."""
        for d in spans:
            seconds, failed = (d["end_ns"] - d["start_ns"]) / 1e9, d.get("status") == "error"
            weight = _weight(d)
            if d["kind"] == "SERVER":
                service = d.get("service", "unknown")
                self.requests.labels(service, d["name"]).inc(weight)
                if failed:
                    self.errors.labels(service, d["name"]).inc(weight)
                _observe(self.duration.labels(service), seconds, weight)
            elif d["kind"] == "CLIENT":
                edge = (d.get("service", "unknown"), d.get("peer_service") or "unknown")
                self.calls.labels(*edge).inc(weight)
                if failed:
                    self.call_errors.labels(*edge).inc(weight)
                _observe(self.call_duration.labels(*edge), seconds, weight)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _weight(span: dict) -> int:
    attrs = span.get("attributes")
    weight = attrs.get(SAMPLING_WEIGHT, 1) if isinstance(attrs, dict) else 1
    # From the wire: only a sane power of two counts as a weight.
    sane = type(weight) is int and 1 <= weight <= 1 << SAMPLE_SHIFT_MAX and not weight & (weight - 1)
    return weight if sane else 1


def _observe(histogram, seconds: float, weight: int) -> None:
    """Histogram.observe as if called `weight` times (prometheus_client has no weights:
    this does what its observe does, with the weight in place of 1)."""
    if weight == 1:
        histogram.observe(seconds)
        return
    histogram._sum.inc(seconds * weight)
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets):
        if seconds <= bound:
            bucket.inc(weight)
            break


class _Health:
    """Gauges read at scrape time, so they are never stale."""

    def __init__(self, health: Callable[[], dict[str, float]], agents: Callable[[], list]) -> None:
        self.health, self.agents = health, agents

    def describe(self):
        return []

    def collect(self):
        for name, value in self.health().items():
            g = GaugeMetricFamily(f"deeptrace_server_{name}", f"DeepTrace server: {name.replace('_', ' ')}.")
            g.add_metric([], value)
            yield g
        agent_stats = ("records", "exchanges", "spans", "drops", "sampled", "sample_level", "cpu_seconds", "rss_bytes", "spool_batches", "spool_bytes",
                       "spool_dropped_batches", "spool_dropped_spans", "spool_write_failed_batches",
                       "spool_write_failed_spans", "sent_batches", "sent_spans", "send_failures")  # fmt: skip
        families = {k: GaugeMetricFamily(f"deeptrace_agent_{k}", f"Agent's own count: {k.replace('_', ' ')}.",
                                         labels=["agent_id", "host"]) for k in agent_stats}  # fmt: skip
        seen = GaugeMetricFamily("deeptrace_agent_last_seen_seconds", "Seconds since the agent last reported.",
                                 labels=["agent_id", "host"])  # fmt: skip
        now = time.time_ns()
        for a in self.agents():
            for k, fam in families.items():
                value = a.stats.get(k)
                if isinstance(value, (int, float)) and abs(value) < 1e300:  # float() of a huge int raises
                    fam.add_metric([a.agent_id, a.host], float(value))
            seen.add_metric([a.agent_id, a.host], (now - a.last_seen_ns) / 1e9)
        yield from families.values()
        yield seen
