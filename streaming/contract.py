"""The reading contract, schema version 1: the one definition of a traffic reading.

Every stage derives from this module or is tested against it: the device encoder
(`streaming.devices`), the processor's validator (`validate_reading`), the lake's
Parquet schema (`lake_arrow_schema`), the warehouse DDL (`warehouse_columns`), the
dbt source definitions and the Great Expectations suites (tests compare them with
`READING_FIELDS`). Changing a field here and nowhere else makes a test fail.

A reading travels alone or, far more often, inside a gateway message: one MQTT message per
reading would make per-message costs dominate at city scale. Two gateway message versions:

- v1, a list of reading objects: `{"schema_version": 1, "gateway_id", "zone_id", "sent_at",
  "readings": [{...}, ...]}` (old firmware, replays);
- v2, columnar (`columnar_message`, what gateways publish): `{"schema_version": 2, "gateway_id",
  "zone_id", "sent_at", "ts": <one shared timestamp, or a list>, "sensor_id": [...], "seq": [...],
  ...}` — one list per reading field, the message's zone for every reading, an optional
  column (`avg_speed_kmh`, `occupancy_pct`) absent when all its values are null. About a fifth
  of v1's bytes per reading, and the processor can check it a column at a time. Reading *i*
  of a v2 message is, by definition, the object `ColumnarReadings[i]` rebuilds from the
  columns; it is validated (and quarantined) exactly as that object would be in v1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal

SCHEMA_VERSION = 1  # of a reading
GATEWAY_V1, GATEWAY_V2 = 1, 2  # gateway message versions: readings as objects, as columns

FieldKind = Literal["string", "integer", "number", "timestamp"]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of the contract: its type, whether it is required, and its valid range."""

    name: str
    kind: FieldKind
    required: bool
    description: str
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    pattern: str | None = None


# Identifiers are short and plain: anything else is quarantined before it can reach
# a key, a path or a log line.
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Detectors report at least once a minute; the ceiling is generous for long intervals
# and multi-lane aggregates, and catches counters that wrapped or were misread.
MAX_VEHICLE_COUNT = 10_000
# IoT Core refuses an MQTT payload over 128 KiB (a device publish, or Basic Ingest).
MAX_MQTT_PAYLOAD_BYTES = 128 * 1024
MAX_SEQ = 2**63 - 1
# Plausibility bounds for event time; freshness and clock skew are the processor's
# policy (relative to receive time), not the contract's.
EARLIEST_TS = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TS = datetime(2100, 1, 1, tzinfo=UTC)

READING_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("sensor_id", "string", True, "Detector id from the sensor registry.", max_length=64, pattern=_ID_PATTERN),
    FieldSpec("zone_id", "string", True, "Zone the detector reports for.", max_length=32, pattern=_ID_PATTERN),
    FieldSpec("ts", "timestamp", True, "End of the measuring interval, UTC, ISO-8601 with milliseconds."),
    FieldSpec(
        "seq",
        "integer",
        True,
        "Per-sensor monotonic sequence number; (sensor_id, seq) is unique.",
        minimum=0,
        maximum=MAX_SEQ,
    ),
    FieldSpec(
        "vehicle_count", "integer", True, "Vehicles counted in the interval.", minimum=0, maximum=MAX_VEHICLE_COUNT
    ),
    FieldSpec(
        "avg_speed_kmh", "number", False, "Mean speed in km/h; absent on count-only detectors.", minimum=0, maximum=250
    ),
    FieldSpec(
        "occupancy_pct", "number", False, "Share of the interval the detector was occupied, %.", minimum=0, maximum=100
    ),
    FieldSpec("congestion_index", "number", True, "0 = free flow, 1 = standstill.", minimum=0, maximum=1),
    FieldSpec("lane", "integer", True, "Lane number, 1 = kerbside.", minimum=1, maximum=16),
)

FIELDS_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in READING_FIELDS}
KEY_FIELDS: tuple[str, str] = ("sensor_id", "seq")

# Columns the processor adds when it lands a reading in the lake. Event time (`ts`)
# decides the lake partition (dt=/hour=), so an hourly load reads exactly its interval.
LAKE_EXTRA_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "gateway_id",
        "string",
        True,
        "Gateway (MQTT client) that delivered the reading.",
        max_length=64,
        pattern=_ID_PATTERN,
    ),
    FieldSpec("received_at", "timestamp", True, "When the ingestion rule received the message."),
    FieldSpec("processed_at", "timestamp", True, "When the processor validated the reading."),
)
LAKE_FIELDS: tuple[FieldSpec, ...] = READING_FIELDS + LAKE_EXTRA_FIELDS

# What a quarantined reading or message keeps: enough to find it, explain it and replay it.
QUARANTINE_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("received_at", "timestamp", True, "When the ingestion rule received the message."),
    FieldSpec("processed_at", "timestamp", True, "When the processor quarantined it."),
    FieldSpec("reason_code", "string", True, "Stable machine-readable reason, e.g. out_of_range."),
    FieldSpec("reason", "string", True, "Human-readable reason naming the field and value."),
    FieldSpec("sensor_id", "string", False, "Sensor id if one could be read."),
    FieldSpec("gateway_id", "string", False, "Gateway that delivered it, from the topic."),
    FieldSpec("zone_id", "string", False, "Zone from the topic."),
    FieldSpec("source_id", "string", True, "Kinesis shard, sequence number and index in the message."),
    FieldSpec("raw", "string", True, "The original bytes (the reading, or the whole message), base64."),
)


class ContractError(ValueError):
    """A reading or message that breaks the contract. `code` is stable; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Reading:
    """A reading that passed `validate_reading`. `ts_ms` is event time in epoch milliseconds."""

    sensor_id: str
    zone_id: str
    ts_ms: int
    seq: int
    vehicle_count: int
    avg_speed_kmh: float | None
    occupancy_pct: float | None
    congestion_index: float
    lane: int


# fullmatch, not match: `$` alone would accept a trailing newline.
_ID_RE = re.compile(_ID_PATTERN)
# Strict ISO-8601 in UTC: date, time with optional fraction (at most microseconds), Z or +00:00.
_TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_EARLIEST_MS = int(EARLIEST_TS.timestamp() * 1000)
_LATEST_MS = int(LATEST_TS.timestamp() * 1000)


def parse_ts_ms(value: Any, field: str = "ts") -> int:
    """Parse a contract timestamp to epoch milliseconds, or raise ContractError."""
    if not isinstance(value, str) or not _TS_RE.fullmatch(value):
        raise ContractError(
            "bad_timestamp", f"{field}={_show(value)} is not ISO-8601 UTC like 2026-11-23T18:00:00.000Z"
        )
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ContractError("bad_timestamp", f"{field}={_show(value)} is not a valid date/time") from exc
    ms = (dt - _EPOCH) // _ONE_MS  # integer arithmetic: float timestamps drift by a millisecond
    if not _EARLIEST_MS <= ms < _LATEST_MS:
        raise ContractError("out_of_range", f"{field}={value} is outside {EARLIEST_TS:%Y}-{LATEST_TS:%Y}")
    return ms


def format_ts(ms: int) -> str:
    """Epoch milliseconds → the contract's timestamp string."""
    return _second_prefix(ms // 1000) + f"{ms % 1000:03d}Z"


@lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    # strftime is ~3 us; a device, the simulator or a batch's alerts format many times a second.
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_plain_id(value: Any, max_length: int = 64) -> bool:
    """True for the short, plain identifiers the contract allows (sensor, zone, gateway ids)."""
    return isinstance(value, str) and 0 < len(value) <= max_length and _ID_RE.fullmatch(value) is not None


def _identifier(obj: dict[str, Any], spec: FieldSpec, who: str) -> str:
    value = obj.get(spec.name)
    if value is None:
        raise ContractError("missing_field", f"{who}: {spec.name} is missing")
    if not isinstance(value, str):
        raise ContractError("wrong_type", f"{who}: {spec.name}={_show(value)} is not a string")
    if not is_plain_id(value, spec.max_length or 0):
        raise ContractError(
            "bad_identifier",
            f"{who}: {spec.name}={_show(value)} is not a plain id of at most {spec.max_length} characters",
        )
    return value


def _timestamp(obj: dict[str, Any], spec: FieldSpec, who: str) -> int:
    value = obj.get(spec.name)
    if value is None:
        raise ContractError("missing_field", f"{who}: {spec.name} is missing")
    return parse_ts_ms(value, f"{who}: {spec.name}")


def _integer(obj: dict[str, Any], spec: FieldSpec, who: str) -> int:
    value = obj.get(spec.name)
    if value is None:
        raise ContractError("missing_field", f"{who}: {spec.name} is missing")
    # bool is an int subclass in Python; true/false are not counts.
    if type(value) is not int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ContractError("wrong_type", f"{who}: {spec.name}={_show(value)} is not an integer")
    if not spec.minimum <= value <= spec.maximum:  # type: ignore[operator]
        raise ContractError("out_of_range", f"{who}: {spec.name}={value} is outside {spec.minimum:g}..{spec.maximum:g}")
    return value


def _number(obj: dict[str, Any], spec: FieldSpec, who: str) -> float | None:
    value = obj.get(spec.name)
    if value is None:
        if spec.required:
            raise ContractError("missing_field", f"{who}: {spec.name} is missing")
        return None
    if type(value) is not float and type(value) is not int:
        raise ContractError("wrong_type", f"{who}: {spec.name}={_show(value)} is not a number")
    if not math.isfinite(value):
        raise ContractError("not_finite", f"{who}: {spec.name}={value} is not finite")
    if not spec.minimum <= value <= spec.maximum:  # type: ignore[operator]
        raise ContractError(
            "out_of_range", f"{who}: {spec.name}={value:g} is outside {spec.minimum:g}..{spec.maximum:g}"
        )
    return float(value)


_F = FIELDS_BY_NAME


def validate_reading(obj: Any) -> Reading:
    """Check one decoded reading against the contract; return it typed, or raise ContractError.

    Unknown extra fields are ignored so that devices can roll out additions before the
    platform reads them.
    """
    if not isinstance(obj, dict):
        raise ContractError("not_an_object", f"reading is {type(obj).__name__}, not a JSON object")
    sensor_id = _identifier(obj, _F["sensor_id"], "reading")
    who = f"reading {sensor_id}"
    seq = _integer(obj, _F["seq"], who)
    who = f"reading {sensor_id} seq {seq}"
    return Reading(
        sensor_id=sensor_id,
        zone_id=_identifier(obj, _F["zone_id"], who),
        ts_ms=_timestamp(obj, _F["ts"], who),
        seq=seq,
        vehicle_count=_integer(obj, _F["vehicle_count"], who),
        avg_speed_kmh=_number(obj, _F["avg_speed_kmh"], who),
        occupancy_pct=_number(obj, _F["occupancy_pct"], who),
        congestion_index=_number(obj, _F["congestion_index"], who),  # type: ignore[arg-type]
        lane=_integer(obj, _F["lane"], who),
    )


def reading_to_json(reading: Reading) -> dict[str, Any]:
    """A reading as the JSON object devices send (the inverse of `validate_reading`)."""
    out: dict[str, Any] = {
        "sensor_id": reading.sensor_id,
        "zone_id": reading.zone_id,
        "ts": format_ts(reading.ts_ms),
        "seq": reading.seq,
        "vehicle_count": reading.vehicle_count,
        "congestion_index": reading.congestion_index,
        "lane": reading.lane,
    }
    if reading.avg_speed_kmh is not None:
        out["avg_speed_kmh"] = reading.avg_speed_kmh
    if reading.occupancy_pct is not None:
        out["occupancy_pct"] = reading.occupancy_pct
    return out


def gateway_message(gateway_id: str, zone_id: str, sent_at_ms: int, readings: list[dict[str, Any]]) -> dict:
    """A v1 gateway message: many reading objects of one zone in one message."""
    return {
        "schema_version": GATEWAY_V1,
        "gateway_id": gateway_id,
        "zone_id": zone_id,
        "sent_at": format_ts(sent_at_ms),
        "readings": readings,
    }


# --- gateway message v2: the readings as columns -------------------------------------------

# v2 carries the zone once, for the whole message; every other reading field is a column.
COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in READING_FIELDS if f.name != "zone_id")
_OPTIONAL_COLUMNS = frozenset(f.name for f in READING_FIELDS if not f.required)
_ROW_COLUMNS = tuple(name for name in COLUMN_NAMES if name not in ("sensor_id", "ts"))


def columnar_message(gateway_id: str, zone_id: str, sent_at_ms: int, readings: list[Any]) -> dict[str, Any]:
    """The v2 (columnar) message of `readings`. Each must be an object of `zone_id` (ValueError
    otherwise: such a batch can only travel as v1). `ts` is one string when all readings share
    it; an optional column whose values are all null or absent is left out; fields outside the
    contract are not carried (the processor ignores them in v1 too)."""
    for r in readings:
        if not isinstance(r, dict) or r.get("zone_id") != zone_id:
            raise ValueError(f"reading {_show(r)} cannot be a row of a v2 message of zone {zone_id}")
    msg: dict[str, Any] = {
        "schema_version": GATEWAY_V2,
        "gateway_id": gateway_id,
        "zone_id": zone_id,
        "sent_at": format_ts(sent_at_ms),
    }
    n = len(readings)
    for name in COLUMN_NAMES:
        column = [r.get(name) for r in readings]
        if name == "ts" and n and isinstance(column[0], str) and column.count(column[0]) == n:
            msg["ts"] = column[0]
        elif name not in _OPTIONAL_COLUMNS or column.count(None) != n:
            msg[name] = column
    return msg


def device_message(gateway_id: str, zone_id: str, sent_at_ms: int, readings: list[Any]) -> dict[str, Any]:
    """What a gateway publishes: v2, or v1 when a reading cannot be a row of v2 (not an object,
    or of another zone — only a faulty device sends those, and they must still arrive to be
    quarantined with their reason)."""
    try:
        return columnar_message(gateway_id, zone_id, sent_at_ms, readings)
    except ValueError:
        return gateway_message(gateway_id, zone_id, sent_at_ms, readings)


class ColumnarReadings:
    """The readings of a v2 message: reading *i* is rebuilt on access as the object a v1 message
    would carry (contract field order; a column left out is a field left out). `sensor_ids`,
    `ts` and `columns` keep the lists for a reader that checks them a column at a time.

    Raises ContractError("bad_columns") when the message cannot be split into readings: a column
    that is not a list, or whose length differs from `sensor_id`'s."""

    __slots__ = ("columns", "sensor_ids", "ts", "zone_id")

    def __init__(self, msg: dict[str, Any], who: str) -> None:
        sensor_ids = msg.get("sensor_id")
        if type(sensor_ids) is not list:
            raise ContractError("bad_columns", f"{who}: sensor_id is not a list (v2 has one list per field)")
        n = len(sensor_ids)
        ts = msg.get("ts")
        if type(ts) is not str and (type(ts) is not list or len(ts) != n):
            raise ContractError("bad_columns", f"{who}: ts={_show(ts)} is neither one timestamp nor a list of {n}")
        columns: dict[str, list[Any] | None] = {}
        for name in _ROW_COLUMNS:
            column = msg.get(name)
            if column is not None and (type(column) is not list or len(column) != n):
                raise ContractError("bad_columns", f"{who}: {name}={_show(column)} is not a list of {n}")
            columns[name] = column
        self.zone_id: Any = msg.get("zone_id")
        self.sensor_ids: list[Any] = sensor_ids
        self.ts: str | list[Any] = ts
        self.columns = columns

    def __len__(self) -> int:
        return len(self.sensor_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ts = self.ts
        r = {"sensor_id": self.sensor_ids[i], "zone_id": self.zone_id, "ts": ts if type(ts) is str else ts[i]}
        for name, column in self.columns.items():
            if column is not None:
                r[name] = column[i]
        return r

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self.__getitem__, range(len(self.sensor_ids)))


def message_readings(msg: dict[str, Any]) -> list[Any]:
    """The reading objects of a gateway message of either version (for tools and tests; the
    processor's envelope module also checks the message against its envelope)."""
    if msg.get("schema_version") == GATEWAY_V2:
        return list(ColumnarReadings(msg, "message"))
    return msg["readings"]


# --- derived artefacts ------------------------------------------------------------------


def _field_schema(f: FieldSpec) -> dict[str, Any]:
    if f.kind == "string":
        prop: dict[str, Any] = {"type": "string", "maxLength": f.max_length, "pattern": f.pattern}
    elif f.kind == "timestamp":
        prop = {"type": "string", "format": "date-time", "pattern": _TS_RE.pattern}
    elif f.kind == "integer":
        prop = {"type": "integer", "minimum": f.minimum, "maximum": f.maximum}
    else:
        prop = {"type": "number", "minimum": f.minimum, "maximum": f.maximum}
    prop["description"] = f.description
    return prop


def json_schema() -> dict[str, Any]:
    """The reading contract as JSON Schema (draft 2020-12), for devices and partners."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://citypulse.dev/schemas/reading-v{SCHEMA_VERSION}.json",
        "title": f"citypulse traffic reading v{SCHEMA_VERSION}",
        "type": "object",
        "properties": {f.name: _field_schema(f) for f in READING_FIELDS},
        "required": [f.name for f in READING_FIELDS if f.required],
        "additionalProperties": True,
    }


def columnar_json_schema() -> dict[str, Any]:
    """The v2 gateway message as JSON Schema (draft 2020-12). JSON Schema cannot say that the
    columns have equal lengths; the processor checks that (`ColumnarReadings`)."""
    props: dict[str, Any] = {
        "schema_version": {"const": GATEWAY_V2},
        "gateway_id": _field_schema(next(f for f in LAKE_EXTRA_FIELDS if f.name == "gateway_id")),
        "zone_id": _field_schema(FIELDS_BY_NAME["zone_id"]),
        "sent_at": _field_schema(FIELDS_BY_NAME["ts"]) | {"description": "When the gateway published the message."},
    }
    for name in COLUMN_NAMES:
        f = FIELDS_BY_NAME[name]
        item = _field_schema(f)
        if not f.required:
            item = {"anyOf": [item, {"type": "null"}]}
        column = {"type": "array", "items": item, "description": f"{f.description} One value per reading."}
        props[name] = {"oneOf": [_field_schema(f), column]} if name == "ts" else column
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://citypulse.dev/schemas/gateway-message-v{GATEWAY_V2}.json",
        "title": f"citypulse gateway message v{GATEWAY_V2} (columnar)",
        "type": "object",
        "properties": props,
        "required": [
            "schema_version",
            "gateway_id",
            "zone_id",
            "sent_at",
            *(n for n in COLUMN_NAMES if n not in _OPTIONAL_COLUMNS),
        ],
        "additionalProperties": True,
    }


def lake_arrow_schema():  # -> pyarrow.Schema; pyarrow is imported lazily (devices do not need it)
    """The Parquet schema of `raw/readings/` in the lake."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "integer": pa.int64(),
        "number": pa.float64(),
        "timestamp": pa.timestamp("ms", tz="UTC"),
    }
    return pa.schema([pa.field(f.name, types[f.kind], nullable=not f.required) for f in LAKE_FIELDS])


def quarantine_arrow_schema():  # -> pyarrow.Schema
    """The Parquet schema of `quarantine/` in the lake."""
    import pyarrow as pa

    types = {"string": pa.string(), "timestamp": pa.timestamp("ms", tz="UTC")}
    return pa.schema([pa.field(f.name, types[f.kind], nullable=not f.required) for f in QUARANTINE_FIELDS])


_SQL_TYPES = {
    "string": "varchar(256)",
    "integer": "bigint",
    "number": "double precision",
    "timestamp": "timestamp",
}


def warehouse_columns(fields: tuple[FieldSpec, ...] = LAKE_FIELDS) -> list[tuple[str, str, bool]]:
    """(column, SQL type, nullable) for the warehouse raw table; the SQL runs on Redshift,
    PostgreSQL and DuckDB alike. Timestamps are stored as UTC without a zone."""
    return [(f.name, _SQL_TYPES[f.kind], not f.required) for f in fields]
