"""One job's search: ask Optuna → launch a trial → report epochs and prune → tell, until the budget is spent.

The loop owns the study (it is its only writer) and trial liveness: a trial whose task died is told FAIL with
the reason and retried with the same parameters (as a new, enqueued Optuna trial) up to
``max_retries_per_trial`` times. It is written against :class:`Executor`, so it runs on Ray
(:mod:`workers.trial_task`) or in this process (:class:`InlineExecutor`, for tests and one machine) alike.

Trial user attributes written here, read by the service: ``gradient_evaluations`` (updated every epoch),
``reason`` (why a trial did not complete), ``attempt`` and ``retry_of`` (for retries), ``will_retry``,
``test_accuracy``, ``test_loss``, ``val_accuracy``, ``val_loss``, ``wall_time``, ``first_step_at`` and
``last_step_at`` (Unix times, for measuring the overhead around training). When the loop ends, the study
gets the user attribute ``outcome``: ``{"state": SUCCEEDED | FAILED | CANCELLED, "reason": ...}``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.trial import TrialState

from workers.results import EpochMetrics, TrialResult
from workers.search_space import grid, split_space
from workers.training import TrialConfig, iterate_trial

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialCrashed:
    """A trial's task ended without a result. ``retryable``: the fault was the machine's, not the trial's."""

    reason: str
    retryable: bool


Event = EpochMetrics | TrialResult | TrialCrashed


class Executor(Protocol):
    """Runs trials somewhere and hands back their events in completion order."""

    def launch(self, config: TrialConfig) -> Hashable:
        """Start a trial; the handle identifies it in :meth:`events` and :meth:`stop`."""

    def events(self, handles: list[Hashable], timeout: float) -> list[tuple[Hashable, Event]]:
        """The next events of any of ``handles``; empty when none came within ``timeout`` seconds."""

    def stop(self, handle: Hashable) -> None:
        """Stop a trial promptly and free its resources; its later events are not asked for."""


@dataclass(frozen=True)
class Outcome:
    state: str  # SUCCEEDED, FAILED or CANCELLED
    reason: str | None = None


def make_sampler(spec: dict[str, Any]) -> optuna.samplers.BaseSampler:
    sampler = spec["sampler"]
    seed = sampler["seed"] if sampler["seed"] is not None else spec["seed"]
    startup = sampler["n_startup_trials"]
    match sampler["name"]:
        case "tpe":  # constant_liar: parallel trials do not get identical suggestions
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        case "grid":
            return optuna.samplers.GridSampler(grid(_space(spec)), seed=seed)
        case "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {sampler['name']!r}")


def make_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    pruner = spec["pruner"]
    match pruner["name"]:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner(pruner["n_startup_trials"], pruner["n_warmup_steps"])
        case "percentile":
            return optuna.pruners.PercentilePruner(
                pruner["percentile"], pruner["n_startup_trials"], pruner["n_warmup_steps"]
            )
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=pruner["min_resource"], reduction_factor=pruner["reduction_factor"]
            )
        case "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=pruner["min_resource"],
                max_resource=spec["budget"]["epochs_per_trial"] or "auto",
                reduction_factor=pruner["reduction_factor"],
            )
    raise ValueError(f"unknown pruner {pruner['name']!r}")


def _space(spec: dict[str, Any]) -> dict[str, Any]:
    """The search space; the service has already filled in the documented default where a job gave none."""
    return spec["search_space"]


@dataclass
class _Running:
    trial: optuna.Trial
    origin: int  # number of the first attempt: retries share its seed
    attempt: int


class StudyLoop:
    """Runs one job's study to the end of its budget, a cancellation or its wall-clock limit."""

    def __init__(
        self,
        study: optuna.Study,
        spec: dict[str, Any],
        executor: Executor,
        *,
        artifacts_dir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        poll_s: float = 0.5,
    ) -> None:
        self.study = study
        self.spec = spec
        self.executor = executor
        self.artifacts_dir = artifacts_dir
        self.should_stop = should_stop
        self.poll_s = poll_s
        self.searched, self.fixed = split_space(_space(spec))
        self.objectives = [(o["metric"], o["direction"]) for o in spec["objectives"]]
        self.planned = spec["budget"]["trials"]
        self.max_retries = spec["budget"]["max_retries_per_trial"]
        self.running: dict[Hashable, _Running] = {}
        self.finished = 0  # logical trials done: complete, pruned, or failed with no retry left
        self.waiting = 0  # retries enqueued and not yet asked for
        self.best_number: int | None = None

    def run(self) -> Outcome:
        """Search to the end; if anything raises (e.g. the study database went away), the running trials are
        stopped first, so no task outlives the loop. A new loop on the same study then resumes it."""
        try:
            return self._search()
        except BaseException:
            for handle in list(self.running):
                self.executor.stop(handle)  # their trials stay RUNNING: the next loop's _recover retries them
            self.running.clear()
            raise

    def _search(self) -> Outcome:
        self._recover()
        limit = self.spec["budget"]["wall_clock_limit_s"]
        deadline = time.monotonic() + limit if limit else math.inf
        while True:
            if self.should_stop():
                self._stop_all("the job was cancelled")
                return Outcome("CANCELLED", "cancelled on request")
            if time.monotonic() > deadline:
                self._stop_all(f"the job's wall-clock limit of {limit:g} s was reached")
                return self._final(f"wall-clock limit of {limit:g} s reached")
            while len(self.running) < self.spec["parallelism"] and self._more_to_launch():
                self._launch()
            if not self.running:
                return self._final(None)
            for handle, event in self.executor.events(list(self.running), timeout=self.poll_s):
                if handle in self.running:
                    self._handle(handle, event)

    # ------------------------------------------------------------------------------------------ launching
    def _more_to_launch(self) -> bool:
        return self.waiting > 0 or self.finished + len(self.running) < self.planned

    def _launch(self) -> None:
        trial = self.study.ask(self.searched)
        attempt = trial.user_attrs.get("attempt", 1)
        origin = trial.user_attrs.get("retry_of", trial.number)
        if "retry_of" in trial.user_attrs:
            self.waiting -= 1
        trial.set_user_attr("attempt", attempt)
        trial.set_user_attr("gradient_evaluations", 0)
        config = self._config(trial, origin)
        handle = self.executor.launch(config)
        self.running[handle] = _Running(trial, origin, attempt)
        logger.info("trial %d started (attempt %d): %s", trial.number, attempt, config.hyperparameters)

    def _config(self, trial: optuna.Trial, origin: int) -> TrialConfig:
        spec, budget, model = self.spec, self.spec["budget"], self.spec["model"]
        return TrialConfig(
            dataset=spec["dataset"],
            model=model["name"],
            width=model["width"],
            batchnorm=model["batchnorm"],
            dropout=model["dropout"],
            optimizer=spec["optimizer"],
            hyperparameters={**self.fixed, **trial.params},
            epochs=budget["epochs_per_trial"] or 1,
            gradient_evaluations=budget["gradient_evaluations_per_trial"],
            batch_size=budget["batch_size"],
            seed=spec["seed"] + origin,
            device="cuda" if spec["resources"]["gpus"] > 0 else "cpu",
        )

    # ------------------------------------------------------------------------------------------ events
    def _handle(self, handle: Hashable, event: Event) -> None:
        running = self.running[handle]
        trial = running.trial
        if isinstance(event, EpochMetrics):
            trial.set_user_attr("gradient_evaluations", event.gradient_evaluations)
            if len(self.objectives) > 1:
                return  # Optuna's pruners and intermediate values are single-objective
            value = _metric(event, self.objectives[0][0])
            if not math.isfinite(value):
                return  # the trial reports its divergence itself
            trial.report(value, step=event.epoch)
            if trial.should_prune():
                self.executor.stop(handle)
                self._end(handle, TrialState.PRUNED, f"pruned after epoch {event.epoch} ({value:.4g})")
        elif isinstance(event, TrialResult):
            self._record_result(trial, event)
            if event.status == "diverged":
                self._end(handle, TrialState.FAIL, f"diverged: {event.reason}")
                return
            values = [_result_metric(event, metric) for metric, _ in self.objectives]
            if not all(math.isfinite(v) for v in values):
                self._end(handle, TrialState.FAIL, "an objective value is not finite")
                return
            self._end(handle, TrialState.COMPLETE, None, values=values)
            self._keep_if_best(trial, event)
        else:
            retry = event.retryable and running.attempt <= self.max_retries
            if retry:
                trial.set_user_attr("will_retry", True)
                user_attrs = {"retry_of": running.origin, "attempt": running.attempt + 1}
                self.study.enqueue_trial(trial.params, user_attrs=user_attrs)
                self.waiting += 1
            self._end(handle, TrialState.FAIL, event.reason, counts=not retry)

    def _end(
        self,
        handle: Hashable,
        state: TrialState,
        reason: str | None,
        *,
        values: list[float] | None = None,
        counts: bool = True,
    ) -> None:
        trial = self.running.pop(handle).trial
        if reason:
            trial.set_user_attr("reason", reason)
        self.study.tell(trial, values, state=state)
        self.finished += counts
        logger.info("trial %d %s%s", trial.number, state.name, f": {reason}" if reason else "")

    def _record_result(self, trial: optuna.Trial, result: TrialResult) -> None:
        for key in (
            "gradient_evaluations",
            "wall_time",
            "val_loss",
            "val_accuracy",
            "test_loss",
            "test_accuracy",
            "first_step_at",
            "last_step_at",
        ):
            value = getattr(result, key)
            if value is not None and math.isfinite(value):
                trial.set_user_attr(key, value)

    def _keep_if_best(self, trial: optuna.Trial, result: TrialResult) -> None:
        """Write the best trial's weights to ``best-model.pt`` (for several objectives: the lowest-numbered
        trial on the Pareto front, as the service reports it)."""
        if self.artifacts_dir is None:
            return
        if len(self.objectives) == 1:
            best = self.study.best_trial.number
        else:
            best = min(t.number for t in self.study.best_trials)
        if best != trial.number:
            return
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        path = self.artifacts_dir / "best-model.pt"
        partial = path.with_suffix(".partial")
        payload = {
            "trial": trial.number,
            "params": {**self.fixed, **trial.params},
            "dataset": self.spec["dataset"],
            "model": self.spec["model"],
            "state_dict": result.state_dict,
        }
        torch.save(payload, partial)
        os.replace(partial, path)  # readers never see a half-written file

    # ------------------------------------------------------------------------------------------ endings
    def _stop_all(self, reason: str) -> None:
        for handle in list(self.running):
            self.executor.stop(handle)
            self._end(handle, TrialState.FAIL, reason)

    def _final(self, note: str | None) -> Outcome:
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        if TrialState.COMPLETE in states:
            return Outcome("SUCCEEDED", note)
        failed = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
        last = failed[-1].user_attrs.get("reason") if failed else None
        reason = note or "no trial completed" + (f"; the last failure: {last}" if last else "")
        return Outcome("FAILED", reason)

    def _recover(self) -> None:
        """Pick up a study left by an earlier driver: its RUNNING trials lost their tasks."""
        for frozen in self.study.get_trials(deepcopy=False):
            if frozen.state == TrialState.WAITING:
                self.waiting += 1
            elif frozen.state != TrialState.RUNNING:
                self.finished += not frozen.user_attrs.get("will_retry")  # its retry counts instead
            else:
                trial = optuna.Trial(self.study, frozen._trial_id)  # optuna has no public id accessor
                attempt = frozen.user_attrs.get("attempt", 1)
                retry = attempt <= self.max_retries
                if retry:
                    trial.set_user_attr("will_retry", True)
                    origin = frozen.user_attrs.get("retry_of", frozen.number)
                    self.study.enqueue_trial(
                        frozen.params, user_attrs={"retry_of": origin, "attempt": attempt + 1}
                    )
                    self.waiting += 1
                trial.set_user_attr("reason", "its job driver stopped while it ran")
                self.study.tell(frozen.number, state=TrialState.FAIL)
                self.finished += not retry


def _metric(metrics: EpochMetrics, name: str) -> float:
    return float(getattr(metrics, name))


def _result_metric(result: TrialResult, name: str) -> float:
    value = result.wall_time if name == "wall_time" else getattr(result.history[-1], name)
    return float(value)


class InlineExecutor:
    """Runs trials in this process, one epoch at a time, round-robin: no Ray needed (tests, one machine)."""

    def __init__(self) -> None:
        self._trials: dict[int, Iterator[EpochMetrics | TrialResult]] = {}
        self._next = 0
        self._turn = 0

    def launch(self, config: TrialConfig) -> Hashable:
        self._next += 1
        self._trials[self._next] = iterate_trial(config)
        return self._next

    def events(self, handles: list[Hashable], timeout: float) -> list[tuple[Hashable, Event]]:
        self._turn += 1
        handle = handles[self._turn % len(handles)]
        trial = self._trials[handle]
        try:
            event: Event = next(trial)
        except Exception as error:  # a trial's own failure is reported, not raised
            event = TrialCrashed(f"{type(error).__name__}: {error}", retryable=False)
        if isinstance(event, TrialResult | TrialCrashed):
            del self._trials[handle]
        return [(handle, event)]

    def stop(self, handle: Hashable) -> None:
        trial = self._trials.pop(handle, None)
        if trial is not None:
            trial.close()  # type: ignore[attr-defined]
