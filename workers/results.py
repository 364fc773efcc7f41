"""What a trial reports: per-epoch metrics and its final result (the only wire format to the driver)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TrialStatus = Literal["completed", "stopped", "diverged"]


@dataclass(frozen=True)
class EpochMetrics:
    """Metrics after one epoch of gradient work (len(train) / batch_size gradient evaluations)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    gradient_evaluations: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return {key: finite_or_none(value) for key, value in asdict(self).items()}


@dataclass
class TrialResult:
    """How a training run ended, its learning curve, final metrics and trained weights.

    ``status`` is ``completed`` (budget spent), ``stopped`` (the reporting callback asked to stop, e.g. a
    pruner or a cancellation) or ``diverged`` (a non-finite loss; ``reason`` says where). Test metrics are
    measured once at the end and never used for selection; they are None when the run diverged.
    """

    status: TrialStatus
    history: list[EpochMetrics]
    gradient_evaluations: int
    wall_time: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    reason: str | None = None
    first_step_at: float | None = None  # Unix times of the first and last optimizer steps, to measure
    last_step_at: float | None = None  # the service's overhead around training
    state_dict: dict[str, Any] | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, Any]:
        """The result without the weights, JSON-safe (non-finite numbers become None)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "gradient_evaluations": self.gradient_evaluations,
            "wall_time": self.wall_time,
            "val_loss": finite_or_none(self.val_loss),
            "val_accuracy": finite_or_none(self.val_accuracy),
            "test_loss": finite_or_none(self.test_loss),
            "test_accuracy": finite_or_none(self.test_accuracy),
            "history": [epoch.to_dict() for epoch in self.history],
        }


def finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
