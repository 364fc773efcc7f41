"""FastAPI dependencies: settings, a database session, the Optuna storage and the job named in the path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from optuna.storages import RDBStorage
from sqlalchemy.orm import Session

from service import jobs
from service.api.errors import ProblemError
from service.config import Settings
from service.db import Database
from service.studies import StudyStorage
from service.tables import Job

logger = logging.getLogger(__name__)


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.db


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One session per request, rolled back on error and always closed."""
    with database.session() as session:
        yield session


def get_storage(request: Request) -> RDBStorage:
    """The Optuna storage; 503 while the study database cannot be reached."""
    study_storage: StudyStorage = request.app.state.optuna
    try:
        return study_storage.get()
    except Exception as error:
        logger.warning("study storage unavailable: %s", error)
        raise ProblemError(
            503,
            "The study database is unavailable; try again shortly",
            slug="unavailable",
            headers={"Retry-After": "5"},
        ) from None


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[RDBStorage, Depends(get_storage)]
JobId = Annotated[str, Path(description="The job's id, e.g. job-0123456789ab")]


def get_job(job_id: JobId, session: SessionDep) -> Job:
    """The job named in the path, or a 404 problem."""
    return jobs.get_job(session, job_id)


JobDep = Annotated[Job, Depends(get_job)]
