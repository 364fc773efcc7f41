"""A private local Ray cluster for the embedded mode: ``ray start --head --block`` as a child process.

Its lifetime is the object's: stopping it (SIGTERM to ``--block``) shuts down exactly the processes it
started, not other Ray clusters on the machine. Every port is chosen free, so several can coexist.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import service.dispatch  # noqa: F401  (sets Ray's authentication mode before Ray is imported)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRay:
    def __init__(self, log_path: Path, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        self.log_path = log_path
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the head and wait until its Jobs API accepts submissions; returns the Jobs API address."""
        dashboard = free_port()
        ports = {
            "--port": free_port(),
            "--dashboard-port": dashboard,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block"]
        command += ["--disable-usage-stats", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
        for flag, port in ports.items():
            command += [flag, str(port)]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            command += ["--num-gpus", str(self.num_gpus)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.address = f"http://127.0.0.1:{dashboard}"
        self._wait_for_jobs_api(timeout_s)
        return self.address

    def _wait_for_jobs_api(self, timeout_s: float) -> None:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log_path}")
            try:
                # The job agent registers a little after the dashboard answers: a no-op job proves both.
                client = JobSubmissionClient(self.address)
                client.submit_job(entrypoint="true", submission_id=f"esgd-ready-{uuid.uuid4().hex[:8]}")
                return
            except AuthenticationError:
                self.stop()
                raise
            except Exception as error:
                if time.monotonic() > deadline:
                    self.stop()
                    message = f"Ray's Jobs API did not come up in {timeout_s:.0f} s: {error}"
                    raise RuntimeError(message) from error
                time.sleep(1.0)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LocalRay:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
