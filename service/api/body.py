"""Request bodies: JSON only, and no non-finite numbers anywhere in them.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (and turns ``1e999`` into infinity). The
schema rejects non-finite numbers in typed fields, but free-form fields (choices, fixed knob values) would
let them through, and a NaN stored is a NaN served as invalid JSON. Python also keeps the last of repeated
member names (``{"name": "a", "name": "b"}``) where other parsers keep the first, so a proxy or a client
library could read another spec than the one we run. So every JSON body is checked before validation: a
non-finite number or a repeated member name is a 422 naming where it is; a body that is not JSON at all is a
400; a body that is not declared as JSON is a 415; a body larger than ``max_body_bytes`` is a 413.

The size limit is our own small middleware rather than Starlette's ``RequestBodyLimitMiddleware`` (or
FastAPI's ``max_body_size``, which uses it): when the declared Content-Length is over the limit, that one
replaces whatever the app answers with a ``text/plain`` 413, and every error here is a problem document.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
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
DUPLICATE_MESSAGE = "this member name appears more than once in its object"

JSONPath = tuple[str | int, ...]


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class _JSONObject(dict[str, Any]):
    """A parsed JSON object that remembers the member names it had more than once."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    if len(obj) < len(pairs):
        obj.duplicates = tuple(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    return obj


def _walk(document: Any) -> Iterator[tuple[JSONPath, Any]]:
    """Every value of a parsed JSON document with its path (iterative: nesting depth is the client's)."""
    stack: list[tuple[JSONPath, Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))


def _sorted(paths: list[JSONPath]) -> list[JSONPath]:
    return sorted(paths, key=lambda p: [str(part) for part in p])


def non_finite_paths(document: Any) -> list[JSONPath]:
    """Where non-finite floats sit in a parsed JSON document."""
    return _sorted([p for p, v in _walk(document) if isinstance(v, float) and not math.isfinite(v)])


def duplicate_key_paths(document: Any) -> list[JSONPath]:
    """Where repeated member names sit in a document parsed with ``object_pairs_hook=_json_object``."""
    return _sorted(
        [(*p, key) for p, v in _walk(document) if isinstance(v, _JSONObject) for key in v.duplicates]
    )


async def check_json_body(request: Request) -> None:
    """Raise a problem unless the body (if any) is declared JSON, parses, holds only finite numbers and
    repeats no member name."""
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
        document = json.loads(body, object_pairs_hook=_json_object)
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
    errors = [
        {"loc": ("body", *path), "msg": NON_FINITE_MESSAGE, "type": "finite_number"}
        for path in non_finite_paths(document)
    ] + [
        {"loc": ("body", *path), "msg": DUPLICATE_MESSAGE, "type": "duplicate_key"}
        for path in duplicate_key_paths(document)
    ]
    if errors:
        raise RequestValidationError(errors)


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
