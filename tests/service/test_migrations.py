"""Both schemas move forward with their data: the service's from the previous release (revision 0001) and the
study database from an older Optuna release's schema, with Optuna's own migrations; on both backends."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from service.config import Settings
from service.db import migrate
from service.main import create_app
from service.schemas import JobCreate
from service.studies import close_storage, open_storage
from tests.conftest import fresh_databases

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

OLDER_OPTUNA_SCHEMA = "v3.0.0.d"  # Optuna 3.0/3.1; 3.2 added an index on trials.study_id


def optuna_alembic_config(url: str) -> Config:
    """Optuna's migrations, configured as its RDBStorage configures them for itself."""
    folder = Path(optuna.storages.__file__).parent / "_rdb"
    config = Config(str(folder / "alembic.ini"))
    config.set_main_option("script_location", str(folder / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_urls(request, tmp_path) -> Iterator[dict[str, str]]:
    """Two empty databases (service, optuna) that no app has touched yet."""
    if request.param == "sqlite":
        yield {"service": f"sqlite:///{tmp_path}/service.db", "optuna": f"sqlite:///{tmp_path}/optuna.db"}
        return
    with fresh_databases(request.getfixturevalue("postgres").admin_url, "service", "optuna") as urls:
        yield urls


def test_the_service_schema_upgrades_from_the_previous_release_with_its_jobs(empty_urls, tmp_path):
    url = empty_urls["service"]
    migrate(url, "0001")  # the previous release's schema
    spec = JobCreate(name="old", dataset="synthetic", model={"name": "mlp"}).model_dump(mode="json")
    engine = create_engine(url)
    with engine.begin() as connection:
        assert "api_keys" not in inspect(connection).get_table_names()
        connection.execute(
            text(
                "INSERT INTO jobs (id, name, spec, state, created_at, study_name, driver_attempts, progress)"
                " VALUES ('job-0123456789ab', 'old', :spec, 'SUCCEEDED', '2026-11-01 12:00:00+00:00',"
                " 'job-0123456789ab/old', 1, :progress)"
            ),
            {"spec": JobCreate.model_validate(spec).model_dump_json(), "progress": '{"trials_planned": 16}'},
        )
        connection.execute(
            text(
                "INSERT INTO job_events (job_id, at, from_state, to_state)"
                " VALUES ('job-0123456789ab', '2026-11-01 12:00:00+00:00', NULL, 'QUEUED')"
            )
        )
    migrate(url)
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        assert {"jobs", "job_events", "api_keys"} <= tables
        assert "ix_jobs_owner" in {index["name"] for index in inspect(connection).get_indexes("jobs")}
        assert connection.execute(text("SELECT count(*) FROM job_events")).scalar() == 1
    engine.dispose()
    settings = Settings(
        data_dir=tmp_path, database_url=url, optuna_storage_url=empty_urls["optuna"], require_api_keys=False
    )
    with TestClient(create_app(settings)) as client:
        job = client.get("/v1/jobs/job-0123456789ab").json()
    assert (job["name"], job["state"], job["spec"]) == ("old", "SUCCEEDED", spec)
    assert job["created_at"].startswith("2026-11-01T12:00:00")


def test_the_study_database_upgrades_from_an_older_optuna_schema_with_its_trials(empty_urls, tmp_path):
    url = empty_urls["optuna"]
    # The older schema, built by Optuna's own migrations up to that revision; then studied in.
    command.upgrade(optuna_alembic_config(url), OLDER_OPTUNA_SCHEMA)
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    assert storage.get_current_version() == OLDER_OPTUNA_SCHEMA
    study = optuna.create_study(storage=storage, study_name="old-study", direction="maximize")
    for x in (0.2, 0.9, 0.5):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(x / 2, step=1)
        study.tell(trial, x)
    close_storage(storage)
    with pytest.raises(RuntimeError, match="no longer compatible"):
        open_storage(url)  # this Optuna refuses the old schema until it is migrated

    env = {
        "ESGD_DATA_DIR": str(tmp_path),
        "ESGD_DATABASE_URL": empty_urls["service"],
        "ESGD_OPTUNA_STORAGE_URL": url,
    }
    migrated = subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    storage = open_storage(url)
    try:
        assert storage.get_current_version() == storage.get_head_version() in migrated.stdout
        old = optuna.load_study(study_name="old-study", storage=storage)
        assert [t.value for t in old.trials] == [0.2, 0.9, 0.5]
        assert [t.intermediate_values for t in old.trials] == [{1: 0.1}, {1: 0.45}, {1: 0.25}]
        assert old.best_trial.number == 1
    finally:
        close_storage(storage)
