"""Prometheus metrics, one registry per app (several apps may live in one process, e.g. tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "proponent_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "proponent_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.queue_depth = Gauge("proponent_query_queue_depth", "queries waiting for a worker", registry=self.registry)
        self.rounds = Histogram(
            "proponent_search_rounds",
            "certified-search deepening rounds per direction",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16),
            registry=self.registry,
        )
        self.jobs = Gauge("proponent_jobs", "jobs by state", ["state"], registry=self.registry)
        self.rejected = Counter(
            "proponent_queries_rejected_total", "queries refused (queue full)", registry=self.registry
        )
