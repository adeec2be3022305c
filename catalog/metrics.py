"""Prometheus metrics of one Quiver process (a registry per catalog, so that several servers
in one test process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quiver_requests_total",
            "Requests served, by listener, method and outcome code.",
            ["listener", "method", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "quiver_request_seconds",
            "Request handling time (for streams: until the stream ends).",
            ["listener", "method"],
            registry=self.registry,
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
        )
        self.auth_failures = Counter(
            "quiver_auth_failures_total",
            "Requests refused for a missing, invalid, expired or revoked token.",
            ["listener"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "quiver_tokens_issued_total",
            "Tokens issued, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.uptime = Gauge("quiver_uptime_seconds", "Seconds since start.", registry=self.registry)
        self.database_bytes = Gauge(
            "quiver_database_bytes", "Size of the DuckDB file and its WAL.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
