"""The compose deployment without containers: each service's command run as a local process, wired as the
resolved compose configuration wires it (commands, environment, start order and health checks).

Containers each have a network and a file system of their own; processes on one machine share both. The
translation keeps every command, argument and variable the compose file gives and changes only what sharing
one machine forces:

* a service's name used as a host (``postgres:5432``, ``ray-head:6379``, and ``127.0.0.1:P`` inside the
  service itself) becomes ``127.0.0.1`` and a free port chosen for that service's port; the ``--*port``
  flags a service listens on get the same free ports, and ``0.0.0.0`` binds become ``127.0.0.1``;
* the ports Ray's nodes take by default (the same in every container) get free ones, so nodes coexist;
* programs come from this interpreter's environment (the image's ``/opt/venv``), ``HOME`` is a fresh folder,
  and the image's ``ESGD_DATA_DIR=/data`` is one shared folder, which also stands in for the ``artifacts``
  volume that the API and the Ray head share;
* PostgreSQL is this machine's server: the ``postgres`` service is not started, and its databases (the
  service's ``POSTGRES_DB`` and the ones its init scripts create) are fresh databases there. Services with no
  program here (Prometheus, Grafana) are not started either; their wiring is checked in ``test_compose``;
* replicas are honoured; resource limits and device reservations are not (no cgroups, no GPUs here).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from service.local_ray import free_port

RAY_NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
RAY_HEAD_PORT_FLAGS = ("--ray-client-server-port",)
DATA_DIR = "/data"
"""The image's ``ESGD_DATA_DIR`` (``service/deploy/Dockerfile``)."""


@dataclass
class Process:
    service: str
    command: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None


@dataclass
class LocalCompose:
    """Runs the services of a resolved compose configuration (``docker-compose config``) as processes."""

    config: Mapping[str, Any]
    workdir: Path
    postgres_url: str
    """This machine's PostgreSQL (host, port, user), for the ``postgres`` service."""
    databases: Mapping[str, str]
    """Each database name the compose file uses → the fresh database that stands in for it."""
    external: frozenset[str] = frozenset({"postgres"})
    absent: frozenset[str] = frozenset({"prometheus", "grafana"})
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.services: dict[str, Any] = dict(self.config["services"])
        self.data_dir = self.workdir / "data"
        self.home = self.workdir / "home"
        for folder in (self.data_dir, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        postgres = make_url(self.postgres_url)
        for name in self.external:
            self.ports[(name, 5432)] = postgres.port or 5432

    # ------------------------------------------------------------------------------------------ addresses
    def port(self, service: str, port: int) -> int:
        """The local port that stands in for ``service:port``."""
        if (service, port) not in self.ports:
            self.ports[(service, port)] = free_port()
        return self.ports[(service, port)]

    def url(self, service: str, port: int, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port(service, port)}{path}"

    def _addresses(self, service: str, text: str) -> str:
        names = "|".join(re.escape(name) for name in sorted(self.services, key=len, reverse=True))

        def local(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            target = service if host == "127.0.0.1" else host
            return f"127.0.0.1:{self.port(target, port)}"

        text = re.sub(rf"(?<![\w.-])({names}|127\.0\.0\.1):(\d+)\b", local, text)
        return text.replace("0.0.0.0", "127.0.0.1")

    def _database_url(self, url: URL) -> str:
        machine = make_url(self.postgres_url)
        return url.set(
            host=machine.host,
            port=machine.port,
            username=machine.username,
            password=machine.password,
            database=self.databases[url.database],
        ).render_as_string(hide_password=False)

    # ------------------------------------------------------------------------------------------ commands
    def _program(self, word: str) -> str:
        local = Path(sys.executable).parent / word
        return str(local) if local.exists() else word

    def command(self, service: str, words: Iterable[str]) -> list[str]:
        words = [self._addresses(service, w) for w in words]
        words = self._listen_ports(service, words)
        if words[:2] == ["ray", "start"]:
            flags = RAY_NODE_PORT_FLAGS + (RAY_HEAD_PORT_FLAGS if "--head" in words else ())
            for flag in flags:
                if not any(w == flag or w.startswith(flag + "=") for w in words):
                    words.append(f"{flag}={free_port()}")
        return [self._program(words[0]), *words[1:]]

    def _listen_ports(self, service: str, words: list[str]) -> list[str]:
        """``--x-port=P`` / ``--port P``: what the service listens on, moved to its free port."""
        result = []
        for i, word in enumerate(words):
            flag, equals, value = word.partition("=")
            if flag.startswith("--") and flag.endswith("port") and equals and value.isdigit():
                word = f"{flag}={self.port(service, int(value))}"
            elif word.isdigit() and i > 0 and words[i - 1].startswith("--") and words[i - 1].endswith("port"):
                word = str(self.port(service, int(word)))
            result.append(word)
        return result

    def environment(self, service: str) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.home),
            "ESGD_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        }
        for name, value in (self.services[service].get("environment") or {}).items():
            value = str(value)
            database = _url_or_none(value)
            if database is not None and database.host in self.external:
                env[name] = self._database_url(database)
            else:
                env[name] = self._addresses(service, value).replace(DATA_DIR, str(self.data_dir))
        return env

    # ------------------------------------------------------------------------------------------ lifecycle
    def order(self) -> list[str]:
        """The services to run, each after what it depends on."""
        ordered: list[str] = []

        def visit(name: str) -> None:
            if name in ordered or name in self.external or name in self.absent:
                return
            for dependency in self.services[name].get("depends_on") or {}:
                visit(dependency)
            ordered.append(name)

        for name in self.services:
            visit(name)
        return [name for name in ordered if self.replicas(name) > 0]

    def replicas(self, service: str) -> int:
        return int((self.services[service].get("deploy") or {}).get("replicas", 1))

    def up(self, timeout_s: float = 180.0) -> None:
        """Start every service once its dependencies meet their conditions, as ``docker compose up`` does."""
        for name in self.order():
            for dependency, rule in (self.services[name].get("depends_on") or {}).items():
                if dependency not in self.external and dependency not in self.absent:
                    self.wait(dependency, rule.get("condition", "service_started"), timeout_s)
            self.start(name)

    def start(self, service: str) -> Process:
        process = Process(
            service,
            self.command(service, self.services[service]["command"]),
            self.environment(service),
            self.workdir / f"{service}.log",
        )
        with open(process.log, "ab") as log:
            process.popen = subprocess.Popen(
                process.command,
                env=process.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops what it started
            )
        self.processes[service] = process
        return process

    def wait(self, service: str, condition: str, timeout_s: float) -> None:
        process = self.processes[service]
        assert process.popen is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = process.popen.poll()
            if condition == "service_completed_successfully":
                if code is not None:
                    assert code == 0, f"{service} exited with {code}:\n{self.log_tail(service)}"
                    return
            else:
                assert code is None, f"{service} exited with {code}:\n{self.log_tail(service)}"
                if condition == "service_started" or self.healthy(service):
                    return
            time.sleep(0.5)
        raise AssertionError(f"{service} not {condition} after {timeout_s:.0f} s:\n{self.log_tail(service)}")

    def healthy(self, service: str) -> bool:
        """The service's own compose health check, run against its local process."""
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        return self.run(service, test[1:]).returncode == 0

    def run(self, service: str, words: Iterable[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """A command as ``docker compose exec SERVICE`` would run it: the service's addresses, environment."""
        return subprocess.run(
            self.command(service, words),
            env=self.environment(service),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def log_tail(self, service: str, characters: int = 4000) -> str:
        log = self.processes[service].log
        return log.read_text(errors="replace")[-characters:] if log.exists() else ""

    def down(self, timeout_s: float = 60.0) -> None:
        """SIGTERM each service's process group, the last started first, as ``docker compose down`` does."""
        for process in reversed(list(self.processes.values())):
            popen = process.popen
            if popen is None or popen.poll() is not None:
                continue
            os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()

    def describe(self) -> str:
        """Each started service and the command line it runs (for failure messages and notes)."""
        return "\n".join(f"{p.service}: {shlex.join(p.command)}" for p in self.processes.values())


def _url_or_none(value: str) -> URL | None:
    try:
        return make_url(value)
    except ArgumentError:
        return None
