"""The entry point that runs one job's study loop on the Ray cluster (submitted through Ray's Jobs API).

    python -m workers.driver --storage URL --study NAME --artifacts-dir DIR

The job spec is read from the study's user attributes, where the service put it. The baselines the job asked
for (each its own study, named in the main study's ``baselines`` attribute) are searched after the main study,
with the same budget. SIGTERM (what Ray sends when
the job is stopped) cancels the search: running trials are stopped and told FAIL, and the study's ``outcome``
says CANCELLED. The exit status is 0 unless the job FAILED.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import optuna
import ray

from workers.study_loop import StudyLoop, make_pruner, make_sampler
from workers.trial_task import RayExecutor


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage; SQLite waits for a busy lock instead of failing (several drivers share the file)."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one job's hyperparameter search.")
    parser.add_argument("--storage", required=True, help="Optuna storage URL")
    parser.add_argument("--study", required=True, help="study name (the job's)")
    parser.add_argument("--artifacts-dir", type=Path, required=True, help="where the best weights go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    storage = open_storage(args.storage)
    spec = optuna.load_study(study_name=args.study, storage=storage).user_attrs["spec"]
    study = optuna.load_study(
        study_name=args.study, storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec)
    )
    ray.init(logging_level=logging.WARNING)  # inside a Ray job this joins the job's cluster
    resources = spec["resources"]
    loop = StudyLoop(
        study,
        spec,
        RayExecutor(resources["cpus"], resources["gpus"]),
        artifacts_dir=args.artifacts_dir,
        should_stop=stop.is_set,
    )
    outcome = loop.run()
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
            artifacts_dir=args.artifacts_dir / optimizer,
            should_stop=stop.is_set,
        ).run()
        if ended.state == "CANCELLED":
            outcome = ended
    study.set_user_attr("outcome", {"state": outcome.state, "reason": outcome.reason})
    logging.getLogger(__name__).info(
        "job ended %s%s", outcome.state, f": {outcome.reason}" if outcome.reason else ""
    )
    return 1 if outcome.state == "FAILED" else 0


if __name__ == "__main__":
    sys.exit(main())
