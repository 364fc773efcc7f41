"""Service fixtures: the real app on each backend (SQLite files, PostgreSQL databases), through TestClient."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from optuna.storages import RDBStorage
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import Database, migrate
from service.main import create_app
from service.studies import StudyStorage
from service.tables import Job

with warnings.catch_warnings():
    # Starlette asks for httpx2 instead of httpx in its test client; httpx is what is installed.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

BACKENDS = ("sqlite", "postgresql")
OPTUNA_VERSION_TABLES = {"version_info", "alembic_version"}


@dataclass(frozen=True)
class Backend:
    name: str
    settings: Settings


def _empty_postgres(service_url: str, optuna_url: str) -> None:
    """Start each test from empty tables (creating databases per test would be slow)."""
    for url, keep in ((service_url, {"esgd_alembic_version"}), (optuna_url, OPTUNA_VERSION_TABLES)):
        engine = create_engine(url)
        try:
            with engine.begin() as connection:
                tables = [t for t in inspect(connection).get_table_names() if t not in keep]
                if tables:
                    names = ", ".join(f'"{t}"' for t in tables)
                    connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        finally:
            engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    """Settings for one backend, with empty databases."""
    data_dir = tmp_path / "esgd"
    # Keys off on both backends, as in the embedded mode: access control has tests of its own.
    if request.param == "sqlite":
        return Backend("sqlite", Settings(data_dir=data_dir, require_api_keys=False))
    postgres = request.getfixturevalue("postgres")
    _empty_postgres(postgres.service_url, postgres.optuna_url)
    return Backend(
        "postgresql",
        Settings(
            data_dir=data_dir,
            database_url=postgres.service_url,
            optuna_storage_url=postgres.optuna_url,
            require_api_keys=False,
        ),
    )


@pytest.fixture
def app(backend: Backend) -> FastAPI:
    return create_app(backend.settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """The real app with its lifespan run (migrations, storage), as an HTTP client."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def storage(client: TestClient) -> RDBStorage:
    """The app's own Optuna storage (the one the API reads)."""
    return client.app.state.optuna.get()  # type: ignore[attr-defined]


@pytest.fixture
def session(client: TestClient) -> Iterator[Session]:
    with client.app.state.db.session() as db_session:  # type: ignore[attr-defined]
        yield db_session


@pytest.fixture
def database(backend: Backend) -> Iterator[Database]:
    """The service database of ``backend``, migrated, without an app around it."""
    url = backend.settings.resolved_database_url()
    migrate(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture
def study_storage(backend: Backend) -> Iterator[RDBStorage]:
    """The Optuna storage of ``backend``, without an app around it."""
    opened = StudyStorage(backend.settings.resolved_optuna_storage_url())
    yield opened.get()
    opened.close()


def _count_jobs(app: FastAPI) -> int:
    with app.state.db.session() as db_session:
        return db_session.scalar(select(func.count()).select_from(Job)) or 0


@pytest.fixture
def counts(client: TestClient) -> Any:
    """``counts()`` → (jobs stored, studies stored): to show that rejected input stored nothing."""
    app = client.app
    return lambda: (_count_jobs(app), len(app.state.optuna.get().get_all_studies()))  # type: ignore[attr-defined]
