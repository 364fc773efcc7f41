"""The Ray side of a trial: a streaming task that trains and yields each epoch, and its executor."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator

import ray
import torch
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from workers.results import EpochMetrics, TrialResult
from workers.study_loop import Event, TrialCrashed
from workers.training import TrialConfig, iterate_trial


# max_retries=0: a lost trial is retried by the study loop as a new Optuna trial, so its FAIL is recorded.
@ray.remote(max_retries=0)
def trial_task(config: TrialConfig, threads: int) -> Iterator[EpochMetrics | TrialResult]:
    """Train one trial on a Ray worker (on its GPU when one is assigned), streaming epochs to the driver."""
    torch.set_num_threads(threads)  # as many as the CPUs reserved, so parallel trials do not oversubscribe
    yield from iterate_trial(config)


class RayExecutor:
    """One Ray task per trial with the job's resources; their streams are read in completion order."""

    def __init__(self, cpus: float, gpus: float) -> None:
        self.options = {"num_cpus": cpus, "num_gpus": gpus}
        self.threads = max(1, math.floor(cpus))

    def launch(self, config: TrialConfig) -> Hashable:
        return trial_task.options(**self.options).remote(config, self.threads)

    def events(self, handles: list[Hashable], timeout: float) -> list[tuple[Hashable, Event]]:
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)  # type: ignore[arg-type]
        return [(stream, self._next_event(stream)) for stream in ready]

    def stop(self, handle: Hashable) -> None:
        ray.cancel(handle)  # type: ignore[arg-type]  # interrupts the task; Ray frees its resources

    @staticmethod
    def _next_event(stream: ray.ObjectRefGenerator) -> Event:
        try:
            return ray.get(next(stream))
        except StopIteration:
            return TrialCrashed("the trial task ended without a result", retryable=False)
        except TaskCancelledError:
            return TrialCrashed("the trial task was cancelled", retryable=False)
        except RayTaskError as error:  # the trial itself raised: retrying the same parameters would too
            cause = error.cause if error.cause is not None else error
            return TrialCrashed(f"{type(cause).__name__}: {cause}", retryable=False)
        except RayError as error:  # the worker, its node or the object was lost: worth another attempt
            return TrialCrashed(f"{type(error).__name__}: {str(error).splitlines()[0]}", retryable=True)
