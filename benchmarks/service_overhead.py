"""Service overhead: what the API, the job driver and Ray add around training, on one machine.

Starts a private local Ray head (2 CPUs) and a real API process
(``uvicorn --factory service.serving:build_app``) on SQLite in a temporary directory, and measures:

1. Per-trial overhead, on jobs of trivially short trials (synthetic data, MLP, 1 epoch of 3 gradient
   evaluations, random sampler, no pruner): from Optuna's ask (the trial's ``datetime_start``) to its first
   optimizer step (user attribute ``first_step_at``), and from its last step (``last_step_at``) to Optuna's
   tell (``datetime_complete``). Also ask → tell minus the trial function's own ``wall_time``, which needs
   no step times: what the driver and Ray add outside the trial function.
2. API read latency on a job whose study holds many finished trials: ``GET /v1/jobs/{id}`` (the job row) and
   ``GET /v1/jobs/{id}/trials?page_size=100`` (reads the study). The job is submitted and cancelled at once,
   then its study is filled with COMPLETE trials through Optuna's API, so no one waits for them to train.
3. Throughput: trials per minute with parallelism 1 and 2, from the job's ``started_at`` to ``finished_at``
   (driver start-up and the reconciler's polling included) and from the first ask to the last tell.

    python -m benchmarks.service_overhead [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from benchmarks.report import publish
from service.local_ray import LocalRay, free_port
from service.studies import close_storage, open_storage
from workers.search_space import split_space

RAY_CPUS = 2
RECONCILE_INTERVAL_S = 0.5
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
SEARCH_SPACE = {
    "lr": {"type": "float", "low": 0.3, "high": 2.0, "log": True},
    "langevin_steps": {"type": "int", "low": 1, "high": 4},
    "eta_prime": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
    "gamma_0": 0.03,
}
SIZES = {
    # trials per timed job; GETs of the job and of a trials page (which costs ~1 s at 1,000 trials on two
    # cores); trials in the study that is read
    "full": {"trials": 20, "job_requests": 500, "page_requests": 100, "stored_trials": 1000},
    "quick": {"trials": 6, "job_requests": 100, "page_requests": 20, "stored_trials": 200},
}
WARMUP = {"job_requests": 20, "page_requests": 3}
STORED_EPOCHS = 10  # learning-curve points per stored trial, as a 10-epoch job would leave


def job_spec(name: str, trials: int, parallelism: int, epochs: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": "synthetic",
        "model": {"name": "mlp"},
        "optimizer": "entropy_sgd",
        "budget": {"trials": trials, "epochs_per_trial": epochs, "batch_size": 256},
        "search_space": SEARCH_SPACE,
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "parallelism": parallelism,
    }


class Api:
    """The API as production runs it, in its own process; its output goes to ``log``.

    ``factory="service.main:create_app"`` serves the API alone, without Ray (jobs are stored and stay QUEUED);
    ``workers`` API processes share the port.
    """

    def __init__(
        self, env: dict[str, str], log: Path, factory: str = "service.serving:build_app", workers: int = 1
    ) -> None:
        self.env = env
        self.log = log
        self.factory = factory
        self.workers = workers
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "uvicorn", "--factory", self.factory]
        command += ["--host", "127.0.0.1", "--port", port, "--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the API was not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    if response.status_code != 202:
        raise RuntimeError(f"job refused ({response.status_code}): {response.text}")
    return response.json()


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['state']} after {timeout_s:.0f} s")
        time.sleep(0.5)


def run_job(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    job = wait_for(client, submit(client, spec)["id"], FINISHED)
    if job["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('failure_reason')}")
    return job


def load_trials(storage_url: str, study_name: str) -> list[FrozenTrial]:
    storage = open_storage(storage_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()
    finally:
        close_storage(storage)


# ----------------------------------------------------------------------------- 1. per-trial overhead
def unix(moment: datetime) -> float:
    """Optuna stores ``datetime.now()``: naive local time of the writer (the driver, on this machine).

    ``timestamp()`` reads a naive datetime as local time too, so this is the Unix time it was taken at.
    """
    return moment.timestamp()


def aware(text: str) -> datetime:
    """A timestamp from the API (UTC; naive ones are UTC too)."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def trial_overheads(job: dict[str, Any], trials: list[FrozenTrial]) -> dict[str, dict[int, float]]:
    """Seconds by trial number, for each COMPLETE trial: ask → first step, last step → tell, and ask → tell
    outside the trial function (which needs no step times)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"job {job['id']} has no COMPLETE trial")
    # The trials' clock against one that is certainly right: the API's UTC started_at and finished_at.
    # Read in the wrong time zone, the trials would fall hours outside the job.
    job_start, job_end = aware(job["started_at"]).timestamp(), aware(job["finished_at"]).timestamp()
    for t in complete:
        if not job_start - 1 <= unix(t.datetime_start) <= unix(t.datetime_complete) <= job_end + 1:
            raise RuntimeError(
                f"trial {t.number} ran {t.datetime_start} → {t.datetime_complete} (read as Unix "
                f"{unix(t.datetime_start):.1f} → {unix(t.datetime_complete):.1f}), outside its job "
                f"{job['started_at']} → {job['finished_at']}: its times are not read in the right time zone"
            )
    overheads: dict[str, dict[int, float]] = {
        "ask → first step": {},
        "last step → tell": {},
        "ask → tell minus trial wall_time": {},
    }
    for t in complete:
        start, end = unix(t.datetime_start), unix(t.datetime_complete)
        if "wall_time" in t.user_attrs:
            overheads["ask → tell minus trial wall_time"][t.number] = end - start - t.user_attrs["wall_time"]
        first, last = t.user_attrs.get("first_step_at"), t.user_attrs.get("last_step_at")
        if first is not None and last is not None:
            overheads["ask → first step"][t.number] = first - start
            overheads["last step → tell"][t.number] = end - last
    for name, values in overheads.items():
        if not all(0 < v < 60 for v in values.values()):
            raise RuntimeError(f"{name}: implausible overheads (s) {values}")
    return overheads


# ----------------------------------------------------------------------------- 2. API latency
def draw(distribution: BaseDistribution, rng: random.Random) -> Any:
    if isinstance(distribution, FloatDistribution):
        if distribution.log:
            return math.exp(rng.uniform(math.log(distribution.low), math.log(distribution.high)))
        return rng.uniform(distribution.low, distribution.high)
    if isinstance(distribution, IntDistribution):
        return rng.randrange(distribution.low, distribution.high + 1, distribution.step)
    if isinstance(distribution, CategoricalDistribution):
        return rng.choice(distribution.choices)
    raise TypeError(f"no sampler for {distribution!r}")


def fill_study(storage_url: str, study_name: str, total: int, seed: int = 0) -> tuple[int, float]:
    """Add COMPLETE trials, each like a finished 10-epoch trial, until the study holds ``total``.

    Returns how many were added and the seconds that took.
    """
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        searched, _fixed = split_space(study.user_attrs["spec"]["search_space"])
        rng = random.Random(seed)
        new = []
        for _ in range(total - len(study.get_trials(deepcopy=False))):
            ceiling = rng.uniform(0.5, 1.0)
            curve = [ceiling * (1 - math.exp(-(epoch + 1) / 3)) for epoch in range(STORED_EPOCHS)]
            now = time.time()
            new.append(
                optuna.trial.create_trial(
                    state=TrialState.COMPLETE,
                    params={knob: draw(d, rng) for knob, d in searched.items()},
                    distributions=searched,
                    value=curve[-1],
                    intermediate_values={epoch + 1: value for epoch, value in enumerate(curve)},
                    user_attrs={
                        "attempt": 1,
                        "gradient_evaluations": 3 * STORED_EPOCHS,
                        "wall_time": 0.5,
                        "val_loss": 1 - curve[-1],
                        "val_accuracy": curve[-1],
                        "test_loss": 1 - curve[-1],
                        "test_accuracy": curve[-1],
                        "first_step_at": now - 0.45,
                        "last_step_at": now - 0.05,
                    },
                )
            )
        started = time.perf_counter()
        study.add_trials(new)
        return len(new), time.perf_counter() - started
    finally:
        close_storage(storage)


def latencies(
    client: httpx.Client, path: str, requests: int, warmup: int, **params: Any
) -> tuple[list[float], float, int]:
    """Seconds per request (sequential, one kept-alive connection), requests per second, response bytes."""
    for _ in range(warmup):
        client.get(path, params=params).raise_for_status()
    samples = []
    began = time.perf_counter()
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(path, params=params)
        samples.append(time.perf_counter() - start)
        response.raise_for_status()
    return samples, requests / (time.perf_counter() - began), len(response.content)


# ----------------------------------------------------------------------------- 3. throughput
def trials_per_minute(job: dict[str, Any], trials: list[FrozenTrial]) -> tuple[float, float]:
    """Over the job (started_at → finished_at) and over its study (first ask → last tell)."""
    done = [t for t in trials if t.state.is_finished()]
    job_s = (aware(job["finished_at"]) - aware(job["started_at"])).total_seconds()
    study_s = max(unix(t.datetime_complete) for t in done) - min(unix(t.datetime_start) for t in done)
    return 60 * len(done) / job_s, 60 * len(done) / study_s


# ----------------------------------------------------------------------------- the table
def row(measurement: str, n: int, samples_s: list[float] | None = None, rate: float | None = None) -> dict:
    def ms(q: float) -> float | str:
        return float(np.percentile(samples_s, q) * 1000) if samples_s else "-"

    return {
        "measurement": measurement,
        "n": n,
        "p50 ms": ms(50),
        "p95 ms": ms(95),
        "p99 ms": ms(99),
        "max ms": float(max(samples_s) * 1000) if samples_s else "-",
        "rate": "-" if rate is None else rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer trials and requests, for a smoke run")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    began = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="esgd-service-overhead-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        storage_url = f"sqlite:///{data_dir}/optuna.db"
        ray = LocalRay(root / "ray.log", num_cpus=RAY_CPUS)
        api: Api | None = None
        try:
            print(f"starting a local Ray ({RAY_CPUS} CPUs) and the API on SQLite in {root}", flush=True)
            address = ray.start()
            env = {key: value for key, value in os.environ.items() if not key.startswith("ESGD_")}
            env |= {
                "RAY_ADDRESS": address,
                "ESGD_DATA_DIR": str(data_dir),
                "ESGD_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S),
            }
            api = Api(env, root / "api.log")
            api.start()
            with httpx.Client(base_url=api.url, timeout=60) as client:
                rows, extra = measure(client, storage_url, size)
        except BaseException:
            if api is not None:
                print(f"--- the API's log, last lines:\n{api.log_tail()}", file=sys.stderr)
            raise
        finally:
            if api is not None:
                api.stop()
            ray.stop()

    run_time = time.monotonic() - began
    publish(
        "service_overhead" + ("_quick" if args.quick else ""),
        "Service overhead: per trial, API latency and parallel throughput (local Ray, SQLite)",
        rows,
        run_time_s=round(run_time, 1),
        **extra,
    )
    print(f"run time {run_time:.0f} s")


def measure(client: httpx.Client, storage_url: str, size: dict[str, int]) -> tuple[list[dict], dict]:
    n, stored = size["trials"], size["stored_trials"]
    rows: list[dict] = []
    rates = {}
    missing_step_times = False
    per_trial: dict[str, list[int]] = {}
    for parallelism in (1, 2):
        print(f"job of {n} tiny trials, parallelism {parallelism}", flush=True)
        job = run_job(client, job_spec(f"overhead-p{parallelism}", n, parallelism))
        trials = load_trials(storage_url, job["study_name"])
        for name, by_number in trial_overheads(job, trials).items():
            if not by_number:
                missing_step_times = True
                continue
            # The first `parallelism` trials wait for the job's Ray workers to start (a cold Python with
            # torch to import): the rest show the steady state.
            warm = [seconds for number, seconds in by_number.items() if number >= parallelism]
            rows.append(
                row(f"{name}, parallelism {parallelism}, all trials", len(by_number), [*by_number.values()])
            )
            label = f"{name}, parallelism {parallelism}, warm workers (trial ≥ {parallelism})"
            rows.append(row(label, len(warm), warm))
            per_trial[f"{name}, parallelism {parallelism} (ms by trial number)"] = [
                round(by_number[number] * 1000) for number in sorted(by_number)
            ]
        rates[parallelism] = trials_per_minute(job, trials)

    print(f"job of {stored} stored trials: submit, cancel, fill its study, then read it", flush=True)
    job = submit(client, job_spec("latency", stored, 1, epochs=STORED_EPOCHS))
    cancel = client.post(f"/v1/jobs/{job['id']}/cancel")
    if cancel.status_code != 202:
        raise RuntimeError(f"cancel refused ({cancel.status_code}): {cancel.text}")
    job = wait_for(client, job["id"], FINISHED, timeout_s=120)
    if job["state"] != "CANCELLED":
        raise RuntimeError(f"job {job['id']} ended {job['state']}, not CANCELLED")
    added, add_s = fill_study(storage_url, job["study_name"], stored)
    finished = [t for t in load_trials(storage_url, job["study_name"]) if t.state.is_finished()]
    for path, params, label, count in (
        (f"/v1/jobs/{job['id']}", {}, "GET /v1/jobs/{id}", "job_requests"),
        (
            f"/v1/jobs/{job['id']}/trials",
            {"page_size": 100},
            "GET /v1/jobs/{id}/trials?page_size=100",
            "page_requests",
        ),
    ):
        samples, per_second, size_bytes = latencies(client, path, size[count], WARMUP[count], **params)
        rows.append(row(f"{label} ({size_bytes:,} B)", size[count], samples, per_second))

    for parallelism, (job_rate, study_rate) in rates.items():
        rows.append(
            row(f"trials/min, parallelism {parallelism}, job started_at → finished_at", n, rate=job_rate)
        )
        rows.append(row(f"trials/min, parallelism {parallelism}, first ask → last tell", n, rate=study_rate))
    rows.append(
        row("speed-up 2 workers / 1, job started_at → finished_at", n, rate=rates[2][0] / rates[1][0])
    )
    rows.append(row("speed-up 2 workers / 1, first ask → last tell", n, rate=rates[2][1] / rates[1][1]))

    extra = {
        "cluster": f"local Ray head, {RAY_CPUS} CPUs, 1 CPU per trial; API and databases on SQLite",
        "trial": "synthetic (900 train), mlp, entropy_sgd, 1 epoch at batch 256 = 3 gradient evaluations, "
        "random sampler, no pruner",
        "trials_per_job": n,
        "reconcile_interval_s": RECONCILE_INTERVAL_S,
        "per_trial_rows": "COMPLETE trials; ask and tell are Optuna's datetime_start and datetime_complete, "
        "first and last step the trial's first_step_at and last_step_at; 'minus trial wall_time' is "
        "ask → tell less the time spent inside the trial function (data, model, training, evaluation), "
        "i.e. what the driver, Ray and the study writes add",
        "latency_rows": f"rate = requests/s; n sequential requests after {WARMUP['job_requests']} (job) or "
        f"{WARMUP['page_requests']} (trials page) warm-up ones, one kept-alive connection; the job's study "
        f"holds {len(finished)} finished trials ({added} added through Optuna in {add_s:.1f} s, each with "
        f"{STORED_EPOCHS} intermediate values). "
        "GET /v1/jobs/{id} reads only the job's row (its progress is copied from the study only while a "
        "job is active, so it does not show them); the trials page reads the study",
        "throughput_rows": "rate = trials per minute (speed-up: a ratio); the job window includes the "
        "driver's start-up and up to one reconcile interval at each end",
    }
    extra |= per_trial
    if missing_step_times:
        extra["missing"] = (
            "the trials carry no first_step_at / last_step_at user attributes (the study loop did not copy "
            "them from the trial results), so ask → first step and "
            "last step → tell could not be measured"
        )
    return rows, extra


if __name__ == "__main__":
    main()
