"""The job lifecycle on real databases: one job = one study, the state machine, cancelling, listing."""

from __future__ import annotations

import itertools
import sqlite3
from datetime import UTC

import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import DBAPIError

from service import jobs, studies
from service.db import Database
from service.schemas import BestTrial, JobCreate, JobState, Progress

TERMINAL = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
LEGAL = {
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.QUEUED, JobState.CANCELLED),
    (JobState.QUEUED, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLING),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.CANCELLING, JobState.CANCELLED),
    (JobState.CANCELLING, JobState.FAILED),
    (JobState.CANCELLING, JobState.SUCCEEDED),
}
PATH_TO = {  # how to reach each state from QUEUED
    JobState.QUEUED: [],
    JobState.RUNNING: [JobState.RUNNING],
    JobState.CANCELLING: [JobState.RUNNING, JobState.CANCELLING],
    JobState.SUCCEEDED: [JobState.RUNNING, JobState.SUCCEEDED],
    JobState.FAILED: [JobState.FAILED],
    JobState.CANCELLED: [JobState.CANCELLED],
}


@pytest.fixture
def session(database):
    with database.session() as db_session:
        yield db_session


def new_job(session, storage, name="job", **kwargs):
    job, created = jobs.create_job(session, storage, JobCreate(name=name), **kwargs)
    assert created
    return job


def test_the_transition_table_is_exactly_the_documented_one():
    table = {(a, b) for a, targets in jobs.TRANSITIONS.items() for b in targets}
    assert table == LEGAL
    assert all(not jobs.TRANSITIONS[state] for state in TERMINAL)


def test_every_transition_is_allowed_or_refused_as_documented(session, study_storage):
    """All 36 pairs: legal moves happen and are recorded; illegal ones raise and change nothing."""
    for start, target in itertools.product(JobState, JobState):
        job = new_job(session, study_storage, f"{start}-{target}")
        for step in PATH_TO[start]:
            jobs.transition(session, job, step)
        events_before = len(jobs.events(session, job.id))
        if (start, target) in LEGAL:
            jobs.transition(session, job, target, "because")
            assert job.state == target
            last = jobs.events(session, job.id)[-1]
            assert (last.from_state, last.to_state, last.reason) == (start, target, "because")
        else:
            with pytest.raises(jobs.InvalidTransition):
                jobs.transition(session, job, target)
            session.refresh(job)
            assert job.state == start, (start, target)  # nothing changed, nothing recorded
            assert len(jobs.events(session, job.id)) == events_before


def test_timestamps_and_failure_reason_follow_the_states(session, study_storage):
    job = new_job(session, study_storage)
    assert job.created_at.tzinfo is not None and job.started_at is None
    jobs.transition(session, job, JobState.RUNNING)
    jobs.transition(session, job, JobState.FAILED, "driver lost twice")
    stored = jobs.get_job(session, job.id)
    session.refresh(stored)
    assert stored.started_at is not None and stored.finished_at is not None
    assert stored.started_at.tzinfo == UTC and stored.created_at <= stored.started_at <= stored.finished_at
    assert stored.failure_reason == "driver lost twice"
    history = [(e.from_state, e.to_state) for e in jobs.events(session, job.id)]
    assert history == [(None, "QUEUED"), ("QUEUED", "RUNNING"), ("RUNNING", "FAILED")]


def test_a_stale_copy_cannot_overwrite_a_newer_state(database, study_storage):
    """Two processes (API and reconciler) holding the same job: the second writer re-reads, not overwrites."""
    with database.session() as first:
        job_id = new_job(first, study_storage).id
        with database.session() as second:
            stale = jobs.get_job(second, job_id)
            jobs.request_cancel(first, jobs.get_job(first, job_id))  # QUEUED → CANCELLED elsewhere
            with pytest.raises(jobs.ConcurrentTransition):
                jobs.transition(second, stale, JobState.RUNNING)
            assert stale.state == JobState.CANCELLED  # refreshed to what is stored
    with database.session() as check:
        assert [e.to_state for e in jobs.events(check, job_id)] == ["QUEUED", "CANCELLED"]


def test_request_cancel_by_state(session, study_storage):
    queued = new_job(session, study_storage, "q")
    assert jobs.request_cancel(session, queued).state == JobState.CANCELLED
    running = new_job(session, study_storage, "r")
    jobs.transition(session, running, JobState.RUNNING)
    assert jobs.request_cancel(session, running).state == JobState.CANCELLING
    assert jobs.request_cancel(session, running).state == JobState.CANCELLING  # idempotent
    assert len(jobs.events(session, running.id)) == 3
    for job in (queued,):
        with pytest.raises(jobs.JobFinished):
            jobs.request_cancel(session, job)


def test_request_cancel_decides_again_on_a_concurrent_change(database, study_storage):
    with database.session() as api, database.session() as reconciler:
        job_id = new_job(api, study_storage).id
        seen_by_api = jobs.get_job(api, job_id)  # still QUEUED in this session
        jobs.transition(reconciler, jobs.get_job(reconciler, job_id), JobState.RUNNING)
        assert jobs.request_cancel(api, seen_by_api).state == JobState.CANCELLING


def test_create_job_makes_exactly_one_study_with_the_spec(session, study_storage):
    spec = JobCreate(name="one", objectives=[{"metric": "val_loss"}])
    job, created = jobs.create_job(session, study_storage, spec)
    assert created and job.state == JobState.QUEUED and job.study_name.startswith(job.id)
    summaries = study_storage.get_all_studies()
    assert [s.study_name for s in summaries] == [job.study_name]
    assert summaries[0].user_attrs == {"spec": spec.model_dump(mode="json"), "job_id": job.id}
    assert Progress.model_validate(job.progress).trials_planned == spec.budget.trials


def test_idempotency_replays_and_conflicts(session, study_storage):
    spec = JobCreate(name="same")
    job, created = jobs.create_job(session, study_storage, spec, idempotency_key="k")
    again, created_again = jobs.create_job(
        session, study_storage, JobCreate(name="same"), idempotency_key="k"
    )
    assert created and not created_again and again.id == job.id
    with pytest.raises(jobs.IdempotencyConflict) as conflict:
        jobs.create_job(session, study_storage, JobCreate(name="different"), idempotency_key="k")
    assert conflict.value.job_id == job.id
    assert isinstance(conflict.value, jobs.ServiceError)
    assert len(study_storage.get_all_studies()) == 1


def test_a_failed_insert_deletes_the_study_it_created(backend, database, study_storage):
    """No study without a job, with a real fault on each backend: SQLite locked by another writer, and
    PostgreSQL refusing an owner longer than its column."""
    url = backend.settings.resolved_database_url()
    if backend.name == "sqlite":
        database = Database(url, busy_timeout_s=0.2)  # the migrated database, impatient
        locker = sqlite3.connect(make_url(url).database, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        owner = None
    else:
        database, locker, owner = Database(url), None, "o" * 1000
    try:
        with database.session() as session, pytest.raises(DBAPIError):
            jobs.create_job(session, study_storage, JobCreate(name="never-stored"), owner=owner)
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
    assert study_storage.get_all_studies() == []
    with database.session() as session:
        assert jobs.list_jobs(session)[0] == []
    database.dispose()


def test_list_queued_and_active_jobs(session, study_storage):
    created = [new_job(session, study_storage, f"j{i}") for i in range(5)]
    jobs.transition(session, created[1], JobState.RUNNING)
    jobs.transition(session, created[2], JobState.RUNNING)
    jobs.transition(session, created[2], JobState.CANCELLING)
    jobs.transition(session, created[3], JobState.CANCELLED)
    assert [j.id for j in jobs.queued_jobs(session)] == [created[0].id, created[4].id]  # oldest first
    assert [j.id for j in jobs.queued_jobs(session, limit=1)] == [created[0].id]
    assert [j.id for j in jobs.active_jobs(session)] == [created[1].id, created[2].id]
    counts = jobs.count_by_state(session)
    assert counts[JobState.QUEUED] == 2 and counts[JobState.RUNNING] == 1 and counts[JobState.SUCCEEDED] == 0
    with pytest.raises(ValueError):
        jobs.list_jobs(session, page_size=0)


def test_update_summary_stores_json_safe_progress_and_best(session, study_storage):
    job = new_job(session, study_storage)
    progress = Progress(trials_planned=16, trials_finished=3, trials_complete=2, trials_pruned=1)
    best = BestTrial(number=1, values=[0.9], params={"lr": 0.5, "weird": float("nan")}, test_accuracy=0.88)
    jobs.update_summary(session, job, progress, best)
    session.expire_all()
    stored = jobs.get_job(session, job.id)
    assert Progress.model_validate(stored.progress) == progress
    assert stored.best_trial == {
        "number": 1,
        "values": [0.9],
        "params": {"lr": 0.5, "weird": None},
        "test_accuracy": 0.88,
    }
    jobs.update_summary(session, stored, progress, None)
    assert jobs.get_job(session, job.id).best_trial is None


def test_summary_of_a_study_matches_its_trials(session, study_storage):
    job = new_job(session, study_storage)
    progress, best = studies.summarise(
        JobCreate.model_validate(job.spec), studies.trials(study_storage, job.study_name)
    )
    assert progress.trials_finished == 0 and best is None


@pytest.mark.parametrize("token", ["", "e30", "eyJhZnRlciI6IC0xfQ", "eyJhZnRlciI6IHRydWV9"])
def test_page_tokens_are_checked(token):
    # "", {}, {"after": -1}, {"after": true}
    with pytest.raises(jobs.InvalidPageToken):
        jobs.decode_page_token(token)
    assert jobs.decode_page_token(jobs.encode_page_token(41, {"state": None}), {"state": None}) == 41
