"""Optimizer overhead per gradient evaluation, forward and backward excluded.

EntropySGD's cost per inner (Langevin) step against torch.optim.SGD(foreach=True, momentum=0.9,
nesterov=True) on the same parameters: for a model of many small tensors and one of ~10M parameters in a
few large tensors, with and without noise, foreach and single-tensor. Gradients are set once and the closure
does nothing, so only the optimizer's own arithmetic (and, with noise, random number generation) is timed.
One EntropySGD step costs L gradient evaluations; its time is divided by L, the outer update included.

    python benchmarks/optimizer_overhead.py [--langevin-steps 20] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import publish
from optimizer import EntropySGD

MODELS = {
    # name: (number of tensors, elements per tensor)
    "100 small tensors": (100, 64 * 64),
    "10M params in 4 tensors": (4, 2_500_000),
}


def make_params(count: int, numel: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.randn(numel, generator=generator).to(device).requires_grad_(True)
        p.grad = torch.randn(numel, generator=generator).to(device) * 1e-3
        params.append(p)
    return params


def seconds_per_gradient(optimizer: torch.optim.Optimizer, evaluations_per_step: int, repeats: int) -> float:
    def closure() -> torch.Tensor:
        return torch.zeros(())  # the gradients are already in place

    def one_step() -> None:
        optimizer.step(closure)

    one_step()  # allocate lazily created state outside the timing
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / evaluations_per_step)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--langevin-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller models, for a smoke run")
    args = parser.parse_args()
    models = {k: (c, n // 100) for k, (c, n) in MODELS.items()} if args.quick else MODELS

    rows = []
    for model, (count, numel) in models.items():
        params = make_params(count, numel, args.device)
        elements = count * numel
        sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, foreach=True)
        sgd_seconds = seconds_per_gradient(sgd, 1, args.repeats * args.langevin_steps)
        rows.append(_row(model, "SGD nesterov", True, "-", sgd_seconds, elements, sgd_seconds))
        for epsilon in (0.0, 1e-4):
            for foreach in (True, False):
                optimizer = EntropySGD(
                    params,
                    lr=1.0,
                    langevin_steps=args.langevin_steps,
                    epsilon=epsilon,
                    foreach=foreach,
                    seed=0,
                )
                seconds = seconds_per_gradient(optimizer, args.langevin_steps, args.repeats)
                rows.append(_row(model, "EntropySGD", foreach, epsilon, seconds, elements, sgd_seconds))
    publish(
        "optimizer_overhead" + ("_quick" if args.quick else ""),
        "Optimizer overhead per gradient evaluation (forward/backward excluded)",
        rows,
        langevin_steps=args.langevin_steps,
        device=args.device,
        goal="EntropySGD foreach with epsilon = 0 within 2x of SGD per inner step",
    )


def _row(model, optimizer, foreach, epsilon, seconds, elements, sgd_seconds):
    return {
        "model": model,
        "optimizer": optimizer,
        "foreach": foreach,
        "epsilon": epsilon,
        "us per grad eval": seconds * 1e6,
        "ns per element": seconds * 1e9 / elements,
        "ratio to SGD": seconds / sgd_seconds,
    }


if __name__ == "__main__":
    main()
