"""Prometheus metrics at ``/metrics``: request latency by route template and status; jobs and trials by state,
trial duration, time in queue and gradient evaluations spent, read from the database at scrape time.

Each app has its own registry (several apps in one process, as in tests, never collide).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import jobs
from service.db import Database

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


QUEUE_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class ServiceFigures(Collector):
    """Jobs and trials, read from the service database when scraped.

    The reconciler keeps every job's progress current, so one pass over the jobs' rows gives figures that are
    right whatever process changed the jobs, and survive restarts of the API.
    """

    def __init__(self, database: Callable[[], Database | None]) -> None:
        self._database = database

    def collect(self) -> Iterator[Metric]:
        database = self._database()
        if database is None:
            return
        try:
            with database.session() as session:
                totals = jobs.totals(session)
        except Exception as error:  # a scrape must not fail because the database is down
            logger.warning("cannot read the jobs for /metrics: %s", error)
            return
        by_job_state = GaugeMetricFamily("esgd_jobs", "Jobs by state", labels=["state"])
        for state, count in totals.jobs.items():
            by_job_state.add_metric([state.value], count)
        yield by_job_state
        by_trial_state = GaugeMetricFamily(
            "esgd_trials", "Trials by state, baselines' included", labels=["state"]
        )
        for state, count in totals.trials.items():
            by_trial_state.add_metric([state], count)
        yield by_trial_state
        yield SummaryMetricFamily(
            "esgd_trial_duration_seconds",
            "Wall-clock time of finished trial attempts (retried ones included), start to finish",
            count_value=totals.attempts_finished,
            sum_value=totals.trial_seconds,
        )
        yield CounterMetricFamily(
            "esgd_gradient_evaluations",
            "Gradient evaluations (minibatch gradients) spent by all trials",
            value=totals.gradient_evaluations,
        )
        waits = sorted(totals.queue_seconds)
        buckets = [(str(bound), bisect.bisect_right(waits, bound)) for bound in QUEUE_BUCKETS_S]
        yield HistogramMetricFamily(
            "esgd_job_queue_seconds",
            "Time each started job waited in QUEUED",
            buckets=[*buckets, ("+Inf", len(waits))],
            sum_value=sum(waits),
        )


class Metrics:
    """One app's registry and instruments.

    Several API workers (``esgd serve --workers``) keep their request figures in files under
    ``PROMETHEUS_MULTIPROC_DIR``, which prometheus_client sums at scrape time, so any worker answers for all.
    """

    def __init__(self, database: Callable[[], Database | None]) -> None:
        self.registry = CollectorRegistry()
        shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if shared:
            MultiProcessCollector(self.registry)
        self.request_seconds = Histogram(
            "esgd_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            labelnames=["method", "route", "status"],
            registry=None if shared else self.registry,
        )
        self.registry.register(ServiceFigures(database))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request; labels use the matched route's template so ids never become labels."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.request_seconds.labels(
                method=scope["method"], route=_route_template(scope), status=str(status)
            ).observe(time.perf_counter() - start)


def _route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template; for a mounted app (the dashboard) its mount path + ``/{path}``."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path or "/"
    root_path, app_root_path = scope.get("root_path", ""), scope.get("app_root_path", "")
    if len(root_path) > len(app_root_path) and root_path.startswith(app_root_path):
        return root_path[len(app_root_path) :] + "/{path}"
    return "unmatched"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
