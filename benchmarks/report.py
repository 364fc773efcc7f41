"""Shared output for the benchmark scripts: a printed table, a JSON file and a Markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, title: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Print the table and write results/NAME.json and results/NAME.md."""
    RESULTS.mkdir(exist_ok=True)
    table = markdown_table(rows)
    print(f"\n{title}\n\n{table}\n")
    payload = {"title": title, "machine": machine(), **extra, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    notes = "".join(f"- {key}: {value}\n" for key, value in extra.items())
    (RESULTS / f"{name}.md").write_text(f"# {title}\n\n{notes}\n{table}\n")
    print(f"wrote {RESULTS / name}.json and .md")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
