"""FastAPI dependencies: settings, a database session, the Optuna storage, the caller (its API key) and the
job named in the path, which the caller must be allowed to see."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from optuna.storages import RDBStorage
from sqlalchemy.orm import Session

from service import jobs, keys
from service.api.auth import presented_secret, unauthenticated
from service.api.errors import ProblemError
from service.config import Settings
from service.db import Database
from service.keys import Principal
from service.studies import StudyStorage
from service.tables import Job

logger = logging.getLogger(__name__)


# Dependencies that only read app state are ``async def``: FastAPI runs a plain ``def`` one in a worker
# thread, a hop that costs more than the lookup. Those that may wait on a database stay ``def``.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
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


def get_principal(request: Request, session: SessionDep) -> Principal:
    """The caller: its key's principal, or :data:`service.keys.ANONYMOUS` while keys are off."""
    secret = presented_secret(request.headers.get("authorization"))
    if secret is None:
        if keys.keys_required(session, request.app.state.settings):
            raise unauthenticated("An API key is required: send it as 'Authorization: Bearer <key>'")
        return keys.ANONYMOUS
    principal = keys.authenticate(session, secret)
    if principal is None:
        raise unauthenticated("The API key is unknown or has been revoked")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_job(job_id: JobId, session: SessionDep, principal: PrincipalDep) -> Job:
    """The job named in the path: a 404 problem if there is none, a 403 if it is another key's."""
    job = jobs.get_job(session, job_id)
    if not principal.may_access(job.owner):
        raise ProblemError(403, f"job {job_id} belongs to another API key", slug="forbidden")
    return job


JobDep = Annotated[Job, Depends(get_job)]
