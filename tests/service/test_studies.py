"""The Optuna side: studies per job, progress and best trial, trials as the API shows them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from service import studies
from service.db import POOL_SIZE
from service.schemas import JobCreate
from tests.conftest import fresh_databases

LR = {"lr": FloatDistribution(0.01, 1.0, log=True)}


def make_study(storage, name: str, **spec_fields) -> tuple[JobCreate, optuna.Study]:
    spec = JobCreate(name=name, **spec_fields)
    studies.create_study_for_job(storage, f"job-{name}", spec, job_id=f"job-{name}")
    return spec, optuna.load_study(study_name=f"job-{name}", storage=storage)


def finish(study, values, *, state=TrialState.COMPLETE, grads=None, test_accuracy=None, reason=None):
    trial = study.ask(LR)
    if grads is not None:
        trial.set_user_attr("gradient_evaluations", grads)
    if test_accuracy is not None:
        trial.set_user_attr("test_accuracy", test_accuracy)
    if reason is not None:
        trial.set_user_attr("reason", reason)
    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    return trial.number


def test_progress_counts_states_and_sums_gradient_evaluations(study_storage):
    spec, study = make_study(study_storage, "progress", budget={"trials": 10})
    finish(study, 0.5, grads=1000)
    finish(study, 0.7, grads=2000)
    finish(study, None, state=TrialState.PRUNED, grads=500, reason="pruned at epoch 2")
    finish(study, None, state=TrialState.FAIL, reason="diverged")  # no gradient attr: counts 0
    retried = study.ask(LR)  # its worker died; it is tried again, so it is not one of the planned trials
    retried.set_user_attr("will_retry", True)
    study.tell(retried, state=TrialState.FAIL)
    study.ask()  # running
    trials = studies.trials(study_storage, study.study_name)
    progress, _ = studies.summarise(spec, trials)
    assert progress.trial_seconds == pytest.approx(
        sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete)
    )
    assert progress.model_dump(exclude={"trial_seconds"}) == {
        "trials_planned": 10,
        "trials_finished": 4,
        "trials_running": 1,
        "trials_complete": 2,
        "trials_pruned": 1,
        "trials_failed": 1,
        "trials_retried": 1,
        "gradient_evaluations": 3500,
        "baselines": [],
    }


def test_each_baseline_gets_its_own_study_searching_its_learning_rate_with_the_same_budget(study_storage):
    spec, study = make_study(
        study_storage, "base", dataset="digits", model={"name": "lenet"}, baselines=["sgd", "adam"]
    )
    assert study.user_attrs["baselines"] == {"sgd": "job-base.sgd", "adam": "job-base.adam"}
    for optimizer in ("sgd", "adam"):
        baseline = JobCreate.model_validate(
            optuna.load_study(study_name=f"job-base.{optimizer}", storage=study_storage).user_attrs["spec"]
        )
        assert baseline.optimizer == optimizer and baseline.baselines == []
        assert baseline.search_space == JobCreate(name="b", optimizer=optimizer).search_space
        assert (baseline.dataset, baseline.model, baseline.budget) == (spec.dataset, spec.model, spec.budget)
    studies.delete_study(study_storage, study.study_name)
    assert not any(s.study_name.startswith("job-base") for s in optuna.get_all_study_summaries(study_storage))


def test_the_job_summary_includes_each_baseline(study_storage):
    spec, study = make_study(study_storage, "summary", budget={"trials": 3}, baselines=["sgd"])
    finish(study, 0.5, grads=100)
    sgd = optuna.load_study(study_name="job-summary.sgd", storage=study_storage)
    finish(sgd, 0.6, grads=10, test_accuracy=0.55)
    finish(sgd, 0.4, grads=10)
    progress, best = studies.summarise_job(study_storage, study.study_name, spec)
    assert (progress.trials_finished, progress.gradient_evaluations, best.values) == (1, 100, [0.5])
    [baseline] = progress.baselines
    assert (baseline.optimizer, baseline.study_name) == ("sgd", "job-summary.sgd")
    assert (baseline.progress.trials_finished, baseline.progress.gradient_evaluations) == (2, 20)
    assert (baseline.best_trial.values, baseline.best_trial.test_accuracy) == ([0.6], 0.55)


@pytest.mark.parametrize(("metric", "best_value"), [("val_accuracy", 0.9), ("val_loss", 0.2)])
def test_best_follows_the_objective_direction(study_storage, metric, best_value):
    spec, study = make_study(study_storage, metric.replace("_", "-"), objectives=[{"metric": metric}])
    numbers = {value: finish(study, value, test_accuracy=value / 2) for value in (0.5, 0.9, 0.2)}
    finish(study, None, state=TrialState.PRUNED)
    _, best = studies.summarise(spec, studies.trials(study_storage, study.study_name))
    assert best is not None
    assert best.number == numbers[best_value] and best.values == [best_value]
    assert best.test_accuracy == pytest.approx(best_value / 2)
    assert set(best.params) == {"lr"}


def test_no_complete_trial_means_no_best(study_storage):
    spec, study = make_study(study_storage, "nobest")
    finish(study, None, state=TrialState.FAIL, reason="out of memory")
    assert studies.summarise(spec, studies.trials(study_storage, study.study_name))[1] is None


def test_several_objectives_take_the_first_trial_on_the_pareto_front(study_storage):
    spec, study = make_study(
        study_storage,
        "pareto",
        objectives=[{"metric": "val_accuracy"}, {"metric": "wall_time"}],
        sampler={"name": "nsga2"},
        pruner={"name": "none"},
    )
    finish(study, [0.5, 30.0])  # dominated by trial 2
    finish(study, [0.9, 50.0])  # on the front
    finish(study, [0.6, 20.0])  # on the front
    _, best = studies.summarise(spec, studies.trials(study_storage, study.study_name))
    assert best is not None and best.number == 1 and best.values == [0.9, 50.0]


def test_trial_public_is_json_safe_and_utc(study_storage):
    _, study = make_study(study_storage, "public")
    trial = study.ask(LR)
    trial.report(0.4, 0)
    trial.report(float("nan"), 1)
    trial.set_user_attr("reason", "pruned: diverged at epoch 1")
    trial.set_user_attr("gradient_evaluations", 1234.0)
    trial.set_user_attr("curve", [0.1, float("-inf")])
    study.tell(trial, state=TrialState.PRUNED)
    public = studies.trial_public(studies.trial(study_storage, study.study_name, 0))
    assert public.state == "PRUNED" and public.values is None
    assert public.reason == "pruned: diverged at epoch 1"
    assert public.gradient_evaluations == 1234
    assert [(p.step, p.value) for p in public.intermediate_values] == [(0, 0.4), (1, None)]
    assert public.user_attrs["curve"] == [0.1, None]
    assert public.started_at.tzinfo == UTC and public.finished_at.tzinfo == UTC
    assert public.started_at <= public.finished_at


def test_delete_study_is_idempotent_and_trials_of_a_missing_study_raise(study_storage):
    _, study = make_study(study_storage, "gone")
    assert studies.study_exists(study_storage, study.study_name)
    studies.delete_study(study_storage, study.study_name)
    studies.delete_study(study_storage, study.study_name)
    assert not studies.study_exists(study_storage, study.study_name)
    with pytest.raises(KeyError):
        studies.trials(study_storage, study.study_name)


def test_the_study_database_keeps_a_pool_and_on_sqlite_uses_wal(backend, study_storage):
    assert study_storage.engine.pool.size() == POOL_SIZE
    if backend.name != "sqlite":
        return
    with study_storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, 1.5), (float("nan"), None), (float("inf"), None), ("x", None), (True, None), (3, 3.0)],
)
def test_finite_or_none(value, expected):
    assert studies.finite_or_none(value) == expected


UPGRADE = "import sys; from service.studies import upgrade_storage; print(upgrade_storage(sys.argv[1]))"


def test_concurrent_creation_of_a_new_study_database_does_not_collide(tmp_path, postgres):
    """Several API workers start at once on an empty study database: each creates Optuna's schema in turn."""
    with fresh_databases(postgres.admin_url, "optuna") as urls:
        for url in (f"sqlite:///{tmp_path}/optuna.db", urls["optuna"]):
            processes = [
                subprocess.Popen(
                    [sys.executable, "-c", UPGRADE, url],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(4)
            ]
            outputs = [p.communicate(timeout=120) for p in processes]
            assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
            assert len({out.strip() for out, _ in outputs}) == 1  # all at the same revision
