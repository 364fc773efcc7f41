"""The entry point that runs one job's study loop on the Ray cluster (submitted through Ray's Jobs API).

    python -m workers.driver --storage URL --study NAME --artifacts-dir DIR

The job spec is read from the study's user attributes, where the service put it. The baselines the job asked
for (each its own study, named in the main study's ``baselines`` attribute) are searched after the main study,
with the same budget. SIGTERM (what Ray sends when the job is stopped) cancels the search: running trials are
stopped and told FAIL, and the study's ``outcome`` says CANCELLED. If the study database goes away (a restart,
a failover), the running trials are stopped, the driver waits for the database (``--max-outage-s``) and
resumes the study, retrying those trials. The exit status is 0 unless the job FAILED.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import optuna
import ray
import sqlalchemy.exc

from workers.study_loop import Outcome, StudyLoop, make_pruner, make_sampler
from workers.trial_task import RayExecutor

logger = logging.getLogger(__name__)

STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)
"""What Optuna's RDB storage raises when its database cannot be reached."""
MAX_RECOVERIES = 20


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage; SQLite waits for a busy lock instead of failing (several drivers share the file)."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one job's hyperparameter search.")
    parser.add_argument("--storage", required=True, help="Optuna storage URL")
    parser.add_argument("--study", required=True, help="study name (the job's)")
    parser.add_argument("--artifacts-dir", type=Path, required=True, help="where the best weights go")
    parser.add_argument(
        "--max-outage-s",
        type=float,
        default=600.0,
        help="how long to wait for a study database that went away",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    storage = open_storage(args.storage)
    ray.init(logging_level=logging.WARNING)  # inside a Ray job this joins the job's cluster
    recoveries = 0
    while True:
        try:
            outcome = search(storage, args.study, args.artifacts_dir, stop)
            break
        except STORAGE_ERRORS as error:
            # An outage (a database restart, a failover) costs the trials in flight, which are retried:
            # wait for the database, then search again, which resumes the study where it was.
            recoveries += 1
            logger.warning("the study database failed (%s); waiting up to %.0f s", error, args.max_outage_s)
            if recoveries > MAX_RECOVERIES or not wait_for_storage(
                storage, args.study, args.max_outage_s, stop
            ):
                raise
            logger.info("the study database is back; resuming the search")
    logger.info("job ended %s%s", outcome.state, f": {outcome.reason}" if outcome.reason else "")
    return 1 if outcome.state == "FAILED" else 0


def search(
    storage: optuna.storages.BaseStorage, study_name: str, artifacts_dir: Path, stop: threading.Event
) -> Outcome:
    """The job's search and then its baselines' (each its own study); records the job's outcome."""
    spec = optuna.load_study(study_name=study_name, storage=storage).user_attrs["spec"]
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec)
    )
    resources = spec["resources"]
    outcome = StudyLoop(
        study,
        spec,
        RayExecutor(resources["cpus"], resources["gpus"]),
        artifacts_dir=artifacts_dir,
        should_stop=stop.is_set,
    ).run()
    for optimizer, name in study.user_attrs.get("baselines", {}).items():
        if outcome.state == "CANCELLED":
            break
        baseline = optuna.load_study(study_name=name, storage=storage).user_attrs["spec"]
        baseline_study = optuna.load_study(
            study_name=name, storage=storage, sampler=make_sampler(baseline), pruner=make_pruner(baseline)
        )
        ended = StudyLoop(
            baseline_study,
            baseline,
            RayExecutor(resources["cpus"], resources["gpus"]),
            artifacts_dir=artifacts_dir / optimizer,
            should_stop=stop.is_set,
        ).run()
        if ended.state == "CANCELLED":
            outcome = ended
    study.set_user_attr("outcome", {"state": outcome.state, "reason": outcome.reason})
    return outcome


def wait_for_storage(
    storage: optuna.storages.BaseStorage, study_name: str, max_s: float, stop: threading.Event
) -> bool:
    """Whether the study database answers again within ``max_s`` seconds (False if cancelled meanwhile)."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            storage.get_study_id_from_name(study_name)
            return True
        except STORAGE_ERRORS:
            stop.wait(1.0)
    return False


if __name__ == "__main__":
    sys.exit(main())
