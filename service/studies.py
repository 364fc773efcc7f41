"""The Optuna side of the service: one study per job, read back as progress, best trial and trial pages.

This is the only service module that touches Optuna's storage. It writes studies (create, delete) and reads
trials; the trials themselves are written by the job's search driver, never by the API process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event, make_url, text

from service.db import SQLITE_BUSY_TIMEOUT_S, engine_options, exclusive, is_sqlite, sqlite_pragmas
from service.schemas import BaselineSummary, BestTrial, EpochPublic, JobCreate, Progress, TrialPublic

BASELINES = ("sgd", "adam")

SPEC_ATTR = "spec"
JOB_ID_ATTR = "job_id"
_JOB_STUDY_NAME = re.compile(r"(job-[0-9a-f]{12})/")
"""How every study of a job is named: ``{job_id}/{name}`` (see :func:`service.jobs.study_name_for`)."""
REASON_ATTR = "reason"
GRADIENT_EVALUATIONS_ATTR = "gradient_evaluations"
TEST_ACCURACY_ATTR = "test_accuracy"


# ----------------------------------------------------------------------------- storage
def open_storage(url: str, *, check_schema: bool = True) -> RDBStorage:
    """An Optuna RDB storage for ``url``; on SQLite with WAL and a busy timeout, like the service database.

    No heartbeat: it does not cover ask/tell, so the driver owns trial liveness. ``check_schema=False``
    opens a database an older Optuna release made, to upgrade it (:func:`upgrade_storage`).
    """
    engine_kwargs = engine_options(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            # WAL is a property of the file: set it before Optuna's first connection creates the tables.
            with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
            connection.close()
    storage = RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=not check_schema)
    if is_sqlite(url):
        event.listen(storage.engine, "connect", sqlite_pragmas())
    return storage


def close_storage(storage: RDBStorage) -> None:
    storage.remove_session()
    storage.engine.dispose()


UPGRADE_LOCK_ID = 0x4553474F  # "ESGO": one process at a time creates or upgrades Optuna's schema


def upgrade_storage(url: str) -> str:
    """Create Optuna's tables, or bring a database from an older Optuna release to this one's schema, with
    Optuna's own migrations; returns the schema revision. Several API workers start at once: one at a time
    does it (Optuna's table creation is not safe to race)."""
    with exclusive(url, UPGRADE_LOCK_ID):
        storage = open_storage(url, check_schema=False)
        try:
            if storage.get_current_version() != storage.get_head_version():
                storage.upgrade()
            return storage.get_current_version()
        finally:
            close_storage(storage)


class StudyStorage:
    """Opens the Optuna storage on first use and keeps it.

    Opening connects (Optuna creates its tables), so doing it lazily lets the API start, and ``/readyz`` say
    what is wrong, while the study database is down.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._storage: RDBStorage | None = None
        self._lock = threading.Lock()

    def get(self) -> RDBStorage:
        """The storage, opening it now if needed (raises if the database cannot be reached)."""
        with self._lock:
            if self._storage is None:
                self._storage = open_storage(self.url)
            return self._storage

    def ping(self) -> None:
        """Raise unless the study database answers ``SELECT 1``."""
        with self.get().engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def close(self) -> None:
        with self._lock:
            if self._storage is not None:
                close_storage(self._storage)
                self._storage = None


# ----------------------------------------------------------------------------- one study per job
def create_study_for_job(storage: RDBStorage, study_name: str, spec: JobCreate, *, job_id: str) -> None:
    """Create the job's study: its directions from the objectives, the spec and job id as user attrs.

    Each baseline gets a study of its own, ``{study_name}.{optimizer}``, holding its spec; the main study's
    ``baselines`` attribute maps the optimizers to those names. The driver runs them after the main search.
    """
    searches = [(study_name, spec)] + [
        (baseline_study_name(study_name, b), spec.baseline(b)) for b in spec.baselines
    ]
    # Through the storage, not optuna.create_study: a submission builds no sampler and no Study object.
    for name, search in searches:
        study_id = storage.create_new_study(study_directions(search), name)
        storage.set_study_user_attr(study_id, SPEC_ATTR, search.model_dump(mode="json"))
        storage.set_study_user_attr(study_id, JOB_ID_ATTR, job_id)
        if name == study_name and spec.baselines:
            baselines = {b: baseline_study_name(study_name, b) for b in spec.baselines}
            storage.set_study_user_attr(study_id, "baselines", baselines)


def study_directions(spec: JobCreate) -> list[StudyDirection]:
    """One per objective (validation has set every objective's direction)."""
    return [
        StudyDirection.MAXIMIZE if o.direction == "maximize" else StudyDirection.MINIMIZE
        for o in spec.objectives
    ]


def job_study_names(storage: RDBStorage) -> dict[str, str]:
    """Every study named the way the service names a job's studies: study name → the job id in it.

    Names only, read straight from Optuna's ``studies`` table (the same since Optuna 0.9): loading every
    study with its attributes to get there would read every job's spec.
    """
    with storage.engine.connect() as connection:
        names = connection.execute(text("SELECT study_name FROM studies")).scalars()
        return {name: match.group(1) for name in names if (match := _JOB_STUDY_NAME.match(name))}


def baseline_study_name(study_name: str, optimizer: str) -> str:
    return f"{study_name}.{optimizer}"


def delete_study(storage: RDBStorage, study_name: str) -> None:
    """Delete a job's study (and its baselines' studies); one that is already gone is not an error."""
    for name in [study_name] + [baseline_study_name(study_name, b) for b in BASELINES]:
        with contextlib.suppress(KeyError):
            storage.delete_study(storage.get_study_id_from_name(name))


def study_exists(storage: RDBStorage, study_name: str) -> bool:
    try:
        storage.get_study_id_from_name(study_name)
    except KeyError:
        return False
    return True


def trials(storage: RDBStorage, study_name: str) -> list[FrozenTrial]:
    """All trials of a study, by number (raises KeyError if the study does not exist).

    Read through a kept ``optuna.Study``: Optuna's storage cache then holds the finished trials (they never
    change) and each call fetches only the unfinished and new ones, instead of the whole study.
    """
    study = _loaded_study(storage, study_name)  # a missing study raises, and misses are not cached
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


@functools.lru_cache(maxsize=256)
def _loaded_study(storage: RDBStorage, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=storage)


def trial(storage: RDBStorage, study_name: str, number: int) -> FrozenTrial:
    """One trial by number (raises KeyError if the study or the trial does not exist)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))


# ----------------------------------------------------------------------------- summaries
def summarise_job(storage: RDBStorage, study_name: str, spec: JobCreate) -> tuple[Progress, BestTrial | None]:
    """The job's progress and best trial, with a summary of each baseline's search."""
    progress, best = summarise(spec, trials(storage, study_name))
    for optimizer in spec.baselines:
        name = baseline_study_name(study_name, optimizer)
        baseline_progress, baseline_best = summarise(spec.baseline(optimizer), trials(storage, name))
        progress.baselines.append(
            BaselineSummary(
                optimizer=optimizer, study_name=name, progress=baseline_progress, best_trial=baseline_best
            )
        )
    return progress, best


def summarise(spec: JobCreate, trials: list[FrozenTrial]) -> tuple[Progress, BestTrial | None]:
    """Progress (trial counts by state, gradient evaluations spent) and the best trial so far.

    With one objective the best trial is the best COMPLETE one in the objective's direction (ties: the
    lowest number). With several there is no single best, so it is the first trial (lowest number) on the
    Pareto front; the whole front is in the dashboard.
    """
    counts = {state: 0 for state in TrialState}
    retried = 0
    for trial in trials:
        counts[trial.state] += 1
        retried += trial.state == TrialState.FAIL and bool(trial.user_attrs.get("will_retry"))
    failed = counts[TrialState.FAIL] - retried
    progress = Progress(
        trials_planned=spec.budget.trials,
        trials_finished=counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] + failed,
        trials_running=counts[TrialState.RUNNING],
        trials_complete=counts[TrialState.COMPLETE],
        trials_pruned=counts[TrialState.PRUNED],
        trials_failed=failed,
        trials_retried=retried,
        gradient_evaluations=sum(_int_attr(t, GRADIENT_EVALUATIONS_ATTR) or 0 for t in trials),
        trial_seconds=sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.state.is_finished() and t.datetime_start and t.datetime_complete
        ),
    )
    best = _best(trials, study_directions(spec))
    if best is None:
        return progress, None
    return progress, BestTrial(
        number=best.number,
        values=[finite_or_none(v) for v in best.values],
        params=json_safe(best.params),
        test_accuracy=_float_attr(best, TEST_ACCURACY_ATTR),
    )


def _best(trials: list[FrozenTrial], directions: list[StudyDirection]) -> FrozenTrial | None:
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and len(t.values) == len(directions)
        and all(math.isfinite(v) for v in t.values)
    ]
    if not complete:
        return None
    # Minimise everything: flip the sign of maximised objectives.
    signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions]
    keyed = [([s * v for s, v in zip(signs, t.values, strict=True)], t) for t in complete]
    if len(directions) == 1:
        return min(keyed, key=lambda kt: (kt[0][0], kt[1].number))[1]

    def dominated(a: list[float]) -> bool:
        return any(
            all(x <= y for x, y in zip(b, a, strict=True)) and any(x < y for x, y in zip(b, a, strict=True))
            for b, _ in keyed
        )

    front = [t for values, t in keyed if not dominated(values)]
    return min(front, key=lambda t: t.number)


def trial_public(trial: FrozenTrial) -> TrialPublic:
    """A trial as the API shows it: JSON-safe numbers, the learning curve by step, UTC timestamps."""
    reason = trial.user_attrs.get(REASON_ATTR, trial.system_attrs.get("fail_reason"))
    return TrialPublic(
        number=trial.number,
        state=trial.state.name,  # type: ignore[arg-type]
        values=None if trial.values is None else [finite_or_none(v) for v in trial.values],
        params=json_safe(trial.params),
        reason=None if reason is None else str(reason),
        gradient_evaluations=_int_attr(trial, GRADIENT_EVALUATIONS_ATTR),
        test_accuracy=_float_attr(trial, TEST_ACCURACY_ATTR),
        intermediate_values=[
            EpochPublic(step=step, value=finite_or_none(value))
            for step, value in sorted(trial.intermediate_values.items())
        ],
        user_attrs=json_safe(trial.user_attrs),
        started_at=as_utc(trial.datetime_start),
        finished_at=as_utc(trial.datetime_complete),
    )


# ----------------------------------------------------------------------------- JSON safety
def finite_or_none(value: Any) -> float | None:
    """A number for JSON: non-finite values (and anything that is not a number) become None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so the output is always valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def as_utc(moment: datetime | None) -> datetime | None:
    """Optuna records naive local times; make them aware and UTC."""
    if moment is None:
        return None
    return moment.astimezone(UTC)


def _int_attr(trial: FrozenTrial, key: str) -> int | None:
    value = trial.user_attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _float_attr(trial: FrozenTrial, key: str) -> float | None:
    return finite_or_none(trial.user_attrs.get(key))
