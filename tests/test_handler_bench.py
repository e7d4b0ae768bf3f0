"""Smoke test of bench/handler_bench.py: a small city through the real handler on the emulator.

The timings belong in docs/performance.md; this checks what the bench reports: every step it
times, and the order the handler reaches them in — the alerts and the other writes before the
commit (the zone states), the commit before the batch is done — and the CPU table's parts. The
consumer-shaped batches are checked without the emulator: they must still be one stream.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from bench.handler_bench import APPLY, DECODE, EMULATOR, ENCODE, LAKE, REST, STEPS, TOTAL, batches_of
from streaming.registry import generate_city

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rows(lines: list[str]) -> dict[str, float]:
    return {line.split("|")[1].strip(): float(line.split("|")[2]) for line in lines if "---" not in line}


@pytest.mark.integration
def test_the_handler_bench_times_every_step_and_the_commit_comes_last() -> None:
    # Two batches of warm-up: the processor's thread pools start their threads in a container's
    # first batches, and a thread started while the alerts leave can begin its write first.
    small = ["--sensors", "600", "--shards", "2", "--batches", "4", "--warm", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "bench.handler_bench", *small],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    table = [line for line in out.splitlines() if line.startswith("| ")]
    split = next(i for i, line in enumerate(table) if line.startswith("| CPU of "))

    rows = _rows(table[1:split])
    assert set(rows) == {f"{name} {end}" for _, name in STEPS for end in ("begins", "ends")} | {"batch done"}
    commit = rows["save_zone_states begins"]
    for name in ("publish", "write_readings", "save_minutes"):
        assert rows[f"{name} ends"] <= commit, name
    assert rows["publish begins"] <= rows["write_readings begins"]
    assert commit <= rows["save_zone_states ends"] <= rows["batch done"]

    cpu = _rows(table[split + 1 :])
    assert list(cpu) == [DECODE, APPLY, ENCODE, LAKE, REST, TOTAL, EMULATOR]
    assert cpu[EMULATOR] > 0
    for part in (DECODE, APPLY, ENCODE, LAKE):
        assert 0 < cpu[part] < cpu[TOTAL], part
    assert cpu[REST] >= 0


def _zones(records: list) -> set[str]:
    return {orjson.loads(r.data)["zone_id"] for r in records}


def test_a_consumers_batches_are_one_shards_stream_with_its_gateways_at_their_own_phases() -> None:
    city = generate_city(sensors=4_000, zones=16)
    second = batches_of(city, shards=2, cycle_s=1, batches=4)
    quarter = batches_of(city, shards=2, cycle_s=0.25, batches=8)

    assert [len(b) for b in quarter] == [round(len(second[0]) / 4)] * 8
    numbers = [r.sequence_number for b in quarter for r in b]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # the stream's order
    # The first four batches are the shard's first second, reordered: its messages, each once.
    assert Counter(r.data for b in quarter[:4] for r in b) == Counter(r.data for r in second[0])
    assert [r.data for b in quarter[:4] for r in b] != [r.data for r in second[0]]
    # The next four are the same shard's next second (the same zones), not the other shard's.
    assert _zones([r for b in quarter[4:] for r in b]) == _zones(second[0])
    # Each batch holds a share of most of the shard's zones, not a quarter of them whole.
    assert all(len(_zones(b)) > len(_zones(second[0])) / 2 for b in quarter)
