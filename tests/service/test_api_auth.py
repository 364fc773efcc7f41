"""Access control and limits: API keys (hashed, revocable, per-job ownership, admin), the dashboard's gate,
the per-key limit on unfinished jobs and the deployment's limits on a job's size, on both backends."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from service import keys
from service.config import Settings
from service.main import create_app
from service.tables import ApiKey

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SPEC = {"name": "auth", "dataset": "synthetic", "model": {"name": "mlp"}, "budget": {"trials": 2}}


@pytest.fixture
def secured(backend) -> Iterator[Any]:
    """``secured(**settings)``: an app on ``backend`` with those settings, and a key maker for it."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(backend.settings.model_copy(update=overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def new_key(client: TestClient, name: str, *, admin: bool = False) -> dict[str, str]:
    with client.app.state.db.session() as session:  # type: ignore[attr-defined]
        key, secret = keys.create_key(session, name, admin=admin)
    return {"Authorization": f"Bearer {secret}", "id": key.id}


def auth(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


def submit(client: TestClient, key: dict[str, str] | None, name: str = "auth") -> Any:
    return client.post("/v1/jobs", json={**SPEC, "name": name}, headers=auth(key) if key else {})


def test_without_keys_the_embedded_service_is_open_and_says_so_loudly(backend, secured, caplog):
    with caplog.at_level(logging.WARNING, logger="service.main"):
        client = secured()
    assert submit(client, None).status_code == 202
    assert any("API KEYS ARE OFF" in r.getMessage() for r in caplog.records)


def test_once_a_key_exists_every_v1_route_needs_one(secured, caplog):
    client = secured()
    job_id = submit(client, None).json()["id"]  # before any key: owned by nobody
    alice = new_key(client, "alice")
    routes = [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/trials"),
        ("GET", f"/v1/jobs/{job_id}/trials/0"),
        ("GET", f"/v1/jobs/{job_id}/best-model"),
        ("GET", "/v1/jobs/job-000000000000"),  # a 401, not a 404: existence is not revealed
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer esgd_not-a-key"}, {"Authorization": "Basic !!"}):
            response = client.request(method, path, headers=headers, json=SPEC if method == "POST" else None)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/v1/jobs", headers=auth(alice)).status_code == 200
    for path in ("/healthz", "/metrics", "/openapi.json"):  # operations stay open (no job data in them)
        assert client.get(path).status_code == 200, path


def test_keys_required_by_settings_with_none_configured(secured):
    client = secured(require_api_keys=True)
    response = client.get("/v1/jobs")
    assert response.status_code == 401 and "API key is required" in response.json()["detail"]


def test_a_key_sees_only_its_own_jobs_and_an_admin_sees_all(secured):
    client = secured()
    alice, bob, admin = new_key(client, "alice"), new_key(client, "bob"), new_key(client, "ops", admin=True)
    alices = submit(client, alice, "alices").json()
    assert submit(client, bob, "bobs").status_code == 202
    assert [j["name"] for j in client.get("/v1/jobs", headers=auth(alice)).json()["items"]] == ["alices"]
    assert [j["name"] for j in client.get("/v1/jobs", headers=auth(bob)).json()["items"]] == ["bobs"]
    assert {j["name"] for j in client.get("/v1/jobs", headers=auth(admin)).json()["items"]} == {
        "alices",
        "bobs",
    }
    for method, path in (
        ("GET", f"/v1/jobs/{alices['id']}"),
        ("GET", f"/v1/jobs/{alices['id']}/trials"),
        ("GET", f"/v1/jobs/{alices['id']}/best-model"),
        ("POST", f"/v1/jobs/{alices['id']}/cancel"),
    ):
        response = client.request(method, path, headers=auth(bob))
        assert response.status_code == 403, (method, path, response.text)
        assert "another API key" in response.json()["detail"]
    assert client.get(f"/v1/jobs/{alices['id']}", headers=auth(admin)).status_code == 200
    assert client.post(f"/v1/jobs/{alices['id']}/cancel", headers=auth(alice)).json()["state"] == "CANCELLED"


def test_a_page_token_is_bound_to_the_key_that_listed(secured):
    client = secured()
    alice, bob = new_key(client, "alice"), new_key(client, "bob")
    for name in ("a1", "a2"):
        submit(client, alice, name)
    token = client.get("/v1/jobs", params={"page_size": 1}, headers=auth(alice)).json()["next_page_token"]
    assert token
    response = client.get("/v1/jobs", params={"page_token": token}, headers=auth(bob))
    assert response.status_code == 400 and response.json()["errors"][0]["loc"] == ["query", "page_token"]


def test_keys_are_stored_hashed_and_a_revoked_key_is_refused_at_once(backend, secured):
    client = secured()
    alice = new_key(client, "alice")
    secret = alice["Authorization"].removeprefix("Bearer ")
    assert secret.startswith("esgd_") and len(secret) >= 40
    with client.app.state.db.session() as session:  # type: ignore[attr-defined]
        rows = session.execute(text("SELECT * FROM api_keys")).all()
        assert secret not in repr(rows)  # only its SHA-256 is kept
        assert submit(client, alice).status_code == 202
        revoked = keys.revoke_key(session, alice["id"])
        assert revoked.revoked_at is not None
        assert keys.revoke_key(session, alice["id"]).revoked_at == revoked.revoked_at
    response = client.get("/v1/jobs", headers=auth(alice))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_the_dashboard_needs_an_admin_key_as_bearer_or_as_basic_password(secured):
    client = secured()
    user, admin = new_key(client, "user"), new_key(client, "ops", admin=True)
    page = "/dashboard/api/studies"
    response = client.get(page)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert client.get(page, headers=auth(user)).status_code == 403
    assert client.get(page, headers={"Authorization": "Bearer esgd_unknown"}).status_code == 401
    assert client.get(page, headers=auth(admin)).status_code == 200
    secret = admin["Authorization"].removeprefix("Bearer ")
    basic = base64.b64encode(f"anyone:{secret}".encode()).decode()
    assert client.get("/dashboard/", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_the_dashboard_is_open_while_keys_are_off(secured):
    assert secured().get("/dashboard/api/studies").status_code == 200


def test_a_key_may_have_only_so_many_unfinished_jobs_at_once(secured):
    client = secured(max_active_jobs_per_key=2)
    alice, admin = new_key(client, "alice"), new_key(client, "ops", admin=True)
    first, _second = (submit(client, alice, f"j{i}").json() for i in range(2))
    response = submit(client, alice, "j2")
    assert response.status_code == 429, response.text
    assert "ESGD_MAX_ACTIVE_JOBS_PER_KEY" in response.json()["detail"]
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(alice)).status_code == 202
    assert submit(client, alice, "j3").status_code == 202  # a finished job frees its place
    assert all(submit(client, admin, f"ops{i}").status_code == 202 for i in range(3))  # admins: no limit


@pytest.mark.parametrize(
    ("overrides", "spec", "loc", "setting"),
    [
        (
            {"max_trials_per_job": 5},
            {"budget": {"trials": 6}},
            ["budget", "trials"],
            "ESGD_MAX_TRIALS_PER_JOB",
        ),
        ({"max_parallelism": 2}, {"parallelism": 3}, ["parallelism"], "ESGD_MAX_PARALLELISM"),
        (
            {"max_search_dimensions": 1},
            {
                "search_space": {
                    "lr": {"type": "float", "low": 0.1, "high": 1},
                    "momentum": {"type": "float", "low": 0, "high": 0.9},
                    "alpha": 0.5,
                }
            },
            ["search_space"],
            "ESGD_MAX_SEARCH_DIMENSIONS",
        ),
    ],
)
def test_a_job_over_a_deployment_limit_is_refused_naming_the_field_and_setting(
    secured, overrides, spec, loc, setting
):
    client = secured(**overrides)
    response = client.post("/v1/jobs", json={**SPEC, **spec})
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == loc and setting in error["msg"]
    with client.app.state.db.session() as session:  # type: ignore[attr-defined]
        assert session.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    assert client.app.state.optuna.get().get_all_studies() == []  # type: ignore[attr-defined]


def test_keys_are_required_by_default_except_on_the_embedded_sqlite(tmp_path):
    assert Settings(data_dir=tmp_path).keys_required_by_settings() is False
    production = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://db/esgd")
    assert production.keys_required_by_settings() is True
    assert production.model_copy(update={"require_api_keys": False}).keys_required_by_settings() is False


def test_the_cli_creates_lists_and_revokes_keys_showing_the_secret_once(tmp_path):
    env = {"ESGD_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}

    def esgd(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "service.cli", "keys", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=False)

    created = esgd("create", "alice", "--admin")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    key_id = created.stdout.split("key ")[1].split()[0]
    assert secret.startswith("esgd_") and key_id.startswith("key-")
    listed = esgd("list")
    assert key_id in listed.stdout and "admin" in listed.stdout and secret not in listed.stdout
    assert esgd("revoke", key_id).returncode == 0
    assert "revoked" in esgd("revoke", key_id).stdout
    assert esgd("revoke", "key-nope").returncode == 1
    from service.db import Database

    database = Database(f"sqlite:///{tmp_path}/service.db")
    with database.session() as session:
        [row] = session.scalars(select(ApiKey)).all()
        assert row.revoked_at is not None and row.admin
    database.dispose()
