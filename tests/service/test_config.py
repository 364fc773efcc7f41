"""Settings: defaults under one data folder, ESGD_* variables, RAY_ADDRESS, and databases kept apart."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in (
        "ESGD_DATA_DIR",
        "ESGD_DATABASE_URL",
        "ESGD_OPTUNA_STORAGE_URL",
        "ESGD_RAY_ADDRESS",
        "RAY_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_embedded_defaults_live_under_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == tmp_path / ".esgd"  # absolute: drivers run in other working directories
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path}/.esgd/service.db"
    assert settings.resolved_optuna_storage_url() == f"sqlite:///{tmp_path}/.esgd/optuna.db"
    assert settings.artifacts_dir == tmp_path / ".esgd" / "artifacts"
    assert (settings.max_running_jobs, settings.max_body_bytes, settings.max_driver_restarts) == (
        2,
        1_048_576,
        1,
    )
    assert settings.ray_address is None


def test_environment_variables_use_the_esgd_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("ESGD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ESGD_DATABASE_URL", "postgresql+psycopg://db/service")
    monkeypatch.setenv("ESGD_MAX_RUNNING_JOBS", "5")
    settings = Settings()
    assert settings.data_dir == tmp_path and settings.max_running_jobs == 5
    assert settings.resolved_database_url() == "postgresql+psycopg://db/service"
    assert settings.resolved_optuna_storage_url() == f"sqlite:///{tmp_path}/optuna.db"


@pytest.mark.parametrize("variable", ["RAY_ADDRESS", "ESGD_RAY_ADDRESS"])
def test_ray_address_comes_from_either_variable(monkeypatch, variable):
    monkeypatch.setenv(variable, "ray://head:10001")
    assert Settings().ray_address == "ray://head:10001"
    assert Settings(ray_address="auto").ray_address == "auto"


def test_the_two_databases_must_differ():
    with pytest.raises(ValidationError, match="different databases"):
        Settings(database_url="sqlite:///one.db", optuna_storage_url="sqlite:///one.db")


def test_get_settings_is_cached():
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    get_settings.cache_clear()
