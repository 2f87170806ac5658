"""Metrics: what the collector did, in Prometheus' format, from one registry per app."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The label values the collector uses, each series present at 0 from the start: an alert on
# a series' absence, or a rate() over it, would otherwise wait for the first increment.
REJECT_REASONS = ("invalid", "too_large", "not_allowed", "unverified_user")  # ingest.judge
REFUSED_STATUSES = ("400", "401", "403", "408", "413", "415")  # ingest.RequestError
# outbound.calls_for, outbound.BATCH_ENDPOINTS
RELAY_ENDPOINTS = ("/v2/identify", "/v2/track", "/v2/identify/batch", "/v2/track/batch")
RELAY_OUTCOMES = ("2xx", "4xx", "5xx", "network", "dry_run")  # relay.relay_outcome


class QueueGauges(Collector):
    """Queue depth, age of the oldest event and dead letters, read when Prometheus scrapes."""

    def __init__(self, read: Callable[[], tuple[int, float | None, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth, oldest, dead = self._read()
        yield GaugeMetricFamily("collector_queue_depth", "Events waiting in the queue.", depth)
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        yield GaugeMetricFamily(
            "collector_queue_oldest_age_seconds", "Age of the oldest waiting event.", age
        )
        yield GaugeMetricFamily("collector_dead_letters", "Events in the dead letters now.", dead)


class Metrics:
    """Every counter, gauge and histogram the collector keeps (no global registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter(
            "collector_events_accepted", "Events stored for Outbound.", registry=r
        )
        self.rejected = Counter(
            "collector_events_rejected",
            "Events refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.refused_requests = Counter(
            "collector_requests_refused",
            "Whole requests refused, by status code.",
            ["status"],
            registry=r,
        )
        self.bot_drops = Counter(
            "collector_bot_events_dropped", "Events from bots, dropped.", registry=r
        )
        self.rate_limited = Counter(
            "collector_rate_limited_requests", "Requests answered 429.", registry=r
        )
        self.duplicates = Counter(
            "collector_duplicate_events", "Resent events stored once.", registry=r
        )
        self.relayed = Counter(
            "collector_relay_calls",
            "Calls to Outbound, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.relayed_events = Counter(
            "collector_relay_events",
            "Events carried by calls to Outbound (a batch call carries several), by endpoint "
            "and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.retries = Counter("collector_retries", "Events scheduled for another try.", registry=r)
        self.dead_lettered = Counter(
            "collector_dead_lettered", "Events moved to the dead letters.", registry=r
        )
        self.dead_letters_dropped = Counter(
            "collector_dead_letters_dropped",
            "Dead letters dropped past dead_letter_days or beyond dead_letters_max.",
            registry=r,
        )
        self.breaker_open = Gauge(
            "collector_breaker_open", "1 while the relay's circuit is open.", registry=r
        )
        self.ingest_latency = Histogram(
            "collector_ingest_seconds",
            "Time to answer an event request, from its arrival.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.relay_latency = Histogram(
            "collector_relay_call_seconds",
            "Time Outbound took to answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for status in REFUSED_STATUSES:
            self.refused_requests.labels(status)
        for endpoint in RELAY_ENDPOINTS:
            self.relay_latency.labels(endpoint)
            for outcome in RELAY_OUTCOMES:
                self.relayed.labels(endpoint, outcome)
                self.relayed_events.labels(endpoint, outcome)

        # Read at scrape time from the latest queue statistics, which /metrics refreshes.
        self.queue_stats: tuple[int, float | None, int] = (0, None, 0)
        r.register(QueueGauges(lambda: self.queue_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), for tests and the stats command."""
        return self.registry.get_sample_value(name, labels) or 0.0
