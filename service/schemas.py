"""The job spec users submit and the shapes the API returns (Create / Public / page families).

Everything a job needs is validated here, before anything is stored: names are checked against the
registries (listing the valid choices), ranges against each other, and no number may be NaN or infinite.
The registries of datasets, models and optimizer knobs live in ``workers`` (which imports torch); their names
are repeated here so the API process stays light, and a test keeps the two in step.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

# ------------------------------------------------------------------ registries (mirrored from workers)
DATASET_INPUTS: dict[str, str] = {
    "mnist1d": "vector",
    "digits": "image",
    "mnist5k": "image",
    "synthetic": "vector",
}
MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "mlp": ("vector", "image"),
    "cnn1d": ("vector",),
    "lenet": ("image",),
}
WIDTHS = ("small", "medium", "large")

Scalar = bool | int | float | str | None

OPTIMIZER_KNOBS: dict[str, dict[str, str]] = {
    # knob → kind: "float", "int", "bool", "float?" (a float or null)
    "entropy_sgd": {
        "lr": "float",
        "langevin_steps": "int",
        "gamma_0": "float",
        "gamma_1": "float",
        "gamma_max": "float?",
        "eta_prime": "float",
        "epsilon": "float",
        "alpha": "float",
        "momentum": "float",
        "dampening": "float",
        "nesterov": "bool",
        "inner_momentum": "float?",
        "weight_decay": "float",
        "scale_outer_by_gamma": "bool",
    },
    "sgd": {
        "lr": "float",
        "momentum": "float",
        "dampening": "float",
        "nesterov": "bool",
        "weight_decay": "float",
    },
    "adam": {"lr": "float", "beta1": "float", "beta2": "float", "eps": "float", "weight_decay": "float"},
}


class _Strict(BaseModel):
    """Unknown fields, non-finite numbers and values of the wrong JSON type are errors everywhere in input.

    Strict: ``"5"`` is not an integer, ``1`` is not ``true`` and ``"0.1"`` is not a number, as the published
    schema says (integers are still accepted where a number is asked for).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# ----------------------------------------------------------------------------- search space
class FloatRange(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log (Optuna samples log ranges continuously)")
        return self


class IntRange(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step must be 1 when log is true")
        return self


class Categorical(_Strict):
    type: Literal["categorical"]
    choices: Annotated[list[Scalar], Field(min_length=1, max_length=100)]

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Scalar]) -> list[Scalar]:
        if len({(type(c), c) for c in choices}) != len(choices):
            raise ValueError("choices must be distinct")
        return choices


Distribution = Annotated[FloatRange | IntRange | Categorical, Field(discriminator="type")]


def _knob_spec_kind(value: Any) -> str:
    return "distribution" if isinstance(value, dict | BaseModel) else "value"


KnobSpec = Annotated[
    Annotated[Distribution, Tag("distribution")] | Annotated[bool | int | float | None, Tag("value")],
    Discriminator(_knob_spec_kind),
]
"""A distribution to search, or a plain value that fixes the knob."""


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got low = {low}")


# Documented defaults: a job without a search space searches all of these (see README, "The search space").
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 0.05, "high": 2.0, "log": True},
    "langevin_steps": {"type": "int", "low": 1, "high": 20, "log": True},
    "gamma_0": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "gamma_1": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "eta_prime": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "epsilon": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "alpha": {"type": "float", "low": 0.1, "high": 1.0},
    "momentum": {"type": "float", "low": 0.5, "high": 0.95},
    "nesterov": {"type": "categorical", "choices": [True, False]},
    "inner_momentum": None,  # null: the inner loop uses `momentum` too
}
BASELINE_SEARCH_SPACES: dict[str, dict[str, Any]] = {
    "sgd": {
        "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "momentum": 0.9,
        "nesterov": True,
    },
    "adam": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
}


# ----------------------------------------------------------------------------- the job spec
class ModelSpec(_Strict):
    name: Literal["mlp", "cnn1d", "lenet"] = "cnn1d"
    width: Literal["small", "medium", "large"] = "small"
    batchnorm: bool = False
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


Metric = Literal["val_accuracy", "val_loss", "train_loss", "wall_time"]
_DEFAULT_DIRECTION = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "train_loss": "minimize",
    "wall_time": "minimize",
}


class Objective(_Strict):
    """What to optimise: validation metrics (the test split is never used for selection)."""

    metric: Metric = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _default_direction(self) -> Objective:
        if self.direction is None:
            self.direction = _DEFAULT_DIRECTION[self.metric]  # type: ignore[assignment]
        return self


class Budget(_Strict):
    trials: Annotated[int, Field(ge=1, le=10_000)] = 16
    epochs_per_trial: Annotated[int, Field(ge=1, le=10_000)] | None = None
    gradient_evaluations_per_trial: Annotated[int, Field(ge=1, le=100_000_000)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 128
    wall_clock_limit_s: Annotated[float, Field(gt=0)] | None = None
    max_retries_per_trial: Annotated[int, Field(ge=0, le=10)] = 2

    @model_validator(mode="after")
    def _one_length(self) -> Budget:
        if self.epochs_per_trial is not None and self.gradient_evaluations_per_trial is not None:
            raise ValueError("give epochs_per_trial or gradient_evaluations_per_trial, not both")
        if self.epochs_per_trial is None and self.gradient_evaluations_per_trial is None:
            self.epochs_per_trial = 10
        return self


class Sampler(_Strict):
    name: Literal["tpe", "random", "cmaes", "gp", "grid", "nsga2"] = "tpe"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    """The samplers' seed (default: the job's); numpy, which they seed, takes 0 to 2**32 - 1."""
    n_startup_trials: Annotated[int, Field(ge=0, le=1000)] = 5


class Pruner(_Strict):
    name: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "median"
    n_startup_trials: Annotated[int, Field(ge=0, le=1000)] = 4
    n_warmup_steps: Annotated[int, Field(ge=0, le=10_000)] = 2
    percentile: Annotated[float, Field(gt=0, lt=100)] = 50.0
    min_resource: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[int, Field(ge=2, le=100)] = 3


class Resources(_Strict):
    """Per trial: Ray's num_cpus and num_gpus (fractions allowed, so trials can share a GPU)."""

    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus: Annotated[float, Field(ge=0, le=64)] = 0.0

    @field_validator("gpus")
    @classmethod
    def _whole_or_fraction(cls, gpus: float) -> float:
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError("more than one GPU per trial must be a whole number")
        return gpus


class JobCreate(_Strict):
    """A search job: one Optuna study over an optimizer's knobs on one dataset and model."""

    # Defaults go through the cross-field checks too: ``{"dataset": "digits"}`` with the default model (the
    # 1-D CNN) is refused, not stored as a job that cannot run.
    model_config = ConfigDict(**_Strict.model_config, validate_default=True)

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\w][\w .:@+=-]*$")]
    dataset: Literal["mnist1d", "digits", "mnist5k", "synthetic"] = "mnist1d"
    model: ModelSpec = ModelSpec()
    optimizer: Literal["entropy_sgd", "sgd", "adam"] = "entropy_sgd"
    objectives: Annotated[list[Objective], Field(min_length=1, max_length=3)] = [Objective()]
    budget: Budget = Budget()
    search_space: Annotated[dict[str, KnobSpec], Field(max_length=32)] | None = None
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    parallelism: Annotated[int, Field(ge=1, le=1024)] = 1
    resources: Resources = Resources()
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    baselines: Annotated[list[Literal["sgd", "adam"]], Field(max_length=2)] = []

    @model_validator(mode="before")
    @classmethod
    def _default_search_space(cls, data: Any) -> Any:
        """Store the documented default space explicitly, so a job shows what it searched."""
        if isinstance(data, dict) and data.get("search_space") is None:
            defaults = {"entropy_sgd": DEFAULT_SEARCH_SPACE, **BASELINE_SEARCH_SPACES}
            optimizer = data.get("optimizer", "entropy_sgd")
            if isinstance(optimizer, str) and optimizer in defaults:  # else the optimizer field reports it
                data = {**data, "search_space": defaults[optimizer]}
        return data

    @field_validator("model")
    @classmethod
    def _model_fits_dataset(cls, model: ModelSpec, info: ValidationInfo) -> ModelSpec:
        dataset = info.data.get("dataset")
        if dataset is not None and DATASET_INPUTS[dataset] not in MODEL_INPUTS[model.name]:
            kind = DATASET_INPUTS[dataset]
            fits = [m for m, kinds in MODEL_INPUTS.items() if kind in kinds]
            raise ValueError(
                f"model {model.name!r} does not fit dataset {dataset!r} ({kind} inputs); use one of {fits}"
            )
        return model

    @field_validator("search_space")
    @classmethod
    def _known_knobs(
        cls, space: dict[str, KnobSpec] | None, info: ValidationInfo
    ) -> dict[str, KnobSpec] | None:
        optimizer = info.data.get("optimizer")
        if space is not None and optimizer is not None:
            for knob, spec in space.items():
                check_knob(optimizer, knob, spec)
        return space

    @field_validator("sampler")
    @classmethod
    def _sampler_fits(cls, sampler: Sampler, info: ValidationInfo) -> Sampler:
        objectives = info.data.get("objectives") or []
        if len(objectives) > 1 and sampler.name not in ("nsga2", "random", "tpe"):
            raise ValueError(f"sampler {sampler.name!r} is single-objective; use nsga2, tpe or random")
        if len(objectives) == 1 and sampler.name == "nsga2":
            raise ValueError("sampler 'nsga2' is for several objectives; give two or more")
        if sampler.name == "grid" and "optimizer" in info.data:
            space = info.data.get("search_space")
            space = _as_plain(space or {})
            for knob, spec in space.items():
                if isinstance(spec, dict) and spec["type"] == "float" and spec.get("step") is None:
                    raise ValueError(
                        f"grid sampling needs a step or choices for every searched knob ({knob!r})"
                    )
        return sampler

    @field_validator("pruner")
    @classmethod
    def _pruner_fits(cls, pruner: Pruner, info: ValidationInfo) -> Pruner:
        if len(info.data.get("objectives") or []) > 1 and pruner.name != "none":
            raise ValueError("pruning needs a single objective; set pruner.name to 'none'")
        return pruner

    def baseline(self, optimizer: str) -> JobCreate:
        """The search run alongside for a baseline: the same data, model, budget and settings, searching the
        baseline's documented default space (its learning rate) instead of Entropy-SGD's knobs."""
        spec = self.model_dump(mode="json", exclude={"search_space", "baselines"})
        return JobCreate.model_validate({**spec, "optimizer": optimizer})

    @field_validator("baselines")
    @classmethod
    def _baselines_fit(cls, baselines: list[str], info: ValidationInfo) -> list[str]:
        if len(set(baselines)) != len(baselines):
            raise ValueError("baselines must be distinct")
        sampler = info.data.get("sampler")
        if baselines and sampler is not None and sampler.name == "grid":
            raise ValueError(
                "a baseline searches a continuous learning rate, which a grid cannot; use another sampler"
            )
        return baselines


def _as_plain(space: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in space.items()}


# Valid values of each knob: (low, high, low included, high included). Checked on fixed values, choices and
# both ends of ranges, so a bad search space is a 422 now rather than failed trials later.
KNOB_BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, False, True),
    "langevin_steps": (0, 10_000, True, True),
    "gamma_0": (0.0, math.inf, True, True),
    "gamma_1": (0.0, math.inf, True, True),
    "gamma_max": (0.0, math.inf, False, True),
    "eta_prime": (0.0, math.inf, True, True),
    "epsilon": (0.0, math.inf, True, True),
    "alpha": (0.0, 1.0, False, True),
    "momentum": (0.0, 1.0, True, False),
    "inner_momentum": (0.0, 1.0, True, False),
    "dampening": (0.0, 1.0, True, True),
    "weight_decay": (0.0, math.inf, True, True),
    "beta1": (0.0, 1.0, True, False),
    "beta2": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, False, True),
}


def check_knob(optimizer: str, knob: str, spec: Any) -> None:
    """Raise ValueError unless ``spec`` (a range, choices or a fixed value) suits ``knob``."""
    knobs = OPTIMIZER_KNOBS[optimizer]
    if knob not in knobs:
        raise ValueError(
            f"unknown knob {knob!r} for optimizer {optimizer!r}; valid knobs: {', '.join(knobs)}"
        )
    kind = knobs[knob]
    if isinstance(spec, FloatRange | IntRange):
        if kind == "bool":
            raise ValueError(f"knob {knob!r} is true or false: fix it or give choices [true, false]")
        if kind == "int" and isinstance(spec, FloatRange):
            raise ValueError(f"knob {knob!r} takes integers: use an int range")
        values = [spec.low, spec.high]
    else:
        values = spec.choices if isinstance(spec, Categorical) else [spec]
    for value in values:
        if not _fits(value, kind):
            raise ValueError(f"knob {knob!r} takes {_kind_name(kind)}, got {value!r}")
        if value is not None and knob in KNOB_BOUNDS and not _within(value, *KNOB_BOUNDS[knob]):
            low, high, low_in, high_in = KNOB_BOUNDS[knob]
            interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ValueError(f"knob {knob!r} must lie in {interval}, got {value!r}")


def _within(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def _fits(value: Any, kind: str) -> bool:
    if value is None:
        return kind.endswith("?")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool | str):
        return False
    if kind == "int":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float) and _finite(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (10**400): no optimizer can take it
        return False


def _kind_name(kind: str) -> str:
    return {"float": "a number", "int": "an integer", "bool": "true or false", "float?": "a number or null"}[
        kind
    ]


# ----------------------------------------------------------------------------- responses
class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class BestTrial(BaseModel):
    number: int
    values: list[float | None]
    params: dict[str, Any]
    test_accuracy: float | None = None


class Progress(BaseModel):
    trials_planned: int
    trials_finished: int = 0
    """Of the planned trials, those done: complete, pruned or failed for good (never above planned)."""
    trials_running: int = 0
    trials_complete: int = 0
    trials_pruned: int = 0
    trials_failed: int = 0
    """Failed with no retry left (a diverged trial, or one whose retries ran out)."""
    trials_retried: int = 0
    """Attempts that failed because their worker or driver died, and were tried again."""
    gradient_evaluations: int = 0
    trial_seconds: float = 0.0
    """Wall-clock seconds of every finished attempt, start to finish, summed."""
    baselines: list[BaselineSummary] = []
    """Each baseline's search (their trials are not counted above)."""


class BaselineSummary(BaseModel):
    """A baseline optimizer's own search, with the job's budget, in the study ``study_name``."""

    optimizer: str
    study_name: str
    progress: Progress
    best_trial: BestTrial | None = None


class JobPublic(BaseModel):
    id: str
    name: str
    state: JobState
    spec: JobCreate
    progress: Progress
    best_trial: BestTrial | None = None
    failure_reason: str | None = None
    study_name: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobPage(BaseModel):
    items: list[JobPublic]
    next_page_token: str = ""


class EpochPublic(BaseModel):
    step: int
    value: float | None


class TrialPublic(BaseModel):
    number: int
    state: Literal["RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"]
    values: list[float | None] | None = None
    params: dict[str, Any]
    reason: str | None = None
    gradient_evaluations: int | None = None
    test_accuracy: float | None = None
    intermediate_values: list[EpochPublic] = []
    user_attrs: dict[str, Any] = {}
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TrialPage(BaseModel):
    items: list[TrialPublic]
    next_page_token: str = ""
