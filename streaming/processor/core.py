"""The processor's pure core: Kinesis records in, everything to write out. No AWS types.

Two phases, so that the handler can load exactly the state a batch needs:

1. `decode_batch` — decode envelopes and messages, validate each reading against the
   contract and the registry, group by zone. Bad input becomes quarantine rows with a
   reason; it never stops the good readings beside it.
2. `apply_batch` — given the zones' prior state and the zone-minute aggregates the
   batch touches, skip redelivered records (per-zone markers), deduplicate readings on
   (sensor_id, seq), aggregate per zone-minute, update live sensor values, run the
   congestion and silence detectors, and emit lake rows, quarantine rows, new state,
   alerts and counts.

Everything `apply_batch` produces is a deterministic function of (prior state, records):
replaying a batch after a crash reproduces the same decisions, which is what makes the
writes idempotent.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from streaming.contract import ContractError, Reading, format_ts, validate_reading
from streaming.processor.envelope import Envelope, decode_envelope, parse_readings
from streaming.processor.state import (
    BEYOND_WINDOW,
    DUPLICATE,
    MinuteAggregate,
    SensorState,
    ShardCounters,
    ZoneState,
)
from streaming.registry import Sensor

MINUTE_MS = 60_000
HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Record:
    """A Kinesis record without AWS types: where it sits in the stream and its bytes."""

    shard_id: str
    sequence_number: int
    data: bytes


@dataclass(frozen=True)
class DetectorSettings:
    """Thresholds of the detectors; documented in docs/architecture.md."""

    congestion_raise: float = 0.7  # zone-minute mean congestion index that raises an episode
    congestion_clear: float = 0.4  # ... and that clears it (hysteresis band between)
    congestion_min_minutes: int = 2  # consecutive closed minutes before either transition
    allowed_lateness_ms: int = 15 * MINUTE_MS  # older than the zone's watermark by more: "late"
    max_future_skew_ms: int = 5 * MINUTE_MS  # event time ahead of receive time by more: rejected
    silence_ms: int = 5 * MINUTE_MS  # a sensor quiet this long (receive time) is "silent"


@dataclass(frozen=True)
class Alert:
    """An event for the alerts bus. `event_id` is deterministic, so consumers can drop
    the copies a retried batch may send."""

    detail_type: str  # CongestionDetected | CongestionCleared | SensorSilent
    event_id: str
    detail: dict[str, Any]


@dataclass(slots=True)
class _Item:
    record: Record
    envelope: Envelope
    index: int
    raw: Any
    reading: Reading | None  # None → `error` says why
    error: ContractError | None


@dataclass
class DecodedBatch:
    """Phase-1 result: readings grouped by zone, plus what could not be attributed."""

    by_zone: dict[str, list[_Item]] = field(default_factory=dict)
    unattributed: list[tuple[Record, ContractError, bytes, Envelope | None]] = field(default_factory=list)
    last_sequence: dict[str, int] = field(default_factory=dict)  # shard → highest seq in batch
    sent_at: list[int] = field(default_factory=list)  # gateway publish times, for latency metrics

    def minute_keys(self) -> set[tuple[str, int]]:
        """(zone, minute) of every valid reading: the aggregates phase 2 needs loaded."""
        return {(zone, item.reading.ts_ms // MINUTE_MS)
                for zone, items in self.by_zone.items() for item in items if item.reading is not None}


def decode_batch(records: Iterable[Record], registry: Mapping[str, Sensor], zones: set[str]) -> DecodedBatch:
    """Phase 1: decode and validate, without any state."""
    out = DecodedBatch()
    for rec in records:
        last = out.last_sequence.get(rec.shard_id, -1)
        out.last_sequence[rec.shard_id] = max(last, rec.sequence_number)
        try:
            env = decode_envelope(rec.data)
        except ContractError as exc:
            out.unattributed.append((rec, exc, rec.data, None))
            continue
        if env.zone_id not in zones:
            out.unattributed.append((rec, ContractError("unknown_zone", f"topic zone {env.zone_id} is not in "
                                                        "the registry"), env.payload, env))
            continue
        items = out.by_zone.setdefault(env.zone_id, [])
        try:
            raws, sent_at_ms = parse_readings(env)
        except ContractError as exc:
            items.append(_Item(rec, env, -1, None, None, exc))
            continue
        if sent_at_ms is not None:
            out.sent_at.append(sent_at_ms)
        for index, raw in enumerate(raws):
            try:
                reading = validate_reading(raw)
                _check_against_registry(reading, env, registry)
            except ContractError as exc:
                items.append(_Item(rec, env, index, raw, None, exc))
                continue
            items.append(_Item(rec, env, index, raw, reading, None))
    return out


def _check_against_registry(r: Reading, env: Envelope, registry: Mapping[str, Sensor]) -> None:
    sensor = registry.get(r.sensor_id)
    if sensor is None:
        raise ContractError("unknown_sensor", f"reading {r.sensor_id} seq {r.seq}: sensor is not in the registry")
    if r.zone_id != sensor.zone_id:
        raise ContractError("zone_mismatch", f"reading {r.sensor_id} seq {r.seq}: zone_id={r.zone_id} but the "
                                             f"registry places the sensor in {sensor.zone_id}")
    if env.zone_id != sensor.zone_id:
        raise ContractError("zone_mismatch", f"reading {r.sensor_id} seq {r.seq}: published on zone topic "
                                             f"{env.zone_id} but the sensor is in {sensor.zone_id}")
    if env.gateway_id != sensor.gateway_id:
        raise ContractError("wrong_gateway", f"reading {r.sensor_id} seq {r.seq}: delivered by {env.gateway_id} "
                                             f"but the sensor belongs to {sensor.gateway_id}")


class LakeColumns:
    """Column lists for one lake file (one event-time hour): cheap to append, and pyarrow
    turns them into a table without a per-row object."""

    NAMES = ("sensor_id", "zone_id", "ts", "seq", "vehicle_count", "avg_speed_kmh", "occupancy_pct",
             "congestion_index", "lane", "gateway_id", "received_at", "processed_at")

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self.NAMES}

    def append(self, r: Reading, gateway_id: str, received_at_ms: int, processed_at_ms: int) -> None:
        c = self.columns
        c["sensor_id"].append(r.sensor_id)
        c["zone_id"].append(r.zone_id)
        c["ts"].append(r.ts_ms)
        c["seq"].append(r.seq)
        c["vehicle_count"].append(r.vehicle_count)
        c["avg_speed_kmh"].append(r.avg_speed_kmh)
        c["occupancy_pct"].append(r.occupancy_pct)
        c["congestion_index"].append(r.congestion_index)
        c["lane"].append(r.lane)
        c["gateway_id"].append(gateway_id)
        c["received_at"].append(received_at_ms)
        c["processed_at"].append(processed_at_ms)

    def __len__(self) -> int:
        return len(self.columns["seq"])


class QuarantineColumns:
    NAMES = ("received_at", "processed_at", "reason_code", "reason", "sensor_id", "gateway_id", "zone_id",
             "source_id", "raw")

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self.NAMES}

    def append(self, *, received_at_ms: int, processed_at_ms: int, error: ContractError, raw: bytes,
               record: Record, index: int, sensor_id: str | None = None, gateway_id: str | None = None,
               zone_id: str | None = None) -> None:
        c = self.columns
        c["received_at"].append(received_at_ms)
        c["processed_at"].append(processed_at_ms)
        c["reason_code"].append(error.code)
        c["reason"].append(str(error))
        c["sensor_id"].append(sensor_id)
        c["gateway_id"].append(gateway_id)
        c["zone_id"].append(zone_id)
        c["source_id"].append(f"{record.shard_id}/{record.sequence_number}/{index}")
        c["raw"].append(base64.b64encode(raw).decode())

    def __len__(self) -> int:
        return len(self.columns["reason_code"])


@dataclass
class BatchOutput:
    """Everything one batch writes. Counts are per reading, and balance:
    received == stored + duplicates + quarantined. A message that cannot be split into
    readings counts once, as `quarantined_messages`."""

    lake: dict[int, LakeColumns] = field(default_factory=lambda: defaultdict(LakeColumns))  # by hour
    quarantine: dict[int, QuarantineColumns] = field(default_factory=lambda: defaultdict(QuarantineColumns))
    zone_states: dict[str, ZoneState] = field(default_factory=dict)
    minutes: dict[tuple[str, int], MinuteAggregate] = field(default_factory=dict)
    shard_counters: dict[str, ShardCounters] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _sensor_id_of(raw: Any) -> str | None:
    if isinstance(raw, dict):
        sid = raw.get("sensor_id")
        if isinstance(sid, str):
            return sid[:64]
    return None


def apply_batch(
    decoded: DecodedBatch,
    zone_states: Mapping[str, ZoneState],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    shard_counters: Mapping[str, ShardCounters],
    processed_at_ms: int,
    settings: DetectorSettings = DetectorSettings(),
) -> BatchOutput:
    """Phase 2: apply the decoded batch to prior state. Inputs are not modified."""
    out = BatchOutput()
    for rec, err, raw, env in decoded.unattributed:
        sc = out.shard_counters.get(rec.shard_id)
        if sc is None:
            prior = shard_counters.get(rec.shard_id)
            sc = ShardCounters(rec.shard_id, prior.marker_seq if prior else -1,
                               dict(prior.counters) if prior else {})
            out.shard_counters[rec.shard_id] = sc
        if rec.sequence_number <= sc.marker_seq:
            out.counts["redelivered_records"] += 1
            continue
        sc.marker_seq = rec.sequence_number
        sc.count("quarantined_messages")
        sc.count(f"quarantined_{err.code}")
        out.counts["quarantined_messages"] += 1
        received = env.received_at_ms if env else processed_at_ms
        out.quarantine[received // HOUR_MS].append(
            received_at_ms=received, processed_at_ms=processed_at_ms, error=err, raw=raw, record=rec, index=-1,
            gateway_id=env.gateway_id if env else None, zone_id=env.zone_id if env else None)

    for zone_id, items in decoded.by_zone.items():
        prior = zone_states.get(zone_id)
        state = ZoneState.from_bytes(prior.to_bytes()) if prior else ZoneState(zone_id)
        _apply_zone(state, items, minutes, out, processed_at_ms, settings)
        out.zone_states[zone_id] = state
    return out


def _apply_zone(state: ZoneState, items: list[_Item], minutes: Mapping[tuple[str, int], MinuteAggregate],
                out: BatchOutput, processed_at_ms: int, settings: DetectorSettings) -> None:
    zone_id = state.zone_id
    counts = out.counts
    last_record: Record | None = None
    latest_received = 0
    for item in items:
        rec = item.record
        if state.already_applied(rec.shard_id, rec.sequence_number):
            if item.index <= 0:
                counts["redelivered_records"] += 1
            continue
        last_record = rec
        env = item.envelope
        latest_received = max(latest_received, env.received_at_ms)
        if item.reading is None:
            err = item.error
            assert err is not None
            unit = "quarantined_messages" if item.index < 0 else "quarantined"
            if item.index >= 0:
                state.count("received")
                counts["received"] += 1
            state.count(unit)
            state.count(f"quarantined_{err.code}")
            counts[unit] += 1
            raw = env.payload if item.index < 0 else orjson.dumps(item.raw, option=orjson.OPT_NON_STR_KEYS)
            out.quarantine[env.received_at_ms // HOUR_MS].append(
                received_at_ms=env.received_at_ms, processed_at_ms=processed_at_ms, error=err, raw=raw,
                record=rec, index=item.index, sensor_id=_sensor_id_of(item.raw), gateway_id=env.gateway_id,
                zone_id=zone_id)
            continue
        r = item.reading
        state.count("received")
        counts["received"] += 1
        if r.ts_ms > env.received_at_ms + settings.max_future_skew_ms:
            err = ContractError("future_timestamp", f"reading {r.sensor_id} seq {r.seq}: ts={format_ts(r.ts_ms)} "
                                                    f"is after receive time {format_ts(env.received_at_ms)}")
            state.count("quarantined")
            state.count("quarantined_future_timestamp")
            counts["quarantined"] += 1
            out.quarantine[env.received_at_ms // HOUR_MS].append(
                received_at_ms=env.received_at_ms, processed_at_ms=processed_at_ms, error=err,
                raw=orjson.dumps(item.raw), record=rec, index=item.index, sensor_id=r.sensor_id,
                gateway_id=env.gateway_id, zone_id=zone_id)
            continue
        sensor = state.sensors.get(r.sensor_id)
        if sensor is None:
            sensor = state.sensors[r.sensor_id] = SensorState()
        verdict = sensor.admit(r.seq)
        if verdict == DUPLICATE:
            state.count("duplicates")
            counts["duplicates"] += 1
            continue
        out.lake[r.ts_ms // HOUR_MS].append(r, env.gateway_id, env.received_at_ms, processed_at_ms)
        state.count("stored")
        counts["stored"] += 1
        if verdict == BEYOND_WINDOW or r.ts_ms < state.watermark_ms - settings.allowed_lateness_ms:
            # Kept in the lake (the warehouse load dedupes it), left out of live aggregates.
            state.count("late")
            counts["late"] += 1
            continue
        _aggregate(state, sensor, r, env, rec, minutes, out)

    if last_record is None:
        return  # the whole zone's share of the batch was a redelivery
    state.marker_shard = last_record.shard_id
    state.marker_seq = last_record.sequence_number
    _close_minutes(state, out, settings)
    _detect_silence(state, latest_received, out, settings)


def _aggregate(state: ZoneState, sensor: SensorState, r: Reading, env: Envelope, rec: Record,
               minutes: Mapping[tuple[str, int], MinuteAggregate], out: BatchOutput) -> None:
    if r.ts_ms >= sensor.last_ts_ms:
        sensor.last_ts_ms = r.ts_ms
        sensor.vehicle_count = r.vehicle_count
        sensor.avg_speed_kmh = r.avg_speed_kmh
        sensor.occupancy_pct = r.occupancy_pct
        sensor.congestion_index = r.congestion_index
    sensor.last_received_ms = max(sensor.last_received_ms, env.received_at_ms)
    if sensor.silent:
        sensor.silent = False
    state.watermark_ms = max(state.watermark_ms, r.ts_ms)

    minute = r.ts_ms // MINUTE_MS
    key = (state.zone_id, minute)
    prior = minutes.get(key)
    # Checked against the stored aggregate, not the one being built: the item may have
    # been written by an earlier attempt of this batch that died before the zone state.
    if prior is None or not prior.already_applied(rec.shard_id, rec.sequence_number):
        agg = out.minutes.get(key)
        if agg is None:
            agg = out.minutes[key] = replace(prior) if prior else MinuteAggregate()
        agg.readings += 1
        agg.vehicles += r.vehicle_count
        if r.avg_speed_kmh is not None:
            agg.speed_sum += r.avg_speed_kmh
            agg.speed_n += 1
        if r.occupancy_pct is not None:
            agg.occupancy_sum += r.occupancy_pct
            agg.occupancy_n += 1
        agg.congestion_sum += r.congestion_index
        agg.marker_shard, agg.marker_seq = rec.shard_id, rec.sequence_number
    if minute > state.evaluated_minute:
        bucket = state.open_minutes.setdefault(minute, [0, 0.0])
        bucket[0] += 1
        bucket[1] += r.congestion_index


def _close_minutes(state: ZoneState, out: BatchOutput, s: DetectorSettings) -> None:
    """Evaluate every minute that is complete (a later minute has been seen)."""
    current = state.watermark_ms // MINUTE_MS
    c = state.congestion
    for minute in sorted(m for m in state.open_minutes if m < current):
        n, total = state.open_minutes.pop(minute)
        mean = total / n if n else 0.0
        state.evaluated_minute = max(state.evaluated_minute, minute)
        if not c.congested:
            c.streak = c.streak + 1 if mean >= s.congestion_raise else 0
            if c.streak >= s.congestion_min_minutes:
                c.congested, c.streak, c.peak_index = True, 0, mean
                c.episode_start_minute = minute - s.congestion_min_minutes + 1
                out.alerts.append(_congestion_alert("CongestionDetected", state, minute, mean))
        else:
            c.peak_index = max(c.peak_index, mean)
            c.streak = c.streak + 1 if mean <= s.congestion_clear else 0
            if c.streak >= s.congestion_min_minutes:
                out.alerts.append(_congestion_alert("CongestionCleared", state, minute, mean))
                c.congested, c.streak, c.episode_start_minute, c.peak_index = False, 0, None, 0.0


def _congestion_alert(kind: str, state: ZoneState, minute: int, mean: float) -> Alert:
    c = state.congestion
    start = c.episode_start_minute if c.episode_start_minute is not None else minute
    episode_id = f"{state.zone_id}/{format_ts(start * MINUTE_MS)}"
    detail: dict[str, Any] = {
        "zone_id": state.zone_id,
        "episode_id": episode_id,
        "started_at": format_ts(start * MINUTE_MS),
        "minute": format_ts(minute * MINUTE_MS),
        "congestion_index": round(mean, 4),
        "peak_congestion_index": round(c.peak_index, 4),
    }
    if kind == "CongestionCleared":
        detail["cleared_at"] = format_ts((minute + 1) * MINUTE_MS)
        detail["duration_minutes"] = minute + 1 - start
    return Alert(kind, f"{kind}/{episode_id}", detail)


def _detect_silence(state: ZoneState, now_ms: int, out: BatchOutput, s: DetectorSettings) -> None:
    for sensor_id, sensor in state.sensors.items():
        if not sensor.silent and sensor.last_received_ms and now_ms - sensor.last_received_ms >= s.silence_ms:
            sensor.silent = True
            out.alerts.append(Alert("SensorSilent", f"SensorSilent/{sensor_id}/{sensor.last_received_ms}", {
                "sensor_id": sensor_id,
                "zone_id": state.zone_id,
                "last_reading_at": format_ts(sensor.last_ts_ms),
                "last_received_at": format_ts(sensor.last_received_ms),
                "silent_for_s": (now_ms - sensor.last_received_ms) // 1000,
            }))
