"""Prometheus metrics: request latency by route template and status, and jobs by state, at ``/metrics``.

Each app has its own registry (several apps in one process, as in tests, never collide). Jobs by state are
counted from the database at scrape time, so the number is right whatever process changed the jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import jobs
from service.db import Database

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


class JobsByState(Collector):
    """``esgd_jobs{state=...}``: how many jobs are in each state, read from the database when scraped."""

    def __init__(self, database: Callable[[], Database | None]) -> None:
        self._database = database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        database = self._database()
        if database is None:
            return
        try:
            with database.session() as session:
                counts = jobs.count_by_state(session)
        except Exception as error:  # a scrape must not fail because the database is down
            logger.warning("cannot count jobs for /metrics: %s", error)
            return
        family = GaugeMetricFamily("esgd_jobs", "Jobs by state", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state.value], count)
        yield family


class Metrics:
    """One app's registry and instruments."""

    def __init__(self, database: Callable[[], Database | None]) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "esgd_http_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            labelnames=["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(JobsByState(database))

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
