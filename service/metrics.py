"""Prometheus metrics: requests by route and status with latency, appends, projector lag."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from service.queue_consumer import queue_stats
from service.runtime import Runtime
from service.scheduler import job_status


class _ViewsCollector(Collector):
    """Reads the views' positions at scrape time, so the figures are never stale."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Any:
        lag = GaugeMetricFamily(
            "resultsvc_projector_lag", "Log positions a view is behind the head", labels=["view"]
        )
        failed = GaugeMetricFamily(
            "resultsvc_projector_failed", "1 when a view stopped on an event", labels=["view"]
        )
        head = GaugeMetricFamily("resultsvc_log_head_position", "Last position in the event log")
        try:
            statuses = self.runtime.projector.status()
        except Exception:
            statuses = []
        for status in statuses:
            lag.add_metric([status.view], status.lag)
            failed.add_metric([status.view], 1 if status.state == "failed" else 0)
        if statuses:
            head.add_metric([], statuses[0].head)
        yield lag
        yield failed
        yield head
        success = GaugeMetricFamily(
            "resultsvc_job_last_success_timestamp_seconds",
            "When each scheduled job last succeeded",
            labels=["job"],
        )
        failure = GaugeMetricFamily(
            "resultsvc_job_last_failure_timestamp_seconds",
            "When each scheduled job last failed",
            labels=["job"],
        )
        try:
            jobs = job_status(self.runtime.views)
        except Exception:
            jobs = []
        for job in jobs:
            for family, column in ((success, "last_success"), (failure, "last_failure")):
                if job[column]:
                    moment = datetime.fromisoformat(job[column]).timestamp()
                    family.add_metric([job["job"]], moment)
        yield success
        yield failure
        drill_passed = GaugeMetricFamily(
            "resultsvc_restore_drill_passed", "1 when the latest restore drill passed, else 0"
        )
        drill_time = GaugeMetricFamily(
            "resultsvc_restore_drill_timestamp_seconds", "When the latest restore drill ran"
        )
        try:
            latest = self.runtime.queries.list_drills(None, 1).items
        except Exception:
            latest = []
        if latest:
            drill_passed.add_metric([], 1 if latest[0]["passed"] else 0)
            recorded = datetime.fromisoformat(latest[0]["recorded_at"].replace("Z", "+00:00"))
            drill_time.add_metric([], recorded.timestamp())
        yield drill_passed
        yield drill_time
        access = GaugeMetricFamily(
            "resultsvc_accounts_linked",
            "Linked customer accounts by access state (lost: the daily check could not"
            " assume the role)",
            labels=["access"],
        )
        try:
            counts = self.runtime.queries.account_access_counts()
        except Exception:
            counts = {}
        for state, count in sorted(counts.items()):
            access.add_metric([state], count)
        yield access
        queue = GaugeMetricFamily(
            "resultsvc_queue_messages",
            "Queue messages handled since the consumers started counting, by outcome"
            " (applied, duplicate, dead_lettered, left)",
            labels=["queue", "outcome"],
        )
        try:
            stats = queue_stats(self.runtime)
        except Exception:
            stats = []  # no consumer has run against this database yet
        for name, outcome, count in stats:
            queue.add_metric([name, outcome], count)
        yield queue


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "resultsvc_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "resultsvc_http_request_seconds",
            "HTTP request latency by route and method",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.appends = Counter(
            "resultsvc_appends",
            "Appending commands that succeeded, by route",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(_ViewsCollector(runtime))

    def appended(self, route: Any) -> None:
        self.appends.labels(getattr(route, "path", "unmatched")).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def install(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def measure(request: Request, call_next: Any) -> Response:
            start = time.perf_counter()
            response: Response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", "unmatched")
            self.latency.labels(route, request.method).observe(time.perf_counter() - start)
            self.requests.labels(route, request.method, str(response.status_code)).inc()
            return response
