"""Replay recorded detector data through the real device path, instead of the simulator.

Flow: **a CSV or Parquet file of detector readings** ──(this module)──▶ gateways
(streaming/devices/gateway.py, MQTT + mutual TLS, QoS 1) ──▶ IoT Core / the local broker ──▶
rule ──▶ Kinesis ──▶ processor. Only the source of the readings differs from the simulator.

1. ``read_rows``: the file's columns are mapped onto the contract's fields
   (``ColumnMap.parse("ts=timestamp,sensor_id=det_id,vehicle_count=flow")``); ``ts``,
   ``sensor_id`` and ``vehicle_count`` are required, ``avg_speed_kmh``, ``occupancy_pct``,
   ``congestion_index`` and ``lane`` optional. A field not mapped is read from a column of
   its own name when the file has one.
2. ``plan_replay``: each row becomes a contract reading of the registry sensor with that id,
   and readings are grouped per gateway, zone and minute into gateway messages, as the
   roadside gateway would send them (on its zone's topic: a gateway serving two zones sends
   one message each). A detector id that is not in the registry is published anyway
   (by the gateway ``gw-replay``, in a zone of the registry), and the processor quarantines
   it as ``unknown_sensor``: the replay shows what the platform makes of the file, it does
   not clean it. Each message gets a send time offset: the recorded time since the first
   minute divided by ``speed`` (1 = real time, 60 = an hour a minute, ``inf`` = at once).
3. ``run_replay``: connects one ``Gateway`` per gateway id and publishes on the schedule.

``seq`` (per-sensor monotonic) is the reading's epoch minute, as for the simulator, or its
epoch second when a detector reports more often than once a minute. So replaying a file of
sub-minute data and then one of minutes (or the simulator after it) for the same sensors makes
their seqs fall, and the processor stores the later readings as late: replay one resolution per
registry. (Epoch seconds for every file, tried and reverted on 2026-12-07, shrank the dedupe
window of minute data from an hour to a minute and put the simulator after any replay behind.)

``congestion_index``, required by the contract, is derived when the file has none: from
occupancy (the traffic model's diagram: occupancy 97.5 % = jam density), else from speed
against the sensor's speed limit, else 0.
"""

from __future__ import annotations

import csv
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from streaming.contract import EARLIEST_TS, LATEST_TS, MAX_MQTT_PAYLOAD_BYTES, device_message, format_ts
from streaming.devices.gateway import Gateway, connect_all
from streaming.registry import Sensor

REPLAY_GATEWAY = "gw-replay"  # delivers the readings of detectors the registry does not know
MINUTE_MS = 60_000
# Occupancy at jam density in the traffic model's diagram (150 veh/km x 6.5 m).
JAM_OCCUPANCY_PCT = 97.5
MAX_READINGS_PER_MESSAGE = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReplayError(ValueError):
    """The file or the column mapping cannot be replayed; the message says what to change."""


@dataclass(frozen=True)
class ColumnMap:
    """Which column of the file holds each contract field (None: not in the file)."""

    ts: str = "ts"
    sensor_id: str = "sensor_id"
    vehicle_count: str = "vehicle_count"
    avg_speed_kmh: str | None = None
    occupancy_pct: str | None = None
    congestion_index: str | None = None
    lane: str | None = None

    @classmethod
    def parse(cls, text: str) -> ColumnMap:
        """``field=column,field=column`` (contract field names on the left)."""
        known = {f.name for f in fields(cls)}
        mapping: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, column = (s.strip() for s in part.partition("="))
            if not sep or not column:
                raise ReplayError(f"--map entry {part!r} is not field=column")
            if name not in known:
                raise ReplayError(f"--map names unknown field {name!r}; fields are {', '.join(sorted(known))}")
            if name in mapping:
                raise ReplayError(f"--map maps {name!r} twice")
            mapping[name] = column
        return cls(**mapping)

    def resolve(self, columns: Iterable[str]) -> dict[str, str]:
        """Field → column present in the file; raises ReplayError for a missing required one."""
        present = set(columns)
        out: dict[str, str] = {}
        for f in fields(self):
            column = getattr(self, f.name)
            if column is None:
                if f.name in present:  # an unmapped optional field read from its own name
                    out[f.name] = f.name
                continue
            if column not in present:
                raise ReplayError(f"column {column!r} (for {f.name}) is not in the file; it has {sorted(present)}")
            out[f.name] = column
        return out


@dataclass(frozen=True)
class Row:
    """One recorded detector reading, with the contract's names and units."""

    sensor_id: str
    ts_ms: int
    vehicle_count: int
    avg_speed_kmh: float | None = None
    occupancy_pct: float | None = None
    congestion_index: float | None = None
    lane: int | None = None


def read_rows(path: Path | str, mapping: ColumnMap) -> list[Row]:
    """The file's rows (CSV, or Parquet by the .parquet/.pq suffix), mapped onto the contract."""
    path = Path(path)
    suffix = path.suffix.lower()
    first_row = 1
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        columns = mapping.resolve(pq.read_schema(path).names)
        records: list[dict[str, Any]] = pq.read_table(path, columns=sorted(set(columns.values()))).to_pylist()
    elif suffix in (".csv", ".txt"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = mapping.resolve(reader.fieldnames or [])
            records = list(reader)
        first_row = 2  # line 1 is the header
    else:
        raise ReplayError(f"{path}: cannot tell the format from {suffix!r}; use .csv or .parquet")
    out: list[Row] = []
    for number, record in enumerate(records, start=first_row):
        try:
            out.append(_row(record, columns))
        except (ValueError, TypeError, OverflowError) as e:
            raise ReplayError(f"{path.name} row {number}: {e}") from e
    return out


def _row(record: Mapping[str, Any], columns: Mapping[str, str]) -> Row:
    def value(name: str) -> Any:
        column = columns.get(name)
        v = record.get(column) if column is not None else None
        # NaN is how pandas and many exports write an empty cell, of any column.
        empty = v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))
        return None if empty else v

    sensor_id, ts, count = value("sensor_id"), value("ts"), value("vehicle_count")
    for name, v in (("sensor_id", sensor_id), ("ts", ts), ("vehicle_count", count)):
        if v is None:
            raise ValueError(f"{name} (column {columns[name]!r}) is empty")
    # A numeric id column with a gap is float64 in pandas' files: 401234.0 is detector 401234.
    if isinstance(sensor_id, float) and sensor_id.is_integer():
        sensor_id = int(sensor_id)
    return Row(
        sensor_id=str(sensor_id).strip(),
        ts_ms=parse_time_ms(ts),
        vehicle_count=_integral(count, "vehicle_count"),
        avg_speed_kmh=_number(value("avg_speed_kmh")),
        occupancy_pct=_number(value("occupancy_pct")),
        congestion_index=_number(value("congestion_index")),
        lane=_integral(value("lane"), "lane") if value("lane") is not None else None,
    )


def _number(v: Any) -> float | None:
    """An optional measurement: NaN is how pandas and many exports write a gap, so it is one
    (None); an infinity is no measurement at all."""
    if v is None:
        return None
    f = float(v)
    if math.isnan(f):
        return None
    if math.isinf(f):
        raise ValueError(f"{v!r} is not a finite number")
    return f


def _integral(v: Any, name: str) -> int:
    f = float(v)
    if not f.is_integer():
        raise ValueError(f"{name}={v!r} is not a whole number")
    return int(f)


# Epoch numbers by magnitude: seconds stay below 1e11 until year 5138, milliseconds below 1e14,
# microseconds below 1e17; nanoseconds (int64 Parquet and pandas times) from there.
_EPOCH_DIVISORS_TO_MS = ((1e17, 1_000_000), (1e14, 1000), (1e11, 1))
_EARLIEST_MS = (EARLIEST_TS - _EPOCH) // timedelta(milliseconds=1)
_LATEST_MS = (LATEST_TS - _EPOCH) // timedelta(milliseconds=1)


def parse_time_ms(value: Any) -> int:
    """A recorded time → epoch ms: ISO-8601 (no zone = UTC; basic forms such as ``20260302``
    too), a datetime, or epoch seconds, milliseconds, microseconds or nanoseconds. A time outside
    the contract's range is refused here, naming it: a nanosecond time once passed as
    milliseconds and failed the replay later with an overflow, and ``20260302`` was read as a
    1970 epoch second (found by a review)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"time {value!r} is not a number of epoch seconds or milliseconds")
        for floor, divisor in _EPOCH_DIVISORS_TO_MS:
            if abs(value) >= floor:
                return _in_range(int(value) // divisor, value)
        return _in_range(round(value * 1000), value)  # epoch seconds
    else:
        text = str(value).strip()
        # A number first, but for eight digits (ISO's basic date, 20260302: as epoch seconds it
        # would be 1970): fromisoformat takes many runs of digits for a date and time too, and
        # read epoch milliseconds as 1601-01-01 01:23 (found by a review).
        number: int | float | None = None
        if not (len(text) == 8 and text.isdigit()):
            try:  # an integer as such: a float would cost a nanosecond time its last digits
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    number = None
        if number is not None:
            return parse_time_ms(number)
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"time {text!r} is neither ISO-8601 nor an epoch number") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # Integer arithmetic: a float timestamp can be off by a millisecond.
    return _in_range((dt - _EPOCH) // timedelta(milliseconds=1), value)


def _in_range(ms: int, value: Any) -> int:
    if not _EARLIEST_MS <= ms < _LATEST_MS:
        raise ValueError(f"time {value!r:.40} is outside {EARLIEST_TS:%Y}-{LATEST_TS:%Y}")
    return ms


@dataclass(frozen=True)
class ScheduledMessage:
    """One gateway message of the replay, due `offset_s` seconds after the replay starts."""

    offset_s: float
    gateway_id: str
    zone_id: str
    minute_ms: int
    readings: tuple[dict[str, Any], ...]


@dataclass
class ReplayPlan:
    messages: list[ScheduledMessage]
    rows: int
    unknown_sensors: set[str] = field(default_factory=set)
    seq_unit_s: int = 60
    speed: float = 1.0

    @property
    def recorded_span_s(self) -> float:
        if not self.messages:
            return 0.0
        return (self.messages[-1].minute_ms - self.messages[0].minute_ms) / 1000


def congestion_from(row: Row, speed_limit_kmh: float | None) -> float:
    """The contract's congestion index for a recorded row that may not carry one."""
    if row.congestion_index is not None:
        return row.congestion_index
    if row.occupancy_pct is not None:
        return round(min(1.0, max(0.0, row.occupancy_pct / JAM_OCCUPANCY_PCT)), 4)
    if row.avg_speed_kmh is not None and speed_limit_kmh:
        return round(min(1.0, max(0.0, 1 - row.avg_speed_kmh / speed_limit_kmh)), 4)
    return 0.0


def plan_replay(
    rows: list[Row],
    registry: Mapping[str, Sensor],
    *,
    speed: float = 1.0,
    unknown_zone: str,
    max_readings: int = MAX_READINGS_PER_MESSAGE,
) -> ReplayPlan:
    """Group `rows` into gateway messages per gateway, zone and minute (a message is published
    on its zone's topic: a gateway serving two zones sends one each), with send offsets for
    `speed`."""
    if not speed > 0:
        raise ReplayError(f"--speed must be > 0 (1 = real time), not {speed}")
    seq_unit_s = _seq_unit(rows)
    groups: dict[tuple[int, str, str], list[tuple[int, dict[str, Any]]]] = {}
    unknown: set[str] = set()
    for row in rows:
        sensor = registry.get(row.sensor_id)
        if sensor is None:
            unknown.add(row.sensor_id)
        gateway_id = sensor.gateway_id if sensor else REPLAY_GATEWAY
        zone_id = sensor.zone_id if sensor else unknown_zone
        reading: dict[str, Any] = {
            "sensor_id": row.sensor_id,
            "zone_id": zone_id,
            "ts": format_ts(row.ts_ms),
            "seq": row.ts_ms // (seq_unit_s * 1000),
            "vehicle_count": row.vehicle_count,
            "congestion_index": congestion_from(row, sensor.speed_limit_kmh if sensor else None),
            "lane": row.lane if row.lane is not None else (sensor.lane if sensor else 1),
        }
        if row.avg_speed_kmh is not None:
            reading["avg_speed_kmh"] = row.avg_speed_kmh
        if row.occupancy_pct is not None:
            reading["occupancy_pct"] = row.occupancy_pct
        minute_ms = row.ts_ms // MINUTE_MS * MINUTE_MS
        groups.setdefault((minute_ms, gateway_id, zone_id), []).append((row.ts_ms, reading))
    messages: list[ScheduledMessage] = []
    first = min((m for m, _, _ in groups), default=0)
    for (minute_ms, gateway_id, zone_id), items in sorted(groups.items()):
        items.sort(key=lambda item: (item[0], item[1]["sensor_id"]))
        offset = 0.0 if math.isinf(speed) else (minute_ms - first) / 1000 / speed
        for i in range(0, len(items), max_readings):
            chunk = [r for _, r in items[i : i + max_readings]]
            for part in _within_payload_limit(gateway_id, zone_id, chunk):
                messages.append(ScheduledMessage(offset, gateway_id, zone_id, minute_ms, tuple(part)))
    return ReplayPlan(messages, len(rows), unknown, seq_unit_s, speed)


# A publish time as long as any the replay will write (`device_message`'s sent_at).
_LONGEST_SENT_AT_MS = 10**13 - 1


def _within_payload_limit(gateway_id: str, zone_id: str, readings: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`readings` as few messages as IoT Core's payload limit allows (halved until each fits:
    long ids, or a v1 message a gateway spanning zones falls back to, can outgrow a count
    limit); a reading too large alone raises ReplayError."""
    size = len(orjson.dumps(device_message(gateway_id, zone_id, _LONGEST_SENT_AT_MS, readings)))
    if size <= MAX_MQTT_PAYLOAD_BYTES:
        return [readings]
    if len(readings) == 1:
        raise ReplayError(f"a reading of {readings[0]['sensor_id']!r:.80} alone is a {size:,}-byte message")
    half = len(readings) // 2
    return [
        *_within_payload_limit(gateway_id, zone_id, readings[:half]),
        *_within_payload_limit(gateway_id, zone_id, readings[half:]),
    ]


def _seq_unit(rows: list[Row]) -> int:
    """Seconds per seq step: a minute if no detector reports twice in a minute (the simulator's
    unit, for which the processor's dedupe window of 64 steps is an hour), else a second. A
    detector with two rows in one second is refused, naming it."""
    for unit in (60, 1):
        seen: set[tuple[str, int]] = set()
        twice = next(
            (r for r in rows if (key := (r.sensor_id, r.ts_ms // (unit * 1000))) in seen or seen.add(key)), None
        )
        if twice is None:
            return unit
    raise ReplayError(
        f"detector {twice.sensor_id!r:.80} has two rows in the second {format_ts(twice.ts_ms // 1000 * 1000)} "
        "((sensor_id, seq) would not be unique)"
    )


@dataclass
class ReplayResult:
    messages: int = 0
    readings: int = 0
    failed_publishes: int = 0
    gateways: int = 0
    seconds: float = 0.0

    @property
    def readings_per_s(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0


def run_replay(
    plan: ReplayPlan,
    connect: Callable[[str], Gateway],
    *,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_message: Callable[[ScheduledMessage, ReplayResult], None] | None = None,
) -> ReplayResult:
    """Publish the plan's messages on its schedule; returns once every publish is acknowledged (or failed)."""
    stop = stop or threading.Event()
    gateway_ids = sorted({m.gateway_id for m in plan.messages})
    result = ReplayResult(gateways=len(gateway_ids))
    connections = connect_all(gateway_ids, connect)
    futures: list[Future[None]] = []
    started = clock()
    try:
        for message in plan.messages:
            # Waiting on the stop event, so an interrupted replay ends at once.
            if stop.wait(max(0.0, started + message.offset_s - clock())):
                break
            payload = device_message(
                message.gateway_id, message.zone_id, int(time.time() * 1000), list(message.readings)
            )
            futures.append(connections[message.gateway_id].publish_telemetry(message.zone_id, orjson.dumps(payload)))
            result.messages += 1
            result.readings += len(message.readings)
            if on_message:
                on_message(message, result)
        for conn in connections.values():
            conn.flush(timeout=120)
    finally:
        for conn in connections.values():
            conn.disconnect()
    result.failed_publishes = sum(1 for f in futures if f.exception() is not None)
    result.seconds = clock() - started
    return result
