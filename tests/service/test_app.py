"""The app factory: background hooks run once the databases are ready; OpenAPI documents the API."""

from __future__ import annotations

import warnings
from contextlib import asynccontextmanager

from service import jobs
from service.main import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_background_hooks_run_between_start_up_and_shutdown(backend):
    seen = []

    def hook(name):
        @asynccontextmanager
        async def run(app):
            with app.state.db.session() as session:  # the database is migrated and open
                session.connection()
            seen.append(f"start {name} storage={app.state.optuna.get() is not None}")
            yield
            seen.append(f"stop {name}")

        return run

    app = create_app(backend.settings, background=[hook("reconciler")])
    app.state.background.append(hook("extra"))  # appendable until start-up
    with TestClient(app) as client:
        assert seen == ["start reconciler storage=True", "start extra storage=True"]
        assert client.get("/healthz").status_code == 200
    assert seen[2:] == ["stop extra", "stop reconciler"]


def test_openapi_documents_the_routes_and_problem_responses(client):
    document = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/trials"} <= set(
        document["paths"]
    )
    submit = document["paths"]["/v1/jobs"]["post"]
    assert "202" in submit["responses"] and "422" in submit["responses"]
    assert "Problem" in document["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_spec_checks_refuse_what_this_deployment_cannot_run_before_storing_anything(backend):
    cluster = {"CPU": 2.0}

    def fits_cluster(spec) -> None:
        wanted = spec.parallelism * spec.resources.cpus
        if wanted > cluster["CPU"]:
            raise jobs.SpecRejected(
                (["parallelism"], f"needs {wanted:g} CPUs; the cluster has {cluster['CPU']:g}")
            )

    with TestClient(create_app(backend.settings, spec_checks=[fits_cluster])) as client:
        accepted = client.post(
            "/v1/jobs", json={"name": "fits", "parallelism": 2}, headers={"Idempotency-Key": "a"}
        )
        assert accepted.status_code == 202
        refused = client.post("/v1/jobs", json={"name": "wide", "parallelism": 64})
        assert refused.status_code == 422
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["errors"][0]["loc"] == ["parallelism"]
        assert "the cluster has 2" in refused.json()["detail"]
        assert [j["name"] for j in client.get("/v1/jobs").json()["items"]] == ["fits"]
        assert len(client.app.state.optuna.get().get_all_studies()) == 1
        cluster["CPU"] = 1.0  # the cluster shrank: a retry of the accepted submission still gets its job
        replay = client.post(
            "/v1/jobs", json={"name": "fits", "parallelism": 2}, headers={"Idempotency-Key": "a"}
        )
        assert replay.status_code == 202 and replay.json()["id"] == accepted.json()["id"]
