"""``/v1/jobs`` on the real app and real databases: submit, idempotency, concurrency, listing, cancelling."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
from optuna.study import StudyDirection

from service import jobs
from service.schemas import JobState


def spec(name: str = "search", **overrides):
    return {"name": name, "budget": {"trials": 4, "epochs_per_trial": 2}, **overrides}


def assert_problem(response, status: int):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["status"] == status
    return body


# ----------------------------------------------------------------------------- submit
def test_submit_returns_202_location_and_the_job_with_its_study(client, storage):
    response = client.post("/v1/jobs", json=spec("first", objectives=[{"metric": "val_loss"}]))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job-") and len(job["id"]) == 16
    assert job["state"] == "QUEUED" and job["name"] == "first"
    assert job["progress"]["trials_planned"] == 4 and job["progress"]["trials_finished"] == 0
    assert job["best_trial"] is None and job["started_at"] is None and job["finished_at"] is None
    assert job["created_at"].endswith("Z") or job["created_at"].endswith("+00:00")
    assert job["spec"]["objectives"] == [{"metric": "val_loss", "direction": "minimize"}]

    study = optuna.load_study(study_name=job["study_name"], storage=storage)
    assert study.directions == [StudyDirection.MINIMIZE]
    assert study.user_attrs["job_id"] == job["id"]
    assert study.user_attrs["spec"] == job["spec"]

    assert client.get(job["id"] and f"/v1/jobs/{job['id']}").json() == job


def test_several_objectives_give_the_study_their_directions(client, storage):
    objectives = [{"metric": "val_accuracy"}, {"metric": "wall_time"}]
    body = spec(objectives=objectives, sampler={"name": "nsga2"}, pruner={"name": "none"})
    job = client.post("/v1/jobs", json=body).json()
    study = optuna.load_study(study_name=job["study_name"], storage=storage)
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]


def test_unknown_job_is_a_404_problem(client):
    body = assert_problem(client.get("/v1/jobs/job-000000000000"), 404)
    assert "job-000000000000" in body["detail"]
    assert body["instance"] == "/v1/jobs/job-000000000000"
    assert_problem(client.post("/v1/jobs/nope/cancel"), 404)
    assert_problem(client.get("/v1/jobs/nope/trials"), 404)


# ----------------------------------------------------------------------------- idempotency
def test_same_idempotency_key_and_body_returns_the_same_job(client, counts):
    first = client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "k-1"})
    # The same spec written differently (key order, defaults spelt out) is the same request.
    again_body = {"budget": {"epochs_per_trial": 2, "trials": 4}, "name": "search", "dataset": "mnist1d"}
    again = client.post("/v1/jobs", json=again_body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert counts() == (1, 1)


def test_same_idempotency_key_with_another_body_is_rejected_naming_the_header(client, counts):
    first = client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": "k-2"})
    assert first.status_code == 202
    body = assert_problem(
        client.post("/v1/jobs", json=spec("other"), headers={"Idempotency-Key": "k-2"}), 422
    )
    assert body["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert first.json()["id"] in body["detail"]
    assert counts() == (1, 1)


def test_an_empty_idempotency_key_is_invalid(client, counts):
    body = assert_problem(client.post("/v1/jobs", json=spec(), headers={"Idempotency-Key": ""}), 422)
    assert body["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert counts() == (0, 0)


def test_concurrent_submissions_with_one_key_make_exactly_one_job_and_one_study(client, counts):
    def submit(_):
        return client.post("/v1/jobs", json=spec("raced"), headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(submit, range(20)))
    assert [r.status_code for r in responses] == [202] * 20, [
        r.text for r in responses if r.status_code != 202
    ]
    assert len({r.json()["id"] for r in responses}) == 1
    assert counts() == (1, 1)


def test_fifty_concurrent_submissions_make_fifty_jobs_each_with_one_study(client, storage, counts):
    def submit(i):
        return client.post("/v1/jobs", json=spec(f"parallel-{i}"))

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(submit, range(50)))
    assert not [r for r in responses if r.status_code >= 500]
    assert [r.status_code for r in responses] == [202] * 50
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 50
    assert counts() == (50, 50)
    study_jobs = [s.user_attrs["job_id"] for s in storage.get_all_studies()]
    assert sorted(study_jobs) == sorted(ids)  # each job exactly one study, each study one job


# ----------------------------------------------------------------------------- listing
def test_list_paginates_newest_first_without_duplicates_or_omissions(client):
    created = [client.post("/v1/jobs", json=spec(f"job-{i}")).json()["id"] for i in range(7)]
    seen, token, pages = [], "", 0
    while True:
        params = {"page_size": 3} | ({"page_token": token} if token else {})
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        pages += 1
        token = page["next_page_token"]
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(created))


def test_list_default_page_and_exact_fit_has_no_empty_last_page(client):
    for i in range(4):
        client.post("/v1/jobs", json=spec(f"j{i}"))
    page = client.get("/v1/jobs", params={"page_size": 4}).json()
    assert len(page["items"]) == 4 and page["next_page_token"] == ""
    assert len(client.get("/v1/jobs").json()["items"]) == 4


def test_list_filters_by_state_and_pages_within_the_filter(client):
    ids = [client.post("/v1/jobs", json=spec(f"j{i}")).json()["id"] for i in range(5)]
    for job_id in ids[:3]:
        client.post(f"/v1/jobs/{job_id}/cancel")
    first = client.get("/v1/jobs", params={"state": "CANCELLED", "page_size": 2}).json()
    second = client.get(
        "/v1/jobs", params={"state": "CANCELLED", "page_size": 2, "page_token": first["next_page_token"]}
    ).json()
    cancelled = [j["id"] for j in first["items"] + second["items"]]
    assert cancelled == list(reversed(ids[:3])) and second["next_page_token"] == ""
    queued = client.get("/v1/jobs", params={"state": "QUEUED"}).json()["items"]
    assert [j["id"] for j in queued] == list(reversed(ids[3:]))
    assert all(j["state"] == "QUEUED" for j in queued)


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "bm90IGpzb24",  # "not json"
        base64.urlsafe_b64encode(b'{"after": "x"}').decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        "A" * 600,
    ],
)
def test_a_bad_page_token_is_a_400_problem_naming_it(client, token):
    body = assert_problem(client.get("/v1/jobs", params={"page_token": token}), 400)
    assert body["errors"][0]["loc"] == ["query", "page_token"]


def test_a_page_token_issued_for_another_filter_is_rejected(client):
    for i in range(3):
        client.post("/v1/jobs", json=spec(f"j{i}"))
    token = client.get("/v1/jobs", params={"page_size": 1}).json()["next_page_token"]
    assert token
    assert_problem(client.get("/v1/jobs", params={"page_token": token, "state": "QUEUED"}), 400)


@pytest.mark.parametrize("params", [{"page_size": 0}, {"page_size": 101}, {"state": "DONE"}])
def test_list_parameters_are_validated(client, params):
    body = assert_problem(client.get("/v1/jobs", params=params), 422)
    assert body["errors"][0]["loc"] == ["query", next(iter(params))]


# ----------------------------------------------------------------------------- cancelling
def test_cancel_a_queued_job_cancels_it_and_a_second_cancel_is_409(client):
    job = client.post("/v1/jobs", json=spec()).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    cancelled = response.json()
    assert cancelled["state"] == "CANCELLED" and cancelled["finished_at"] is not None
    body = assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert "CANCELLED" in body["detail"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "CANCELLED"


def test_cancel_a_running_job_asks_its_driver_to_stop_and_is_idempotent(client, session):
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    jobs.transition(session, jobs.get_job(session, job_id), JobState.RUNNING)
    first = client.post(f"/v1/jobs/{job_id}/cancel")
    second = client.post(f"/v1/jobs/{job_id}/cancel")
    assert first.status_code == second.status_code == 202
    assert first.json()["state"] == second.json()["state"] == "CANCELLING"
    assert first.json()["started_at"] is not None and first.json()["finished_at"] is None


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED])
def test_cancel_a_finished_job_is_409(client, session, final):
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    job = jobs.get_job(session, job_id)
    jobs.transition(session, job, JobState.RUNNING)
    jobs.transition(session, job, final, "done" if final == JobState.FAILED else None)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel"), 409)
    shown = client.get(f"/v1/jobs/{job_id}").json()
    assert shown["state"] == final.value
    assert shown["failure_reason"] == ("done" if final == JobState.FAILED else None)


def test_job_json_round_trips_through_the_page_token_format(client):
    for i in range(2):
        client.post("/v1/jobs", json=spec(f"j{i}"))
    token = client.get("/v1/jobs", params={"page_size": 1}).json()["next_page_token"]
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert set(payload) == {"after", "filter"}  # opaque to clients, but plain to debug
