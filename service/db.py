"""Engines, sessions and migrations for the service's own database (SQLite embedded, PostgreSQL deployed).

SQLite is shared by the API, the reconciler and the CLI, so every connection gets WAL (readers never block
the writer) and a busy timeout (writers wait their turn instead of failing). Alembic is the only way the
schema changes: :func:`migrate` runs ``upgrade head`` programmatically, no ``alembic.ini`` needed.
"""

from __future__ import annotations

import fcntl
import functools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_S = 30.0
POOL_SIZE = 10
"""Connections an engine keeps open, and never more: a burst waits for one instead of opening more. With
SQLAlchemy's default overflow a busy API opened and closed connections all the time, and on PostgreSQL each
new one is a new server process: under load that churn took the cores the requests needed. With every API
worker holding two engines, a deployment needs 2 x POOL_SIZE connections per worker."""
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "esgd_alembic_version"
"""Not Alembic's default name, so it can never be mistaken for Optuna's own ``alembic_version``."""
_MIGRATION_LOCK_ID = 0x45534744  # "ESGD": a PostgreSQL advisory lock serialising concurrent migrations
_migration_lock = threading.Lock()

_json_serializer = functools.partial(json.dumps, allow_nan=False)
"""NaN is not JSON (and PostgreSQL rejects it): storing one is a bug, so it fails loudly."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def ensure_sqlite_directory(url: str) -> None:
    """Create the folder a SQLite file URL points into (the embedded default lives in ``.esgd/``)."""
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def sqlite_pragmas(busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Callable[[Any, Any], None]:
    """A ``connect`` listener: WAL, the busy timeout, and foreign keys on every new SQLite connection."""

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    return on_connect


def engine_options(url: str, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> dict[str, Any]:
    """``create_engine`` options for either database: a fixed pool of :data:`POOL_SIZE`; the busy timeout on
    SQLite (the pragmas are :func:`sqlite_pragmas`), a connect timeout on PostgreSQL.

    No ping before each use, which would cost a round trip per request: a connection that PostgreSQL dropped
    fails the one use that finds it (a 503 in the API), and SQLAlchemy then renews the whole pool.
    """
    if is_sqlite(url):
        ensure_sqlite_directory(url)
        options: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": busy_timeout_s}}
        if make_url(url).database not in (None, "", ":memory:"):  # memory databases have a pool of one
            options |= {"pool_size": POOL_SIZE, "max_overflow": 0}
        return options
    options = {"pool_size": POOL_SIZE, "max_overflow": 0}
    if make_url(url).get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": 5}
    return options


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, **kwargs: Any) -> Engine:
    """An engine for the service database (:func:`engine_options`); WAL and the busy timeout on SQLite."""
    options = {"json_serializer": _json_serializer, **engine_options(url, busy_timeout_s), **kwargs}
    engine = create_engine(url, **options)
    if is_sqlite(url):
        event.listen(engine, "connect", sqlite_pragmas(busy_timeout_s))
    return engine


class Database:
    """The service database: one engine and its session factory, shared by a process."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that is rolled back if the block raises and always closed."""
        with self.sessionmaker() as session:
            try:
                yield session
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> None:
        """Raise unless the database answers ``SELECT 1``."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(connection: Any = None) -> Any:
    """Alembic's configuration, built in code: the scripts in ``service/migrations``, our version table."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLE
    return config


@contextmanager
def exclusive(url: str, lock_id: int) -> Iterator[None]:
    """Run the block in one process at a time, across processes and hosts: under a PostgreSQL advisory lock
    held on a connection of its own, or a ``flock`` on a file beside a SQLite database."""
    if is_sqlite(url):
        database = make_url(url).database
        if not database or database == ":memory:":  # a database of this process alone
            yield
            return
        ensure_sqlite_directory(url)
        with open(f"{database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield
        return
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
            yield  # released when the connection closes
    finally:
        engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the service database at ``url`` to ``revision`` (creating it from nothing if needed).

    Safe to call from several processes at once (a database lock serialises them) and from several threads
    (Alembic's ``context`` is process-global, so a process lock too).
    """
    from alembic import command

    engine = make_engine(url)
    try:
        with _migration_lock, engine.begin() as connection:
            # One migrator at a time (the API and the CLI may start together).
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            elif connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            command.upgrade(alembic_config(connection), revision)
    finally:
        engine.dispose()
