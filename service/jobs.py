"""Job lifecycle: creation (one job = one study), the state machine, cancellation, listing and summaries.

Every state change is a compare-and-set ``UPDATE ... WHERE state = <old>`` plus a ``job_events`` row in the
same transaction, so the API, the reconciler and the CLI can race on one job (on SQLite as on PostgreSQL)
without ever leaving a terminal state or losing a transition.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.storages import RDBStorage
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service import studies
from service.schemas import BestTrial, JobCreate, JobState, Progress
from service.tables import Job, JobEvent, utcnow

MAX_PAGE_SIZE = 100

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.CANCELLING, JobState.SUCCEEDED, JobState.FAILED}),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
"""The only legal moves; terminal states have none."""

ACTIVE_STATES = (JobState.RUNNING, JobState.CANCELLING)


# ----------------------------------------------------------------------------- errors
class ServiceError(Exception):
    """Root of every error the service raises on purpose (the API maps each to a problem response)."""


class JobNotFound(ServiceError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class InvalidTransition(ServiceError):
    def __init__(self, job_id: str, from_state: JobState, to_state: JobState) -> None:
        super().__init__(f"job {job_id} cannot go from {from_state} to {to_state}")
        self.job_id, self.from_state, self.to_state = job_id, from_state, to_state


class ConcurrentTransition(InvalidTransition):
    """Someone else changed the job's state between our read and our write; re-read and decide again."""


class JobFinished(ServiceError):
    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"job {job_id} has already finished ({state}); a finished job cannot be cancelled")
        self.job_id, self.state = job_id, state


class IdempotencyConflict(ServiceError):
    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for job {job_id} with a different request body"
        )
        self.key, self.job_id = key, job_id


class SpecRejected(ServiceError):
    """A spec that is valid on its own but cannot run here (e.g. more CPUs per trial than any node has).

    Raised by a :data:`SpecCheck` with one or more ``(loc, msg)`` pairs naming the fields at fault.
    """

    def __init__(self, *errors: tuple[Sequence[str | int], str]) -> None:
        self.errors = [{"loc": list(loc), "msg": msg, "type": "spec_rejected"} for loc, msg in errors]
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in self.errors))


SpecCheck = Callable[[JobCreate], None]
"""Checks a new job's spec against this deployment before anything is stored; raises :class:`SpecRejected`."""


class InvalidPageToken(ServiceError):
    def __init__(self, why: str = "not a token this service issued") -> None:
        super().__init__(f"page_token is invalid: {why}; start again without page_token")


# ----------------------------------------------------------------------------- creation
JOB_ID_PATTERN = re.compile(r"job-[0-9a-f]{12}")
"""Every job id this service issues (:func:`new_job_id`)."""


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def study_name_for(job_id: str, name: str) -> str:
    """The study's name: the job id makes it unique, the job's name makes it readable in the dashboard."""
    return f"{job_id}/{name}"


def spec_hash(spec: JobCreate) -> str:
    """A fingerprint of the validated spec, so a retried submission matches whatever its JSON formatting."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    session: Session,
    storage: RDBStorage,
    spec: JobCreate,
    *,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    owner: str | None = None,
    checks: Sequence[SpecCheck] = (),
) -> tuple[Job, bool]:
    """Store a QUEUED job and create its study; returns ``(job, created)``.

    No job without a study, no study without a job: the study is created first, the row is inserted in one
    transaction, and the study is deleted again if that fails. A repeated ``idempotency_key`` with the same
    request returns the existing job (``created`` False); with a different request it raises
    :class:`IdempotencyConflict`. Two concurrent requests with one key are settled by the unique constraint:
    the loser deletes its study and returns the winner's job. ``checks`` run on a new job only (a replay
    returns the job as it was accepted), before anything is stored; every rejection is collected into one
    :class:`SpecRejected`.
    """
    request_hash = request_hash or spec_hash(spec)
    if idempotency_key is not None:
        existing = _replay(session, idempotency_key, request_hash)
        if existing is not None:
            return existing, False
    rejected: list[tuple[Sequence[str | int], str]] = []
    for check in checks:
        try:
            check(spec)
        except SpecRejected as error:
            rejected += [(e["loc"], e["msg"]) for e in error.errors]
    if rejected:
        raise SpecRejected(*rejected)

    job_id = new_job_id()
    study_name = study_name_for(job_id, spec.name)
    studies.create_study_for_job(storage, study_name, spec, job_id=job_id)
    now = utcnow()
    job = Job(
        id=job_id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        state=JobState.QUEUED.value,
        created_at=now,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        study_name=study_name,
        driver_attempts=0,
        progress=Progress(trials_planned=spec.budget.trials).model_dump(mode="json"),
        owner=owner,
    )
    try:
        session.add(job)
        session.add(JobEvent(job_id=job_id, at=now, from_state=None, to_state=JobState.QUEUED.value))
        session.commit()
    except IntegrityError:
        session.rollback()
        studies.delete_study(storage, study_name)
        if idempotency_key is not None:
            winner = _replay(session, idempotency_key, request_hash)
            if winner is not None:
                return winner, False
        raise
    except BaseException:
        session.rollback()
        studies.delete_study(storage, study_name)
        raise
    return job, True


def _replay(session: Session, key: str, request_hash: str) -> Job | None:
    job = session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise IdempotencyConflict(key, job.id)
    return job


# ----------------------------------------------------------------------------- reading
def get_job(session: Session, job_id: str) -> Job:
    # Only text shaped like an issued id reaches the database: PostgreSQL refuses text with NUL characters
    # (``/v1/jobs/job-%00`` would be an error, not a 404), and an id of any length would be looked up.
    if JOB_ID_PATTERN.fullmatch(job_id) is None:
        raise JobNotFound(job_id)
    job = session.scalars(select(Job).where(Job.id == job_id)).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(
    session: Session,
    *,
    state: JobState | None = None,
    owner: str | None = None,
    page_size: int = 20,
    page_token: str | None = None,
) -> tuple[list[Job], str]:
    """One page of jobs, newest first, and the token of the next page ("" at the end).

    Keyset pagination on ``seq``: pages stay consistent while jobs are created, and the token is opaque
    (urlsafe base64 of JSON) and bound to the filters it was issued for (``owner``: one key's jobs only).
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    filter_ = {"state": state.value if state else None, "owner": owner}
    query = select(Job).order_by(Job.seq.desc()).limit(page_size + 1)
    if state is not None:
        query = query.where(Job.state == state.value)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if page_token:
        query = query.where(Job.seq < decode_page_token(page_token, filter_))
    rows = list(session.scalars(query))
    if len(rows) <= page_size:
        return rows, ""
    rows = rows[:page_size]
    return rows, encode_page_token(rows[-1].seq, filter_)


def existing_job_ids(session: Session, job_ids: set[str]) -> set[str]:
    """Which of ``job_ids`` name a stored job."""
    found: set[str] = set()
    ids = sorted(job_ids)
    for start in range(0, len(ids), 500):  # bounded IN lists
        found.update(session.scalars(select(Job.id).where(Job.id.in_(ids[start : start + 500]))))
    return found


def count_unfinished(session: Session, owner: str | None) -> int:
    """How many of ``owner``'s jobs are QUEUED, RUNNING or CANCELLING."""
    unfinished = [JobState.QUEUED.value, *(s.value for s in ACTIVE_STATES)]
    query = select(func.count()).select_from(Job).where(Job.owner == owner, Job.state.in_(unfinished))
    return session.scalar(query) or 0


def queued_jobs(session: Session, limit: int | None = None) -> list[Job]:
    """Jobs waiting to start, oldest first (the dispatch order)."""
    query = select(Job).where(Job.state == JobState.QUEUED.value).order_by(Job.seq)
    return list(session.scalars(query.limit(limit) if limit is not None else query))


def active_jobs(session: Session) -> list[Job]:
    """Jobs whose driver should be alive: RUNNING or CANCELLING, oldest first."""
    query = select(Job).where(Job.state.in_([s.value for s in ACTIVE_STATES])).order_by(Job.seq)
    return list(session.scalars(query))


@dataclass
class Totals:
    """Figures over every job, for ``/metrics``: trials count each job's baselines' too."""

    jobs: dict[JobState, int]
    trials: dict[str, int]
    gradient_evaluations: int
    trial_seconds: float
    attempts_finished: int
    """Finished trial attempts (retried ones included): what ``trial_seconds`` sums over."""
    queue_seconds: list[float]
    """How long each started job waited in QUEUED."""


def totals(session: Session) -> Totals:
    """One pass over the jobs' rows (their progress is kept current by the reconciler)."""
    result = Totals(count_by_state(session), dict.fromkeys(TRIAL_STATES, 0), 0, 0.0, 0, [])
    rows = session.execute(select(Job.progress, Job.created_at, Job.started_at))
    for progress, created_at, started_at in rows:
        if started_at is not None:
            result.queue_seconds.append((started_at - created_at).total_seconds())
        if not progress:
            continue
        for part in [progress, *(baseline["progress"] for baseline in progress.get("baselines", []))]:
            for state in TRIAL_STATES:
                result.trials[state] += part.get(f"trials_{state}", 0)
            result.attempts_finished += part.get("trials_finished", 0) + part.get("trials_retried", 0)
            result.gradient_evaluations += part.get("gradient_evaluations", 0)
            result.trial_seconds += part.get("trial_seconds", 0.0)
    return result


TRIAL_STATES = ("running", "complete", "pruned", "failed", "retried")


def count_by_state(session: Session) -> dict[JobState, int]:
    """How many jobs are in each state (every state present, zeros included)."""
    counts = dict.fromkeys(JobState, 0)
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[JobState(state)] = count
    return counts


def events(session: Session, job_id: str) -> Sequence[JobEvent]:
    """The job's state history, oldest first."""
    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()


# ----------------------------------------------------------------------------- state machine
def check_transition(from_state: JobState, to_state: JobState, job_id: str = "?") -> None:
    if to_state not in TRANSITIONS[from_state]:
        raise InvalidTransition(job_id, from_state, to_state)


def transition(
    session: Session, job: Job, new_state: JobState, reason: str | None = None, *, commit: bool = True
) -> Job:
    """Move ``job`` to ``new_state`` if the state machine allows it, recording a ``job_events`` row.

    Sets ``started_at`` on entering RUNNING, ``finished_at`` on entering a terminal state and
    ``failure_reason`` on FAILED. Raises :class:`InvalidTransition` for an illegal move and
    :class:`ConcurrentTransition` if the stored state changed since ``job`` was read: the session is then
    rolled back and ``job`` refreshed, so the caller can decide again. Pending changes to ``job`` (e.g.
    ``ray_submission_id``) are flushed in the same transaction as the state change.
    """
    new_state = JobState(new_state)
    old_state = JobState(job.state)
    check_transition(old_state, new_state, job.id)
    now = utcnow()
    values: dict[str, Any] = {"state": new_state.value}
    if new_state == JobState.RUNNING and job.started_at is None:
        values["started_at"] = now
    if new_state.terminal:
        values["finished_at"] = now
    if new_state == JobState.FAILED:
        values["failure_reason"] = reason or "failed"
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == old_state.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        session.refresh(job)
        raise ConcurrentTransition(job.id, JobState(job.state), new_state)
    for key, value in values.items():
        set_committed_value(job, key, value)  # already written by the UPDATE above
    session.add(
        JobEvent(job_id=job.id, at=now, from_state=old_state.value, to_state=new_state.value, reason=reason)
    )
    if commit:
        session.commit()
    else:
        session.flush()
    return job


def request_cancel(session: Session, job: Job, reason: str = "cancelled by request") -> Job:
    """Cancel a job: QUEUED → CANCELLED at once, RUNNING → CANCELLING (its driver stops the trials and
    reports CANCELLED), CANCELLING stays as it is. A finished job raises :class:`JobFinished`.
    """
    for _ in range(5):
        state = JobState(job.state)
        if state.terminal:
            raise JobFinished(job.id, state)
        if state == JobState.CANCELLING:
            return job
        target = JobState.CANCELLED if state == JobState.QUEUED else JobState.CANCELLING
        try:
            return transition(session, job, target, reason)
        except ConcurrentTransition:
            continue  # ``job`` was refreshed: decide again on its current state
    raise ConcurrentTransition(job.id, JobState(job.state), JobState.CANCELLING)


def update_summary(session: Session, job: Job, progress: Progress, best: BestTrial | None) -> Job:
    """Store the job's latest progress and best trial (what ``GET /v1/jobs/{id}`` shows)."""
    job.progress = studies.json_safe(progress.model_dump(mode="json"))
    job.best_trial = None if best is None else studies.json_safe(best.model_dump(mode="json"))
    session.commit()
    return job


# ----------------------------------------------------------------------------- page tokens
def encode_page_token(after: int, filter_: dict[str, Any] | None = None) -> str:
    payload = json.dumps({"after": after, "filter": filter_ or {}}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, filter_: dict[str, Any] | None = None) -> int:
    """The position a token points after; raises :class:`InvalidPageToken` for anything else."""
    if len(token) > 512:
        raise InvalidPageToken("too long")
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidPageToken() from None
    if not isinstance(payload, dict) or type(payload.get("after")) is not int or payload["after"] < 0:
        raise InvalidPageToken()
    if payload.get("filter", {}) != (filter_ or {}):
        raise InvalidPageToken("it was issued for other filters")
    return payload["after"]
