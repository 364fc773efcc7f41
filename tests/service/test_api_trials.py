"""``/v1/jobs/{id}/trials``: trials written through Optuna's own ask/tell API, read back through ours."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState


def strict_json(text: str):
    """Parse as standard JSON: NaN and Infinity are not JSON, so they must never appear in our output."""

    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token} in the output")

    return json.loads(text, parse_constant=refuse)


def write_trials(storage, study_name: str) -> None:
    """The kinds of trial a search driver leaves: complete, pruned, failed, running (learning curves too)."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    for value in (0.61, 0.83):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)})
        for step, accuracy in enumerate([0.3, 0.5, value]):
            trial.report(accuracy, step)
        trial.set_user_attr("gradient_evaluations", 3000)
        trial.set_user_attr("test_accuracy", value - 0.01)
        study.tell(trial, value)
    pruned = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)})
    pruned.report(0.2, 0)
    pruned.report(float("nan"), 1)  # a diverged epoch: shown as null
    pruned.set_user_attr("reason", "pruned at epoch 1 by the median pruner")
    pruned.set_user_attr("gradient_evaluations", 1000)
    pruned.set_user_attr("loss_trace", [1.0, float("inf")])
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask()
    failed.set_user_attr("reason", "worker died: node lost")
    study.tell(failed, state=TrialState.FAIL)
    study.ask()  # still running


@pytest.fixture
def job(client, storage):
    created = client.post("/v1/jobs", json={"name": "with-trials"}).json()
    write_trials(storage, created["study_name"])
    return created


def test_trials_show_states_reasons_curves_and_attrs(client, job):
    response = client.get(f"/v1/jobs/{job['id']}/trials", params={"page_size": 100})
    assert response.status_code == 200
    page = strict_json(response.text)
    trials = page["items"]
    assert page["next_page_token"] == ""
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "RUNNING"]

    best = trials[1]
    assert best["values"] == [0.83] and 0.01 <= best["params"]["lr"] <= 1.0
    assert best["intermediate_values"] == [
        {"step": 0, "value": 0.3},
        {"step": 1, "value": 0.5},
        {"step": 2, "value": 0.83},
    ]
    assert best["gradient_evaluations"] == 3000 and best["test_accuracy"] == pytest.approx(0.82)
    assert best["reason"] is None
    assert best["started_at"] and best["finished_at"]
    assert best["finished_at"].endswith("Z") or best["finished_at"].endswith("+00:00")

    pruned, failed, running = trials[2], trials[3], trials[4]
    assert pruned["reason"] == "pruned at epoch 1 by the median pruner"
    assert pruned["intermediate_values"] == [{"step": 0, "value": 0.2}, {"step": 1, "value": None}]
    assert pruned["user_attrs"]["loss_trace"] == [1.0, None]
    assert pruned["values"] is None
    assert failed["reason"] == "worker died: node lost" and failed["values"] is None
    assert running["finished_at"] is None and running["reason"] is None


def test_trials_paginate_by_number(client, job):
    numbers, token = [], ""
    while True:
        params = {"page_size": 2} | ({"page_token": token} if token else {})
        page = client.get(f"/v1/jobs/{job['id']}/trials", params=params).json()
        numbers += [t["number"] for t in page["items"]]
        token = page["next_page_token"]
        if not token:
            break
    assert numbers == [0, 1, 2, 3, 4]


def test_one_trial_with_its_learning_curve(client, job):
    trial = strict_json(client.get(f"/v1/jobs/{job['id']}/trials/0").text)
    assert trial["number"] == 0 and trial["state"] == "COMPLETE"
    assert [p["step"] for p in trial["intermediate_values"]] == [0, 1, 2]
    missing = client.get(f"/v1/jobs/{job['id']}/trials/99")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(
        "application/problem+json"
    )
    assert client.get(f"/v1/jobs/{job['id']}/trials/-1").status_code == 422
    assert client.get(f"/v1/jobs/{job['id']}/trials/{10**30}").status_code == 422  # never a database error


def test_a_trial_page_token_only_works_for_its_job(client, job):
    other = client.post("/v1/jobs", json={"name": "other"}).json()
    token = client.get(f"/v1/jobs/{job['id']}/trials", params={"page_size": 1}).json()["next_page_token"]
    response = client.get(f"/v1/jobs/{other['id']}/trials", params={"page_token": token})
    assert response.status_code == 400
    assert response.json()["errors"][0]["loc"] == ["query", "page_token"]
    assert client.get(f"/v1/jobs/{job['id']}/trials", params={"page_token": "%%"}).status_code == 400


def test_a_job_without_trials_has_an_empty_page(client):
    created = client.post("/v1/jobs", json={"name": "empty"}).json()
    assert client.get(f"/v1/jobs/{created['id']}/trials").json() == {"items": [], "next_page_token": ""}


def test_output_json_stays_valid_for_non_finite_values(client, job):
    for path in (f"/v1/jobs/{job['id']}/trials", f"/v1/jobs/{job['id']}/trials/2", f"/v1/jobs/{job['id']}"):
        body = strict_json(client.get(path).text)
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(body))


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value
