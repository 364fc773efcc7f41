"""The optimizers a trial can use, by name: Entropy-SGD and the baselines it is compared against."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimizer import EntropySGD


@dataclass(frozen=True)
class OptimizerKind:
    """An optimizer family: its knobs (name → type, None allowed where the type is a tuple with NoneType)."""

    name: str
    knobs: Mapping[str, type | tuple[type, ...]]
    build: Callable[[Iterable[Tensor], dict[str, Any], int], torch.optim.Optimizer]


def _entropy_sgd(params: Iterable[Tensor], knobs: dict[str, Any], seed: int) -> torch.optim.Optimizer:
    return EntropySGD(params, seed=seed, **knobs)


def _sgd(params: Iterable[Tensor], knobs: dict[str, Any], seed: int) -> torch.optim.Optimizer:
    settings = {"lr": 0.1, "momentum": 0.9, "nesterov": True, **knobs}
    return torch.optim.SGD(params, **settings)


def _adam(params: Iterable[Tensor], knobs: dict[str, Any], seed: int) -> torch.optim.Optimizer:
    settings = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, **knobs}
    betas = (settings.pop("beta1"), settings.pop("beta2"))
    return torch.optim.Adam(params, betas=betas, **settings)


_OPTIONAL_FLOAT = (float, type(None))
OPTIMIZERS: dict[str, OptimizerKind] = {
    kind.name: kind
    for kind in (
        OptimizerKind(
            "entropy_sgd",
            {
                "lr": float,
                "langevin_steps": int,
                "gamma_0": float,
                "gamma_1": float,
                "gamma_max": _OPTIONAL_FLOAT,
                "eta_prime": float,
                "epsilon": float,
                "alpha": float,
                "momentum": float,
                "dampening": float,
                "nesterov": bool,
                "inner_momentum": _OPTIONAL_FLOAT,
                "weight_decay": float,
                "scale_outer_by_gamma": bool,
            },
            _entropy_sgd,
        ),
        OptimizerKind(
            "sgd",
            {"lr": float, "momentum": float, "dampening": float, "nesterov": bool, "weight_decay": float},
            _sgd,
        ),
        OptimizerKind(
            "adam",
            {"lr": float, "beta1": float, "beta2": float, "eps": float, "weight_decay": float},
            _adam,
        ),
    )
}


def optimizer_kind(name: str) -> OptimizerKind:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def check_knobs(name: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and types of an optimizer's knobs; ints are accepted where floats are expected."""
    kind = optimizer_kind(name)
    checked = {}
    for knob, value in knobs.items():
        if knob not in kind.knobs:
            valid = ", ".join(kind.knobs)
            raise ValueError(f"unknown knob {knob!r} for optimizer {name!r}; valid knobs: {valid}")
        expected = kind.knobs[knob]
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"knob {knob!r} of optimizer {name!r} must be {names}, got {value!r}")
        checked[knob] = value
    return checked


def build_optimizer(name: str, params: Iterable[Tensor], knobs: Mapping[str, Any], seed: int = 0):
    """Build optimizer ``name`` over ``params``; invalid values raise ValueError naming the knob."""
    return optimizer_kind(name).build(params, check_knobs(name, knobs), seed)
