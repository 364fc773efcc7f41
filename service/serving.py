"""The full service: the API app wired to Ray (dispatcher, reconciler, readiness).

``uvicorn --factory service.serving:build_app`` serves it with settings from the environment; ``esgd serve``
does the same after starting a private local Ray when no ``RAY_ADDRESS`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.config import Settings, get_settings
from service.dispatch import DriverSettings, RayDispatcher
from service.jobs import SpecRejected
from service.main import create_app
from service.reconcile import Reconciler
from service.schemas import JobCreate


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.ray_address:
        raise RuntimeError("no Ray cluster: set RAY_ADDRESS (the Jobs API URL), or run `esgd serve`")
    dispatcher = RayDispatcher(
        settings.ray_address,
        DriverSettings(
            python=settings.driver_python or sys.executable,
            optuna_storage_url=settings.resolved_optuna_storage_url(),
            artifacts_dir=settings.artifacts_dir,
            data_cache_dir=settings.data_dir / "datasets",
        ),
    )

    @asynccontextmanager
    async def reconciler(app: FastAPI) -> AsyncIterator[None]:
        worker = Reconciler(settings, app.state.db.session, app.state.optuna.get(), dispatcher)
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    def fits_cluster(spec: JobCreate) -> None:
        """Refuse what the cluster can never run: a trial larger than any node, or too many at once."""
        errors = misfits(spec, dispatcher.cluster_resources())
        if errors:  # nodes may have joined since (workers start after the API): refuse on fresh figures only
            errors = misfits(spec, dispatcher.cluster_resources(max_age_s=0))
        if errors:
            raise SpecRejected(*errors)

    app = create_app(settings, background=[reconciler], ray_ping=dispatcher.ping, spec_checks=[fits_cluster])
    app.state.dispatcher = dispatcher
    return app


def misfits(spec: JobCreate, cluster: dict[str, float]) -> list[tuple[list[str], str]]:
    """What in ``spec`` the cluster (``RayDispatcher.cluster_resources``) cannot run, as field errors."""
    errors = []
    for kind, field in (("CPU", "cpus"), ("GPU", "gpus")):
        need = getattr(spec.resources, field)
        if need > cluster[f"max_node_{kind}"]:
            most = cluster[f"max_node_{kind}"]
            errors.append(
                (["resources", field], f"a trial needs {need:g} {kind}s; the largest node has {most:g}")
            )
        elif need > 0 and spec.parallelism * need > cluster[kind]:
            message = f"{spec.parallelism} trials of {need:g} {kind}s need {spec.parallelism * need:g}"
            errors.append((["parallelism"], f"{message}; the cluster has {cluster[kind]:g}"))
    return errors
