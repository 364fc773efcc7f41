"""``/healthz`` (the process answers) and ``/readyz`` (both databases and, if wired, Ray answer)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from service.api.errors import ProblemError, problem_doc

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

RayPing = Callable[[], Any]
"""Raises (or returns False) when Ray cannot be reached; set as ``app.state.ray_ping``."""


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check(probe: Callable[[], Any]) -> str:
    try:
        if probe() is False:
            return "down"
    except Exception as error:
        logger.warning("readiness probe failed: %s", error)
        return "down"
    return "ok"


@router.get(
    "/readyz",
    summary="Readiness: the service database, the study database and Ray answer",
    responses={503: problem_doc("Something is down; `checks` says what")},
)
async def readyz(request: Request) -> dict[str, Any]:
    state = request.app.state
    checks: dict[str, str] = {
        "database": await run_in_threadpool(_check, state.db.ping),
        "optuna_storage": await run_in_threadpool(_check, state.optuna.ping),
    }
    ray_ping: RayPing | None = getattr(state, "ray_ping", None)
    checks["ray"] = "not checked" if ray_ping is None else await run_in_threadpool(_check, ray_ping)
    down = [name for name, result in checks.items() if result == "down"]
    if down:
        raise ProblemError(
            503, f"not ready: {', '.join(down)} unreachable", slug="not-ready", extra={"checks": checks}
        )
    return {"status": "ok", "checks": checks}
