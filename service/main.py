"""Builds the API application: ``uvicorn --factory service.main:create_app``.

Importing this module has no side effects (no app, no database, no torch). :func:`create_app` wires the
routers, error handlers, metrics and the dashboard; its lifespan runs the migrations, opens the databases,
then starts the background hooks (``app.state.background``) and stops them again on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import keys
from service.api import body, dashboard, errors, metrics, routers
from service.api.auth import AdminOnly
from service.api.health import RayPing
from service.config import Settings, get_settings
from service.db import Database, migrate
from service.jobs import SpecCheck
from service.limits import spec_limits
from service.studies import StudyStorage, upgrade_storage

logger = logging.getLogger(__name__)

BackgroundHook = Callable[[FastAPI], AbstractAsyncContextManager[Any]]
"""Something to run beside the API (e.g. the reconciler): entered once the databases are ready, exited on
shutdown in reverse order. It finds everything it needs on ``app.state`` (settings, db, optuna)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate and open both databases (Optuna's with Optuna's migrations), then run the background hooks."""
    settings: Settings = app.state.settings
    url = settings.resolved_database_url()
    await to_thread.run_sync(migrate, url)
    app.state.db = Database(url)
    await to_thread.run_sync(_announce_access, app.state.db, settings)
    try:
        await to_thread.run_sync(upgrade_storage, settings.resolved_optuna_storage_url())
        await to_thread.run_sync(app.state.optuna.get)
    except Exception as error:  # keep serving: /readyz reports it and the storage is retried on use
        logger.warning("study storage unavailable at start-up: %s", error)
    try:
        async with AsyncExitStack() as stack:
            for hook in list(app.state.background):
                await stack.enter_async_context(hook(app))
            yield
    finally:
        app.state.optuna.close()
        app.state.db.dispose()


def _announce_access(database: Database, settings: Settings) -> None:
    with database.session() as session:
        if keys.keys_required(session, settings):
            logger.info("API keys are required on /v1 and the dashboard")
            return
    logger.warning(
        "API KEYS ARE OFF: anyone who can reach this port can submit, read and cancel every job "
        "(the embedded single-user mode). Create a key to require them: esgd keys create --admin NAME"
    )


def create_app(
    settings: Settings | None = None,
    *,
    background: Sequence[BackgroundHook] = (),
    ray_ping: RayPing | None = None,
    spec_checks: Sequence[SpecCheck] = (),
) -> FastAPI:
    """A new app for ``settings`` (default: from the environment).

    ``app.state`` holds ``settings``, ``db`` (:class:`service.db.Database`, from start-up on), ``optuna``
    (:class:`service.studies.StudyStorage`), ``metrics``, ``background`` (hooks, appendable until start-up),
    ``ray_ping`` (an optional callable ``/readyz`` uses to check Ray) and ``spec_checks`` (callables that may
    refuse a new job's spec with :class:`service.jobs.SpecRejected`, a 422, before anything is stored; the
    deployment's limits are always checked first).
    """
    settings = settings or get_settings()
    # The docs pages' JavaScript and CSS come from the package, not a CDN: deployments are often offline.
    app = FastAPIOffline(
        title="Entropy-SGD as a service",
        version="0.1.0",
        description="Hyperparameter searches of Entropy-SGD (and baselines) as Optuna studies on Ray.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = None
    app.state.optuna = StudyStorage(settings.resolved_optuna_storage_url())
    app.state.background = list(background)
    app.state.ray_ping = ray_ping
    app.state.spec_checks = [spec_limits(settings), *spec_checks]
    app.state.metrics = metrics.Metrics(lambda: app.state.db)

    errors.install(app)
    app.add_middleware(body.BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(metrics.MetricsMiddleware, metrics=app.state.metrics)  # outermost: times everything
    for router in routers():
        app.include_router(router)
    dashboard_app = AdminOnly(dashboard.asgi_app(app.state.optuna), lambda: app.state.db, settings)
    app.mount(dashboard.MOUNT_PATH, dashboard_app, name="dashboard")
    return app
