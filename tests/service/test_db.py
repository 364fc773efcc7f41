"""The service database: migrations are the schema, SQLite is set up for several processes, times are UTC."""

from __future__ import annotations

import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, select, text
from sqlalchemy.exc import OperationalError, StatementError

from service.db import VERSION_TABLE, Database, migrate
from service.tables import Base, Job, JobEvent
from tests.conftest import fresh_databases


def test_migrations_create_exactly_the_models_and_are_idempotent(backend, database):
    migrate(database.url)  # a second run is a no-op
    with database.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == "0002"
        tables = set(inspect(connection).get_table_names())
    assert {"jobs", "job_events", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # never Optuna's version table name


def test_sqlite_connections_use_wal_and_wait_for_the_writer(tmp_path):
    url = f"sqlite:///{tmp_path}/nested/folder/service.db"
    migrate(url)  # creates the folder
    database = Database(url)
    with database.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    database.ping()
    database.dispose()


MIGRATE = "import sys; from service.db import migrate; migrate(sys.argv[1])"


def test_concurrent_migrations_of_a_new_database_do_not_collide(tmp_path, postgres):
    """The API and the CLI may start at once on an empty database: separate processes, one database each."""
    admin = create_engine(postgres.admin_url, isolation_level="AUTOCOMMIT")
    name = f"esgd_migrate_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    urls = [
        f"sqlite:///{tmp_path}/fresh.db",
        make_url(postgres.admin_url).set(database=name).render_as_string(hide_password=False),
    ]
    try:
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", MIGRATE, url],
                stderr=subprocess.PIPE,
                text=True,
            )
            for url in urls
            for _ in range(3)
        ]
        failures = [p.communicate(timeout=120)[1] for p in processes if p.wait(timeout=120) != 0]
        assert not failures, failures[0]
        for url in urls:
            database = Database(url)
            with database.engine.connect() as connection:
                context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
                assert context.get_current_revision() == "0002"
            database.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_timestamps_come_back_aware_and_utc(backend, database):
    paris = timezone(timedelta(hours=2))
    moment = datetime(2026, 5, 1, 14, 30, tzinfo=paris)
    with database.session() as session:
        session.add(
            Job(
                id="job-0123456789ab",
                name="t",
                spec={},
                state="QUEUED",
                created_at=moment,
                study_name="s",
                progress={},
            )
        )
        session.add(JobEvent(job_id="job-0123456789ab", at=moment, to_state="QUEUED"))
        session.commit()
    with database.session() as session:
        job = session.scalars(select(Job)).one()
        assert job.created_at == moment and job.created_at.tzinfo == UTC and job.created_at.hour == 12
        assert job.driver_attempts == 0


def test_naive_datetimes_are_refused(database):
    with database.session() as session:
        session.add(
            Job(
                id="job-0123456789ab",
                name="t",
                spec={},
                state="QUEUED",
                created_at=datetime(2026, 1, 1),
                study_name="s",
                progress={},
            )
        )
        with pytest.raises(Exception, match="naive"):
            session.commit()


def test_non_finite_numbers_are_never_stored_as_json(database):
    with database.session() as session:
        session.add(
            Job(
                id="job-0123456789ab",
                name="t",
                spec={"x": float("nan")},
                state="QUEUED",
                study_name="s",
                progress={},
            )
        )
        with pytest.raises((StatementError, ValueError), match="not JSON compliant"):
            session.commit()


def test_connections_postgresql_dropped_cost_one_failed_use_then_the_pool_reconnects(postgres):
    """No ping before each use (a round trip on every request): a dropped connection fails the one use that
    finds it (the API answers that with a 503), and SQLAlchemy then replaces every pooled connection."""
    with fresh_databases(postgres.admin_url, "service") as urls:
        database = Database(urls["service"])
        admin = create_engine(postgres.admin_url, isolation_level="AUTOCOMMIT")
        try:
            sessions = [database.session() for _ in range(3)]
            for session in sessions:  # three pooled connections
                session.__enter__().execute(text("SELECT 1"))
            for session in sessions:
                session.__exit__(None, None, None)
            with admin.connect() as connection:  # what a PostgreSQL restart does to every client
                dropped = connection.execute(
                    text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :db"),
                    {"db": make_url(urls["service"]).database},
                ).scalar()
            assert dropped == 3
            with pytest.raises(OperationalError), database.session() as session:
                session.execute(text("SELECT 1"))
            for _ in range(3):  # every later use gets a new connection
                with database.session() as session:
                    assert session.execute(text("SELECT 1")).scalar() == 1
        finally:
            database.dispose()
            admin.dispose()
