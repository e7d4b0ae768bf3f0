"""Smoke test of bench/handler_bench.py: a small city through the real handler on the emulator.

The timings belong in docs/performance.md; this checks what the bench reports: every step it
times, and the order the handler reaches them in — the alerts and the other writes before the
commit (the zone states), the commit before the batch is done.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.handler_bench import STEPS

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_the_handler_bench_times_every_step_and_the_commit_comes_last() -> None:
    small = ["--sensors", "600", "--shards", "2", "--batches", "3", "--warm", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "bench.handler_bench", *small],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    rows = {
        line.split("|")[1].strip(): float(line.split("|")[2])
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line and "ms after" not in line
    }
    assert set(rows) == {f"{name} {end}" for _, name in STEPS for end in ("begins", "ends")} | {"batch done"}
    commit = rows["save_zone_states begins"]
    for name in ("publish", "write_readings", "save_minutes"):
        assert rows[f"{name} ends"] <= commit, name
    assert rows["publish begins"] <= rows["write_readings begins"]
    assert commit <= rows["save_zone_states ends"] <= rows["batch done"]
