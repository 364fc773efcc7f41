"""The compose deployment as a real compose implementation reads it.

Debian's ``docker-compose`` (1.29) parses and interpolates the files with ``config``; no container engine is
needed. Without it these tests fail with how to install it (``.ci/run`` does).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "RAY_AUTH_TOKEN": "fedcba9876543210fedcba9876543210",
    "GRAFANA_ADMIN_PASSWORD": "00aa11bb",
}


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
