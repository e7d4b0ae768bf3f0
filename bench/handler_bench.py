"""The processor handler's AWS side on the emulator: when a batch's alerts leave, when its commit
begins, how long the batch takes.

Run: `python -m bench.handler_bench [--sensors N] [--shards N] [--batches N]`
(docs/performance.md, "Load").

`bench/processor_bench.py` times the core without AWS; this times `Processor.process` — the
core plus its DynamoDB reads and writes, the lake's Parquet file and the EventBridge call —
against a fresh ministack, on the batch shape of a load run: one shard's share of one second
when every sensor of the city reports once a second over `--shards` shards (default 50,000
sensors, 4 shards: ~440 v2 gateway messages, ~12,500 readings, ~64 zones a batch). Each step is
timed from the moment `process` starts (wrappers around the processor's own objects): the
state reads, the alerts, the lake file, the zone-minute items and the zone states (the commit).
Wall time, median over the batches after the first `--warm` (cold caches, first states).
ministack answers on one Python event loop, so requests sent at once overlap less than on AWS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.records import kinesis_events
from infra.local.emulators import aws_env, start_kinesalite, start_ministack
from infra.local.scratch import fresh_processor
from streaming.processor.handler import Processor, records_from_event
from streaming.registry import generate_city

# (object, method) of each timed step, in the order a batch reaches them.
STEPS = (
    ("store", "load_zone_states"),
    ("store", "load_minutes"),
    ("alerts", "publish"),
    ("lake", "write_readings"),
    ("store", "save_minutes"),
    ("store", "save_zone_states"),
)


def _time_steps(p: Processor, clock: list[float]) -> dict[str, list[float]]:
    """Note, for each step, when each call began and ended after `clock[0]` (seconds)."""
    marks: dict[str, list[float]] = {}
    for owner, name in STEPS:
        obj = getattr(p, owner)
        real = getattr(obj, name)
        marks[f"{name} begins"], marks[f"{name} ends"] = [], []

        def timed(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            marks[f"{_name} begins"].append(time.perf_counter() - clock[0])
            try:
                return _real(*args, **kwargs)
            finally:
                marks[f"{_name} ends"].append(time.perf_counter() - clock[0])

        setattr(obj, name, timed)
    return marks


def run(sensors: int, shards: int, batches: int, warm: int) -> None:
    city = generate_city(sensors=sensors)
    gateways = len(city.gateways())
    per_batch = max(1, round(gateways / shards))
    state_dir = Path(tempfile.mkdtemp(prefix="handler-bench-"))
    ministack, kinesalite = start_ministack(state_dir), start_kinesalite(state_dir)
    try:
        os.environ.update(aws_env(ministack, kinesalite))
        p = fresh_processor(city)
        clock = [0.0]
        marks = _time_steps(p, clock)
        took: list[float] = []
        readings = 0
        for n, event in enumerate(kinesis_events(city, "columnar", per_batch, batches)):
            records = records_from_event(event)
            clock[0] = time.perf_counter()
            summary = p.process(records)
            took.append(time.perf_counter() - clock[0])
            if n >= warm:
                readings += summary["counts"].get("received", 0)
    finally:
        ministack.stop()
        kinesalite.stop()
    measured = batches - warm
    print(
        f"citypulse handler bench — Python {platform.python_version()}, {os.cpu_count()} cores; "
        f"{sensors:,} sensors over {shards} shards: {per_batch} gateway messages "
        f"(~{readings / measured:,.0f} readings) a batch, median of {measured} batches after {warm}"
    )
    print("| step | ms after the batch began |")
    print("|---|---:|")
    for step, values in marks.items():
        print(f"| {step} | {statistics.median(values[warm:]) * 1000:.1f} |")
    print(f"| batch done | {statistics.median(took[warm:]) * 1000:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--warm", type=int, default=2, help="batches left out of the medians")
    args = parser.parse_args()
    if args.batches <= args.warm:
        parser.error("--batches must exceed --warm")
    run(args.sensors, args.shards, args.batches, args.warm)


if __name__ == "__main__":
    main()
