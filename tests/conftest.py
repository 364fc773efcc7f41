"""Shared fixtures: temporary PostgreSQL databases for a test session.

The service is tested against real SQLite files and a real PostgreSQL. The admin URL comes from
``ESGD_TEST_POSTGRES_ADMIN_URL`` (default: the local server's ``test`` database); two fresh databases are
created for the session (one for the service, one for Optuna: they always live apart) and dropped at the end.
An unreachable PostgreSQL fails those tests with the reason, unless ``ESGD_TEST_SKIP_POSTGRES=1``, which
skips them instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class PostgresDatabases:
    admin_url: str
    service_url: str
    optuna_url: str

    def missing_database_url(self) -> str:
        """A URL to a database that does not exist on the same server: a real, reproducible outage."""
        url = make_url(self.admin_url).set(database=f"esgd_missing_{secrets.token_hex(4)}")
        return url.render_as_string(hide_password=False)


def postgres_admin_url() -> str:
    return os.environ.get("ESGD_TEST_POSTGRES_ADMIN_URL", DEFAULT_ADMIN_URL)


def _with_database(admin: URL, name: str) -> str:
    return admin.set(database=name).render_as_string(hide_password=False)


@contextmanager
def fresh_databases(admin_url: str, *kinds: str) -> Iterator[dict[str, str]]:
    """New, empty databases on the server of ``admin_url``, one per kind (kind → URL), dropped afterwards."""
    admin = make_url(admin_url)
    engine = create_engine(
        admin, isolation_level="AUTOCOMMIT", pool_pre_ping=True, connect_args={"connect_timeout": 5}
    )
    names = {kind: f"esgd_test_{secrets.token_hex(4)}_{kind}" for kind in kinds}
    try:
        with engine.connect() as connection:
            for name in names.values():
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield {kind: _with_database(admin, name) for kind, name in names.items()}
    finally:
        with engine.connect() as connection:
            for name in names.values():
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    """Two fresh PostgreSQL databases for this test session, dropped afterwards."""
    admin_url = postgres_admin_url()
    engine = create_engine(admin_url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = (
            f"PostgreSQL is not reachable at {make_url(admin_url).render_as_string()} "
            f"({error.__class__.__name__}: {first_line}). Start it, point ESGD_TEST_POSTGRES_ADMIN_URL "
            "at one, or set ESGD_TEST_SKIP_POSTGRES=1 to skip these tests."
        )
        if os.environ.get("ESGD_TEST_SKIP_POSTGRES") == "1":
            pytest.skip(f"ESGD_TEST_SKIP_POSTGRES=1: {message}")
        pytest.fail(message, pytrace=False)
    finally:
        engine.dispose()
    with fresh_databases(admin_url, "service", "optuna") as urls:
        yield PostgresDatabases(admin_url, urls["service"], urls["optuna"])
