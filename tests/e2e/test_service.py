"""The whole service on a real local Ray, real SQLite and real PostgreSQL: REST job → search → results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.e2e.conftest import wait_for, wait_for_progress

TINY = {
    "dataset": "synthetic",
    "model": {"name": "mlp"},
    "optimizer": "entropy_sgd",
    "budget": {"trials": 4, "epochs_per_trial": 3, "batch_size": 64},
    "search_space": {
        "lr": {"type": "float", "low": 0.3, "high": 2.0, "log": True},
        "langevin_steps": {"type": "int", "low": 1, "high": 4},
        "eta_prime": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
        "gamma_0": 0.03,
    },
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "parallelism": 2,
}


def submit(client, **overrides):
    response = client.post("/v1/jobs", json={"name": "e2e", **TINY, **overrides})
    assert response.status_code == 202, response.text
    return response.json()


def load_study(server, job):
    storage = (
        server.env.get("ESGD_OPTUNA_STORAGE_URL") or f"sqlite:///{server.env['ESGD_DATA_DIR']}/optuna.db"
    )
    return storage, optuna.load_study(study_name=job["study_name"], storage=storage)


def test_a_job_runs_to_success_and_every_view_agrees(server):
    with server.client() as client:
        job = submit(client)
        job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
        assert job["state"] == "SUCCEEDED", job
        trials = client.get(f"/v1/jobs/{job['id']}/trials", params={"page_size": 100}).json()["items"]
        best_model = client.get(f"/v1/jobs/{job['id']}/best-model")

    storage, study = load_study(server, job)
    finished = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    assert len(study.trials) == 4 and all(t.state in finished for t in study.trials)
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [1, 2, 3]  # one per epoch
    assert job["progress"]["trials_finished"] == 4
    assert job["progress"]["gradient_evaluations"] == sum(
        t.user_attrs["gradient_evaluations"] for t in study.trials
    )
    best = job["best_trial"]
    assert best["number"] == study.best_trial.number and best["values"] == [study.best_value]
    assert best["params"] == study.best_trial.params
    assert [t["number"] for t in trials] == [t.number for t in study.trials]
    assert best_model.status_code == 200 and len(best_model.content) > 1000

    # The optuna CLI reads the same storage.
    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "optuna"),
            "best-trial",
            "--study-name",
            job["study_name"],
            "--storage",
            storage,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f'"number": {study.best_trial.number}' in cli.stdout


def test_cancel_stops_running_trials_within_seconds_and_frees_ray(embedded_server):
    server = embedded_server
    with server.client() as client:
        job = submit(client, budget={"trials": 8, "epochs_per_trial": 200, "batch_size": 32})
        wait_for(client, job["id"], {"RUNNING"})
        wait_for_progress(client, job["id"], "trials_running", at_least=2)
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        job = wait_for(client, job["id"], {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout_s=60)
        took = time.monotonic() - asked
        assert job["state"] == "CANCELLED"
        assert took < 20, f"cancellation took {took:.1f} s"
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    _, study = load_study(server, job)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    _assert_ray_resources_free(server.env["RAY_ADDRESS"])


def _assert_ray_resources_free(address, timeout_s=30):
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout_s
    while True:
        running = list_tasks(
            address=address, filters=[("state", "=", "RUNNING"), ("name", "=", "trial_task")]
        )
        if not running:
            return
        assert time.monotonic() < deadline, f"trial tasks still running: {running}"
        time.sleep(1)


def test_a_killed_trial_worker_fails_that_trial_which_is_retried(embedded_server):
    server = embedded_server
    from ray.util.state import list_tasks

    with server.client() as client:
        job = submit(client, budget={"trials": 3, "epochs_per_trial": 40, "batch_size": 32}, parallelism=1)
        deadline = time.monotonic() + 120
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no trial task started"
            tasks = list_tasks(
                address=server.env["RAY_ADDRESS"],
                filters=[("state", "=", "RUNNING"), ("name", "=", "trial_task")],
                detail=True,
            )
            victim = next((t for t in tasks if t.worker_pid), None)
            time.sleep(0.3)
        os.kill(victim.worker_pid, signal.SIGKILL)  # the worker process dies for real
        job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert job["state"] == "SUCCEEDED", job
    _, study = load_study(server, job)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["will_retry"]
    assert "Worker" in failed[0].user_attrs["reason"] or "died" in failed[0].user_attrs["reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == TrialState.COMPLETE


def test_restarting_the_api_mid_job_loses_and_duplicates_nothing(server):
    with server.client() as client:
        job = submit(client, budget={"trials": 4, "epochs_per_trial": 15, "batch_size": 32})
        wait_for(client, job["id"], {"RUNNING"})
        time.sleep(3)
    server.kill()
    time.sleep(2)  # the search goes on without the API
    server.start()
    with server.client() as client:
        job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert job["state"] == "SUCCEEDED", job
    _, study = load_study(server, job)
    assert len(study.trials) == 4  # no trial lost, none run twice
    assert len({t.number for t in study.trials}) == 4
    assert all(t.state != TrialState.RUNNING for t in study.trials)


def test_parallelism_beyond_the_cluster_is_refused(embedded_server):
    server = embedded_server
    with server.client() as client:
        response = client.post("/v1/jobs", json={"name": "too-wide", **TINY, "parallelism": 64})
        assert response.status_code == 422
        assert any("parallelism" in str(e["loc"]) for e in response.json()["errors"])
        response = client.post("/v1/jobs", json={"name": "too-big", **TINY, "resources": {"cpus": 64}})
        assert response.status_code == 422
        assert client.get("/v1/jobs").json()["items"] == []


def test_a_killed_driver_is_restarted_and_resumes_the_study(embedded_server):
    server = embedded_server
    with server.client() as client:
        job = submit(client, budget={"trials": 4, "epochs_per_trial": 30, "batch_size": 32})
        wait_for_progress(client, job["id"], "trials_running")
        found = subprocess.run(
            ["pgrep", "-f", f"workers.driver.*{job['study_name']}"], capture_output=True, text=True
        )
        pids = [int(pid) for pid in found.stdout.split()]
        assert pids, "the driver process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # the driver dies for real, its trials with it
        job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert job["state"] == "SUCCEEDED", job
    _, study = load_study(server, job)
    orphans = [t for t in study.trials if t.user_attrs.get("reason") == "its job driver stopped while it ran"]
    assert orphans and all(t.state == TrialState.FAIL for t in orphans)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert sum(not t.user_attrs.get("will_retry") for t in study.trials) == 4  # the budget, each trial once


def test_pruning_prunes_with_a_pruner_and_not_without(embedded_server):
    hopeless = {**TINY["search_space"], "lr": {"type": "categorical", "choices": [1.0, 1e-7]}}
    common = {
        "search_space": hopeless,
        "sampler": {"name": "random", "seed": 3},
        "budget": {"trials": 8, "epochs_per_trial": 4, "batch_size": 64},
        "parallelism": 1,
    }
    states = {}
    with embedded_server.client() as client:
        for pruner in ("median", "none"):
            spec = {**common, "pruner": {"name": pruner, "n_startup_trials": 1, "n_warmup_steps": 0}}
            job = submit(client, **spec)
            job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
            assert job["state"] == "SUCCEEDED", job
            states[pruner] = [t.state for t in load_study(embedded_server, job)[1].trials]
            assert job["progress"]["trials_pruned"] == states[pruner].count(TrialState.PRUNED)
    assert TrialState.PRUNED in states["median"]
    assert TrialState.PRUNED not in states["none"]


def test_baselines_are_searched_with_the_same_budget_and_summarised(embedded_server):
    with embedded_server.client() as client:
        job = submit(client, baselines=["sgd", "adam"], pruner={"name": "none"})
        job = wait_for(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert job["state"] == "SUCCEEDED", job
    storage, study = load_study(embedded_server, job)
    assert job["progress"]["gradient_evaluations"] == sum(
        t.user_attrs["gradient_evaluations"] for t in study.trials
    )
    for baseline in job["progress"]["baselines"]:
        searched = optuna.load_study(study_name=baseline["study_name"], storage=storage)
        assert baseline["study_name"] == f"{job['study_name']}.{baseline['optimizer']}"
        assert searched.user_attrs["spec"]["optimizer"] == baseline["optimizer"]
        assert [t.state for t in searched.trials] == [TrialState.COMPLETE] * 4
        assert set(searched.best_params) == {"lr"}
        assert baseline["best_trial"]["values"] == [searched.best_value]
        spent = sum(t.user_attrs["gradient_evaluations"] for t in searched.trials)
        assert baseline["progress"]["gradient_evaluations"] == spent
        assert baseline["progress"]["trials_finished"] == 4
    assert [b["optimizer"] for b in job["progress"]["baselines"]] == ["sgd", "adam"]
