"""The service's settings: one pydantic-settings class, read from ``ESGD_*`` environment variables.

Embedded defaults keep everything under ``data_dir`` (two SQLite files); production sets the two database
URLs to PostgreSQL and ``RAY_ADDRESS`` to the cluster. Optuna's tables always live apart from the service's
(another file or database): Optuna's table names are generic and it keeps its own Alembic version table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import make_url


class Settings(BaseSettings):
    """Everything the API process and its background tasks are configured with."""

    model_config = SettingsConfigDict(
        env_prefix="ESGD_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    data_dir: Path = Path(".esgd")
    database_url: str | None = None
    """The service's own tables; default ``sqlite:///{data_dir}/service.db``."""
    optuna_storage_url: str | None = None
    """Optuna's tables; default ``sqlite:///{data_dir}/optuna.db``; never the service's database."""
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("ESGD_RAY_ADDRESS", "RAY_ADDRESS")
    )
    max_running_jobs: int = Field(default=2, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    max_driver_restarts: int = Field(default=1, ge=0)
    reconcile_interval_s: float = Field(default=1.0, gt=0)
    driver_python: str | None = None
    """The Python that runs job drivers on the Ray nodes; default: the API's own interpreter."""

    require_api_keys: bool | None = None
    """True: every ``/v1`` route and the dashboard need a key. None (default): required unless the service
    database is the embedded SQLite. Either way, keys are required as soon as one exists."""
    orphan_study_grace_s: float = Field(default=60.0, gt=0)
    """A study this old whose job was never stored (its submission died half-way) is deleted."""
    max_active_jobs_per_key: int = Field(default=8, ge=1)
    """Jobs a (non-admin) key may have QUEUED, RUNNING or CANCELLING at once; more is a 429."""
    max_trials_per_job: int = Field(default=10_000, ge=1)
    max_parallelism: int = Field(default=64, ge=1)
    max_search_dimensions: int = Field(default=16, ge=1)
    """Searched knobs per job (fixed knobs do not count)."""

    @property
    def artifacts_dir(self) -> Path:
        """Where drivers leave each job's files (``{artifacts_dir}/{job_id}/best-model.pt``)."""
        return self.data_dir / "artifacts"

    def resolved_database_url(self) -> str:
        """The service database URL, defaulting to a SQLite file under ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir}/service.db"

    def resolved_optuna_storage_url(self) -> str:
        """The Optuna storage URL, defaulting to its own SQLite file under ``data_dir``."""
        return self.optuna_storage_url or f"sqlite:///{self.data_dir}/optuna.db"

    def keys_required_by_settings(self) -> bool:
        if self.require_api_keys is not None:
            return self.require_api_keys
        return make_url(self.resolved_database_url()).get_backend_name() != "sqlite"

    @model_validator(mode="after")
    def _absolute_and_apart(self) -> Settings:
        # Absolute, so a job driver started by Ray in another working directory finds the same files.
        self.data_dir = self.data_dir.expanduser().absolute()
        if self.resolved_database_url() == self.resolved_optuna_storage_url():
            raise ValueError("database_url and optuna_storage_url must name different databases")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (a FastAPI dependency too)."""
    return Settings()
