"""Health, readiness, metrics, the best-model download and the dashboard under ``/dashboard/``."""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from service.config import Settings
from service.main import create_app
from service.tables import Job

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_metrics_sum_trials_time_and_gradient_evaluations_over_jobs_and_their_baselines(client, session):
    first, second, queued = (client.post("/v1/jobs", json={"name": n}).json()["id"] for n in "abc")
    baseline = {
        "optimizer": "sgd",
        "study_name": "s.sgd",
        "progress": {
            "trials_planned": 2,
            "trials_finished": 2,
            "trials_complete": 1,
            "trials_failed": 1,
            "gradient_evaluations": 40,
            "trial_seconds": 1.5,
        },
    }
    figures = {
        first: (
            {
                "trials_finished": 3,
                "trials_running": 1,
                "trials_complete": 2,
                "trials_pruned": 1,
                "gradient_evaluations": 1000,
                "trial_seconds": 12.0,
                "baselines": [baseline],
            },
            3.0,
        ),
        second: (
            {"trials_finished": 1, "trials_complete": 1, "gradient_evaluations": 200, "trial_seconds": 4.5},
            90.0,
        ),
    }
    for job_id, (progress, waited_s) in figures.items():
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        job.progress = {"trials_planned": 4, **progress}
        job.started_at = job.created_at + timedelta(seconds=waited_s)
    session.commit()

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    trials = {s.labels["state"]: s.value for s in families["esgd_trials"].samples}
    assert trials == {"running": 1, "complete": 4, "pruned": 1, "failed": 1, "retried": 0}
    assert samples[("esgd_trial_duration_seconds_count", ())] == 6
    assert samples[("esgd_trial_duration_seconds_sum", ())] == 18.0
    assert samples[("esgd_gradient_evaluations_total", ())] == 1240
    assert samples[("esgd_job_queue_seconds_count", ())] == 2  # the queued job has not started
    assert samples[("esgd_job_queue_seconds_bucket", (("le", "5.0"),))] == 1
    assert samples[("esgd_job_queue_seconds_bucket", (("le", "60.0"),))] == 1
    assert samples[("esgd_job_queue_seconds_bucket", (("le", "300.0"),))] == 2
    assert abs(samples[("esgd_job_queue_seconds_sum", ())] - 93.0) < 1e-6
    assert queued


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_both_databases(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "optuna_storage": "ok", "ray": "not checked"}


def test_readyz_calls_the_ray_probe_and_reports_it_down(backend):
    def ray_down() -> None:
        raise ConnectionError("no cluster at ray://nowhere:10001")

    with TestClient(create_app(backend.settings, ray_ping=ray_down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "ray" in response.json()["detail"] and response.json()["checks"]["ray"] == "down"
    assert "nowhere" not in response.text  # the reason goes to the log, not to the client


def test_readyz_is_503_naming_the_study_database_when_it_does_not_exist(postgres, tmp_path):
    """A real fault: the study storage URL names a database the server does not have."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/service.db",
        optuna_storage_url=postgres.missing_database_url(),
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200  # the process is alive all the same
        response = client.get("/readyz")
        assert response.status_code == 503, response.text
        problem = response.json()
        assert "optuna_storage" in problem["detail"]
        assert problem["checks"] == {"database": "ok", "optuna_storage": "down", "ray": "not checked"}
        # Endpoints that need the study database say it is unavailable; nothing is stored meanwhile.
        submit = client.post("/v1/jobs", json={"name": "x"})
        assert submit.status_code == 503 and submit.headers["retry-after"]
        assert client.get("/v1/jobs").json()["items"] == []


def test_metrics_has_jobs_by_state_and_request_latency_by_route(client):
    job_id = client.post("/v1/jobs", json={"name": "m"}).json()["id"]
    client.post("/v1/jobs", json={"name": "n"})
    client.post(f"/v1/jobs/{job_id}/cancel")
    client.get(f"/v1/jobs/{job_id}")
    client.get("/v1/jobs/job-000000000000")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'esgd_jobs{state="QUEUED"} 1.0' in text
    assert 'esgd_jobs{state="CANCELLED"} 1.0' in text
    assert 'esgd_jobs{state="RUNNING"} 0.0' in text
    assert 'route="/v1/jobs",status="202"' in text
    assert 'route="/v1/jobs/{job_id}",status="200"' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text  # templates, never ids
    assert job_id not in text


def test_best_model_is_404_until_the_driver_saves_it(client):
    job_id = client.post("/v1/jobs", json={"name": "weights"}).json()["id"]
    missing = client.get(f"/v1/jobs/{job_id}/best-model")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(
        "application/problem+json"
    )

    folder = client.app.state.settings.artifacts_dir / job_id
    folder.mkdir(parents=True)
    (folder / "best-model.pt").write_bytes(b"\x80\x02weights")
    response = client.get(f"/v1/jobs/{job_id}/best-model")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == b"\x80\x02weights"
    assert client.get("/v1/jobs/..%2F..%2Fetc/best-model").status_code == 404


@pytest.fixture
def study_name(client):
    return client.post("/v1/jobs", json={"name": "dashboard"}).json()["study_name"]


def test_dashboard_page_answers_under_the_prefix(client, study_name):
    page = client.get("/dashboard/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/dashboard/static/bundle.js"' in page.text
    assert 'src="/dashboard/prefix.js"' in page.text
    assert "Content-Security-Policy" in page.headers
    deep_link = client.get("/dashboard/studies/1")  # the front end's own routes, on reload
    assert deep_link.status_code == 200 and deep_link.headers["content-type"].startswith("text/html")
    redirect = client.get("/dashboard", follow_redirects=False)
    assert redirect.status_code in (307, 308) and redirect.headers["location"].endswith("/dashboard/")


def test_dashboard_assets_and_api_answer_under_the_prefix(client, study_name):
    bundle = client.get("/dashboard/static/bundle.js")
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
    shim = client.get("/dashboard/prefix.js")
    assert shim.status_code == 200 and b"/api/" in shim.content
    studies = client.get("/dashboard/api/studies")
    assert studies.status_code == 200
    assert study_name in [s["study_name"] for s in studies.json()["study_summaries"]]
    study_id = studies.json()["study_summaries"][0]["study_id"]
    assert client.get(f"/dashboard/api/studies/{study_id}?after=0").status_code == 200


def test_dashboard_is_read_only(client, study_name):
    study_id = client.get("/dashboard/api/studies").json()["study_summaries"][0]["study_id"]
    assert client.delete(f"/dashboard/api/studies/{study_id}").status_code == 405
    assert (
        client.post(
            "/dashboard/api/studies", json={"study_name": "x", "directions": ["minimize"]}
        ).status_code
        == 405
    )
    assert [s["study_name"] for s in client.get("/dashboard/api/studies").json()["study_summaries"]] == [
        study_name
    ]
