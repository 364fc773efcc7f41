"""API load: an open-loop mix of reads and job submissions against the real API, on SQLite and PostgreSQL.

What is loaded is the API tier as the compose deployment runs it (``esgd serve --workers 2`` there): its
worker processes, their SQLAlchemy pools and both databases. For each setup, "embedded" (SQLite files in a
temporary data directory) and "postgresql" (two fresh databases on the local server, dropped at the end), it
runs ``uvicorn --factory service.main:create_app --workers N`` with API keys off. That app has no scheduler:
the submitted jobs are stored with their studies and stay QUEUED. On these two cores a job driver and its
trials would take the cores the API and the load generator need; what dispatching costs is measured by
``benchmarks.service_overhead``.

After a few seeded jobs, requests are started on a fixed timetable for ``--duration`` seconds (open loop: a
request starts when its time comes, not when the previous one returns, so a slow server shows up as latency
and not as a lower offered rate), from one event loop and one pooled ``aiohttp.ClientSession``: 200 GET/s
over a job, the jobs list, a job's trials and ``/healthz``, and 20 submissions/s, each with its own
Idempotency-Key.
Latency runs from a request's scheduled start to its response. Errors are 5xx, any other unexpected status,
connection errors and timeouts. The resident memory of the API's processes is read before and after the load.

Exits non-zero if any request failed or a setup's achieved rate fell under 90 % of the offered one.

    python -m benchmarks.load [--quick] [--duration S] [--setups embedded postgresql] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from sqlalchemy import create_engine, make_url, text

from benchmarks.report import publish
from benchmarks.service_overhead import Api

SETUPS = ("embedded", "postgresql")
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORKERS = 2  # API processes, as in docker-compose.yml
APP = "service.main:create_app"
JOB, LIST, TRIALS, HEALTH, SUBMIT = (
    "GET /v1/jobs/{id}",
    "GET /v1/jobs?page_size=20",
    "GET /v1/jobs/{id}/trials",
    "GET /healthz",
    "POST /v1/jobs",
)
RATES = {JOB: 80.0, LIST: 40.0, TRIALS: 40.0, HEALTH: 40.0, SUBMIT: 20.0}
"""Requests per second offered; reads of one job weigh most, as every waiting client polls its job."""
DURATION_S = {"full": 60.0, "quick": 5.0}
SEED_JOBS = 5
WARMUP_ROUNDS = 5  # sequential requests of each kind before the load, so first-use imports are not timed
TIMEOUT_S = 10.0  # per request, waiting for a pooled connection included: bounds the run's length
POOL = 32  # connections, so requests in flight at most: the API runs sync routes on 40 threads anyway
MIN_ACHIEVED = 0.9  # of the offered rate, per setup, or the run fails
TINY_JOB = {
    "dataset": "synthetic",
    "model": {"name": "mlp"},
    "optimizer": "entropy_sgd",
    "budget": {"trials": 1, "epochs_per_trial": 1, "batch_size": 256},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "parallelism": 1,
    "resources": {"cpus": 1, "gpus": 0},
}


@dataclass
class Sample:
    kind: str
    status: int | None  # None: no response
    latency_s: float  # scheduled start → response (or failure)
    done_s: float  # when it ended, from the start of the load
    lag_s: float  # how late the client started it: the load generator's own delay
    error: str | None = None


@dataclass
class Measured:
    samples: list[Sample]
    memory_before: dict[str, float]
    memory_after: dict[str, float]
    jobs_stored: int
    client_cpu: float  # the load generator's CPU seconds per second of load


# ----------------------------------------------------------------------------- the servers
@contextmanager
def postgres_databases(admin_url: str) -> Iterator[tuple[str, str]]:
    """Two new databases on the server of ``admin_url``, the service's and Optuna's, dropped afterwards."""
    admin = make_url(admin_url)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    names = [f"esgd_load_{secrets.token_hex(4)}_{kind}" for kind in ("service", "optuna")]
    try:
        with engine.connect() as connection:
            for name in names:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        service, optuna = (admin.set(database=name).render_as_string(hide_password=False) for name in names)
        yield service, optuna
    finally:
        with engine.connect() as connection:
            for name in names:  # FORCE: a driver Ray has not finished stopping may still be connected
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process and its descendants (uvicorn's workers), now (VmRSS) and each at its
    peak so far (VmHWM), summed, in MiB."""
    totals = {"VmRSS": 0.0, "VmHWM": 0.0}
    pending = [pid]
    while pending:
        current = pending.pop()
        for line in Path(f"/proc/{current}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in totals:
                totals[key] += int(value.split()[0]) / 1024  # kB
        for task in Path(f"/proc/{current}").glob("task/*/children"):
            pending += [int(child) for child in task.read_text().split()]
    return totals


# ----------------------------------------------------------------------------- the load
def timetable(rates: dict[str, float], duration_s: float) -> list[tuple[float, str]]:
    """(start offset in s, kind), evenly spaced per kind; kinds are phase-shifted so they do not start in
    bursts at the same instants."""
    starts = []
    for index, (kind, rate) in enumerate(rates.items()):
        phase = index / len(rates)
        starts += [((i + phase) / rate, kind) for i in range(round(rate * duration_s))]
    return sorted(starts)


class Load:
    """One open-loop run: the job ids it reads grow with the jobs it submits."""

    def __init__(self, client: aiohttp.ClientSession, seeded: list[str], seed: int = 0) -> None:
        self.client = client
        self.seeded = seeded
        self.job_ids = list(seeded)
        self.rng = random.Random(seed)
        self.submitted = 0
        self.slots = asyncio.Semaphore(POOL)

    def request(self, kind: str) -> tuple[str, str, dict[str, Any]]:
        """Method, path and aiohttp arguments of the next request of ``kind``."""
        if kind == JOB:
            return "GET", f"/v1/jobs/{self.rng.choice(self.job_ids)}", {}
        if kind == LIST:
            return "GET", "/v1/jobs", {"params": {"page_size": 20}}
        if kind == TRIALS:
            return "GET", f"/v1/jobs/{self.rng.choice(self.seeded)}/trials", {}
        if kind == HEALTH:
            return "GET", "/healthz", {}
        self.submitted += 1
        spec = {"name": f"load-{self.submitted}", **TINY_JOB}
        return "POST", "/v1/jobs", {"json": spec, "headers": {"Idempotency-Key": uuid.uuid4().hex}}

    async def send(self, kind: str, due: float, start: float) -> Sample:
        loop = asyncio.get_running_loop()
        lag = loop.time() - due
        method, path, arguments = self.request(kind)
        status, error = None, None
        try:
            # One deadline for the whole request, from its scheduled start, waiting for a connection included.
            # The semaphore keeps the waiting in our O(1) queue, not in the client's pool.
            async with (
                asyncio.timeout_at(due + TIMEOUT_S),
                self.slots,
                self.client.request(method, path, **arguments) as response,
            ):
                status = response.status
                body = await response.read()
            if status != (202 if kind == SUBMIT else 200):
                error = f"{status}: {body[:300].decode(errors='replace')}"
            elif kind == SUBMIT:
                self.job_ids.append(json.loads(body)["id"])
        except TimeoutError as failure:
            error = f"timeout ({type(failure).__name__})"
        except aiohttp.ClientError as failure:
            error = f"connection error ({type(failure).__name__}: {failure})"
        now = loop.time()
        return Sample(kind, status, now - due, now - start, lag, error)

    async def run(self, rates: dict[str, float], duration_s: float) -> list[Sample]:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1
        tasks = []
        for offset, kind in timetable(rates, duration_s):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(kind, start + offset, start)))
        return await asyncio.gather(*tasks)  # each is bounded by the client's timeout


async def drive(url: str, pid: int, rates: dict[str, float], duration_s: float) -> Measured:
    """Seed, warm up, measure memory, run the load, measure memory again."""
    # aiohttp, not httpx: at 220 requests/s httpx took three quarters of a core, which on two cores starves
    # the server it measures; aiohttp needs about a third of that.
    connector = aiohttp.TCPConnector(limit=POOL)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as client:
        seeded = []
        for number in range(SEED_JOBS):
            async with client.post("/v1/jobs", json={"name": f"seed-{number}", **TINY_JOB}) as response:
                if response.status != 202:
                    raise RuntimeError(f"seed job refused ({response.status}): {await response.text()}")
                seeded.append((await response.json())["id"])
        load = Load(client, seeded)
        for _ in range(WARMUP_ROUNDS):
            for kind in (JOB, LIST, TRIALS, HEALTH):
                method, path, arguments = load.request(kind)
                async with client.request(method, path, **arguments) as response:
                    response.raise_for_status()
        before = memory_mib(pid)
        cpu, wall = time.process_time(), time.monotonic()
        samples = await load.run(rates, duration_s)
        client_cpu = (time.process_time() - cpu) / (time.monotonic() - wall)
        after = memory_mib(pid)
    return Measured(samples, before, after, len(load.job_ids), client_cpu)


def run_setup(
    setup: str, root: Path, admin_url: str, workers: int, rates: dict[str, float], duration_s: float
) -> Measured:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ESGD_", "RAY_"))}
    env |= {"ESGD_DATA_DIR": str(root / setup / "data"), "ESGD_REQUIRE_API_KEYS": "false"}
    with ExitStack() as cleanup:  # in reverse: stop the API, then drop the databases
        if setup == "postgresql":
            urls = cleanup.enter_context(postgres_databases(admin_url))
            env["ESGD_DATABASE_URL"], env["ESGD_OPTUNA_STORAGE_URL"] = urls
        (root / setup).mkdir()
        api = Api(env, root / setup / "api.log", factory=APP, workers=workers)
        cleanup.callback(api.stop)
        print(f"{setup}: starting the API", flush=True)
        api.start()
        assert api.process is not None
        print(f"{setup}: {duration_s:.0f} s of load at {sum(rates.values()):.0f} requests/s", flush=True)
        try:
            return asyncio.run(drive(api.url, api.process.pid, rates, duration_s))
        except BaseException:
            print(f"--- the API's log, last lines:\n{api.log_tail()}", file=sys.stderr)
            raise


# ----------------------------------------------------------------------------- the table
def summary(samples: list[Sample], offered: float, duration_s: float) -> dict[str, Any]:
    """Achieved rate: good responses over the time from the first scheduled start to the last response (at
    least the offered duration), so a server that falls behind stretches the window and lowers it."""
    ok = [s for s in samples if s.error is None]
    window = max([duration_s, *(s.done_s for s in samples)])
    latency_ms = np.array([s.latency_s for s in samples]) * 1000
    return {
        "offered/s": offered,
        "achieved/s": len(ok) / window,
        "n": len(samples),
        "p50 ms": float(np.percentile(latency_ms, 50)),
        "p99 ms": float(np.percentile(latency_ms, 99)),
        "max ms": float(latency_ms.max()),
        "errors": len(samples) - len(ok),
    }


def table(results: dict[str, Measured], rates: dict[str, float], duration_s: float) -> list[dict[str, Any]]:
    rows = []
    for setup, measured in results.items():
        for kind in [*rates, "all"]:
            samples = [s for s in measured.samples if kind in ("all", s.kind)]
            offered = sum(rates.values()) if kind == "all" else rates[kind]
            rows.append({"setup": setup, "request": kind} | summary(samples, offered, duration_s))
    # Embedded against the obvious alternative, PostgreSQL: above 1 is slower on SQLite.
    postgresql = {row["request"]: row for row in rows if row["setup"] == "postgresql"}
    for row in rows:
        other = postgresql.get(row["request"]) if row["setup"] == "embedded" else None
        for q in ("p50", "p99"):
            row[f"{q} emb/pg"] = row[f"{q} ms"] / other[f"{q} ms"] if other else "-"
    return rows


def statuses(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """How many responses of each status per kind ("None": no response)."""
    counts: dict[str, Counter[str]] = {}
    for s in samples:
        counts.setdefault(s.kind, Counter())[str(s.status)] += 1
    return {kind: dict(counter) for kind, counter in counts.items()}


def lag_ms(samples: list[Sample]) -> dict[str, float]:
    """How late the load generator started its requests: large values mean the client, not the server,
    was the bottleneck."""
    lags = np.array([s.lag_s for s in samples]) * 1000
    return {"p50": round(float(np.percentile(lags, 50)), 1), "p99": round(float(np.percentile(lags, 99)), 1)}


def failures(rows: list[dict[str, Any]]) -> list[str]:
    found = []
    for row in rows:
        if row["errors"]:
            found.append(f"{row['setup']}, {row['request']}: {row['errors']} errors")
        if row["request"] == "all" and row["achieved/s"] < MIN_ACHIEVED * row["offered/s"]:
            found.append(
                f"{row['setup']}: achieved {row['achieved/s']:.0f} requests/s, under "
                f"{MIN_ACHIEVED:.0%} of the {row['offered/s']:.0f} offered"
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per setup, for CI")
    parser.add_argument("--duration", type=float, help="seconds of load per setup (default 60, quick 5)")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"API processes (default {WORKERS})")
    parser.add_argument(
        "--postgres-admin-url",
        default=os.environ.get("ESGD_TEST_POSTGRES_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a database on the server where the two databases are created and dropped",
    )
    args = parser.parse_args()
    duration_s = args.duration or DURATION_S["quick" if args.quick else "full"]
    began = time.monotonic()

    results = {}
    with tempfile.TemporaryDirectory(prefix="esgd-load-", ignore_cleanup_errors=True) as tmp:
        for setup in args.setups:
            results[setup] = run_setup(
                setup, Path(tmp), args.postgres_admin_url, args.workers, RATES, duration_s
            )

    rows = table(results, RATES, duration_s)
    run_time = time.monotonic() - began
    memory = {
        setup: {
            "VmRSS before MiB": round(m.memory_before["VmRSS"], 1),
            "VmRSS after MiB": round(m.memory_after["VmRSS"], 1),
            "VmHWM (peak) MiB": round(m.memory_after["VmHWM"], 1),
        }
        for setup, m in results.items()
    }
    for setup, figures in memory.items():
        print(f"API memory, {setup}: " + ", ".join(f"{key} {value:,.1f}" for key, value in figures.items()))
    publish(
        "load" + ("_quick" if args.quick else ""),
        "API load: open-loop reads and submissions (SQLite vs PostgreSQL)",
        rows,
        run_time_s=round(run_time, 1),
        offered=f"open loop for {duration_s:g} s per setup: requests start on a fixed timetable, evenly "
        "spaced per kind, whether or not earlier ones have returned; "
        + ", ".join(f"{kind} {rate:g}/s" for kind, rate in RATES.items())
        + f" ({sum(RATES.values()):g}/s in all); {JOB} reads a random seeded or submitted job, {TRIALS} "
        f"one of the {SEED_JOBS} seeded jobs (whose studies hold 0 or 1 trial); every POST has its own "
        "Idempotency-Key",
        measured="latency from a request's scheduled start to its response (time waiting for a pooled "
        "connection included); achieved = good responses / (first scheduled start → last response, at "
        "least the offered duration); errors = any 5xx or other unexpected status (GETs expect 200, POSTs "
        f"202), connection errors and timeouts ({TIMEOUT_S:g} s); emb/pg = the embedded setup's latency "
        "over PostgreSQL's (above 1: SQLite is slower)",
        client="one asyncio event loop and one aiohttp.ClientSession in the benchmark's process, "
        f"{POOL} pooled keep-alive connections over loopback; {WARMUP_ROUNDS} sequential warm-up "
        f"requests of each GET kind after {SEED_JOBS} seeded jobs",
        client_start_lag_ms={setup: lag_ms(m.samples) for setup, m in results.items()},
        client_cpu_per_s={setup: round(m.client_cpu, 2) for setup, m in results.items()},
        server=f"uvicorn --factory {APP} --workers {args.workers} (uvloop, httptools), API keys off, no "
        "scheduler (the submitted jobs stay QUEUED)",
        setups="embedded: SQLite files in a temporary data directory; postgresql: two fresh databases "
        "(service, Optuna) on 127.0.0.1:5432, dropped afterwards",
        job="synthetic dataset, mlp, entropy_sgd over its default space, 1 trial of 1 epoch at batch "
        "256, random sampler, no pruner, parallelism 1 on 1 CPU (stored, never run)",
        jobs_stored={setup: m.jobs_stored for setup, m in results.items()},
        api_memory=memory,
        statuses={setup: statuses(m.samples) for setup, m in results.items()},
        first_errors={setup: [s.error for s in m.samples if s.error][:5] for setup, m in results.items()},
    )
    print(f"run time {run_time:.0f} s")
    problems = failures(rows)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
