"""Access control: who is asking (``Authorization: Bearer <key>``), and the gate in front of the dashboard.

Every ``/v1`` route depends on ``deps.get_principal``: without a key it is a 401 while keys are required
(:func:`service.keys.keys_required`), and an unknown or revoked key is always a 401. What a principal may
touch is decided where the job is looked up (``deps.get_job``): another key's job is a 403.

The dashboard shows every study, so it needs an admin key. Browsers cannot add a Bearer header to a page
they load, so :class:`AdminOnly` also takes the key as the password of HTTP Basic authentication (any user
name) and answers 401 with ``WWW-Authenticate: Basic``, which makes the browser ask for it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from anyio import to_thread
from fastapi import Request
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Receive, Scope, Send

from service import keys
from service.api.errors import ProblemError, problem_response
from service.config import Settings
from service.db import Database


def presented_secret(authorization: str | None) -> str | None:
    """The key in an ``Authorization`` header: ``Bearer <key>``, or ``Basic`` with the key as password."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def unauthenticated(detail: str, scheme: str = "Bearer") -> ProblemError:
    return ProblemError(
        401, detail, slug="unauthenticated", headers={"WWW-Authenticate": f'{scheme} realm="esgd"'}
    )


class AdminOnly:
    """ASGI middleware: only admin keys get through while keys are required (the dashboard)."""

    def __init__(self, app: ASGIApp, database: Callable[[], Database | None], settings: Settings) -> None:
        self.app = app
        self.database = database
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        secret = presented_secret(request.headers.get("authorization"))
        try:
            refusal = await to_thread.run_sync(self._refusal, secret)
        except OperationalError:
            refusal = 503, "the service database is unavailable; try again shortly"
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, detail = refusal
        headers = (
            {"WWW-Authenticate": 'Basic realm="esgd dashboard", charset="UTF-8"'} if status == 401 else None
        )
        slug = {401: "unauthenticated", 403: "forbidden", 503: "unavailable"}[status]
        await problem_response(request, status, detail, slug=slug, headers=headers)(scope, receive, send)

    def _refusal(self, secret: str | None) -> tuple[int, str] | None:
        database = self.database()
        if database is None:
            return 503, "the service database is not open yet"
        with database.session() as session:
            if secret is None:
                if keys.keys_required(session, self.settings):
                    return 401, "the dashboard needs an admin API key (as the password; any user name)"
                return None
            principal = keys.authenticate(session, secret)
        if principal is None:
            return 401, "the API key is unknown or has been revoked"
        if not principal.admin:
            return 403, "the dashboard shows every job's study: it needs an admin API key"
        return None
