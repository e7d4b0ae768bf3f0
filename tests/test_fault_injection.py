"""Issue #8: fault injection on the running local platform, every outcome compared with a clean run.

Two platforms of the same seed (`citypulse up`, 256 sensors, 16 zones, one gateway each) get the
same workload through the real path (gateway over mTLS → Mosquitto → rule bridge → kinesalite →
poller → real handler → ministack): first a clean one, then one whose processor reaches DynamoDB,
S3 and EventBridge through the fault-injecting proxy (infra/local/faults.py). The zones are split
into four groups, one per scenario, so each scenario's outcome is compared with the clean run's
for exactly its zones, **per sensor and per zone-minute**:

* the zone-minute aggregates (readings, vehicles, speed/occupancy/congestion sums and counts);
* the lake's rows per sensor (every column but the receive/processing times) and the `dt=/hour=`
  partition each row is in;
* the quarantine per sensor and reason (distinct rejected items);
* the processor's counters per zone (stored, quarantined by reason, late, received - duplicates);
* and `citypulse audit`: every zone balances, and per sensor
  published == stored + quarantined + dead-lettered.

The last test (consumer crash) needs no platform: the real handler in a real poller process over
kinesalite and ministack, `kill -9`ed mid-stream, against an in-process clean run.

Values are multiples of 1/4, so float sums are exact in any order. Both platforms run the processor
with 2 attempts per AWS call (`CITYPULSE_AWS_MAX_ATTEMPTS`), so an injected fault is more often
beyond botocore's retries and reaches the event-source mapping's retries too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from kinesis_records import city_minutes
from platform_harness import MINUTE_MS, Platform, message, publish_all, reading, running_platform

from infra.local.audit import render, run_audit
from infra.local.broker import Broker, start_broker
from infra.local.faults import FaultPlan, FaultRule
from infra.local.faults import stats as fault_stats
from infra.local.platform import REPO_ROOT, demo_city, process_start
from infra.local.scratch import fresh_processor
from streaming.parquet import read_parquet
from streaming.processor.handler import Processor
from streaming.registry import Sensor, generate_city

pytestmark = pytest.mark.integration

SENSORS, SEED = 256, 8
MINUTES = 5
GROUPS = ("time", "throttling", "outage", "broker")
DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=2))
AWS_MAX_ATTEMPTS = "2"
TIMEOUT = 180.0


# --- the workload: the same bytes for both runs ----------------------------------------------------


def _values(sensor_id: str, seq: int) -> dict[str, Any]:
    rng = random.Random(f"{SEED}/{sensor_id}/{seq}")
    return {
        "vehicle_count": rng.randrange(0, 40),
        "avg_speed_kmh": rng.randrange(0, 480) / 4,
        "occupancy_pct": rng.randrange(0, 400) / 4,
        "congestion_index": rng.randrange(0, 5) / 4,
    }


def _r(sensor: Sensor, seq: int, ts_ms: int, **over: Any) -> dict[str, Any]:
    return reading(sensor, seq, ts_ms, **{**_values(sensor.sensor_id, seq), **over})


def _last_sunday(year: int, month: int) -> datetime:
    day = datetime(year, month + 1, 1, tzinfo=UTC) - timedelta(days=1)
    return day - timedelta(days=(day.weekday() + 1) % 7)


@dataclass
class ZonePlan:
    """One zone's messages: `head` and `tail` in this order in every run; `minutes` in order in
    the clean run (a scenario may reorder them); then a device resend and the barrier."""

    sensors: list[Sensor]
    head: list[bytes] = field(default_factory=list)
    minutes: list[bytes] = field(default_factory=list)
    tail: list[bytes] = field(default_factory=list)
    stored: int = 0  # ground truth: readings the processor must store
    quarantined: Counter[str] = field(default_factory=Counter)  # reason → readings

    def messages(self, minutes_order: list[int] | None = None) -> list[bytes]:
        order = minutes_order or list(range(len(self.minutes)))
        resend = self.minutes[3]  # a device resend, byte for byte: duplicates
        barrier = message(self.sensors, [_r(self.sensors[-1], 10 + MINUTES, _BASE + MINUTES * MINUTE_MS)], _T0)
        return [*self.head, *(self.minutes[i] for i in order), resend, *self.tail, barrier]


_T0 = int(time.time() * 1000) // MINUTE_MS * MINUTE_MS  # the module's "now": the same for both runs
_BASE = _T0 - 30 * MINUTE_MS
_MIDNIGHT = (_T0 - 3 * HOUR_MS) // DAY_MS * DAY_MS


@dataclass
class Workload:
    groups: dict[str, list[str]]  # scenario → zones
    zones: dict[str, ZonePlan]

    def plan(self, group: str, minutes_order: dict[str, list[int]] | None = None) -> dict[str, list[bytes]]:
        order = minutes_order or {}
        return {self.zones[z].sensors[0].gateway_id: self.zones[z].messages(order.get(z)) for z in self.groups[group]}

    def expect_stored(self, group: str) -> dict[str, dict[str, int]]:
        return {z: {"stored": self.zones[z].stored} for z in self.groups[group]}


def build_workload() -> Workload:
    city = demo_city(SENSORS, SEED)
    by_zone = {s[0].zone_id: s for s in city.gateways().values()}
    zones = sorted(by_zone)
    groups = {g: zones[i :: len(GROUPS)] for i, g in enumerate(GROUPS)}  # spread over the shards
    plans: dict[str, ZonePlan] = {}
    for zone in zones:
        sensors = by_zone[zone]
        p = plans[zone] = ZonePlan(sensors)
        for m in range(MINUTES):
            readings = []
            for k, s in enumerate(sensors):
                ts = _BASE + m * MINUTE_MS + k * 250
                # Congested for three minutes, then clear: a CongestionDetected and a
                # CongestionCleared alert per zone, so EventBridge is written to as well.
                congestion = 1.0 if m < 3 else 0.0
                if m == 2 and k == 1:
                    readings.append(_r(s, 10 + m, ts, vehicle_count=-1, congestion_index=congestion))
                    p.quarantined["out_of_range"] += 1
                else:
                    readings.append(_r(s, 10 + m, ts, congestion_index=congestion))
                    p.stored += 1
            p.minutes.append(message(sensors, readings, _BASE + m * MINUTE_MS))
        p.stored += 1  # the barrier
    t_late, t_skew, t_midnight, t_dst = groups["time"]
    # Late: within the watermark (latest event time - 15 min) it is aggregated; beyond, lake only.
    s = plans[t_late].sensors
    p = plans[t_late]
    p.tail += [
        message(s, [_r(s[0], 50, _BASE + (MINUTES - 1) * MINUTE_MS - 10 * MINUTE_MS)], _T0),
        message(s, [_r(s[0], 51, _BASE - 20 * MINUTE_MS)], _T0),
    ]
    p.stored += 2
    # Clock skew, after the zone's minutes: 2 min ahead of the module's start is accepted;
    # 6 h ahead is quarantined; behind by 8 min is aggregated, behind by 20 min is late.
    s = plans[t_skew].sensors
    p = plans[t_skew]
    p.tail += [
        message(s, [_r(s[0], 60, _T0 + 2 * MINUTE_MS)], _T0),
        message(s, [_r(s[1], 60, _T0 + 6 * HOUR_MS)], _T0),  # far ahead however late the module runs
        message(s, [_r(s[2], 60, _T0 - 8 * MINUTE_MS)], _T0),
        message(s, [_r(s[3], 60, _T0 - 20 * MINUTE_MS)], _T0),
    ]
    p.stored += 3
    p.quarantined["future_timestamp"] += 1
    # Midnight and hour boundaries, one message straddling each (first, so nothing is late).
    s = plans[t_midnight].sensors
    p = plans[t_midnight]
    p.head += [
        message(s, [_r(s[0], 0, _MIDNIGHT - 500), _r(s[1], 0, _MIDNIGHT + 250)], _MIDNIGHT + 300),
        message(s, [_r(s[0], 1, _MIDNIGHT + HOUR_MS - 100), _r(s[1], 1, _MIDNIGHT + HOUR_MS + 100)], _MIDNIGHT),
    ]
    p.stored += 4
    # DST: the EU transitions (01:00 UTC on the last Sundays of March and October) of last year.
    s = plans[t_dst].sensors
    p = plans[t_dst]
    year = datetime.fromtimestamp(_T0 / 1000, UTC).year - 1
    for i, month in enumerate((3, 10)):
        switch = int((_last_sunday(year, month) + timedelta(hours=1)).timestamp() * 1000)
        p.head.append(message(s, [_r(s[0], i, switch - 100), _r(s[1], i, switch + 100)], switch))
        p.stored += 2
    return Workload(groups, plans)


WORKLOAD = build_workload()


# --- what is compared ---------------------------------------------------------------------------

_SKIP_COUNTERS = {"received", "duplicates", "redelivered_records"}


@dataclass
class Snapshot:
    minutes: dict[tuple[str, str], tuple[Any, ...]]
    lake: dict[str, list[tuple[Any, ...]]]  # sensor → sorted (partition, row without times)
    quarantine: dict[str, Counter[str]]  # sensor → reason → distinct items
    counters: dict[str, dict[str, int]]
    duplicates: dict[str, int]


def snapshot(platform: Platform, zones: list[str]) -> Snapshot:
    env = platform.info.env
    return take_snapshot(
        platform.ddb,
        platform.s3,
        env["CITYPULSE_ZONE_METRICS_TABLE"],
        env["CITYPULSE_LAKE_BUCKET"],
        platform.zone_counters(),
        zones,
    )


def take_snapshot(
    ddb: Any, s3: Any, metrics_table: str, bucket: str, counters: dict[str, dict[str, int]], zones: list[str]
) -> Snapshot:
    now_s = time.time()
    minutes = {}
    for zone in zones:
        pages = ddb.get_paginator("query").paginate(
            TableName=metrics_table,
            KeyConditionExpression="zone_id = :z",
            ExpressionAttributeValues={":z": {"S": zone}},
            ConsistentRead=True,
        )
        for page in pages:
            for item in page["Items"]:
                if int(item["expires_at"]["N"]) < now_s:
                    continue  # past the 7-day TTL (the DST minutes): the emulator may purge it any time
                minutes[(zone, item["bucket"]["S"])] = tuple(
                    item[k]["N"]
                    for k in (
                        "readings",
                        "vehicles",
                        "speed_sum",
                        "speed_n",
                        "occupancy_sum",
                        "occupancy_n",
                        "congestion_sum",
                    )
                )
    lake: dict[str, set[tuple[Any, ...]]] = {}
    quarantine: dict[str, set[tuple[str, str]]] = {}
    for prefix in ("raw/readings/", "quarantine/"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                partition = "/".join(o["Key"].split("/")[-3:-1])
                for row in read_parquet(body).to_pylist():
                    if row["zone_id"] not in zones:
                        continue
                    if prefix == "quarantine/":
                        quarantine.setdefault(row["sensor_id"], set()).add((row["reason_code"], row["source_id"]))
                    else:
                        kept = tuple(v for k, v in row.items() if k not in ("received_at", "processed_at"))
                        lake.setdefault(row["sensor_id"], set()).add((partition, *kept))
    return Snapshot(
        minutes=minutes,
        lake={s: sorted(rows) for s, rows in lake.items()},
        quarantine={s: Counter(code for code, _ in items) for s, items in quarantine.items()},
        counters={
            z: {
                **{k: v for k, v in counters[z].items() if k not in _SKIP_COUNTERS},
                "distinct_received": counters[z]["received"] - counters[z].get("duplicates", 0),
            }
            for z in zones
        },
        duplicates={z: counters[z].get("duplicates", 0) for z in zones},
    )


def assert_same_as_clean(faulty: Snapshot, clean: Snapshot) -> None:
    assert faulty.counters == clean.counters
    assert faulty.minutes == clean.minutes
    assert faulty.lake == clean.lake
    assert faulty.quarantine == clean.quarantine


def assert_audit_balances(platform: Platform, zones: list[str]) -> None:
    report = run_audit(platform.state, *ALL_TIME)
    text = render(report)
    assert report.counters_balance and report.balanced is True, text
    assert report.dead_lettered == 0 and report.dead_letter_batches == 0, text
    for zone in zones:
        for s in WORKLOAD.zones[zone].sensors:
            audited = report.sensors[s.sensor_id]
            assert audited.dead_lettered == 0
            assert audited.received_distinct == _published(s), (s.sensor_id, text)


def _published(sensor: Sensor) -> int:
    """Distinct readings of `sensor` in the workload: each must be stored or quarantined once."""
    keys = set()
    for payload in WORKLOAD.zones[sensor.zone_id].messages():
        for r in orjson.loads(payload)["readings"]:
            if r["sensor_id"] == sensor.sensor_id:
                keys.add(r["seq"])
    return len(keys)


# --- the two platforms ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CITYPULSE_AWS_MAX_ATTEMPTS", AWS_MAX_ATTEMPTS)  # inherited by the pollers
        yield


@pytest.fixture(scope="module")
def clean(processor_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Snapshot]:
    """The clean run: every group's workload, in order, no faults; its snapshot per group."""
    with running_platform(tmp_path_factory.mktemp("clean"), SENSORS, SEED) as p:
        plan = {gw: msgs for g in GROUPS for gw, msgs in WORKLOAD.plan(g).items()}
        publish_all(p, plan, basic_ingest=False)
        p.wait_for_counters({z: e for g in GROUPS for z, e in WORKLOAD.expect_stored(g).items()}, key="stored")
        for g in GROUPS:
            assert_audit_balances(p, WORKLOAD.groups[g])
        return {g: snapshot(p, WORKLOAD.groups[g]) for g in GROUPS}


@dataclass
class Faulty:
    platform: Platform
    plan_path: Path

    def set_plan(self, scenario: str, *rules: FaultRule) -> None:
        FaultPlan(SEED, scenario, rules).write(self.plan_path)

    def fault_stats(self) -> dict[str, Any]:
        return fault_stats(self.platform.info.endpoints["faults"])

    def poller_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.platform.state / "logs").glob("poller-*.log"))


@pytest.fixture(scope="module")
def faulty(clean: dict[str, Snapshot], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    root = tmp_path_factory.mktemp("faulty")
    plan_path = root / "faults.json"
    FaultPlan(SEED).write(plan_path)
    with running_platform(root / "state", SENSORS, SEED, faults=plan_path) as p:
        yield Faulty(p, plan_path)


# --- 3. time (first: its clock-skew readings are relative to the module's start) -------------------


def test_late_out_of_order_skewed_and_boundary_readings_match_the_clean_run(
    faulty: Faulty, clean: dict[str, Snapshot]
) -> None:
    p = faulty.platform
    zones = WORKLOAD.groups["time"]
    rng = random.Random(SEED)
    shuffled = {z: rng.sample(range(MINUTES), MINUTES) for z in zones}
    assert any(order != sorted(order) for order in shuffled.values())
    publish_all(p, WORKLOAD.plan("time", shuffled), basic_ingest=False)
    p.wait_for_counters(WORKLOAD.expect_stored("time"), key="stored")
    got = snapshot(p, zones)
    assert_same_as_clean(got, clean["time"])
    assert_audit_balances(p, zones)

    t_late, t_skew, t_midnight, t_dst = zones
    # Both sides of the watermark: 10 min behind the latest event time is aggregated into its
    # minute; 20 min behind is in the lake, counted late, in no zone-minute.
    within = datetime.fromtimestamp((_BASE + (MINUTES - 1) * MINUTE_MS - 10 * MINUTE_MS) / 1000, UTC)
    beyond = datetime.fromtimestamp((_BASE - 20 * MINUTE_MS) / 1000, UTC)
    assert got.minutes[(t_late, f"m#{within:%Y-%m-%dT%H:%M}")][0] == "1"
    assert (t_late, f"m#{beyond:%Y-%m-%dT%H:%M}") not in got.minutes
    assert got.counters[t_late]["late"] == 1
    assert any(row[4] == 51 for row in got.lake[WORKLOAD.zones[t_late].sensors[0].sensor_id])
    # Skew: ahead 2 min stored; ahead 6 h quarantined; after the ahead reading moved the
    # watermark, 20 min behind is late (as is the barrier, 30 min behind) and 8 min behind is not.
    s = WORKLOAD.zones[t_skew].sensors
    assert got.quarantine[s[1].sensor_id] == Counter(future_timestamp=1, out_of_range=1)  # and its bad minute
    assert got.counters[t_skew]["late"] == 2
    ahead = datetime.fromtimestamp((_T0 + 2 * MINUTE_MS) / 1000, UTC)
    behind = datetime.fromtimestamp((_T0 - 8 * MINUTE_MS) / 1000, UTC)
    assert got.minutes[(t_skew, f"m#{ahead:%Y-%m-%dT%H:%M}")][0] == "1"
    assert got.minutes[(t_skew, f"m#{behind:%Y-%m-%dT%H:%M}")][0] == "1"
    # Midnight and hour: each reading of a straddling message in its own dt=/hour= and minute.
    day_before = datetime.fromtimestamp((_MIDNIGHT - 1) / 1000, UTC)
    day = datetime.fromtimestamp(_MIDNIGHT / 1000, UTC)
    s = WORKLOAD.zones[t_midnight].sensors
    parts = {(row[0], row[4]) for sensor in s[:2] for row in got.lake[sensor.sensor_id] if row[4] < 2}
    assert parts == {
        (f"dt={day_before:%Y-%m-%d}/hour=23", 0),
        (f"dt={day:%Y-%m-%d}/hour=00", 0),
        (f"dt={day:%Y-%m-%d}/hour=00", 1),
        (f"dt={day:%Y-%m-%d}/hour=01", 1),
    }
    for minute in (f"{day_before:%Y-%m-%d}T23:59", f"{day:%Y-%m-%d}T00:00", f"{day:%Y-%m-%d}T00:59"):
        assert got.minutes[(t_midnight, f"m#{minute}")][0] == "1"
    assert got.counters[t_midnight].get("late", 0) == 0
    # DST: UTC throughout. The reading 100 ms after the switch is in hour=01 although Amsterdam's
    # wall clock jumped 02:00 → 03:00 (March) or 03:00 → 02:00 (October) at that instant.
    amsterdam = ZoneInfo("Europe/Amsterdam")
    s = WORKLOAD.zones[t_dst].sensors
    rows = sorted(row[0] for sensor in s[:2] for row in got.lake[sensor.sensor_id] if row[4] < 2)
    assert rows == [f"dt={d}/hour={h}" for d in _dst_days() for h in ("00", "01")]
    for d in _dst_days():
        switch = datetime.fromisoformat(f"{d}T01:00:00+00:00")
        before, after = switch - timedelta(milliseconds=100), switch + timedelta(milliseconds=100)
        assert before.astimezone(amsterdam).utcoffset() != after.astimezone(amsterdam).utcoffset()
    assert got.counters[t_dst].get("late", 0) == 0


def _dst_days() -> list[str]:
    year = datetime.fromtimestamp(_T0 / 1000, UTC).year - 1
    return [f"{_last_sunday(year, m):%Y-%m-%d}" for m in (3, 10)]


def publish_in_steps(p: Platform, plan: dict[str, list[bytes]]) -> None:
    """Every gateway publishes its i-th message, then waits until the processor has received it:
    one batch per step, so the faults meet many batches (and every alert of the run)."""
    zone_of = {gw_id: p.gateways[gw_id][0].zone_id for gw_id in plan}
    gateways = {gw_id: p.connect(gw_id, basic_ingest=False) for gw_id in plan}
    received: Counter[str] = Counter()
    try:
        for i in range(max(len(msgs) for msgs in plan.values())):
            for gw_id, gw in gateways.items():
                if i < len(plan[gw_id]):
                    gw.publish_telemetry(zone_of[gw_id], plan[gw_id][i])
                    received[zone_of[gw_id]] += len(orjson.loads(plan[gw_id][i])["readings"])
            for gw in gateways.values():
                assert gw.flush(60).failed == 0
            p.wait_for_counters({z: {"received": n} for z, n in received.items()}, timeout=TIMEOUT)
    finally:
        for gw in gateways.values():
            gw.disconnect()


# --- 1. throttling and 5xx ---------------------------------------------------------------------------


def test_throttling_and_5xx_are_retried_to_the_clean_totals(faulty: Faulty, clean: dict[str, Snapshot]) -> None:
    p = faulty.platform
    zones = WORKLOAD.groups["throttling"]
    kinds = ("throttle", "500", "503")
    # EventBridge is called once per batch with alerts, the others several times per batch.
    rules = (FaultRule("dynamodb", 0.25, kinds), FaultRule("s3", 0.25, kinds), FaultRule("events", 0.5, kinds))
    faulty.set_plan("throttling", *rules)
    try:
        publish_in_steps(p, WORKLOAD.plan("throttling"))
        p.wait_for_counters(WORKLOAD.expect_stored("throttling"), key="stored", timeout=TIMEOUT)
    finally:
        faulty.set_plan("healthy")
    injected = faulty.fault_stats()["injected"]["throttling"]
    assert set(injected) == {"dynamodb", "s3", "events"}, injected
    # Beyond botocore's attempts the batch was reported failed and retried by the mapping.
    logs = faulty.poller_logs()
    assert "batch failed; reporting it for retry" in logs
    assert "on-failure destination" not in logs
    assert p.dlq_depth() == 0
    assert_same_as_clean(snapshot(p, zones), clean["throttling"])
    assert_audit_balances(p, zones)


# --- 1b. an outage beyond every retry: dead-lettered, counted, redriven -------------------------------


def test_an_outage_dead_letters_counted_batches_and_a_redrive_restores_the_clean_totals(
    faulty: Faulty, clean: dict[str, Snapshot]
) -> None:
    p = faulty.platform
    zones = WORKLOAD.groups["outage"]
    sensors = [s for z in zones for s in WORKLOAD.zones[z].sensors]
    published = {s.sensor_id: _published(s) for s in sensors}
    faulty.set_plan("outage", FaultRule("dynamodb", 1.0, ("503",)))
    try:
        publish_all(p, WORKLOAD.plan("outage"), basic_ingest=False)
        deadline = time.monotonic() + TIMEOUT
        while True:
            report = run_audit(p.state, *ALL_TIME)
            if sum(report.sensors[s].dead_lettered for s in published if s in report.sensors) == sum(
                published.values()
            ):
                break
            assert time.monotonic() < deadline, render(report)
            time.sleep(1.0)  # polling the pollers' retries; no event to wait on
    finally:
        faulty.set_plan("healthy")
    # Nothing stored, nothing silently dropped: each reading is on the on-failure queue, counted.
    for sensor_id, n in published.items():
        s = report.sensors[sensor_id]
        assert (s.stored, sum(s.quarantined.values()), s.dead_lettered) == (0, 0, n), sensor_id
        assert s.received_distinct == n
    assert report.dead_letter_batches >= 1 and "on-failure" in render(report)
    assert "RetryAttemptsExhausted" in faulty.poller_logs()

    redrive = subprocess.run(
        [sys.executable, "-m", "infra.local.poller", "redrive", "--dlq-url", p.info.env["CITYPULSE_PROCESSOR_DLQ_URL"]],
        cwd=REPO_ROOT,
        env={**os.environ, **p.info.env},
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert redrive.returncode == 0, redrive.stderr.decode()[-3000:]
    assert b'"event":"redriven"' in redrive.stdout
    counters = p.zone_counters()
    assert all(counters[z]["stored"] == WORKLOAD.zones[z].stored for z in zones), counters
    assert p.dlq_depth() == 0
    assert_same_as_clean(snapshot(p, zones), clean["outage"])
    assert_audit_balances(p, zones)


# --- 2. the broker killed with messages in flight --------------------------------------------------


@pytest.fixture(scope="module")
def broker_restarts(faulty: Faulty) -> Iterator[list[Broker]]:
    """Brokers a test restarted in place of the platform's: stopped before the platform."""
    restarted: list[Broker] = []
    yield restarted
    for b in restarted:
        b.stop()


def test_broker_kill_9_with_messages_in_flight_loses_nothing_and_doubles_nothing(
    faulty: Faulty, clean: dict[str, Snapshot], broker_restarts: list[Broker]
) -> None:
    p = faulty.platform
    zones = WORKLOAD.groups["broker"]
    plan = WORKLOAD.plan("broker")
    half = {gw_id: len(msgs) // 2 for gw_id, msgs in plan.items()}
    window = {gw_id: len(msgs) - half[gw_id] for gw_id, msgs in plan.items()}
    # Each gateway's offline buffer (its in-flight window) can hold everything it sends after the first half.
    gateways = {
        gw_id: p.connect(gw_id, basic_ingest=False, max_in_flight=window[gw_id], reconnect_max_timeout_secs=2)
        for gw_id in plan
    }
    zone_of = {gw_id: p.gateways[gw_id][0].zone_id for gw_id in plan}
    resent = dict.fromkeys(plan, 0)
    try:
        for gw_id, gw in gateways.items():
            for payload in plan[gw_id][: half[gw_id]]:
                gw.publish_telemetry(zone_of[gw_id], payload)
            gw.flush(60)
        # The next message of each gateway goes out with the kill: its PUBACK may or may not come.
        for gw_id, gw in gateways.items():
            gw.publish_telemetry(zone_of[gw_id], plan[gw_id][half[gw_id]])
        pid = p.info.pids["mosquitto"]
        assert p.info.running("mosquitto")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while process_start(pid) is not None:
            assert time.monotonic() < deadline, "mosquitto survived SIGKILL"
            time.sleep(0.05)  # waiting for the kernel to reap another process
        # Offline: the gateways buffer the rest. Once a gateway has seen the drop, its in-flight count
        # is final, so the test tops the window up with resends of the first message (duplicates) until
        # it is full; one more publish is then refused, counted, and stays with the caller.
        for gw_id, gw in gateways.items():
            unacked = gw.wait_online(False, timeout=30).in_flight
            assert unacked in (0, 1)  # the message sent with the kill
            for payload in plan[gw_id][half[gw_id] + 1 :]:
                gw.publish_telemetry(zone_of[gw_id], payload, timeout=5)
            resent[gw_id] = window[gw_id] - gw.stats.in_flight
            assert resent[gw_id] == 1 - unacked
            for _ in range(resent[gw_id]):
                gw.publish_telemetry(zone_of[gw_id], plan[gw_id][0], timeout=5)
            with pytest.raises(TimeoutError):
                gw.publish_telemetry(zone_of[gw_id], plan[gw_id][0], timeout=0.2)
            assert gw.stats.refused == 1
        broker_restarts.append(
            start_broker(
                p.state / "broker",
                p.ca,
                port=int(p.info.env["CITYPULSE_MQTT_PORT"]),
                basic_ingest_rule=p.info.env["CITYPULSE_TOPIC_RULE"],
            )
        )
        for gw_id, gw in gateways.items():
            stats = gw.flush(60)
            n = len(plan[gw_id]) + resent[gw_id]
            assert (stats.published, stats.acked, stats.failed, stats.refused) == (n, n, 0, 1)
            assert stats.interruptions >= 1 and stats.resumptions >= 1
            gw.publish_telemetry(zone_of[gw_id], plan[gw_id][0])  # the refused one, now: a duplicate
            assert gw.flush(60).acked == n + 1
    finally:
        for gw in gateways.values():
            gw.disconnect()
    p.wait_for_counters(WORKLOAD.expect_stored("broker"), key="stored", timeout=TIMEOUT)
    got = snapshot(p, zones)
    assert_same_as_clean(got, clean["broker"])
    # QoS 1 resends after the reconnect may arrive twice: absorbed as duplicates, never stored twice.
    assert all(got.duplicates[z] >= clean["broker"].duplicates[z] for z in zones)
    assert_audit_balances(p, zones)


# --- 4. consumer crash: the real handler killed -9 mid-stream, repeatedly ---------------------------

CRASH_CITY = generate_city(sensors=160, zones=3, seed=9)


def _processor_snapshot(proc: Processor) -> Snapshot:
    counters = {z.zone_id: dict(z.counters) for z in proc.store.scan_zone_states()}
    s = proc.settings
    return take_snapshot(proc.store.dynamodb, proc.lake.s3, s.metrics_table, s.lake_bucket, counters, sorted(counters))


def test_the_real_handler_killed_mid_stream_repeatedly_gives_the_clean_totals(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    """test_poller kills a poller with a recording handler, test_processor_redelivery crashes the
    processor in-process before its commit; here the real handler in a real poller process is
    `kill -9`ed wherever it happens to be (lake write, aggregates, commit) and restarted."""
    import boto3

    start = (_T0 - 10 * MINUTE_MS) // HOUR_MS * HOUR_MS
    records = list(city_minutes(CRASH_CITY, 6, start_ms=start, congestion=0.75))
    clean = fresh_processor(CRASH_CITY)
    for i in range(0, len(records), 7):
        clean.process(records[i : i + 7])
    expected = _processor_snapshot(clean)
    total = sum(c["stored"] for c in expected.counters.values())
    assert total == 6 * len(CRASH_CITY.sensors) and expected.minutes

    crashed = fresh_processor(CRASH_CITY)
    kinesis = boto3.client("kinesis")
    stream = f"crash-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
    for i in range(0, len(records), 100):
        batch = [{"Data": r.data, "PartitionKey": "z"} for r in records[i : i + 100]]
        assert kinesis.put_records(StreamName=stream, Records=batch)["FailedRecordCount"] == 0
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    s = crashed.settings
    env = {
        **os.environ,
        "CITYPULSE_LAKE_BUCKET": s.lake_bucket,
        "CITYPULSE_PROCESSOR_STATE_TABLE": s.processor_table,
        "CITYPULSE_ZONE_METRICS_TABLE": s.metrics_table,
        "CITYPULSE_EVENT_BUS": s.event_bus,
        "CITYPULSE_REGISTRY_KEY": s.registry_key,
    }
    argv = [
        *(sys.executable, "-m", "infra.local.poller", "--stream", stream, "--shard", shard),
        *("--checkpoint-dir", str(tmp_path / "cp"), "--batch-size", "3", "--batching-window", "0"),
    ]

    def stored() -> int:
        return sum(z.counters.get("stored", 0) for z in crashed.store.scan_zone_states())

    log = tmp_path / "poller.log"

    def run_until(done: Callable[[], bool]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + TIMEOUT
        while not done():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the poller made no progress"
            time.sleep(0.02)  # watching another process's progress
        return proc

    for fraction in (0.2, 0.45, 0.7):  # kill -9 three times, each after more was committed
        proc = run_until(lambda f=fraction: stored() >= f * total)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, "the poller had ended by itself: nothing was killed"
    proc = run_until(lambda: stored() >= total)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    got = _processor_snapshot(crashed)
    assert_same_as_clean(got, expected)
