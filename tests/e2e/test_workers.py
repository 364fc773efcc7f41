"""``esgd serve --workers 2`` on the shared Ray, on each backend: two API processes serve, exactly one of them
schedules (each job's driver starts once), and /metrics answers for both."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
from sqlalchemy import create_engine, text

from service.local_ray import free_port
from tests.conftest import fresh_databases
from tests.e2e.conftest import wait_for
from tests.e2e.test_faults import FINISHED
from tests.e2e.test_service import submit

JOBS = 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_api_workers_share_the_load_and_one_of_them_schedules(request, backend, ray_address, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_address,
        "ESGD_DATA_DIR": str(tmp_path / "data"),
        "ESGD_RECONCILE_INTERVAL_S": "0.5",
        "ESGD_REQUIRE_API_KEYS": "false",
    }
    with ExitStack() as cleanup:
        if backend == "postgresql":
            admin_url = request.getfixturevalue("postgres").admin_url
            urls = cleanup.enter_context(fresh_databases(admin_url, "service", "optuna"))
            env["ESGD_DATABASE_URL"], env["ESGD_OPTUNA_STORAGE_URL"] = urls["service"], urls["optuna"]
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"]
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed by the stack)
        cleanup.callback(log.close)
        serve = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(lambda: (serve.terminate(), serve.wait(60)))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the API was not ready"
                time.sleep(0.5)
            budget = {"trials": 1, "epochs_per_trial": 1, "batch_size": 64}
            ids = [submit(client, budget=budget, parallelism=1)["id"] for _ in range(JOBS)]
            ended = [wait_for(client, job_id, FINISHED, timeout_s=240) for job_id in ids]
            metrics = client.get("/metrics").text

        database_url = env.get("ESGD_DATABASE_URL") or f"sqlite:///{tmp_path}/data/service.db"
        engine = create_engine(database_url)
        with engine.connect() as connection:
            attempts = dict(connection.execute(text("SELECT id, driver_attempts FROM jobs")).all())
        engine.dispose()

    assert [job["state"] for job in ended] == ["SUCCEEDED"] * JOBS
    assert attempts == dict.fromkeys(ids, 1)  # one scheduler: no driver started twice
    submissions = next(
        line
        for line in metrics.splitlines()
        if line.startswith('esgd_http_request_duration_seconds_count{method="POST",route="/v1/jobs"')
    )
    assert float(submissions.rsplit(" ", 1)[1]) == JOBS  # counted across both workers
