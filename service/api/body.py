"""Request bodies: JSON only, and no non-finite numbers anywhere in them.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (and turns ``1e999`` into infinity). The
schema rejects non-finite numbers in typed fields, but free-form fields (choices, fixed knob values) would
let them through, and a NaN stored is a NaN served as invalid JSON. So every JSON body is checked before
validation: a non-finite number is a 422 naming where it is; a body that is not JSON at all is a 400; a body
that is not declared as JSON is a 415; a body larger than ``max_body_bytes`` is a 413.

The size limit is our own small middleware rather than Starlette's ``RequestBodyLimitMiddleware`` (or
FastAPI's ``max_body_size``, which uses it): when the declared Content-Length is over the limit, that one
replaces whatever the app answers with a ``text/plain`` 413, and every error here is a problem document.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ProblemError, problem_response

NON_FINITE_MESSAGE = "non-finite numbers (NaN, Infinity) are not allowed"


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def non_finite_paths(document: Any) -> list[tuple[str | int, ...]]:
    """Where non-finite floats sit in a parsed JSON document (iterative: nesting depth is the client's)."""
    found: list[tuple[str | int, ...]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                found.append(path)
        elif isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
    return sorted(found, key=lambda p: [str(part) for part in p])


async def check_json_body(request: Request) -> None:
    """Raise a problem unless the body (if any) is declared JSON, parses, and holds only finite numbers."""
    body = await request.body()
    if not body:
        return
    if not is_json_media_type(request.headers.get("content-type")):
        raise ProblemError(
            415,
            f"The body must be JSON (Content-Type: application/json), "
            f"not {request.headers.get('content-type') or 'undeclared'}",
            slug="unsupported-media-type",
        )
    try:
        document = json.loads(body)
    except UnicodeDecodeError:
        raise ProblemError(400, "The request body is not valid UTF-8 JSON", slug="malformed-json") from None
    except json.JSONDecodeError as error:
        raise ProblemError(
            400,
            f"The request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
            slug="malformed-json",
        ) from None
    except (ValueError, RecursionError) as error:  # e.g. an integer with thousands of digits, deep nesting
        raise ProblemError(
            400, f"The request body cannot be read as JSON: {error}", slug="malformed-json"
        ) from None
    bad = non_finite_paths(document)
    if bad:
        raise RequestValidationError(
            [{"loc": ("body", *path), "msg": NON_FINITE_MESSAGE, "type": "finite_number"} for path in bad]
        )


class JSONBodyRoute(APIRoute):
    """An API route whose JSON body is checked by :func:`check_json_body` before FastAPI validates it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            await check_json_body(request)  # the body is cached on the request for FastAPI to parse again
            return await handler(request)

        return checked


class BodyLimitMiddleware:
    """413 for a request body over ``max_body_bytes``: at once when Content-Length says so, else as soon as
    the bytes received pass the limit (raised from ``receive``, so the app's error handlers answer).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> str:
        return f"The request body is larger than this service accepts ({self.max_body_bytes} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body_bytes:
            response = problem_response(Request(scope), 413, self._too_large(), slug="body-too-large")
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)
