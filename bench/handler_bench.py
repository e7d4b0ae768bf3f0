"""The processor handler's AWS side on the emulator: when a batch's alerts leave, when its commit
begins, how long the batch takes, and the CPU it spends a reading.

Run: `python -m bench.handler_bench [--sensors N] [--shards N] [--cycle S] [--batches N]`
(docs/performance.md, "Load").

`bench/processor_bench.py` times the core without AWS; this times `Processor.process` — the
core plus its DynamoDB reads and writes, the lake's Parquet file and the EventBridge call —
against a fresh ministack, on the batch shape of a load run: one shard's share of one second
when every sensor of the city reports once a second over `--shards` shards (default 50,000
sensors, 4 shards: ~440 v2 gateway messages, ~12,500 readings, ~64 zones a batch), second after
second (a zone's minute lasts 60 of its shard's seconds, as on the street). With
`--cycle` under 1 s, the batches of an enhanced fan-out consumer with no window: each shard's
second is cut into batches of `--cycle` seconds, its gateways at their own (seeded) phases of
the second, so each batch holds a share of nearly every zone of the shard, as in a load run.

Each step is timed from the moment `process` starts (wrappers around the processor's own
objects): the state reads, the alerts, the lake file, the zone-minute items and the zone states
(the commit). Wall time, median over the batches after the first `--warm` (cold caches, first
states). ministack answers on one Python event loop, so requests sent at once overlap less than
on AWS. The CPU table is this process's CPU over the same batches, a reading at a time: the
core's two phases, the zone states' encoding, the lake file (Parquet and its PUT), and the rest
(the other requests, their threads), each part on the thread that ran it; and beside them
ministack's, answering (DynamoDB's and S3's side, which on AWS is not the function's).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.records import kinesis_events
from infra.local.emulators import aws_env, start_kinesalite, start_ministack
from infra.local.load import cpu_seconds, process_tree
from infra.local.scratch import fresh_processor
from streaming.processor import handler as handler_module
from streaming.processor.core import Record
from streaming.processor.handler import Processor, records_from_event
from streaming.processor.state import ZoneState
from streaming.registry import City, generate_city

TICK_MS = 1_000  # every sensor reports once a second, as in a load run
# (object, method) of each timed step, in the order a batch reaches them.
STEPS = (
    ("store", "load_zone_states"),
    ("store", "load_minutes"),
    ("alerts", "publish"),
    ("lake", "write_readings"),
    ("store", "save_minutes"),
    ("store", "save_zone_states"),
)
# The parts of a batch's CPU, as the CPU table names them; then the emulator's, beside them.
DECODE, APPLY, ENCODE, LAKE, REST, TOTAL, EMULATOR = (
    "decode (decode_batch)",
    "apply (apply_batch)",
    "zone states encoded (to_bytes)",
    "lake file (Parquet, PUT)",
    "the rest (requests, threads)",
    "process",
    "ministack, answering the requests",
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


def _on_thread_cpu(cpu: Counter[str], part: str, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, adding the CPU each call spends on its own thread to `cpu[part]`."""
    lock = threading.Lock()

    def counted(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with lock:
                cpu[part] += spent

    return counted


def _count_cpu(p: Processor, cpu: Counter[str]) -> Callable[[], None]:
    """Count the CPU of the batch's parts into `cpu`; returns what undoes the module-level wrappers."""
    real = handler_module.decode_batch, handler_module.apply_batch, ZoneState.to_bytes
    handler_module.decode_batch = _on_thread_cpu(cpu, DECODE, real[0])
    handler_module.apply_batch = _on_thread_cpu(cpu, APPLY, real[1])
    ZoneState.to_bytes = _on_thread_cpu(cpu, ENCODE, real[2])  # type: ignore[method-assign]
    p.lake.write_readings = _on_thread_cpu(cpu, LAKE, p.lake.write_readings)  # type: ignore[method-assign]

    def undo() -> None:
        handler_module.decode_batch, handler_module.apply_batch, ZoneState.to_bytes = real  # type: ignore[method-assign]

    return undo


def batches_of(city: City, shards: int, cycle_s: float, batches: int, seed: int = 7) -> list[list[Record]]:
    """`batches` consecutive batches of one shard's traffic of `cycle_s` seconds (see the module doc)."""
    second = max(1, round(len(city.gateways()) / shards))
    if cycle_s >= 1:
        return [records_from_event(e) for e in kinesis_events(city, "columnar", second, batches, TICK_MS)]
    per_batch = max(1, round(second * cycle_s))
    per_second = -(-second // per_batch)
    rng = random.Random(seed)
    out: list[list[Record]] = []
    # The same shard's consecutive seconds: every `shards`-th event of the city's order.
    for event in kinesis_events(city, "columnar", second, -(-batches // per_second) * shards, TICK_MS)[::shards]:
        records = records_from_event(event)
        numbers = [r.sequence_number for r in records]
        rng.shuffle(records)  # each gateway at its own phase of the second
        # The stream numbers records in arrival order.
        records = [Record(r.shard_id, n, r.data) for r, n in zip(records, numbers, strict=True)]
        out += [records[i : i + per_batch] for i in range(0, len(records), per_batch)]
    return out[:batches]


def run(sensors: int, shards: int, cycle_s: float, batches: int, warm: int) -> None:
    city = generate_city(sensors=sensors)
    state_dir = Path(tempfile.mkdtemp(prefix="handler-bench-"))
    ministack, kinesalite = start_ministack(state_dir), start_kinesalite(state_dir)
    cpu: Counter[str] = Counter()
    undo = None
    try:
        os.environ.update(aws_env(ministack, kinesalite))
        p = fresh_processor(city)
        clock = [0.0]
        marks = _time_steps(p, clock)
        undo = _count_cpu(p, cpu)
        took: list[float] = []
        readings = messages = zones = 0
        for n, records in enumerate(batches_of(city, shards, cycle_s, batches)):
            if n == warm:
                cpu.clear()
                emulator_from = cpu_seconds(process_tree(ministack.process.pid))
            clock[0] = time.perf_counter()
            started_cpu = time.process_time()
            summary = p.process(records)
            took.append(time.perf_counter() - clock[0])
            if n >= warm:
                cpu[TOTAL] += time.process_time() - started_cpu
                readings += summary["counts"].get("received", 0)
                messages += len(records)
                zones += len({orjson.loads(r.data)["zone_id"] for r in records})
        cpu[EMULATOR] = cpu_seconds(process_tree(ministack.process.pid)) - emulator_from
    finally:
        if undo is not None:
            undo()
        ministack.stop()
        kinesalite.stop()
    measured = batches - warm
    print(
        f"citypulse handler bench — Python {platform.python_version()}, {os.cpu_count()} cores; "
        f"{sensors:,} sensors over {shards} shards, {cycle_s:g} s of a shard a batch: "
        f"~{messages / measured:,.0f} gateway messages (~{readings / measured:,.0f} readings, "
        f"~{zones / measured:,.0f} zones) a batch, "
        f"median of {measured} batches after {warm}"
    )
    print("| step | ms after the batch began |")
    print("|---|---:|")
    for step, values in marks.items():
        print(f"| {step} | {statistics.median(values[warm:]) * 1000:.1f} |")
    print(f"| batch done | {statistics.median(took[warm:]) * 1000:.1f} |")
    print()
    cpu[REST] = cpu[TOTAL] - sum(cpu[part] for part in (DECODE, APPLY, ENCODE, LAKE))
    print(f"| CPU of {measured} batches | µs a reading | share |")
    print("|---|---:|---:|")
    for part in (DECODE, APPLY, ENCODE, LAKE, REST, TOTAL):
        print(f"| {part} | {cpu[part] / readings * 1e6:.2f} | {cpu[part] / cpu[TOTAL]:.0%} |")
    print(f"| {EMULATOR} | {cpu[EMULATOR] / readings * 1e6:.2f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--cycle", type=float, default=1.0, help="seconds of a shard's traffic a batch (under 1: a consumer's batches)"
    )
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--warm", type=int, default=2, help="batches left out of the medians")
    args = parser.parse_args()
    if args.batches <= args.warm:
        parser.error("--batches must exceed --warm")
    if not 0 < args.cycle <= 1:
        parser.error("--cycle must be in (0, 1]")
    run(args.sensors, args.shards, args.cycle, args.batches, args.warm)


if __name__ == "__main__":
    main()
