"""Which API process leads: one reconciler per deployment, however many API workers or replicas serve.

The leader holds a lock that the operating system or the database frees when its holder dies, so another
process takes over at its next try, with no lease to expire:

- PostgreSQL: a session-level advisory lock, on a connection kept open for it;
- SQLite (one host by nature): an exclusive ``flock`` on a file beside the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

logger = logging.getLogger(__name__)

ADVISORY_LOCK_ID = 0x45534C44  # "ESLD"; the migrations use another id


class LeaderLock:
    """``held()`` says whether this process leads, taking the lock when it is free."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        sqlite = url.get_backend_name() == "sqlite"
        self._file = Path(f"{url.database}.leader") if sqlite else None
        self._engine = (
            None if sqlite else create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        )
        self._fd: int | None = None
        self._connection: Connection | None = None

    def held(self) -> bool:
        return self._held_file() if self._file is not None else self._held_advisory()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._connection is not None:
            self._drop_connection()

    # ------------------------------------------------------------------------------------------ SQLite
    def _held_file(self) -> bool:
        if self._fd is not None:
            return True
        assert self._file is not None
        fd = os.open(self._file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        logger.info("this process leads: it runs the reconciler (lock %s)", self._file)
        return True

    # ------------------------------------------------------------------------------------------ PostgreSQL
    def _held_advisory(self) -> bool:
        if self._connection is not None:
            try:  # the lock lives as long as this connection; a restart of PostgreSQL ends both
                self._connection.exec_driver_sql("SELECT 1")
                return True
            except DBAPIError:
                logger.warning("lost the leader lock with its connection; trying to take it again")
                self._drop_connection()
        assert self._engine is not None
        try:
            connection = self._engine.connect()
        except DBAPIError:
            return False
        with contextlib.suppress(DBAPIError):  # a failed try is a try lost: not leading this round
            taken = connection.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
            if taken.scalar():
                self._connection = connection
                logger.info("this process leads: it runs the reconciler (advisory lock %d)", ADVISORY_LOCK_ID)
                return True
        connection.close()
        return False

    def _drop_connection(self) -> None:
        assert self._connection is not None
        with contextlib.suppress(DBAPIError):
            self._connection.close()  # on a live connection, closing it releases the lock
        self._connection = None
