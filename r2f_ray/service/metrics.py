"""Prometheus metrics of one service instance (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("r2f_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.generate_seconds = Histogram("r2f_generate_batch_seconds", "wall time of one generate batch",
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.generate_batch_size = Histogram("r2f_generate_batch_size", "requests per generate batch",
                                             buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.jobs = Counter("r2f_unlearn_jobs", "finished unlearn jobs by status", ["status"], registry=r)
        self.job_seconds = Histogram("r2f_unlearn_job_seconds", "wall time of one unlearn job",
                                     buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=r)
        self.queue_depth = Gauge("r2f_unlearn_jobs_pending", "unlearn jobs queued or running", registry=r)
        self.versions = Gauge("r2f_model_versions", "stored model versions, root included", registry=r)
        self.active = Gauge("r2f_active_version", "number of the active version (v0003 -> 3)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
