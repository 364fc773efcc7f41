"""This deployment's limits on a job's size, each a setting: checked before anything is stored (a 422 that
names the field and the setting)."""

from __future__ import annotations

from pydantic import BaseModel

from service.config import Settings
from service.jobs import SpecCheck, SpecRejected
from service.schemas import JobCreate


def spec_limits(settings: Settings) -> SpecCheck:
    """A spec check refusing jobs larger than ``settings`` allow."""

    def check(spec: JobCreate) -> None:
        errors = []
        dimensions = sum(isinstance(knob, BaseModel) for knob in (spec.search_space or {}).values())
        for loc, value, limit, setting in (
            (["budget", "trials"], spec.budget.trials, settings.max_trials_per_job, "MAX_TRIALS_PER_JOB"),
            (["parallelism"], spec.parallelism, settings.max_parallelism, "MAX_PARALLELISM"),
            (["search_space"], dimensions, settings.max_search_dimensions, "MAX_SEARCH_DIMENSIONS"),
        ):
            if value > limit:
                what = f"{value} searched knobs" if loc == ["search_space"] else str(value)
                errors.append((loc, f"{what} is over this service's limit of {limit} (ESGD_{setting})"))
        if errors:
            raise SpecRejected(*errors)

    return check
