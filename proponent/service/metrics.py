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
        self.in_flight = Gauge("proponent_query_in_flight", "queries a worker is running now", registry=self.registry)
        self.candidates = Histogram(
            "proponent_search_candidates",
            "rows rescored exactly per direction (k plus the rows within the scan's error bound)",
            buckets=(1, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000),
            registry=self.registry,
        )
        self.jobs = Gauge("proponent_jobs", "jobs by state", ["state"], registry=self.registry)
        self.rejected = Counter(
            "proponent_queries_rejected_total", "queries refused (queue full)", registry=self.registry
        )
