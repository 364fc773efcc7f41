"""The load benchmark's short form: open-loop reads and submissions at the full offered rate against the API
on SQLite and on PostgreSQL, with no failed request (the full run is ``python -m benchmarks.load``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_quick_load_run_answers_every_request_at_the_offered_rate(postgres):
    command = [sys.executable, "-m", "benchmarks.load", "--quick", "--postgres-admin-url", postgres.admin_url]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = json.loads((ROOT / "benchmarks" / "results" / "load_quick.json").read_text())
    rows = {(row["setup"], row["request"]): row for row in results["rows"]}
    for setup in ("embedded", "postgresql"):
        total = rows[setup, "all"]
        assert total["errors"] == 0 and total["n"] >= 5 * 220  # 5 s of 200 reads/s and 20 submissions/s
        assert total["achieved/s"] >= 0.9 * total["offered/s"]
        assert results["jobs_stored"][setup] >= 5 + 5 * 20  # seeded, then every submission stored
        memory = results["api_memory"][setup]
        assert 0 < memory["VmRSS before MiB"] <= memory["VmHWM (peak) MiB"]
