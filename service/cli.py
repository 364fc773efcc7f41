"""The ``esgd`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    no_args_is_help=True, help="Entropy-SGD as a service: train, search and compare optimizers."
)
console = Console()


@app.callback()
def main() -> None:
    """Entropy-SGD as a service: train, search and compare optimizers."""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Optimizer knobs follow as --KNOB VALUE, e.g. --lr 1 --langevin-steps 5 --nesterov true "
    "--gamma-max none. Unknown knobs are refused with the list of valid ones.",
)
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="mnist1d, digits, mnist5k or synthetic")] = "mnist1d",
    model: Annotated[str, typer.Option(help="mlp, cnn1d or lenet")] = "cnn1d",
    optimizer: Annotated[str, typer.Option(help="entropy_sgd, sgd or adam")] = "entropy_sgd",
    epochs: Annotated[int, typer.Option(help="budget, in epochs of gradient evaluations")] = 10,
    batch_size: Annotated[int, typer.Option()] = 128,
    width: Annotated[str, typer.Option(help="model size: small, medium or large")] = "small",
    batchnorm: Annotated[bool, typer.Option()] = False,
    dropout: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    data: Annotated[Path | None, typer.Option(help="train on your own .npz (arrays x, y)")] = None,
    save_weights: Annotated[Path | None, typer.Option(help="write the trained weights here")] = None,
) -> None:
    """Train one model with one set of hyperparameters and print its learning curve."""
    # Imported here: the rest of the CLI (and the API process) never loads torch.
    from workers.datasets import load_npz
    from workers.optimizers import optimizer_kind
    from workers.training import TrialConfig
    from workers.training import train as run_trial

    try:
        knobs = parse_knobs(ctx.args, optimizer_kind(optimizer).knobs)
        config = TrialConfig(
            dataset=dataset if data is None else data.stem,
            model=model,
            optimizer=optimizer,
            hyperparameters=knobs,
            epochs=epochs,
            batch_size=batch_size,
            width=width,
            batchnorm=batchnorm,
            dropout=dropout,
            seed=seed,
            device=device,
        )
        splits = load_npz(data, seed=seed) if data is not None else None
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error

    with Progress(
        TextColumn("[bold]epoch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("train", total=epochs, status="")

        def report(metrics: Any) -> bool:
            status = f"val acc {metrics.val_accuracy:.3f}  val loss {metrics.val_loss:.4f}"
            progress.update(task, advance=1, status=status)
            return False

        try:
            result = run_trial(config, report, data=splits)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error

    table = Table(title=f"{optimizer} on {config.dataset} with {model}")
    for column in ("epoch", "train loss", "val loss", "val acc", "grad evals", "seconds"):
        table.add_column(column, justify="right")
    for m in result.history:
        table.add_row(
            str(m.epoch),
            f"{m.train_loss:.4f}",
            f"{m.val_loss:.4f}",
            f"{m.val_accuracy:.4f}",
            str(m.gradient_evaluations),
            f"{m.wall_time:.1f}",
        )
    console.print(table)
    console.print(f"status: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    if result.test_accuracy is not None:
        console.print(f"test accuracy: {result.test_accuracy:.4f}   test loss: {result.test_loss:.4f}")
    console.print(
        f"gradient evaluations: {result.gradient_evaluations}   wall time: {result.wall_time:.1f} s"
    )
    if save_weights is not None:
        import torch

        torch.save(result.state_dict, save_weights)
        console.print(f"weights written to {save_weights}")
    if result.status == "diverged":
        raise typer.Exit(code=1)


def parse_knobs(args: list[str], knobs: dict[str, Any]) -> dict[str, Any]:
    """Turn ``--knob-name VALUE`` pairs into typed knob values; unknown names list the valid ones."""
    parsed: dict[str, Any] = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or not rest:
            raise ValueError(f"expected --KNOB VALUE pairs, got {flag!r}")
        name = flag[2:].replace("-", "_")
        if name not in knobs:
            raise ValueError(
                f"unknown knob {flag!r}; valid knobs: {', '.join('--' + k.replace('_', '-') for k in knobs)}"
            )
        parsed[name] = _typed(name, rest.pop(0), knobs[name])
    return parsed


def _typed(name: str, text: str, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("none", "null"):
        return None
    if bool in kinds:
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--{name.replace('_', '-')} expects true or false, got {text!r}")
    try:
        return int(text) if int in kinds else float(text)
    except ValueError:
        expected = "an integer" if int in kinds else "a number"
        raise ValueError(f"--{name.replace('_', '-')} expects {expected}, got {text!r}") from None
