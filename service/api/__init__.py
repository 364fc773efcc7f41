"""The HTTP interface: one router per resource, the error handlers, metrics and the dashboard mount.

Each router carries its full path (``/v1/...``) rather than getting a prefix when included, so the matched
route's template, which labels the latency metric, is the path clients see.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api import health, jobs, metrics, trials


def routers() -> list[APIRouter]:
    """Every router of the app: the ``/v1`` resources, then health and metrics."""
    return [jobs.router, trials.router, health.router, metrics.router]
