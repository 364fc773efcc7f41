"""Every error the API returns is an RFC 9457 problem (``application/problem+json``).

Problem members: ``type`` (``about:blank`` for plain HTTP errors, ``urn:esgd:problem:<slug>`` for the
service's own), ``title``, ``status``, ``detail``, ``instance`` (the request path), and for invalid input
``errors: [{loc, msg, type}]`` where ``loc`` is the path to the offending field. Bad input is always a 4xx;
an unexpected exception is a 500 that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from optuna.exceptions import StorageInternalError
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import jobs

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:esgd:problem:"

# Union members pydantic names in an error's location; they say which alternative failed, not where.
_UNION_TAGS = frozenset({"distribution", "value", "float", "int", "categorical", "bool", "str", "none"})


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raised by the API layer to answer with a specific problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.slug = status, detail, slug
        self.errors, self.headers, self.extra = errors, headers, extra


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ProblemResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + slug if slug else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors is not None:
        body["errors"] = list(errors)
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return ProblemResponse(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# ----------------------------------------------------------------------------- validation errors
def field_loc(loc: Sequence[str | int]) -> list[str | int]:
    """The path to the field, readable: no leading ``body``, no union member tags inside the search space.

    ``("body", "search_space", "lr", "distribution", "float", "low")`` becomes
    ``["search_space", "lr", "low"]``; query, header and path parameters keep their source
    (``["query", "page_size"]``).
    """
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:] or ["body"]
    if len(parts) > 2 and parts[0] == "search_space":
        parts = parts[:2] + [p for p in parts[2:] if not (isinstance(p, str) and p in _UNION_TAGS)]
    return parts


def field_errors(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as ``{loc, msg, type}``, without inputs (which may hold non-finite numbers)."""
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    for error in raw:
        loc = field_loc(error.get("loc", ()))
        msg = str(error.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        key = (repr(loc), msg)
        if key not in seen:
            seen.add(key)
            out.append({"loc": loc, "msg": msg, "type": str(error.get("type", "value_error"))})
    return out


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


# ----------------------------------------------------------------------------- handlers
async def _validation_error(request: Request, exc: RequestValidationError) -> ProblemResponse:
    raw = list(exc.errors())
    malformed = [e for e in raw if e.get("type") == "json_invalid"]
    if malformed:
        reason = (malformed[0].get("ctx") or {}).get("error", "invalid JSON")
        return problem_response(
            request, 400, f"The request body is not valid JSON: {reason}", slug="malformed-json"
        )
    errors = field_errors(raw)
    detail = _summary(errors) if errors else "invalid request"
    return problem_response(request, 422, detail, slug="validation-error", errors=errors)


async def _http_error(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No resource at {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(request, exc.status_code, detail, headers=exc.headers)


_SERVICE_ERRORS: dict[type[jobs.ServiceError], tuple[int, str, list[str] | None]] = {
    jobs.JobNotFound: (404, "job-not-found", None),
    jobs.JobFinished: (409, "job-finished", None),
    jobs.InvalidTransition: (409, "invalid-transition", None),
    jobs.IdempotencyConflict: (422, "idempotency-conflict", ["header", "Idempotency-Key"]),
    jobs.InvalidPageToken: (400, "invalid-page-token", ["query", "page_token"]),
    jobs.SpecRejected: (422, "validation-error", None),
}


async def _service_error(request: Request, exc: jobs.ServiceError) -> ProblemResponse:
    status, slug, loc = 400, "bad-request", None
    for cls in type(exc).__mro__:
        if cls in _SERVICE_ERRORS:
            status, slug, loc = _SERVICE_ERRORS[cls]
            break
    errors = None if loc is None else [{"loc": loc, "msg": str(exc), "type": slug}]
    if isinstance(exc, jobs.SpecRejected):
        errors = exc.errors
    return problem_response(request, status, str(exc), slug=slug, errors=errors)


async def _problem_error(request: Request, exc: ProblemError) -> ProblemResponse:
    return problem_response(
        request,
        exc.status,
        exc.detail,
        slug=exc.slug,
        errors=exc.errors,
        headers=exc.headers,
        extra=exc.extra,
    )


async def _database_unavailable(request: Request, exc: Exception) -> ProblemResponse:
    logger.warning("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    detail = "A database is unavailable; try again shortly"
    return problem_response(request, 503, detail, slug="unavailable", headers={"Retry-After": "5"})


async def _storage_error(request: Request, exc: StorageInternalError) -> ProblemResponse:
    """Optuna's storage wraps every database error in this one: an outage is a 503, the rest a 500."""
    if isinstance(exc.__cause__, OperationalError | InterfaceError):
        return await _database_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    logger.exception("unhandled error during %s %s", request.method, request.url.path)
    return problem_response(request, 500, "An unexpected error occurred; it has been logged")


def install(app: FastAPI) -> None:
    """Make every error of ``app`` a problem response."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(jobs.ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(ProblemError, _problem_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(InterfaceError, _database_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(PoolTimeout, _database_unavailable)  # every pooled connection busy for 30 s
    app.add_exception_handler(StorageInternalError, _storage_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def problem_doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description, "content": {PROBLEM_MEDIA_TYPE: {}}}


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("Malformed JSON or an invalid page token"),
    401: problem_doc("No API key while keys are required, or an unknown or revoked key"),
    403: problem_doc("The job belongs to another API key"),
    404: problem_doc("No such job, trial or file"),
    413: problem_doc("Request body too large"),
    415: problem_doc("The body is not JSON"),
    422: problem_doc("Invalid input; `errors` names each field"),
    503: problem_doc("A database is unavailable; retry after `Retry-After` seconds"),
}
"""For the OpenAPI document: what the routes' error bodies look like."""
