"""Faults caused for real, with nothing lost: the database restarted under a running job, the API killed in
the middle of submissions, a trial's worker killed on every attempt, and many writers on embedded SQLite."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from tests.conftest import fresh_databases
from tests.e2e.conftest import Server, wait_for, wait_for_progress
from tests.e2e.private_postgres import PrivatePostgres
from tests.e2e.test_service import TINY, load_study, submit

FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
BURST = {"name": "burst", **TINY, "budget": {"trials": 1, "epochs_per_trial": 1, "batch_size": 64}}
"""A job small enough to submit many of."""


def cancel_everything(client: httpx.Client) -> None:
    """Leave the shared Ray idle for the next test: cancel every unfinished job and wait for the ends."""
    unfinished, token = [], ""
    while True:
        page = client.get("/v1/jobs", params={"page_size": 100, "page_token": token}).json()
        unfinished += [job["id"] for job in page["items"] if job["state"] not in FINISHED]
        token = page["next_page_token"]
        if not token:
            break
    for job_id in unfinished:
        client.post(f"/v1/jobs/{job_id}/cancel")  # a 409 for the finished ones
    for job_id in unfinished:
        wait_for(client, job_id, FINISHED, timeout_s=120)


# ----------------------------------------------------------------------------- the database restarted
@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().init()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_postgresql_restarted_mid_job_answers_503_reconnects_and_the_job_finishes(
    private_postgres, ray_address, tmp_path
):
    with fresh_databases(private_postgres.url(), "service", "optuna") as urls:
        env = {
            **os.environ,
            "RAY_ADDRESS": ray_address,
            "ESGD_DATA_DIR": str(tmp_path / "data"),
            "ESGD_DATABASE_URL": urls["service"],
            "ESGD_OPTUNA_STORAGE_URL": urls["optuna"],
            "ESGD_RECONCILE_INTERVAL_S": "0.5",
            "ESGD_REQUIRE_API_KEYS": "false",
        }
        server = Server(env, tmp_path / "api.log")
        server.start()
        try:
            with server.client() as client:
                job = submit(client, budget={"trials": 6, "epochs_per_trial": 6, "batch_size": 32})
                wait_for_progress(client, job["id"], "trials_finished")

                private_postgres.stop()  # every connection drops, as in a crash
                answers: dict[str, set[int]] = {}
                for _ in range(5):
                    for path in (f"/v1/jobs/{job['id']}", "/v1/jobs", f"/v1/jobs/{job['id']}/trials"):
                        answers.setdefault(path, set()).add(client.get(path).status_code)
                    time.sleep(0.5)
                ready, alive = client.get("/readyz"), client.get("/healthz")
                private_postgres.start()

                assert all(codes == {503} for codes in answers.values()), answers
                assert ready.status_code == 503 and alive.status_code == 200
                job = wait_for(client, job["id"], FINISHED, timeout_s=300)
        finally:
            server.stop()
        assert job["state"] == "SUCCEEDED", job
        study = optuna.load_study(study_name=job["study_name"], storage=urls["optuna"])
        assert not [t for t in study.trials if t.state == TrialState.RUNNING]
        assert sum(not t.user_attrs.get("will_retry") for t in study.trials) == 6  # the budget, each once
        progress = job["progress"]
        assert progress["trials_finished"] == 6 and progress["trials_retried"] == len(study.trials) - 6


# ----------------------------------------------------------------------------- the API killed
def orphans(server: Server) -> tuple[set[str], set[str]]:
    """(studies whose job is not stored, jobs whose study does not exist), read from both databases."""
    service_url = server.env.get("ESGD_DATABASE_URL") or f"sqlite:///{server.env['ESGD_DATA_DIR']}/service.db"
    engine = create_engine(service_url)
    with engine.connect() as connection:
        jobs = dict(connection.execute(text("SELECT id, study_name FROM jobs")).all())
    engine.dispose()
    storage, _ = load_study_storage(server)
    studies = {s.study_name: s.study_name.split("/")[0] for s in storage.get_all_studies()}  # job-…/name
    storage.engine.dispose()
    studies_without_job = {name for name, job_id in studies.items() if job_id not in jobs}
    jobs_without_study = {job_id for job_id, name in jobs.items() if name not in studies}
    return studies_without_job, jobs_without_study


def load_study_storage(server: Server) -> tuple[optuna.storages.RDBStorage, str]:
    url = server.env.get("ESGD_OPTUNA_STORAGE_URL") or f"sqlite:///{server.env['ESGD_DATA_DIR']}/optuna.db"
    return optuna.storages.RDBStorage(url), url


def submit_until_killed(server: Server, accepted: dict[str, str], submitters: int = 4) -> int:
    """Several clients submit jobs until the API is SIGKILLed under them; returns the requests cut off."""
    cut_off = 0
    lock = threading.Lock()

    def submitter() -> None:
        nonlocal cut_off
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while True:
                key = uuid.uuid4().hex
                try:
                    response = client.post("/v1/jobs", json=BURST, headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    with lock:
                        cut_off += 1
                    return
                assert response.status_code == 202, response.text
                with lock:
                    accepted[key] = response.json()["id"]

    threads = [threading.Thread(target=submitter) for _ in range(submitters)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    server.kill()
    for thread in threads:
        thread.join(30)
    return cut_off


def test_an_api_killed_during_submissions_leaves_each_job_with_its_study_or_not_at_all(server):
    server.env["ESGD_ORPHAN_STUDY_GRACE_S"] = "1"
    server.env["ESGD_MAX_RUNNING_JOBS"] = "1"
    accepted: dict[str, str] = {}
    half_made = set()
    for _ in range(5):  # until a kill lands between a study's creation and its job's (it usually does)
        cut_off = submit_until_killed(server, accepted)
        assert cut_off > 0, "no submission was in flight when the API died"
        studies_without_job, jobs_without_study = orphans(server)
        assert jobs_without_study == set()  # never a job without its study
        half_made |= studies_without_job
        server.start()
        if half_made:
            break
    assert half_made, "no kill landed inside a submission in 5 tries"
    with server.client() as client:
        deadline = time.monotonic() + 30
        while orphans(server) != (set(), set()):  # the restarted API deletes what the dead one left
            assert time.monotonic() < deadline, orphans(server)
            time.sleep(0.5)
        for key, job_id in accepted.items():  # every accepted job is there, and a retry finds it
            again = client.post("/v1/jobs", json=BURST, headers={"Idempotency-Key": key})
            assert again.status_code == 202 and again.json()["id"] == job_id
        cancel_everything(client)


# ----------------------------------------------------------------------------- a worker killed every time
def test_a_trial_whose_worker_dies_on_every_attempt_fails_after_its_retries_and_the_job_goes_on(
    embedded_server,
):
    from ray.util.state import list_tasks

    server = embedded_server
    budget = {"trials": 2, "epochs_per_trial": 40, "batch_size": 32, "max_retries_per_trial": 1}
    killed: set[int] = set()
    with server.client() as client:
        job = submit(client, budget=budget, parallelism=1, pruner={"name": "none"})
        deadline = time.monotonic() + 180
        while len(killed) < 2:  # the first attempt and its one retry
            assert time.monotonic() < deadline, f"only {len(killed)} workers killed"
            tasks = list_tasks(
                address=server.env["RAY_ADDRESS"],
                filters=[("state", "=", "RUNNING"), ("name", "=", "trial_task")],
                detail=True,
            )
            for task in tasks:
                if task.worker_pid and task.worker_pid not in killed:
                    os.kill(task.worker_pid, signal.SIGKILL)
                    killed.add(task.worker_pid)
            time.sleep(0.3)
        job = wait_for(client, job["id"], FINISHED, timeout_s=240)
    assert job["state"] == "SUCCEEDED", job
    _, study = load_study(server, job)
    first, retry, *rest = study.trials
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.FAIL)
    assert retry.user_attrs["retry_of"] == first.number and retry.params == first.params
    assert first.user_attrs.get("will_retry") and not retry.user_attrs.get("will_retry")  # retries bounded
    for trial in (first, retry):
        assert "died" in trial.user_attrs["reason"] or "Worker" in trial.user_attrs["reason"]
    assert [t.state for t in rest] == [TrialState.COMPLETE]  # the job went on with its next trial
    progress = job["progress"]
    assert (progress["trials_failed"], progress["trials_retried"], progress["trials_complete"]) == (1, 1, 1)
    assert progress["trials_finished"] == progress["trials_planned"] == 2


# ----------------------------------------------------------------------------- many writers on SQLite
def test_embedded_sqlite_with_jobs_running_at_once_never_shows_a_lock_to_anyone(embedded_server):
    server = embedded_server
    server.stop()
    server.env["ESGD_MAX_RUNNING_JOBS"] = "4"  # four drivers and the API write at once
    server.start()
    small = {"budget": {"trials": 4, "epochs_per_trial": 3, "batch_size": 64}, "resources": {"cpus": 0.5}}
    statuses: list[tuple[str, int, str]] = []
    done = threading.Event()

    def reader_writer(client: httpx.Client) -> None:
        while not done.is_set():
            for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{jobs[0]}/trials")):
                response = client.request(method, path)
                statuses.append((path, response.status_code, response.text[:200]))
            response = client.post("/v1/jobs", json={"name": "extra", **TINY, "budget": {"trials": 1}})
            statuses.append(("POST /v1/jobs", response.status_code, response.text[:200]))
            if response.status_code == 202:  # submitted and cancelled at once: more writes
                cancelled = client.post(f"/v1/jobs/{response.json()['id']}/cancel")
                statuses.append(("cancel", cancelled.status_code, cancelled.text[:200]))
            done.wait(0.2)  # a steady stream of writes beside the drivers', not a flood that starves them

    with server.client() as client:
        jobs = [submit(client, **small)["id"] for _ in range(4)]
        threads = [threading.Thread(target=reader_writer, args=(server.client(),)) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            ended = [wait_for(client, job_id, FINISHED, timeout_s=300) for job_id in jobs]
        finally:
            done.set()
            for thread in threads:
                thread.join(30)
        cancel_everything(client)
    assert statuses and all(code < 500 for _, code, _ in statuses), [s for s in statuses if s[1] >= 500][:3]
    assert not [s for s in statuses if "locked" in s[2]]
    assert [job["state"] for job in ended] == ["SUCCEEDED"] * 4, [j["failure_reason"] for j in ended]
    storage, _ = load_study_storage(server)
    for job in ended:
        for trial in optuna.load_study(study_name=job["study_name"], storage=storage).trials:
            assert "locked" not in str(trial.user_attrs.get("reason", ""))
    assert "database is locked" not in Path(server.log).read_text()
