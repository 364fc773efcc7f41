"""The study loop on a real Optuna storage (SQLite), its trials run in this process."""

from __future__ import annotations

from collections.abc import Hashable

import optuna
import pytest
from optuna.trial import TrialState

from service.schemas import JobCreate
from workers.study_loop import InlineExecutor, StudyLoop, TrialCrashed, make_pruner, make_sampler

ESGD_SPACE = {
    "lr": {"type": "float", "low": 0.3, "high": 2.0, "log": True},
    "langevin_steps": {"type": "int", "low": 1, "high": 4},
    "eta_prime": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
    "gamma_0": 0.03,
}


def job_spec(**overrides) -> dict:
    spec = {
        "name": "loop-test",
        "dataset": "synthetic",
        "model": {"name": "mlp"},
        "budget": {"trials": 6, "epochs_per_trial": 3, "batch_size": 64},
        "search_space": ESGD_SPACE,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "parallelism": 2,
    }
    spec.update(overrides)
    return JobCreate.model_validate(spec).model_dump(mode="json")


def new_study(tmp_path, spec):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    directions = [o["direction"] for o in spec["objectives"]]
    study = optuna.create_study(
        storage=storage, study_name="job-test", directions=directions,
        sampler=make_sampler(spec), pruner=make_pruner(spec),
    )  # fmt: skip
    study.set_user_attr("spec", spec)
    return study


def test_search_runs_to_budget_with_intermediate_values_and_best_weights(tmp_path):
    spec = job_spec()
    study = new_study(tmp_path, spec)
    outcome = StudyLoop(study, spec, InlineExecutor(), artifacts_dir=tmp_path / "artifacts").run()
    assert outcome.state == "SUCCEEDED"
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2, 3]
        assert t.user_attrs["gradient_evaluations"] == 42  # 900 // 64 = 14 per epoch
        assert 0.0 <= t.user_attrs["test_accuracy"] <= 1.0
        start, first, last, end = (
            t.datetime_start.timestamp(), t.user_attrs["first_step_at"], t.user_attrs["last_step_at"],
            t.datetime_complete.timestamp(),
        )  # fmt: skip
        assert start <= first <= last <= end
        assert t.params["langevin_steps"] in range(1, 5)
    assert study.best_value > 0.6
    import torch

    saved = torch.load(tmp_path / "artifacts" / "best-model.pt")
    assert saved["trial"] == study.best_trial.number
    assert saved["params"] == {"gamma_0": 0.03, **study.best_trial.params}


def test_pruning_prunes_with_a_pruner_and_not_without(tmp_path):
    space = {
        **ESGD_SPACE,
        "lr": {"type": "float", "low": 1e-4, "high": 2.0, "log": True},
    }  # some hopeless trials
    pruned = job_spec(
        search_space=space,
        budget={"trials": 10, "epochs_per_trial": 4, "batch_size": 64},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        parallelism=1,
    )
    (tmp_path / "a").mkdir()
    study = new_study(tmp_path / "a", pruned)
    assert StudyLoop(study, pruned, InlineExecutor()).run().state == "SUCCEEDED"
    states = [t.state for t in study.get_trials()]
    assert TrialState.PRUNED in states and len(states) == 10
    reasons = [t.user_attrs["reason"] for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert all(r.startswith("pruned after epoch") for r in reasons)

    unpruned = {**pruned, "pruner": {**pruned["pruner"], "name": "none"}}
    (tmp_path / "b").mkdir()
    study = new_study(tmp_path / "b", unpruned)
    StudyLoop(study, unpruned, InlineExecutor()).run()
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_a_diverging_trial_fails_with_its_reason_and_the_job_goes_on(tmp_path):
    space = {**ESGD_SPACE, "lr": {"type": "categorical", "choices": [1.0, 1e12]}, "momentum": 0.99}
    spec = job_spec(optimizer="entropy_sgd", search_space=space, budget={"trials": 6, "epochs_per_trial": 2})
    study = new_study(tmp_path, spec)
    assert StudyLoop(study, spec, InlineExecutor()).run().state == "SUCCEEDED"
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert failed and all(t.params["lr"] == 1e12 for t in failed)
    assert all(t.user_attrs["reason"].startswith("diverged: non-finite") for t in failed)
    assert any(t.state == TrialState.COMPLETE for t in study.get_trials())


class LosesFirstLaunches(InlineExecutor):
    """A worker lost under a trial cannot be caused in-process (the Ray tests kill real workers), so this
    executor reports the first ``losses`` launches as lost machines, exactly as RayExecutor would."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses
        self.lost: set[Hashable] = set()

    def launch(self, config):
        handle = super().launch(config)
        if self.losses > 0:
            self.losses -= 1
            self.lost.add(handle)
        return handle

    def events(self, handles, timeout):
        lost = [h for h in handles if h in self.lost]
        if lost:
            self.lost.discard(lost[0])
            self.stop(lost[0])
            return [(lost[0], TrialCrashed("WorkerCrashedError: the worker died", retryable=True))]
        return super().events(handles, timeout)


@pytest.mark.parametrize(("losses", "retries", "failed_logical"), [(1, 2, 0), (3, 2, 1)])
def test_lost_trials_are_retried_with_the_same_parameters_up_to_a_bound(
    tmp_path, losses, retries, failed_logical
):
    spec = job_spec(
        budget={"trials": 3, "epochs_per_trial": 1, "max_retries_per_trial": retries}, parallelism=1
    )
    study = new_study(tmp_path, spec)
    assert StudyLoop(study, spec, LosesFirstLaunches(losses)).run().state == "SUCCEEDED"
    trials = study.get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and "WorkerCrashedError" in first.user_attrs["reason"]
    retries_of_first = [t for t in trials if t.user_attrs.get("retry_of") == first.number]
    assert all(t.params == first.params for t in retries_of_first)
    assert len(retries_of_first) == min(losses, retries)
    logical_done = [t for t in trials if not t.user_attrs.get("will_retry")]
    assert len(logical_done) == 3  # the budget counts each trial once, whatever its attempts
    assert sum(t.state == TrialState.FAIL for t in logical_done) == failed_logical


def test_a_restarted_driver_fails_orphans_and_finishes_the_budget(tmp_path):
    spec = job_spec(budget={"trials": 4, "epochs_per_trial": 1})
    study = new_study(tmp_path, spec)
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(0.3, 2.0, log=True)})  # left RUNNING
    orphan.set_user_attr("attempt", 1)
    StudyLoop(study, spec, InlineExecutor()).run()
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "driver stopped" in trials[0].user_attrs["reason"]
    assert not any(t.state == TrialState.RUNNING for t in trials)
    assert sum(not t.user_attrs.get("will_retry") for t in trials) == 4


def test_cancellation_stops_running_trials(tmp_path):
    spec = job_spec()
    study = new_study(tmp_path, spec)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3

    outcome = StudyLoop(study, spec, InlineExecutor(), should_stop=should_stop).run()
    assert outcome.state == "CANCELLED"
    assert not any(t.state == TrialState.RUNNING for t in study.get_trials())
    assert any(t.user_attrs.get("reason") == "the job was cancelled" for t in study.get_trials())
