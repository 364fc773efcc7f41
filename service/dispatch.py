"""The service's only Ray client: submits, stops and watches job drivers through Ray's Jobs API.

Each job's search runs in a driver process that Ray starts (``python -m workers.driver``), outside the API
process, so restarting the API stops no search. Ray's token authentication (on by default for a local
``ray start --head`` since Ray 2.52) needs ``RAY_AUTH_MODE=token`` in the client's environment; it is set here
when a token is present and the operator has not chosen otherwise.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def enable_token_auth_if_present() -> None:
    """Ray reads RAY_AUTH_MODE when it is imported, so this runs before the import below."""
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


enable_token_auth_if_present()

from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

TERMINAL = {JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.STOPPED.value}


@dataclass(frozen=True)
class DriverSettings:
    """What a driver needs to find its study, write its artifacts and cache datasets."""

    python: str
    optuna_storage_url: str
    artifacts_dir: Path
    data_cache_dir: Path


class RayDispatcher:
    def __init__(self, address: str, driver: DriverSettings) -> None:
        self.address = address
        self.driver = driver
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()
        self._resources: tuple[float, dict[str, float]] | None = None

    @property
    def client(self) -> JobSubmissionClient:
        with self._lock:  # connecting checks the cluster over HTTP; do it once, lazily
            if self._client is None:
                self._client = JobSubmissionClient(self.address)
            return self._client

    def submit(self, job_id: str, study_name: str, attempt: int) -> str:
        """Start the job's driver; returns Ray's submission id (unique per attempt)."""
        entrypoint = shlex.join(
            [
                self.driver.python,
                "-m",
                "workers.driver",
                "--storage",
                self.driver.optuna_storage_url,
                "--study",
                study_name,
                "--artifacts-dir",
                str(self.driver.artifacts_dir / job_id),
            ]
        )
        return self.client.submit_job(
            entrypoint=entrypoint,
            submission_id=f"esgd-{job_id}-{attempt}",
            runtime_env={"env_vars": {"ESGD_DATA_DIR": str(self.driver.data_cache_dir)}},
            metadata={"esgd_job_id": job_id},
        )

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the driver (SIGTERM, then SIGKILL): it cancels its trials and records CANCELLED."""
        self.client.stop_job(submission_id)

    def status(self, submission_id: str) -> str | None:
        """The driver's Ray job status, or None when Ray does not know it (e.g. the cluster was restarted)."""
        try:
            return self.client.get_job_status(submission_id).value
        except RuntimeError as error:
            if "does not exist" in str(error):
                return None
            raise

    def logs_tail(self, submission_id: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.client.get_job_logs(submission_id).splitlines()[-lines:])
        except RuntimeError:
            return ""

    def cluster_resources(self, max_age_s: float = 30.0) -> dict[str, float]:
        """Total CPUs and GPUs of the alive nodes, cached: used to refuse jobs the cluster can never run."""
        from ray.util.state import list_nodes

        if self._resources is None or time.monotonic() - self._resources[0] > max_age_s:
            totals = {"CPU": 0.0, "GPU": 0.0, "max_node_CPU": 0.0, "max_node_GPU": 0.0}
            for node in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")]):
                resources = node.resources_total or {}
                for kind in ("CPU", "GPU"):
                    totals[kind] += resources.get(kind, 0.0)
                    totals[f"max_node_{kind}"] = max(totals[f"max_node_{kind}"], resources.get(kind, 0.0))
            self._resources = (time.monotonic(), totals)
        return self._resources[1]

    def ping(self) -> bool:
        try:
            self.client.list_jobs()
        except Exception:
            with self._lock:
                self._client = None  # reconnect next time
            return False
        return True
