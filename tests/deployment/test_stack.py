"""The compose deployment run without containers (``compose_stack``): one job on PostgreSQL, a Ray head and
a CPU worker, seen through the API, both databases, the standalone dashboard, ``/metrics`` and Ray's nodes."""

from __future__ import annotations

import json
import re
import time

import httpx
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.deployment.conftest import ROOT, SECRETS, SMALL_JOB

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


@pytest.fixture(scope="module")
def study(compose_stack, finished_job) -> optuna.Study:
    storage = compose_stack.environment("api")["ESGD_OPTUNA_STORAGE_URL"]
    return optuna.load_study(study_name=finished_job["study_name"], storage=storage)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    page = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def test_the_job_succeeds_and_its_trials_are_in_postgresql(compose_stack, finished_job, study):
    assert finished_job["state"] == "SUCCEEDED", finished_job
    env = compose_stack.environment("api")
    assert env["ESGD_DATABASE_URL"].startswith("postgresql+psycopg://")
    # Optuna's own tables, read with SQL: one row per trial, one intermediate value per epoch reported.
    engine = create_engine(env["ESGD_OPTUNA_STORAGE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT t.number, t.state, count(v.trial_intermediate_value_id) FROM trials t "
                    "JOIN studies s ON s.study_id = t.study_id "
                    "LEFT JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
                    "WHERE s.study_name = :name GROUP BY t.number, t.state ORDER BY t.number"
                ),
                {"name": finished_job["study_name"]},
            ).all()
    finally:
        engine.dispose()
    assert [(number, state) for number, state, _ in rows] == [(t.number, t.state.name) for t in study.trials]
    assert len(rows) == SMALL_JOB["budget"]["trials"]
    assert all(state in ("COMPLETE", "PRUNED", "FAIL") for _, state, _ in rows)
    for (_, state, values), trial in zip(rows, study.trials, strict=True):
        assert values == len(trial.intermediate_values) >= 1
        if state == "COMPLETE":
            assert values == SMALL_JOB["budget"]["epochs_per_trial"]
    # The service's own table holds the job, in the other database.
    engine = create_engine(env["ESGD_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            job_row = connection.execute(
                text("SELECT state, study_name FROM jobs WHERE id = :id"), {"id": finished_job["id"]}
            ).one()
    finally:
        engine.dispose()
    assert tuple(job_row) == ("SUCCEEDED", finished_job["study_name"])
    best = finished_job["best_trial"]
    assert (best["number"], best["values"]) == (study.best_trial.number, [study.best_value])


def test_every_service_running_here_passes_its_own_health_check(compose_stack):
    """What ``docker compose ps`` would show as healthy: each compose health check, run as compose runs it
    (the dashboard's needs no key, which the deployment requires everywhere else)."""
    checked = [
        name
        for name in compose_stack.processes
        if compose_stack.services[name].get("healthcheck", {}).get("test", ["NONE"])[0] != "NONE"
    ]
    assert {"api", "dashboard", "ray-head", "ray-cpu-worker"} <= set(checked)
    assert {name: compose_stack.healthy(name) for name in checked} == dict.fromkeys(checked, True)


def test_the_standalone_dashboard_serves_the_study_and_its_trials_read_only(
    compose_stack, finished_job, study, admin_key
):
    assert httpx.get(compose_stack.url("dashboard", 8080, "/dashboard/api/studies")).status_code == 401
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=compose_stack.url("dashboard", 8080), headers=headers, timeout=10) as client:
        summaries = client.get("/dashboard/api/studies").json()["study_summaries"]
        [summary] = [s for s in summaries if s["study_name"] == finished_job["study_name"]]
        detail = client.get(f"/dashboard/api/studies/{summary['study_id']}", params={"after": 0}).json()
        assert client.delete(f"/dashboard/api/studies/{summary['study_id']}").status_code == 405
        root = client.get("/")
    assert root.is_redirect and root.headers["location"].endswith("/dashboard/")
    trials = {t["number"]: t for t in detail["trials"]}
    assert sorted(trials) == [t.number for t in study.trials]
    for trial in study.trials:
        shown = trials[trial.number]
        assert shown["state"] == trial.state.name.capitalize()
        shown_values = {v["step"]: v["value"] for v in shown["intermediate_values"]}
        assert shown_values == pytest.approx(trial.intermediate_values)


def test_metrics_count_the_job_and_its_trials(compose_stack, finished_job, study):
    samples = scrape(compose_stack.url("api", 8000, "/metrics"))
    jobs = {labels[0][1]: value for (name, labels), value in samples.items() if name == "esgd_jobs"}
    assert jobs["SUCCEEDED"] == 1 and sum(jobs.values()) == 1
    trials = {labels[0][1]: value for (name, labels), value in samples.items() if name == "esgd_trials"}
    states = [t.state for t in study.trials]
    assert trials == {
        "running": 0,
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "retried": 0,
    }
    spent = sum(t.user_attrs["gradient_evaluations"] for t in study.trials)
    assert samples[("esgd_gradient_evaluations_total", ())] == spent > 0
    assert samples[("esgd_trial_duration_seconds_count", ())] == len(study.trials)
    durations = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials)
    assert samples[("esgd_trial_duration_seconds_sum", ())] == pytest.approx(durations)
    assert samples[("esgd_job_queue_seconds_count", ())] == 1
    submitted = (("method", "POST"), ("route", "/v1/jobs"), ("status", "202"))
    assert samples[("esgd_http_request_duration_seconds_count", submitted)] == 1


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "dashboards/grafana/dashboards/esgd.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {name for name in re.findall(r"\b[a-zA-Z_:][\w:]*\b(?!\s*\()", expr) if name not in PROMQL_WORDS}


def test_metric_names_are_read_from_promql():
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{status=~"5.."}[5m]))) / sum(b_total)'
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_every_metric_a_grafana_panel_queries_is_served(compose_stack, finished_job):
    served = {name for name, _ in scrape(compose_stack.url("api", 8000, "/metrics"))}
    queries = panel_queries()
    assert len(queries) >= 8
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= served, f"{title}: {sorted(names - served)} are not in /metrics"


def test_every_ray_node_exports_metrics_where_prometheus_scrapes_them(compose_stack):
    prometheus = yaml.safe_load((ROOT / "dashboards/prometheus.yml").read_text())
    [ray_job] = [job for job in prometheus["scrape_configs"] if job["job_name"] == "ray"]
    [discovery] = ray_job["dns_sd_configs"]
    nodes = [name for name in compose_stack.processes if name.startswith("ray-")]
    assert len(nodes) == 2 and set(nodes) <= set(discovery["names"])
    for node in nodes:
        url = compose_stack.url(node, discovery["port"], "/metrics")
        deadline = time.monotonic() + 60
        names: set[str] = set()
        while not any(name.startswith("ray_") for name in names) and time.monotonic() < deadline:
            try:
                names = {name for name, _ in scrape(url)}
            except httpx.TransportError:
                time.sleep(1)
        assert any(name.startswith("ray_") for name in names), f"{node} exports no ray_ metrics at {url}"


def test_ray_answers_only_requests_with_the_clusters_token(compose_stack):
    jobs_api = compose_stack.url("ray-head", 8265, "/api/jobs/")
    assert httpx.get(jobs_api, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 32}
    assert httpx.get(jobs_api, headers=wrong, timeout=10).status_code in (401, 403)
    right = {"Authorization": f"Bearer {SECRETS['RAY_AUTH_TOKEN']}"}
    assert httpx.get(jobs_api, headers=right, timeout=10).status_code == 200
