"""A real local Ray cluster for the session and real API processes on top of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from service.local_ray import LocalRay, free_port
from tests.conftest import fresh_databases


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory) -> Iterator[str]:
    """One local Ray head (2 CPUs) shared by the session, torn down at the end."""
    ray = LocalRay(tmp_path_factory.mktemp("ray") / "ray.log", num_cpus=2)
    address = ray.start()
    try:
        yield address
    finally:
        ray.stop()


class Server:
    """``uvicorn --factory service.serving:build_app`` in its own process, as production runs it.

    ``factory="service.main:create_app"`` serves the API alone, without Ray: jobs are stored and stay QUEUED.
    """

    def __init__(self, env: dict[str, str], log: Path, factory: str = "service.serving:build_app") -> None:
        self.env = env
        self.log = log
        self.factory = factory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        command = [sys.executable, "-m", "uvicorn", "--factory", self.factory]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the API exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the API was not ready in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the API dies without any clean-up, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def _serve(request, ray_address: str, tmp_path: Path, backend: str) -> Iterator[Server]:
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_address,
        "ESGD_DATA_DIR": str(tmp_path / "data"),
        "ESGD_RECONCILE_INTERVAL_S": "0.5",
        "ESGD_MAX_RUNNING_JOBS": "2",
        "ESGD_REQUIRE_API_KEYS": "false",  # access control is tested on its own
    }
    with ExitStack() as cleanup:
        if backend == "postgresql":
            admin_url = request.getfixturevalue("postgres").admin_url  # fails loudly when PostgreSQL is down
            urls = cleanup.enter_context(fresh_databases(admin_url, "service", "optuna"))
            env["ESGD_DATABASE_URL"], env["ESGD_OPTUNA_STORAGE_URL"] = urls["service"], urls["optuna"]
        server = Server(env, tmp_path / "api.log")
        cleanup.callback(server.stop)
        server.start()
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, ray_address, tmp_path) -> Iterator[Server]:
    """A running API on the shared Ray, with its databases on each backend in turn."""
    yield from _serve(request, ray_address, tmp_path, request.param)


@pytest.fixture
def embedded_server(request, ray_address, tmp_path) -> Iterator[Server]:
    """A running API on SQLite, for behaviour that does not depend on the database."""
    yield from _serve(request, ray_address, tmp_path, "sqlite")


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")


def wait_for_progress(
    client: httpx.Client, job_id: str, field: str, at_least: int = 1, timeout_s: float = 120
) -> None:
    """Until the job's ``progress[field]`` (e.g. ``trials_running``) is at least ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/jobs/{job_id}").json()["progress"][field] < at_least:
        assert time.monotonic() < deadline, f"no progress in {field} after {timeout_s} s"
        time.sleep(0.3)
