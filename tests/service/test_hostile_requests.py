"""A corpus of malformed and hostile requests (``hostile_requests.json``) against a real API process on each
backend: each gets its 4xx as a problem detail naming the field, the server stays up, and nothing is stored.

Each entry is one request as it goes on the wire: ``method``, ``path`` (sent as written, percent-escapes and
all), ``headers``, and a body given as ``body`` (text; ``encoding`` if not UTF-8) or ``body_parts`` (pieces
repeated ``count`` times: deep nesting, long names, large bodies). ``status`` is the answer it must get and
``loc``, where given, a field error's location that the problem must name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_databases
from tests.e2e.conftest import Server

CORPUS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "hostile_requests.json").read_text())
PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance"}


def body_of(entry: dict[str, Any]) -> bytes | None:
    if "body_parts" in entry:
        return "".join(piece * count for piece, count in entry["body_parts"]).encode()
    if "body" in entry:
        return entry["body"].encode(entry.get("encoding", "utf-8"))
    return None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory) -> Iterator[Server]:
    """The API alone (no Ray: what is accepted stays QUEUED) in its own process, keys off."""
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    env = {**os.environ, "ESGD_DATA_DIR": str(tmp / "data"), "ESGD_REQUIRE_API_KEYS": "false"}
    env.pop("RAY_ADDRESS", None)
    with ExitStack() as cleanup:
        if request.param == "postgresql":
            admin_url = request.getfixturevalue("postgres").admin_url
            urls = cleanup.enter_context(fresh_databases(admin_url, "service", "optuna"))
            env["ESGD_DATABASE_URL"], env["ESGD_OPTUNA_STORAGE_URL"] = urls["service"], urls["optuna"]
        server = Server(env, tmp / "api.log", factory="service.main:create_app")
        cleanup.callback(server.stop)
        server.start()
        yield server


def test_the_corpus_is_large_and_each_entry_is_distinct():
    assert len(CORPUS) >= 60
    assert len({entry["id"] for entry in CORPUS}) == len(CORPUS)
    assert all(400 <= entry["status"] < 500 for entry in CORPUS)


@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_a_hostile_request_gets_its_4xx_problem_and_the_server_stays_up(api, entry):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        request = client.build_request(
            entry["method"], entry["path"], content=body_of(entry), headers=entry.get("headers", {})
        )
        request.url = request.url.copy_with(raw_path=entry["path"].encode())  # no normalising of ../ or %2F
        response = client.send(request)

        assert response.status_code == entry["status"], response.text[:500]
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert set(problem) >= PROBLEM_FIELDS and problem["status"] == entry["status"]
        if "loc" in entry:
            locs = [error["loc"] for error in problem["errors"]]
            assert entry["loc"] in locs, locs
        assert api.process is not None and api.process.poll() is None, "the API died"
        assert client.get("/healthz").status_code == 200


def test_nothing_hostile_was_stored(api):
    """Runs after the corpus (file order): every request was refused, so there is no job."""
    with httpx.Client(base_url=api.url, timeout=30) as client:
        jobs = client.get("/v1/jobs").json()
    assert jobs["items"] == []
    assert "Traceback" not in api.log.read_text()
