"""The ``esgd`` command line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    no_args_is_help=True, help="Entropy-SGD as a service: train, search and compare optimizers."
)
console = Console()


@app.callback()
def main() -> None:
    """Entropy-SGD as a service: train, search and compare optimizers."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Optimizer knobs follow as --KNOB VALUE, e.g. --lr 1 --langevin-steps 5 --nesterov true "
    "--gamma-max none. Unknown knobs are refused with the list of valid ones.",
)
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="mnist1d, digits, mnist5k or synthetic")] = "mnist1d",
    model: Annotated[str, typer.Option(help="mlp, cnn1d or lenet")] = "cnn1d",
    optimizer: Annotated[str, typer.Option(help="entropy_sgd, sgd or adam")] = "entropy_sgd",
    epochs: Annotated[int, typer.Option(help="budget, in epochs of gradient evaluations")] = 10,
    batch_size: Annotated[int, typer.Option()] = 128,
    width: Annotated[str, typer.Option(help="model size: small, medium or large")] = "small",
    batchnorm: Annotated[bool, typer.Option()] = False,
    dropout: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    data: Annotated[Path | None, typer.Option(help="train on your own .npz (arrays x, y)")] = None,
    save_weights: Annotated[Path | None, typer.Option(help="write the trained weights here")] = None,
) -> None:
    """Train one model with one set of hyperparameters and print its learning curve."""
    # Imported here: the rest of the CLI (and the API process) never loads torch.
    from workers.datasets import load_npz
    from workers.optimizers import optimizer_kind
    from workers.training import TrialConfig
    from workers.training import train as run_trial

    try:
        knobs = parse_knobs(ctx.args, optimizer_kind(optimizer).knobs)
        config = TrialConfig(
            dataset=dataset if data is None else data.stem,
            model=model,
            optimizer=optimizer,
            hyperparameters=knobs,
            epochs=epochs,
            batch_size=batch_size,
            width=width,
            batchnorm=batchnorm,
            dropout=dropout,
            seed=seed,
            device=device,
        )
        splits = load_npz(data, seed=seed) if data is not None else None
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error

    with Progress(
        TextColumn("[bold]epoch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("train", total=epochs, status="")

        def report(metrics: Any) -> bool:
            status = f"val acc {metrics.val_accuracy:.3f}  val loss {metrics.val_loss:.4f}"
            progress.update(task, advance=1, status=status)
            return False

        try:
            result = run_trial(config, report, data=splits)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error

    table = Table(title=f"{optimizer} on {config.dataset} with {model}")
    for column in ("epoch", "train loss", "val loss", "val acc", "grad evals", "seconds"):
        table.add_column(column, justify="right")
    for m in result.history:
        table.add_row(
            str(m.epoch),
            f"{m.train_loss:.4f}",
            f"{m.val_loss:.4f}",
            f"{m.val_accuracy:.4f}",
            str(m.gradient_evaluations),
            f"{m.wall_time:.1f}",
        )
    console.print(table)
    console.print(f"status: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    if result.test_accuracy is not None:
        console.print(f"test accuracy: {result.test_accuracy:.4f}   test loss: {result.test_loss:.4f}")
    console.print(
        f"gradient evaluations: {result.gradient_evaluations}   wall time: {result.wall_time:.1f} s"
    )
    if save_weights is not None:
        import torch

        torch.save(result.state_dict, save_weights)
        console.print(f"weights written to {save_weights}")
    if result.status == "diverged":
        raise typer.Exit(code=1)


def parse_knobs(args: list[str], knobs: dict[str, Any]) -> dict[str, Any]:
    """Turn ``--knob-name VALUE`` pairs into typed knob values; unknown names list the valid ones."""
    parsed: dict[str, Any] = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or not rest:
            raise ValueError(f"expected --KNOB VALUE pairs, got {flag!r}")
        name = flag[2:].replace("-", "_")
        if name not in knobs:
            raise ValueError(
                f"unknown knob {flag!r}; valid knobs: {', '.join('--' + k.replace('_', '-') for k in knobs)}"
            )
        parsed[name] = _typed(name, rest.pop(0), knobs[name])
    return parsed


def _typed(name: str, text: str, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("none", "null"):
        return None
    if bool in kinds:
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--{name.replace('_', '-')} expects true or false, got {text!r}")
    try:
        return int(text) if int in kinds else float(text)
    except ValueError:
        expected = "an integer" if int in kinds else "a number"
        raise ValueError(f"--{name.replace('_', '-')} expects {expected}, got {text!r}") from None


# ------------------------------------------------------------------------------------------ API clients
Url = Annotated[str, typer.Option("--url", envvar="ESGD_URL", help="the service's base URL")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="ESGD_API_KEY", help="API key, when required")
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def _check(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful response; a problem detail is printed and ends the command."""
    if response.is_success:
        return response.json()
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    console.print(
        f"[red]{response.status_code} {problem.get('title', '')}[/red]: {problem.get('detail', '')}"
    )
    for error in problem.get("errors", []):
        console.print(f"  {'.'.join(str(part) for part in error.get('loc', []))}: {error.get('msg')}")
    raise typer.Exit(code=1)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a job spec (JSON)")],
    wait: Annotated[bool, typer.Option(help="follow the job until it ends")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with the same key is safe")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a search job and print its id (and, with --wait, follow it to the end)."""
    try:
        spec = json.loads(file.read_text())
    except ValueError as error:
        raise typer.BadParameter(f"{file} is not valid JSON: {error}") from error
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(url, api_key) as client:
        job = _check(client.post("/v1/jobs", json=spec, headers=headers))
        console.print(f"job [bold]{job['id']}[/bold] {job['state']}: {job['name']}")
        if wait:
            job = follow(client, job["id"])
            print_summary(job, url)
            if job["state"] != "SUCCEEDED":
                raise typer.Exit(code=1)


def follow(client: httpx.Client, job_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Show a live progress bar of the job's trials and best value until it reaches a terminal state."""
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials  {task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("job", total=None, state="QUEUED", detail="")
        while True:
            job = _check(client.get(f"/v1/jobs/{job_id}"))
            p, best = job["progress"], job.get("best_trial")
            detail = (
                f"{p['trials_running']} running, {p['trials_pruned']} pruned, {p['trials_failed']} failed"
            )
            if best and best["values"]:
                detail += f"  best {best['values'][0]:.4f} (trial {best['number']})"
            progress.update(
                task,
                total=p["trials_planned"],
                completed=p["trials_finished"],
                state=job["state"],
                detail=detail,
            )
            if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                return job
            time.sleep(poll_s)


def print_summary(job: dict[str, Any], url: str) -> None:
    p, best = job["progress"], job.get("best_trial")
    console.print(
        f"job {job['id']} {job['state']}" + (f": {job['failure_reason']}" if job["failure_reason"] else "")
    )
    console.print(
        f"trials: {p['trials_finished']} finished of {p['trials_planned']} planned — "
        f"{p['trials_complete']} complete, {p['trials_pruned']} pruned, {p['trials_failed']} failed"
        + (f" ({p['trials_retried']} attempts retried)" if p.get("trials_retried") else "")
        + "; "
        f"{p['gradient_evaluations']:,} gradient evaluations"
    )
    if best:
        table = Table(title=f"best trial: #{best['number']}")
        table.add_column("hyperparameter")
        table.add_column("value", justify="right")
        for name, value in best["params"].items():
            table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
        metrics = [
            f"{o['metric']} {v:.4f}" for o, v in zip(job["spec"]["objectives"], best["values"], strict=False)
        ]
        if best.get("test_accuracy") is not None:
            metrics.append(f"test_accuracy {best['test_accuracy']:.4f}")
        console.print("best: " + ", ".join(metrics))
    console.print(f"dashboard: {url.rstrip('/')}/dashboard/")


@app.command()
def status(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show a job's state, progress and best trial."""
    with _client(url, api_key) as client:
        print_summary(_check(client.get(f"/v1/jobs/{job_id}")), url)


@app.command()
def trials(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List a job's trials with their states, values and reasons."""
    table = Table(title=f"trials of {job_id}")
    for column in ("#", "state", "value", "grad evals", "params", "reason"):
        table.add_column(column)
    with _client(url, api_key) as client:
        token = ""
        while True:
            page = _check(
                client.get(f"/v1/jobs/{job_id}/trials", params={"page_size": 100, "page_token": token})
            )
            for t in page["items"]:
                value = ", ".join(f"{v:.4f}" for v in t["values"] if v is not None) if t["values"] else ""
                params = " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()
                )
                table.add_row(
                    str(t["number"]),
                    t["state"],
                    value,
                    str(t["gradient_evaluations"] or ""),
                    params,
                    t["reason"] or "",
                )
            token = page["next_page_token"]
            if not token:
                break
    console.print(table)


@app.command()
def cancel(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job: its running trials stop within seconds."""
    with _client(url, api_key) as client:
        job = _check(client.post(f"/v1/jobs/{job_id}/cancel"))
    console.print(f"job {job['id']} {job['state']}")


# ------------------------------------------------------------------------------------------ serving
@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    data_dir: Annotated[Path, typer.Option(envvar="ESGD_DATA_DIR", help="SQLite files, artifacts")] = Path(
        ".esgd"
    ),
    ray_address: Annotated[
        str | None, typer.Option(envvar="RAY_ADDRESS", help="an existing cluster's Jobs API URL")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all)")] = None,
    workers: Annotated[
        int, typer.Option(min=1, envvar="ESGD_WORKERS", help="API processes (one leads the scheduler)")
    ] = 1,
    access_log: Annotated[bool, typer.Option(help="log every request")] = True,
) -> None:
    """Run the API, the dashboard and the job scheduler, on a private local Ray unless RAY_ADDRESS is set."""
    import shutil

    import uvicorn

    from service.local_ray import LocalRay

    # uvicorn re-raises the SIGTERM it handled once it has shut down; unwinding instead lets `finally` stop
    # the local Ray rather than leaving it behind.
    signal.signal(signal.SIGTERM, _unwind)
    data_dir = data_dir.resolve()
    local = None
    if not ray_address:
        local = LocalRay(data_dir / "ray.log", num_cpus=num_cpus)
        with console.status("starting a local Ray cluster"):
            ray_address = local.start()
        console.print(f"local Ray started: Jobs API at {ray_address}")
    try:
        # The workers are new processes: they read their settings from the environment.
        os.environ |= {"ESGD_DATA_DIR": str(data_dir), "ESGD_RAY_ADDRESS": ray_address}
        if workers > 1:
            metrics_dir = data_dir / "metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)  # the figures of an earlier run
            metrics_dir.mkdir(parents=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        console.print(f"API at http://{host}:{port}/docs, dashboard at http://{host}:{port}/dashboard/")
        uvicorn.run(
            "service.serving:build_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="info",
            access_log=access_log,
        )
    finally:
        if local is not None:
            local.stop()


def _unwind(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command()
def migrate() -> None:
    """Create or upgrade both databases (ESGD_DATABASE_URL, ESGD_OPTUNA_STORAGE_URL), then exit.

    A deployment runs this once before the API; the API also migrates both at start-up, so it is optional.
    """
    from service.config import Settings
    from service.db import migrate as migrate_service_database
    from service.studies import upgrade_storage

    settings = Settings()
    migrate_service_database(settings.resolved_database_url())
    console.print("service database at the latest revision")
    revision = upgrade_storage(settings.resolved_optuna_storage_url())
    console.print(f"study database at Optuna's revision {revision}")


# ------------------------------------------------------------------------------------------ API keys
keys_app = typer.Typer(
    no_args_is_help=True,
    help="API keys, in the service database (ESGD_DATABASE_URL, or SQLite under ESGD_DATA_DIR).",
)
app.add_typer(keys_app, name="keys")


def _service_database() -> Any:
    from service.config import Settings
    from service.db import Database, migrate

    url = Settings().resolved_database_url()
    migrate(url)  # a fresh deployment's first key may come before the API's first start
    return Database(url)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    admin: Annotated[bool, typer.Option(help="may see every job and the dashboard")] = False,
) -> None:
    """Create a key and print its secret, once: only its hash is stored."""
    from service import keys

    if not 1 <= len(name) <= 128:
        raise typer.BadParameter("a key's name has 1 to 128 characters", param_hint="NAME")
    database = _service_database()
    try:
        with database.session() as session:
            key, secret = keys.create_key(session, name, admin=admin)
    finally:
        database.dispose()
    console.print(f"created {'admin ' if key.admin else ''}key [bold]{key.id}[/bold] ({key.name})")
    console.print("its secret, shown this once (send it as 'Authorization: Bearer <secret>'):")
    print(secret)


@keys_app.command("list")
def keys_list() -> None:
    """The keys, with their ids, names, roles and whether they are revoked (never their secrets)."""
    from service import keys

    database = _service_database()
    try:
        with database.session() as session:
            rows = keys.list_keys(session)
    finally:
        database.dispose()
    table = Table(title="API keys")
    for column in ("id", "name", "role", "created", "revoked"):
        table.add_column(column)
    for key in rows:
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else ""
        table.add_row(
            key.id,
            key.name,
            "admin" if key.admin else "user",
            key.created_at.isoformat(timespec="seconds"),
            revoked,
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (key-...)")]) -> None:
    """Revoke a key: requests with it are refused from now on; its jobs keep running."""
    from service import keys

    database = _service_database()
    try:
        with database.session() as session:
            key = keys.revoke_key(session, key_id)
    except keys.KeyNotFound:
        console.print(f"[red]no key with id {key_id!r}[/red]")
        raise typer.Exit(code=1) from None
    finally:
        database.dispose()
    console.print(f"key {key.id} ({key.name}) revoked at {key.revoked_at.isoformat(timespec='seconds')}")


@app.command()
def dashboard(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
) -> None:
    """optuna-dashboard on its own, read-only, on the study database (ESGD_OPTUNA_STORAGE_URL); API keys
    are checked in the service database (ESGD_DATABASE_URL), as by the API."""
    import uvicorn

    from service.api.dashboard import standalone_app
    from service.config import Settings

    console.print(f"dashboard at http://{host}:{port}/dashboard/")
    uvicorn.run(standalone_app(Settings()), host=host, port=port)


@app.command()
def demo(
    spec: Annotated[Path, typer.Option(exists=True, help="the job to run")] = Path(
        "examples/mnist1d_entropy_sgd.json"
    ),
    port: Annotated[int, typer.Option()] = 8000,
    data_dir: Annotated[Path, typer.Option()] = Path(".esgd"),
    keep_serving: Annotated[bool, typer.Option(help="keep the API and dashboard up afterwards")] = False,
) -> None:
    """The main job: start the service, submit a real search over REST, follow it and print the result."""
    import subprocess
    import sys

    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "serve", "--no-access-log"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--data-dir", str(data_dir)],
        env={**os.environ, "ESGD_DATA_DIR": str(data_dir.resolve())},
    )
    try:
        with _client(url, None) as client, console.status("waiting for the service"):
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise typer.Exit(code=server.returncode or 1)
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    console.print("[red]the service did not become ready in 180 s[/red]")
                    raise typer.Exit(code=1)
                time.sleep(1)
        submit(spec, wait=True, idempotency_key=None, url=url, api_key=None)
        if keep_serving:
            console.print("serving until Ctrl-C")
            server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=120)


if __name__ == "__main__":
    app()
