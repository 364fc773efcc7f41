"""From a job's search space (plain JSON, validated by the service) to Optuna distributions and back."""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


def split_space(space: dict[str, Any]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """Separate the searched knobs (as Optuna distributions) from the fixed ones (plain values)."""
    searched: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for knob, spec in space.items():
        if not isinstance(spec, dict):
            fixed[knob] = spec
        elif spec["type"] == "float":
            searched[knob] = FloatDistribution(
                spec["low"], spec["high"], log=spec["log"], step=spec.get("step")
            )
        elif spec["type"] == "int":
            searched[knob] = IntDistribution(
                spec["low"], spec["high"], log=spec["log"], step=spec.get("step", 1)
            )
        else:
            searched[knob] = CategoricalDistribution(spec["choices"])
    return searched, fixed


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value of every searched knob, for Optuna's GridSampler (the service checked each is finite)."""
    values: dict[str, list[Any]] = {}
    for knob, spec in space.items():
        if not isinstance(spec, dict):
            continue
        if spec["type"] == "categorical":
            values[knob] = list(spec["choices"])
        else:
            step = spec.get("step") or 1
            count = round((spec["high"] - spec["low"]) / step) + 1
            values[knob] = [spec["low"] + i * step for i in range(count)]
            if spec["type"] == "int":
                values[knob] = [int(v) for v in values[knob]]
    return values
