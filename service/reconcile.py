"""Keeps the service's jobs in step with their drivers on Ray and their studies, in a background thread.

Every ``reconcile_interval_s`` (and at start-up, which is how a restarted API picks up where it was), in
the one API process that holds the leader lock (:mod:`service.leader`), however many serve:
- QUEUED jobs start, first come first served, while fewer than ``max_running_jobs`` are active;
- CANCELLING jobs have their drivers stopped;
- active jobs get their progress and best trial copied from their study, so reads never touch Optuna;
- studies left by submissions that never stored their job (the API died in between) are deleted, at
  start-up and every ``orphan_study_grace_s``, so no study stays without its job;
- a job whose driver ended takes the outcome the driver recorded in its study. A driver that died without
  one (killed, node lost, cluster restarted) is restarted up to ``max_driver_restarts`` times; it resumes the
  study, failing and retrying the trials that were running. Past that the job FAILS with the reason, and its
  RUNNING trials are failed here, so nothing stays RUNNING once its task is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState
from sqlalchemy.orm import Session

from service import jobs, studies
from service.config import Settings
from service.dispatch import TERMINAL, RayDispatcher
from service.leader import LeaderLock
from service.schemas import JobCreate, JobState
from service.tables import Job

logger = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        sessions: Callable[[], Session],
        storage: optuna.storages.BaseStorage,
        dispatcher: RayDispatcher,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.dispatcher = dispatcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leader = LeaderLock(settings.resolved_database_url())
        self._next_sweep = 0.0  # at start-up, then every orphan_study_grace_s
        self._suspects: dict[str, float] = {}  # study name → when first seen without its job

    # ------------------------------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="esgd-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.leader.held():  # one reconciler per deployment: the others wait their turn
                    self.reconcile_once()
            except Exception:  # a database or Ray outage: log it and try again next round
                logger.exception(
                    "reconciliation failed; retrying in %.1f s", self.settings.reconcile_interval_s
                )
            self._stop.wait(self.settings.reconcile_interval_s)
        self.leader.release()

    # ------------------------------------------------------------------------------------------ one round
    def reconcile_once(self) -> None:
        with self.sessions() as session:
            for job in jobs.active_jobs(session):
                self._follow(session, job)
            self._start_queued(session)
            if time.monotonic() >= self._next_sweep:
                self.sweep_orphan_studies(session)
                self._next_sweep = time.monotonic() + self.settings.orphan_study_grace_s

    def sweep_orphan_studies(self, session: Session) -> list[str]:
        """Delete the studies of submissions whose job was never stored (the API died in between).

        A submission creates its study first and commits its job row after, so a study is only deleted once
        this sweep has seen it without its job for ``orphan_study_grace_s`` (a submission in flight stores
        its job within milliseconds).
        """
        named = studies.job_study_names(self.storage)
        stored = jobs.existing_job_ids(session, set(named.values()))
        now, grace = time.time(), self.settings.orphan_study_grace_s
        self._suspects = {name: seen for name, seen in self._suspects.items() if name in named}
        deleted = []
        for name, job_id in named.items():
            if job_id in stored:
                self._suspects.pop(name, None)
                continue
            if now - self._suspects.setdefault(name, now) > grace:
                studies.delete_study(self.storage, name)
                self._suspects.pop(name, None)
                deleted.append(name)
                logger.warning("deleted study %s: its job was never stored", name)
        return deleted

    def _start_queued(self, session: Session) -> None:
        free = self.settings.max_running_jobs - len(jobs.active_jobs(session))
        for job in jobs.queued_jobs(session)[: max(free, 0)]:
            self._submit(session, job)  # before RUNNING: while Ray refuses, the job stays QUEUED
            try:
                jobs.transition(session, job, JobState.RUNNING)
            except jobs.InvalidTransition:  # cancelled meanwhile: its driver must not run
                self.dispatcher.stop(job.ray_submission_id)

    def _submit(self, session: Session, job: Job) -> None:
        job.driver_attempts += 1
        job.ray_submission_id = self.dispatcher.submit(job.id, job.study_name, job.driver_attempts)
        session.commit()
        logger.info("job %s: driver %s submitted", job.id, job.ray_submission_id)

    def _follow(self, session: Session, job: Job) -> None:
        self._copy_summary(session, job)
        status = self.dispatcher.status(job.ray_submission_id) if job.ray_submission_id else None
        if status is not None and status not in TERMINAL:
            if job.state == JobState.CANCELLING:
                self.dispatcher.stop(job.ray_submission_id)
            return
        outcome = self._outcome(job)
        if outcome is not None:
            state, reason = JobState(outcome["state"]), outcome.get("reason")
            if job.state == JobState.CANCELLING and state != JobState.SUCCEEDED:
                state = JobState.CANCELLED
            elif job.state == JobState.RUNNING and state == JobState.CANCELLED:
                state, reason = JobState.FAILED, "its driver was stopped from outside the service"
            self._finish(session, job, state, reason)
        elif job.state == JobState.CANCELLING:
            self._fail_running_trials(job, "the job was cancelled")
            self._finish(session, job, JobState.CANCELLED, "cancelled on request")
        elif job.driver_attempts <= self.settings.max_driver_restarts:
            logger.warning(
                "job %s: driver %s ended without an outcome; restarting it", job.id, job.ray_submission_id
            )
            self._submit(session, job)
        else:
            last_words = self.dispatcher.logs_tail(job.ray_submission_id) if job.ray_submission_id else ""
            reason = f"the job driver stopped without finishing {job.driver_attempts} times"
            reason += f" (Ray status {status})" if status else " (unknown to Ray)"
            if last_words:
                reason += f"; its last log lines:\n{last_words}"
            self._fail_running_trials(job, "its job driver stopped")
            self._finish(session, job, JobState.FAILED, reason)

    def _finish(self, session: Session, job: Job, state: JobState, reason: str | None) -> None:
        self._copy_summary(session, job)
        jobs.transition(session, job, state, reason)
        session.commit()
        logger.info("job %s ended %s%s", job.id, state.value, f": {reason}" if reason else "")

    def _copy_summary(self, session: Session, job: Job) -> None:
        spec = JobCreate.model_validate(job.spec)
        progress, best = studies.summarise_job(self.storage, job.study_name, spec)
        jobs.update_summary(session, job, progress, best)
        session.commit()

    def _outcome(self, job: Job) -> dict | None:
        study_id = self.storage.get_study_id_from_name(job.study_name)
        return self.storage.get_study_user_attrs(study_id).get("outcome")

    def _fail_running_trials(self, job: Job, reason: str) -> None:
        """Only once the driver is gone: the study then has no other writer."""
        study = optuna.load_study(study_name=job.study_name, storage=self.storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.storage.set_trial_user_attr(trial._trial_id, "reason", reason)  # no public id accessor
            study.tell(trial.number, state=TrialState.FAIL)
