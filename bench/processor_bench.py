"""Processor throughput on one core: the naive tutorial handler, the decode floor, citypulse's core.

Run: `python -m bench.processor_bench [--repeat N] [--records N]` (docs/performance.md, "Processor").

Each contender gets the same Lambda events (10,000 Kinesis records as the event-source mapping
delivers them, base64 data) of four kinds: gateway messages v1 (reading objects), the same
readings as gateway messages v2 (columns: what gateways publish), v2 messages whose detectors
each report their own time within the minute, and single-reading messages.
The floor decodes base64 with pybase64, as the processor does; the binascii floor of earlier runs is
shown beside it. The v2 table also shows the v1 floor, measured in the same run on the v1 event; the
single-reading table also a typed floor (msgspec structs instead of orjson dicts).
The core is measured as the handler runs it minus AWS I/O: event → records → `decode_batch` →
`apply_batch`, against the zone state the previous batch left (the steady state of a running
stream), so dedupe windows and live values are warm.
Each kind runs in a fresh process (in one process, each kind ran 13-15 % slower after the ones
before it). Reported: readings per CPU second (median of the repetitions) and ratios against the
naive handler and the floor.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson
import pybase64

from bench.records import BASE_MS, kinesis_events
from streaming.contract import GATEWAY_V2, READING_FIELDS, message_readings
from streaming.processor import core
from streaming.processor.handler import records_from_event
from streaming.registry import generate_city


def naive(event: dict[str, Any]) -> int:
    """The tutorial handler: per record base64 → json.loads → dict → json.dumps → base64."""
    n = 0
    for rec in event["Records"]:
        env = json.loads(base64.b64decode(rec["kinesis"]["data"]))
        msg = json.loads(base64.b64decode(env["payload"]))
        readings = message_readings(msg) if "readings" in msg or msg.get("schema_version") == GATEWAY_V2 else [msg]
        for r in readings:
            out = dict(r, gateway_id=env["gateway_id"], received_at=env["received_at"])
            base64.b64encode(json.dumps(out).encode())
            n += 1
    return n


def make_floor(b64decode: Callable[[Any], bytes]) -> Callable[[dict[str, Any]], int]:
    def floor(event: dict[str, Any]) -> int:
        """The least any processor must do to see the readings: two base64 layers, two orjson parses."""
        n = 0
        for rec in event["Records"]:
            env = orjson.loads(b64decode(rec["kinesis"]["data"]))
            msg = orjson.loads(b64decode(env["payload"]))
            if "readings" in msg:
                n += len(msg["readings"])
            elif msg.get("schema_version") == GATEWAY_V2:
                n += len(msg["sensor_id"])
            else:
                n += 1
        return n

    return floor


class _Envelope(msgspec.Struct):
    payload: str
    zone_id: str
    gateway_id: str
    received_at: int


# A reading's JSON types, derived from the contract's fields (ranges are left to the core).
_JSON_TYPES = {"string": str, "timestamp": str, "integer": int, "number": float}
_Reading = msgspec.defstruct(
    "Reading",
    [
        (f.name, _JSON_TYPES[f.kind]) if f.required else (f.name, _JSON_TYPES[f.kind] | None, None)
        for f in READING_FIELDS
    ],
    kw_only=True,
)


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_READING = msgspec.json.Decoder(_Reading)


def typed_floor(event: dict[str, Any]) -> int:
    """The floor of single-reading records with typed decoding: both layers into msgspec structs
    (the fastest per-record decode measured here; it also checks the fields' JSON types)."""
    n = 0
    for rec in event["Records"]:
        env = _ENVELOPE.decode(pybase64.b64decode(rec["kinesis"]["data"]))
        _READING.decode(pybase64.b64decode(env.payload))
        n += 1
    return n


def payload_bytes(event: dict[str, Any]) -> int:
    """The MQTT payload bytes of the event's messages (what IoT Core and Kinesis bill)."""
    total = 0
    for rec in event["Records"]:
        env = orjson.loads(binascii.a2b_base64(rec["kinesis"]["data"]))
        total += len(binascii.a2b_base64(env["payload"]))
    return total


def make_core(
    decode: Callable[..., Any], apply: Callable[..., Any], registry: dict, zones: set[str], prior: dict
) -> Callable[[dict[str, Any]], int]:
    def run(event: dict[str, Any]) -> int:
        decoded = decode(records_from_event(event), registry, zones)
        out = apply(decoded, prior, {}, {}, BASE_MS)
        return out.counts["received"]

    return run


def measure(fn: Callable[[dict[str, Any]], int], event: dict[str, Any], repeat: int) -> tuple[float, int]:
    """Median CPU seconds per event over `repeat` runs, and the readings one run saw. CPU time of
    this process, not wall time: the machine is shared, and other jobs' time slices on the same
    core would otherwise count as ours (one thread: CPU time is what a Lambda core spends)."""
    times = []
    readings = 0
    for _ in range(repeat):
        started = time.process_time()
        readings = fn(event)
        times.append(time.process_time() - started)
    return statistics.median(times), readings


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


FLOOR = "floor (pybase64 + orjson)"
# The floor as measured before the processor decoded base64 with pybase64 (earlier runs' floor).
BINASCII_FLOOR = "floor (binascii + orjson)"
KINDS = {
    "gateway": "gateway records, v1 (reading objects)",
    "columnar": "gateway records, v2 (columns)",
    "per_detector": "gateway records, v2, each detector's own event time",
    "single": "single-reading records",
}


def contenders(kind: str, registry: dict, zones: set[str], prior: dict) -> dict[str, Callable[[dict[str, Any]], int]]:
    out = {
        "naive handler": naive,
        FLOOR: make_floor(pybase64.b64decode),
        BINASCII_FLOOR: make_floor(binascii.a2b_base64),
    }
    if kind == "single":
        out["floor, typed (pybase64 + msgspec)"] = typed_floor
    if hasattr(core, "decode_batch_reference"):
        out["core, reference path"] = make_core(
            core.decode_batch_reference, core.apply_batch_reference, registry, zones, prior
        )
    out["core (decode_batch + apply_batch)"] = make_core(core.decode_batch, core.apply_batch, registry, zones, prior)
    return out


def run_kind(kind: str, records: int, repeat: int) -> None:
    """Measure every contender on one kind of event and print its table."""
    city = generate_city()
    registry = {s.sensor_id: s for s in city.sensors}
    zones = {z.zone_id for z in city.zones}
    warm, event = kinesis_events(city, kind, records, 2)
    # The zone state the previous batch left: the benchmark batch meets warm dedupe windows.
    warm_out = core.apply_batch(core.decode_batch(records_from_event(warm), registry, zones), {}, {}, {}, BASE_MS)
    prior = warm_out.zone_states
    results = {}
    for name, fn in contenders(kind, registry, zones, prior).items():
        seconds, readings = measure(fn, event, repeat)
        results[name] = (readings / seconds, seconds, readings)
    if kind == "columnar":  # the floor of the same readings as v1 messages, in this process too
        _, v1 = kinesis_events(city, "gateway", records, 2)
        seconds, readings = measure(make_floor(pybase64.b64decode), v1, repeat)
        results["floor of the same readings as v1"] = (readings / seconds, seconds, readings)
    base = results["naive handler"][0]
    flo = results[FLOOR][0]
    readings = results[FLOOR][2]
    print(
        f"\n{KINDS[kind]}: {readings:,} readings per batch, "
        f"{payload_bytes(event) / readings:,.1f} MQTT payload bytes per reading"
    )
    print(f"| {'contender':<36} | {'readings/s':>12} | {'ms/batch':>9} | {'x naive':>8} | {'of floor':>8} |")
    print("|---|---:|---:|---:|---:|")
    for name, (rate, seconds, _) in results.items():
        print(f"| {name:<36} | {rate:>12,.0f} | {seconds * 1000:>9.1f} | {rate / base:>8.2f} | {rate / flo:>8.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000, help="Kinesis records per batch")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per contender (median reported)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="record kinds to run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as a Lambda with 1,769 MB
    if not args.child:
        print(
            f"citypulse processor bench — Python {platform.python_version()}, {cpu_model()}, "
            f"nproc={os.cpu_count()}, pinned to one core; {args.records:,} records per batch, "
            f"median of {args.repeat}; each kind in a fresh process"
        )
    if len(args.kinds) == 1:
        run_kind(args.kinds[0], args.records, args.repeat)
        return
    # One process per kind, as a Lambda container serves one stream: measured in one process,
    # each kind ran 13-15 % slower after the ones before it (2026-12-05), floors and core alike.
    for kind in args.kinds:
        sys.stdout.flush()
        sizes = ["--records", str(args.records), "--repeat", str(args.repeat)]
        subprocess.run([sys.executable, "-m", "bench.processor_bench", "--child", "--kinds", kind, *sizes], check=True)


if __name__ == "__main__":
    main()
