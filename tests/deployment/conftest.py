"""The compose deployment as a real compose implementation reads it, and run without containers.

Debian's ``docker-compose`` (1.29) parses and interpolates the files with ``config``; no container engine is
needed. Without it these tests fail with how to install it (``.ci/run`` does). :func:`compose_stack` runs
the CPU variant's services as local processes (:mod:`tests.deployment.local_compose`) on this machine's
PostgreSQL, and :func:`finished_job` is one small job run to the end on it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import make_url

from tests.conftest import fresh_databases
from tests.deployment.local_compose import LocalCompose

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "RAY_AUTH_TOKEN": "fedcba9876543210fedcba9876543210",
    "GRAFANA_ADMIN_PASSWORD": "00aa11bb",
}


SCREENSHOTS = pytest.StashKey[list[Path]]()


@pytest.fixture(scope="session")
def screenshots(pytestconfig) -> list[Path]:
    """Where a test records the screenshots it saved: they are listed at the end of the run."""
    return pytestconfig.stash.setdefault(SCREENSHOTS, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if config.stash.get(SCREENSHOTS, []):
        terminalreporter.section("screenshots")
        for path in config.stash[SCREENSHOTS]:
            terminalreporter.write_line(str(path))


def compose(
    *files: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """``docker-compose -f FILE ... config`` in the repository root, with only ``env`` in the environment."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose (Debian's package)")
    command = [binary, "--project-directory", str(ROOT)]
    for file in files:
        command += ["-f", str(ROOT / file)]
    result = subprocess.run(
        [*command, "config"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def resolved(*files: str, **env: str) -> dict[str, Any]:
    """The configuration as compose resolves it (merged, interpolated)."""
    return yaml.safe_load(compose(*files, env={**SECRETS, **env}).stdout)


@pytest.fixture(scope="session")
def gpu_config() -> dict[str, Any]:
    return resolved("docker-compose.yml")


@pytest.fixture(scope="session")
def cpu_config() -> dict[str, Any]:
    return resolved("docker-compose.yml", "docker-compose.cpu.yml")


def compose_databases(config: dict[str, Any]) -> list[str]:
    """The databases the ``postgres`` service holds: ``POSTGRES_DB`` and those its init scripts create."""
    postgres = config["services"]["postgres"]
    names = [postgres["environment"]["POSTGRES_DB"]]
    for volume in postgres["volumes"]:
        source, target = volume.split(":")[:2]
        if target == "/docker-entrypoint-initdb.d":
            for script in sorted(Path(source).glob("*.sql")):
                names += re.findall(r"CREATE DATABASE (\w+)", script.read_text())
    return names


@pytest.fixture(scope="session")
def compose_stack(cpu_config, postgres, tmp_path_factory) -> Iterator[LocalCompose]:
    """The CPU deployment's services as local processes, up and healthy, with every Ray node joined."""
    with fresh_databases(postgres.admin_url, *compose_databases(cpu_config)) as urls:
        stack = LocalCompose(
            cpu_config,
            tmp_path_factory.mktemp("compose"),
            postgres.admin_url,
            {name: make_url(url).database for name, url in urls.items()},
        )
        try:
            stack.up()
            nodes = sum(stack.replicas(name) for name in stack.order() if name.startswith("ray-"))
            wait_for_ray_nodes(stack, nodes)
            yield stack
        finally:
            stack.down()


def wait_for_ray_nodes(stack: LocalCompose, count: int, timeout_s: float = 120.0) -> None:
    """Until ``count`` nodes are alive: a worker is healthy before the head has registered it."""
    script = (
        "import os; from ray.util.state import list_nodes; "
        "print(len(list_nodes(address=os.environ['RAY_ADDRESS'], filters=[('state', '=', 'ALIVE')])))"
    )
    deadline = time.monotonic() + timeout_s
    alive = ""
    while time.monotonic() < deadline:
        alive = stack.run("api", ["python", "-c", script]).stdout.strip()
        if alive == str(count):
            return
        time.sleep(1)
    raise AssertionError(f"{alive or 'no'} Ray nodes alive of {count}:\n{stack.describe()}")


SMALL_JOB = {
    "name": "compose-e2e",
    "dataset": "synthetic",
    "model": {"name": "mlp"},
    "optimizer": "entropy_sgd",
    "budget": {"trials": 4, "epochs_per_trial": 3, "batch_size": 64},
    "search_space": {
        "lr": {"type": "float", "low": 0.3, "high": 2.0, "log": True},
        "langevin_steps": {"type": "int", "low": 1, "high": 4},
    },
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "parallelism": 2,
}


@pytest.fixture(scope="session")
def admin_key(compose_stack) -> str:
    """An admin key's secret: on PostgreSQL keys are required, so the operator creates one first, with
    ``docker compose exec api esgd keys create --admin NAME`` (here: the same command, as the api runs it)."""
    created = compose_stack.run("api", ["esgd", "keys", "create", "--admin", "operator"])
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def finished_job(compose_stack, admin_key) -> dict[str, Any]:
    """:data:`SMALL_JOB` submitted to the stack's API and followed to a terminal state."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=compose_stack.url("api", 8000), headers=headers, timeout=30) as client:
        assert client.post("/v1/jobs", json=SMALL_JOB, headers={"Authorization": ""}).status_code == 401
        response = client.post("/v1/jobs", json=SMALL_JOB)
        assert response.status_code == 202, response.text
        job = response.json()
        deadline = time.monotonic() + 300
        while job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            assert time.monotonic() < deadline, json.dumps(job, indent=1)
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
    return job
