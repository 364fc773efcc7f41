"""optuna-dashboard, read-only, served by the API process under ``/dashboard/``.

The dashboard is a WSGI (bottle) app whose front end is built for the root of a host: the page loads
``/static/bundle.js`` and calls ``/api/...`` with absolute paths, and its own page route is ``/dashboard``.
Mounted under ``/dashboard`` with Starlette's ``WSGIMiddleware`` (which passes the mount path as
``SCRIPT_NAME`` and the rest as ``PATH_INFO``), its API answers at ``/dashboard/api/...`` as is, but the page
would fetch the bundle and the API from the host's root. :class:`DashboardApp` closes that gap, the least
intrusive way found, without touching the dashboard's files or claiming ``/api`` and ``/static`` at the root:

* any path that is not ``/api/...``, ``/static/...`` or ``/favicon.ico`` is answered with the dashboard page
  (its client-side router already lives under ``/dashboard``, the mount point, so deep links work);
* the page's ``/static/`` references get the ``SCRIPT_NAME`` prefix, and a small same-origin script
  (``prefix.js``, allowed by the dashboard's own Content-Security-Policy) runs first and prefixes the
  ``fetch("/api/...")`` calls.

The front end's router prefix is compiled in as ``/dashboard``, so the mount point must stay ``/dashboard``.
The mount is read-only (GET and HEAD): the job's driver is the only writer of its study, and deleting or
renaming a study from the dashboard would leave a job without its study.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from service.config import Settings
from service.studies import StudyStorage

logger = logging.getLogger(__name__)

MOUNT_PATH = "/dashboard"
PREFIX_SCRIPT = "/prefix.js"
_PASS_THROUGH = ("/api/", "/static/")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_PREFIX_JS = b"""(function () {
  var prefix = document.currentScript.getAttribute("data-prefix");
  var original = window.fetch.bind(window);
  window.fetch = function (input, init) {
    if (typeof input === "string" && input.indexOf("/api/") === 0) {
      input = prefix + input;
    }
    return original(input, init);
  };
})();
"""


class DashboardApp:
    """A WSGI app: the dashboard for the study storage, opened on first request, behind ``SCRIPT_NAME``."""

    def __init__(self, study_storage: StudyStorage) -> None:
        self._study_storage = study_storage
        self._app: WSGIApp | None = None
        self._lock = threading.Lock()

    def _dashboard(self) -> WSGIApp:
        with self._lock:
            if self._app is None:
                import optuna_dashboard

                self._app = optuna_dashboard.wsgi(self._study_storage.get())
            return self._app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return _plain(start_response, "405 Method Not Allowed", b"the dashboard is read-only\n", allow)
        path = environ.get("PATH_INFO", "") or "/"
        prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
        if path == PREFIX_SCRIPT:
            return _plain(start_response, "200 OK", _PREFIX_JS, content_type="text/javascript; charset=utf-8")
        try:
            app = self._dashboard()
        except Exception as error:
            logger.warning("dashboard unavailable: %s", error)
            return _plain(start_response, "503 Service Unavailable", b"the study database is unavailable\n")
        if path.startswith(_PASS_THROUGH) or path == "/favicon.ico":
            return app(environ, start_response)
        return self._page(app, environ, start_response, prefix)

    def _page(
        self, app: WSGIApp, environ: dict[str, Any], start_response: StartResponse, prefix: str
    ) -> Iterable[bytes]:
        page_environ = {
            key: value
            for key, value in environ.items()
            if key not in ("HTTP_IF_MODIFIED_SINCE", "HTTP_IF_NONE_MATCH", "HTTP_RANGE")
        }
        page_environ["PATH_INFO"] = MOUNT_PATH + (environ.get("PATH_INFO", "") or "/")
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., None]:
            captured["status"], captured["headers"] = status, headers
            return chunks.append

        result = app(page_environ, capture)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        body = b"".join(chunks)
        status: str = captured.get("status", "500 Internal Server Error")
        headers = [
            (name, value)
            for name, value in captured.get("headers", [])
            if name.lower() not in ("content-length", "etag", "last-modified", "accept-ranges")
        ]
        if status.startswith("200") and body:
            body = _rewrite_page(body, prefix)
        headers.append(("Content-Length", str(len(body))))
        headers.append(("Cache-Control", "no-cache"))
        start_response(status, headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _rewrite_page(body: bytes, prefix: str) -> bytes:
    encoded = prefix.encode("latin-1")
    shim = b'<script src="%s%s" data-prefix="%s"></script>\n    ' % (encoded, PREFIX_SCRIPT.encode(), encoded)
    body = body.replace(b'src="/static/', b'src="' + encoded + b"/static/")
    return body.replace(b"<script ", shim + b"<script ", 1)


def _plain(
    start_response: StartResponse,
    status: str,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
    *,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(extra or [])]
    start_response(status, headers)
    return [body]


def asgi_app(study_storage: StudyStorage) -> Any:
    """The dashboard as an ASGI app, ready to mount at :data:`MOUNT_PATH`."""
    with warnings.catch_warnings():
        # Starlette deprecates its WSGI adapter in favour of a2wsgi, which is not a dependency; it still
        # works (tested) and is only used here.
        warnings.simplefilter("ignore")
        from starlette.middleware.wsgi import WSGIMiddleware

    return WSGIMiddleware(DashboardApp(study_storage))


def standalone_app(settings: Settings) -> Any:
    """The dashboard alone (``esgd dashboard``): mounted at :data:`MOUNT_PATH`, the root redirecting there.

    It reads the study database, and the service database for the API keys (an admin key is needed while
    keys are required, as for the API's own mount). ``/healthz`` answers without a key, for health checks.
    """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, RedirectResponse
    from starlette.routing import Mount, Route

    from service.api.auth import AdminOnly
    from service.db import Database

    study_storage = StudyStorage(settings.resolved_optuna_storage_url())
    database = Database(settings.resolved_database_url())

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> Any:
        yield
        study_storage.close()
        database.dispose()

    return Starlette(
        routes=[
            Route("/", lambda _request: RedirectResponse(MOUNT_PATH + "/")),
            Route("/healthz", lambda _request: JSONResponse({"status": "ok"})),
            Mount(MOUNT_PATH, AdminOnly(asgi_app(study_storage), lambda: database, settings)),
        ],
        lifespan=lifespan,
    )
