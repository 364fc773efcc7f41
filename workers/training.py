"""One trial: train a model with one set of hyperparameters, charged in gradient evaluations.

A plain function, usable without Ray, Optuna or a database. :func:`train` takes a :class:`TrialConfig`,
trains, evaluates on the validation split after every epoch, hands each epoch's metrics to a callback that
may stop the run, and returns a :class:`~workers.results.TrialResult` with test metrics and the weights.

Budgets count gradient evaluations (closure calls): an epoch is ``len(train) // batch_size`` of them, whatever
the optimizer, so Entropy-SGD with L Langevin steps takes an outer step every L evaluations and gets the
same compute as SGD or Adam. An Entropy-SGD step that would cross the end of the budget is shortened to the
evaluations left, so every optimizer spends exactly the budget. Epoch boundaries are otherwise not forced: an
epoch is reported at the first step that completes it, with the exact count spent.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from optimizer import EntropySGD, reestimate_batchnorm
from workers.datasets import Split, Splits, load_dataset
from workers.networks import build_model
from workers.optimizers import build_optimizer, check_knobs
from workers.results import EpochMetrics, TrialResult

Reporter = Callable[[EpochMetrics], bool | None]
"""Called after every epoch; returning True stops the run (pruning, cancellation)."""

_EVAL_BATCH = 1024


@dataclass(frozen=True)
class TrialConfig:
    """Everything that defines one training run. ``hyperparameters`` are the optimizer's knobs."""

    dataset: str = "mnist1d"
    model: str = "cnn1d"
    optimizer: str = "entropy_sgd"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    gradient_evaluations: int | None = None  # overrides epochs; the last epoch may then be partial
    batch_size: int = 128
    width: str = "small"
    batchnorm: bool = False
    dropout: float = 0.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_knobs(self.optimizer, self.hyperparameters)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name} value: {value!r} (must be an int >= 1)")
        budget = self.gradient_evaluations
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"Invalid gradient_evaluations value: {budget!r} (must be an int >= 1 or None)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Invalid dropout value: {self.dropout!r} (must be in [0, 1))")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA where there is none is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device value: {name!r} (no CUDA device is available here)")
    return device


def train(config: TrialConfig, report: Reporter | None = None, *, data: Splits | None = None) -> TrialResult:
    """Run one trial. A non-finite loss ends it with status ``diverged`` and a reason; it never raises."""
    stop = threading.Event()
    for item in iterate_trial(config, data=data, should_stop=stop.is_set):
        if isinstance(item, TrialResult):
            return item
        if report is not None and report(item):
            stop.set()
    raise AssertionError("iterate_trial always ends with its result")


def iterate_trial(
    config: TrialConfig, *, data: Splits | None = None, should_stop: Callable[[], bool] = lambda: False
) -> Iterator[EpochMetrics | TrialResult]:
    """Train, yielding each epoch's metrics and finally the :class:`TrialResult`.

    ``should_stop`` is asked after every yielded epoch; when it says so, the run ends with status ``stopped``.
    This form lets a Ray task stream epochs to its driver; :func:`train` is the callback form.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    data = data or load_dataset(config.dataset, seed=config.seed)
    train_split, val_split, test_split = (_to(split, device) for split in (data.train, data.val, data.test))
    model = build_model(
        config.model,
        data.input_shape,
        data.num_classes,
        width=config.width,
        batchnorm=config.batchnorm,
        dropout=config.dropout,
    ).to(device)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), config.hyperparameters, seed=config.seed
    )

    per_epoch = max(1, len(train_split) // config.batch_size)
    budget = config.gradient_evaluations or per_epoch * config.epochs
    batches = _minibatches(train_split, config.batch_size, config.seed, device)
    spent = 0
    epoch_losses: list[Tensor] = []

    def closure() -> Tensor:
        nonlocal spent
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        spent += 1
        return loss

    history: list[EpochMetrics] = []
    status, reason = "completed", None
    model.train()
    first_step_at = time.time()
    while spent < budget:
        epoch_losses.append(_step(optimizer, closure, budget - spent).detach())
        last_step_at = time.time()
        if spent < per_epoch * (len(history) + 1) and spent < budget:
            continue
        train_loss = torch.stack(epoch_losses).mean().item()
        epoch_losses.clear()
        reestimate_batchnorm(model, train_split.x.split(_EVAL_BATCH))  # inner passes ran at x′, not x
        val_loss, val_accuracy = _evaluate(model, val_split)
        metrics = EpochMetrics(
            epoch=len(history) + 1,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            gradient_evaluations=spent,
            wall_time=time.perf_counter() - started,
        )
        history.append(metrics)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            which = "training" if not math.isfinite(train_loss) else "validation"
            status = "diverged"
            reason = f"non-finite {which} loss in epoch {metrics.epoch} (after {spent} gradient evaluations)"
            break
        yield metrics
        if should_stop():
            status, reason = "stopped", f"stopped by the caller after epoch {metrics.epoch}"
            break
        model.train()

    result = TrialResult(
        status=status,
        reason=reason,
        history=history,
        gradient_evaluations=spent,
        wall_time=0.0,
        first_step_at=first_step_at,
        last_step_at=last_step_at,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )
    if history:
        result.val_loss, result.val_accuracy = history[-1].val_loss, history[-1].val_accuracy
    if status != "diverged":
        result.test_loss, result.test_accuracy = _evaluate(model, test_split)  # weights as last evaluated
    result.wall_time = time.perf_counter() - started
    yield result


def _step(optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor], remaining: int) -> Tensor:
    """One optimizer step, an Entropy-SGD step shortened to the gradient evaluations left in the budget."""
    if not isinstance(optimizer, EntropySGD):
        return optimizer.step(closure)
    full = [group["langevin_steps"] for group in optimizer.param_groups]
    if remaining >= max(full):
        return optimizer.step(closure)
    for group in optimizer.param_groups:
        group["langevin_steps"] = min(group["langevin_steps"], remaining)
    try:
        return optimizer.step(closure)
    finally:
        for group, steps in zip(optimizer.param_groups, full, strict=True):
            group["langevin_steps"] = steps


def _minibatches(
    split: Split, batch_size: int, seed: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """An endless stream of minibatches, reshuffled every pass, the order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    n = len(split)
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield split.x[index], split.y[index]


@torch.no_grad()
def _evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean loss and accuracy on ``split``, in evaluation mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in zip(split.x.split(_EVAL_BATCH), split.y.split(_EVAL_BATCH), strict=True):
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    return total_loss / len(split), correct / len(split)


def _to(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), split.y.to(device))
