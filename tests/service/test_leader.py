"""One leader per service database: the lock is exclusive, handed over on release, and freed for real when its
holder dies (a killed process on SQLite, a dropped connection on PostgreSQL)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, make_url, text

from service.leader import LeaderLock
from tests.conftest import fresh_databases

HOLD = """
import sys, time
from service.leader import LeaderLock
lock = LeaderLock(sys.argv[1])
print(lock.held(), flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/service.db"
        return
    with fresh_databases(request.getfixturevalue("postgres").admin_url, "service") as urls:
        yield urls["service"]


def test_one_process_leads_and_hands_over_when_it_releases(database_url):
    first, second = LeaderLock(database_url), LeaderLock(database_url)
    try:
        assert first.held() and first.held()  # and keeps leading
        assert not second.held()
        first.release()
        assert second.held() and not first.held()
    finally:
        first.release()
        second.release()


def test_a_leader_killed_for_real_frees_the_lock(database_url):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, database_url], stdout=subprocess.PIPE, text=True)
    lock = LeaderLock(database_url)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        assert not lock.held()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        assert lock.held()
    finally:
        holder.kill()
        lock.release()


def test_a_leader_whose_connection_postgresql_dropped_steps_down(postgres):
    with fresh_databases(postgres.admin_url, "service") as urls:
        leader, follower = LeaderLock(urls["service"]), LeaderLock(urls["service"])
        admin = create_engine(postgres.admin_url, isolation_level="AUTOCOMMIT")
        try:
            assert leader.held() and not follower.held()
            with admin.connect() as connection:  # as a PostgreSQL restart would
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
                    {"db": make_url(urls["service"]).database},
                )
            assert follower.held()
            assert not leader.held()  # it notices, tries again, and finds the lock taken
        finally:
            leader.release()
            follower.release()
            admin.dispose()
