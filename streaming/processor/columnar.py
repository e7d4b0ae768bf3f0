"""The processor's columnar fast path: a gateway message taken a column at a time.

Part of phase 1 and 2 of `streaming.processor.core` (`decode_batch`, `apply_batch`). A gateway
message — v2 (columnar, what gateways publish) or v1 (a list of reading objects) — whose
readings are all plainly valid and fall in one event-time minute is checked column by column with
C-level builtins (`accept`) and kept as columns (`ColumnBlock`): no Reading, no item, no dict
per reading. `apply_rows` then does per reading only what must be per reading — the dedupe
window and the sensor's live values — and lands the lake rows, the zone-minute aggregate, the
watermark and the open minute a column at a time.

The reference path (`decode_batch_reference`, `apply_batch_reference`) stays the definition:
anything in doubt here goes back to the per-reading path, which alone decides and words a
rejection, and `ColumnBlock.items()` is exactly what the reference makes of the message (a
property test holds them together, tests/test_processor_fastpath.py).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Annotated, Any

import msgspec

from streaming.contract import GATEWAY_V2, READING_FIELDS, ColumnarReadings, FieldSpec, Reading
from streaming.processor import core
from streaming.processor.envelope import (
    DECLINED,
    MAX_PAYLOAD_BYTES,
    MAX_READINGS_PER_MESSAGE,
    Envelope,
    parse_readings,
    sent_at_ms,
)
from streaming.processor.state import _WINDOW_MASK, DEDUPE_WINDOW, DUPLICATE, MinuteAggregate, SensorState, ZoneState

# The fields of a v1 reading object, in the order `accept` unpacks them.
_ROW = operator.itemgetter(
    "sensor_id", "zone_id", "ts", "seq", "vehicle_count", "avg_speed_kmh", "occupancy_pct", "congestion_index", "lane"
)
_INT_ONLY = {int}
_STR_ONLY = {str}
_SEQUENCES = (list, tuple)
_FLOAT_ONLY = {float}
_FLOAT_OR_NULL = {float, type(None)}


# Readings as columns: sensor ids, event times (epoch ms), seqs, vehicle counts, speeds,
# occupancies, congestion indexes and lanes.
ReadingColumns = tuple[
    Sequence[str],
    Sequence[int],
    Sequence[int],
    Sequence[int],
    Sequence[float | None],
    Sequence[float | None],
    Sequence[float],
    Sequence[int],
]


@dataclass(slots=True)
class ColumnBlock:
    """A whole gateway message whose readings are all plainly valid (every required field
    present, exact types, in range, registered to the message's zone and gateway) and fall in
    one event-time minute, kept as columns. It stands in `DecodedBatch.by_zone` where the
    reference has the message's items; `items()` rebuilds those."""

    record: core.Record
    envelope: Envelope
    first_ms: int  # the earliest and the latest event time of its readings (one minute)
    ts_ms: int
    columns: ReadingColumns
    index: int = 0  # a block is a whole record: its redelivery counts once, as the first item's

    def items(self) -> list[core._Item]:
        """The items `decode_batch_reference` makes of this message. The raw readings are parsed
        again from the message bytes rather than kept: a block rarely needs them (a reading from
        the future is quarantined with its bytes), and a batch of them alive would cost every
        garbage collection a walk through ~300,000 objects."""
        rec, env, zone_id = self.record, self.envelope, self.envelope.zone_id
        raws, _ = parse_readings(env)
        return [
            core._Item(rec, env, i, raw, Reading(sid, zone_id, ts_ms, seq, vc, sp, oc, ci, lane), None)
            for i, (raw, sid, ts_ms, seq, vc, sp, oc, ci, lane) in enumerate(zip(raws, *self.columns, strict=True))
        ]


def _value_type(f: FieldSpec) -> Any:
    """The msgspec type of one value of a reading field: exact type and range (no bool for an
    int, no float for an int; an int for a float is converted, as the reference does)."""
    if f.kind not in ("integer", "number"):
        return str
    base = int if f.kind == "integer" else float
    return Annotated[base, msgspec.Meta(ge=f.minimum, le=f.maximum)]  # type: ignore[valid-type]


def _column_type(f: FieldSpec) -> Any:
    item = _value_type(f)
    return list[item] if f.required else list[item | None] | None  # type: ignore[valid-type]


# The columns of a v2 message whose readings are all plainly valid, as one msgspec type derived
# from the contract: `msgspec.convert` checks every value's exact type (no bool for an int, no
# float for an int; an int for a float is converted, as the reference does) and range in C.
_NUMERIC = [f for f in READING_FIELDS if f.kind in ("integer", "number")]
_COLUMN_FIELDS = [
    ("sensor_id", list[str]),
    ("ts", str | list[str]),
    *((f.name, _column_type(f)) if f.required else (f.name, _column_type(f), None) for f in _NUMERIC),
]
_PlainColumns = msgspec.defstruct("PlainColumns", _COLUMN_FIELDS, kw_only=True)

# A whole v2 message of plainly valid columns, decoded from its bytes in one pass (no dict, no
# list of untyped values first). Unknown fields are refused, so a message the typed decode
# accepts holds nothing the reference's orjson parse would see and this one would skip (a
# `readings` list that makes it v1, a string orjson rejects); any refusal sends the message
# the reference's way (`parse_readings`), which alone words a rejection.
_WireMessage = msgspec.defstruct(
    "WireMessage",
    # `sent_at` a string or absent, as gateways write it: any other value is left to the
    # reference's parse (an integer too long for orjson fails the whole message there).
    [("schema_version", int), ("gateway_id", str), ("zone_id", str), ("sent_at", str | None, None), *_COLUMN_FIELDS],
    kw_only=True,
    forbid_unknown_fields=True,
)
_WIRE_MESSAGE = msgspec.json.Decoder(_WireMessage)
_V2_KEY = b'"schema_version"'


def accept(
    rec: core.Record,
    env: Envelope,
    raws: Sequence[Any],
    members: core.Members | None,
    ts_cache: dict[str, int],
) -> ColumnBlock | None:
    """The message as a ColumnBlock if every reading is plainly valid and they fall in one
    event-time minute; None when in any doubt (the caller then takes the message one reading at
    a time).

    The same conditions as `core._accept` on each reading, stated over columns: membership of
    the sensors the registry gives this zone and gateway (`core.Members`), `count` for the zone, each
    distinct `ts` parsed once (`_stamps`); types and ranges by msgspec for v2 (`_PlainColumns`), and for v1 by
    `set(map(type, ...))` for exact types (bool and integral floats, which the reference
    converts, defer), `min`/`max` for ranges and a sum for NaN."""
    if members is None or not raws:  # no sensor of the registry belongs to this zone and gateway
        return None
    columns = _plain_columns(raws) if type(raws) is ColumnarReadings else _plain_objects(raws, env.zone_id)
    return block_of(rec, env, columns, members, ts_cache)


def block_of(
    rec: core.Record,
    env: Envelope,
    columns: Columns | None,
    members: core.Members | None,
    ts_cache: dict[str, int],
    stamps: list[int] | None = None,
) -> ColumnBlock | None:
    """The message's plainly valid columns (`_plain_columns`, `_plain_objects`, `decode_plain`)
    as a ColumnBlock, if its sensors are the registry's for this zone and gateway and its
    readings fall in one event-time minute; else None. `stamps`: the epoch ms of a `ts` list,
    when `core.canonical_stamps` has them already."""
    if columns is None or members is None:
        return None
    ts, sensor_ids, *rest = columns
    if not members.include(sensor_ids):
        return None
    if type(ts) is str:  # one event time for all
        first = last = core.cached_ts_ms(ts, ts_cache)
        stamps = [first] * len(sensor_ids)
    else:
        if stamps is None:
            stamps = _stamps(ts, ts_cache)
            if stamps is None:
                return None
        first, last = min(stamps), max(stamps)
    if first < 0 or first // core.MINUTE_MS != last // core.MINUTE_MS:
        return None
    return ColumnBlock(rec, env, first, last, (sensor_ids, stamps, *rest))


def _stamps(ts: Any, ts_cache: dict[str, int]) -> list[int] | None:
    """Epoch ms of each reading's `ts` (-1 for a string that is not a valid timestamp), each
    distinct string parsed once per batch; None when one is not a string."""
    if type(ts) not in _SEQUENCES or set(map(type, ts)) != _STR_ONLY:
        return None
    stamps = list(map(ts_cache.get, ts))
    if None in stamps:  # a timestamp not seen before in this batch
        stamps = [core.cached_ts_ms(t, ts_cache) for t in ts]
    return stamps


Columns = tuple[
    Any, Sequence[Any], Sequence[int], Sequence[int], Sequence[Any], Sequence[Any], Sequence[float], Sequence[int]
]


def _plain_columns(raws: ColumnarReadings) -> Columns | None:
    """ts (one string, or one per reading), sensor ids, seqs, vehicle counts, speeds, occupancies,
    congestion indexes and lanes of a v2 message whose values all have the contract's types and
    ranges; else None.
    (The message's zone is every reading's zone, and `parse_readings` matched it to the topic.)"""
    try:
        c = msgspec.convert({"sensor_id": raws.sensor_ids, "ts": raws.ts, **raws.columns}, _PlainColumns)
    except msgspec.ValidationError:
        return None
    return _columns_of(c)


@dataclass(slots=True)
class PlainMessage:
    """A v2 message `decode_plain` decoded into checked columns."""

    columns: Columns
    sent_at_ms: int | None
    stamps: list[int] | None = None  # each reading's epoch ms, once `core.canonical_stamps` has them

    @property
    def ts_list(self) -> list[str] | None:
        """The readings' own `ts` strings, when they are not all one."""
        ts = self.columns[0]
        return ts if type(ts) is list else None


def decode_plain(env: Envelope) -> PlainMessage | None:
    """The columns of a v2 message and its `sent_at` (epoch ms, or None), straight from the
    message bytes, when the message is what `parse_readings` and `_plain_columns` would make
    columns of: a v2 object of this envelope's gateway and zone, no field but the contract's,
    every column a list as long as `sensor_id` (1 to MAX_READINGS_PER_MESSAGE) of values with
    the contract's types and ranges. None in any doubt: the caller then parses the message the
    reference's way. One typed decode instead of orjson, `ColumnarReadings` and
    `msgspec.convert` (docs/performance.md, "Processor")."""
    payload = env.payload
    # Without the key (as plain bytes) it is not a v2 message, or not a plain one: a single
    # reading, say, is left to the reference's parse without a typed decode failing first.
    if len(payload) > MAX_PAYLOAD_BYTES or _V2_KEY not in payload:
        return None
    try:
        m = _WIRE_MESSAGE.decode(payload)
    except DECLINED:
        return None
    n = len(m.sensor_id)
    if (
        m.schema_version != GATEWAY_V2
        or m.gateway_id != env.gateway_id
        or m.zone_id != env.zone_id
        or not 0 < n <= MAX_READINGS_PER_MESSAGE
        or (type(m.ts) is list and len(m.ts) != n)
    ):
        return None
    for f in _NUMERIC:
        column = getattr(m, f.name)
        if column is not None and len(column) != n:
            return None
    return PlainMessage(_columns_of(m), _sent_at_ms(m.sent_at))


def _sent_at_ms(sent_at: Any) -> int | None:
    """`envelope.sent_at_ms`, through `core._canonical_ts_ms` when the gateway wrote the
    canonical form (its minute parsed once per container: ~1.8 -> ~0.6 us a message)."""
    if type(sent_at) is str:
        ms = core._canonical_ts_ms(sent_at)
        if ms is not None:
            return ms
    return sent_at_ms(sent_at)


# A single-reading message, decoded from its bytes in one pass: the contract's fields with their
# types and ranges, nothing else (a `readings` list, a `schema_version`, a field the reference
# ignores: declined, and the reference's way takes the message).
_WireReading = msgspec.defstruct(
    "WireReading",
    [(f.name, _value_type(f)) if f.required else (f.name, _value_type(f) | None, None) for f in READING_FIELDS],
    kw_only=True,
    forbid_unknown_fields=True,
)
_WIRE_READING = msgspec.json.Decoder(_WireReading)


def decode_single(
    env: Envelope, registry: Mapping[str, Any], owners: dict[str, tuple[str, str] | None], ts_cache: dict[str, int]
) -> Reading | None:
    """The Reading of a single-reading message straight from its bytes, when it is what
    `parse_readings` + `core._accept` would accept (a plainly valid reading of a sensor the
    registry places in this envelope's zone and gateway); None in any doubt. ~0.9 us against
    ~2.3 for orjson, the message checks and `_accept` (docs/performance.md, "Processor")."""
    payload = env.payload
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        r = _WIRE_READING.decode(payload)
    except DECLINED:
        return None
    zone_id = env.zone_id
    if r.zone_id != zone_id or core.owner_of(r.sensor_id, registry, owners) != (zone_id, env.gateway_id):
        return None
    ts_ms = core.cached_ts_ms(r.ts, ts_cache)
    if ts_ms < 0:
        return None
    return Reading(
        r.sensor_id,
        zone_id,
        ts_ms,
        r.seq,
        r.vehicle_count,
        r.avg_speed_kmh,
        r.occupancy_pct,
        r.congestion_index,
        r.lane,
    )


def _columns_of(c: Any) -> Columns:
    """The `Columns` of a converted or decoded v2 message (`_PlainColumns`, `_WireMessage`)."""
    n = len(c.sensor_id)
    ts = c.ts
    if type(ts) is list and ts and ts.count(ts[0]) == n:
        ts = ts[0]  # one event time, as a list
    none = [None] * n
    return (
        ts,
        c.sensor_id,
        c.seq,
        c.vehicle_count,
        none if c.avg_speed_kmh is None else c.avg_speed_kmh,
        none if c.occupancy_pct is None else c.occupancy_pct,
        c.congestion_index,
        c.lane,
    )


def _plain_objects(raws: Sequence[Any], zone_id: str) -> Columns | None:
    """The same columns of a v1 message whose reading objects all have every field, the
    contract's exact types and ranges and `zone_id`; else None."""
    n = len(raws)
    try:
        # KeyError: a field is absent; TypeError: a reading is not an object.
        sensor_ids, zone_ids, stamps, seqs, vehicles, speeds, occupancies, congestions, lanes = zip(
            *map(_ROW, raws), strict=True
        )
    except (KeyError, TypeError):
        return None
    if zone_ids.count(zone_id) != n:
        return None
    ts = stamps[0]
    if type(ts) is not str:
        # Not a timestamp: the reference quarantines it. (Shared by every reading, a list of
        # strings passed for one time per reading, found by a review.)
        return None
    if stamps.count(ts) == n:
        stamps = ts  # one event time
    if set(map(type, seqs + vehicles + lanes)) != _INT_ONLY or set(map(type, congestions)) != _FLOAT_ONLY:
        return None
    optional = speeds + occupancies
    kinds = set(map(type, optional))
    if not kinds <= _FLOAT_OR_NULL:
        return None
    if len(kinds) > 1 or None in optional[:1]:  # nulls: range-check the values there are
        present_speeds = [v for v in speeds if v is not None]
        present_occupancies = [v for v in occupancies if v is not None]
    else:
        present_speeds, present_occupancies = speeds, occupancies
    c = core  # the contract's ranges, as the per-reading fast path reads them
    if not (
        min(seqs) >= c._SEQ_MIN
        and max(seqs) <= c._SEQ_MAX
        and min(vehicles) >= c._VEHICLES_MIN
        and max(vehicles) <= c._VEHICLES_MAX
        and min(lanes) >= c._LANE_MIN
        and max(lanes) <= c._LANE_MAX
        and min(congestions) >= c._CONGESTION_MIN
        and max(congestions) <= c._CONGESTION_MAX
        and (not present_speeds or (min(present_speeds) >= c._SPEED_MIN and max(present_speeds) <= c._SPEED_MAX))
        and (
            not present_occupancies
            or (min(present_occupancies) >= c._OCCUPANCY_MIN and max(present_occupancies) <= c._OCCUPANCY_MAX)
        )
    ):
        return None
    # min/max skip a NaN that is not first; a NaN makes the sum NaN. (orjson rejects NaN and
    # overflowing literals today; this keeps the check true if that ever changes.)
    total = sum(present_speeds) + sum(present_occupancies) + sum(congestions)
    if total != total:
        return None
    return stamps, sensor_ids, seqs, vehicles, speeds, occupancies, congestions, lanes


# --- phase 2 -----------------------------------------------------------------------------


def own_sensor(sensors: dict[str, SensorState], own: dict[str, SensorState], sensor_id: str) -> SensorState:
    """The sensor's state for this batch to change: copy-on-write. A new zone state starts with
    its prior's SensorStates shared (`core._copy_zone_state`); the first change of a sensor in
    the batch copies it (`own` holds the copies), so the prior state is never modified and only
    the sensors a batch touches are copied."""
    s = own.get(sensor_id)
    if s is None:
        prior = sensors.get(sensor_id)
        s = SensorState() if prior is None else SensorState(*prior.row())
        own[sensor_id] = sensors[sensor_id] = s
    return s


# Python's `sum` of floats adds left to right in 3.11, exactly as the reference's `+=` loop does;
# 3.12 made it compensated (more exact, different bits). Aggregates are compared exactly across
# replays, so the block path uses `sum` only where it is the plain left-to-right sum.
_SUM_IS_SEQUENTIAL = sum([1e100, 1.0, -1e100, 1.0]) == 1.0


def add_in_order(total: float, values: Iterable[float]) -> float:
    """`total + v0 + v1 + ...`, left to right: the reference's summation order, bit for bit."""
    if _SUM_IS_SEQUENTIAL:
        return sum(values, total)
    for v in values:
        total += v
    return total


def _without(columns: tuple[Sequence[Any], ...], n: int, positions: list[int]) -> tuple[Sequence[Any], ...]:
    """The columns without the rows at `positions` (usually none: then the columns themselves)."""
    if not positions:
        return columns
    keep = [True] * n
    for j in positions:
        keep[j] = False
    return tuple(list(compress(c, keep)) for c in columns)


@dataclass(slots=True)
class RunOrigin:
    """Where each row of a run (`apply_run`) came from: its record, receive time and gateway."""

    records: list[core.Record]
    received: list[int]
    gateways: list[str]


# The fields of a Reading that make a row of `apply_rows`' columns, in their order.
_RUN_ROW = operator.attrgetter(
    "sensor_id", "ts_ms", "seq", "vehicle_count", "avg_speed_kmh", "occupancy_pct", "congestion_index", "lane"
)


def apply_run(
    state: ZoneState,
    own: dict[str, SensorState],
    items: list[core._Item],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: core.BatchOutput,
    processed_at_ms: int,
    settings: core.DetectorSettings,
) -> tuple[int, int, int]:
    """Consecutive items of a zone, each a valid reading taken one at a time (single-reading
    messages, above all) in its own record with its own receive time and gateway:
    `apply_rows` with those per row. The caller gathers them so that the conditions of a
    block hold: one event-time minute, a spread within the allowed lateness, no record applied
    before (to the zone state or to the stored zone-minute aggregate), no event time beyond
    its own record's future bound."""
    columns = tuple(zip(*(_RUN_ROW(i.reading) for i in items), strict=True))
    stamps = columns[1]
    origin = RunOrigin(
        [i.record for i in items], [i.envelope.received_at_ms for i in items], [i.envelope.gateway_id for i in items]
    )
    return apply_rows(
        state,
        own,
        columns,
        min(stamps),
        max(stamps),
        origin,
        minutes,
        out,
        processed_at_ms,
        settings,
    )


def apply_rows(
    state: ZoneState,
    own: dict[str, SensorState],
    columns: ReadingColumns,
    first_ms: int,
    ts_ms: int,
    origin: ColumnBlock | RunOrigin,
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: core.BatchOutput,
    processed_at_ms: int,
    settings: core.DetectorSettings,
) -> tuple[int, int, int]:
    """Readings of one zone and one event-time minute (the earliest `first_ms`, the latest
    `ts_ms`), their spread within the allowed lateness, as columns: sensor ids, event times,
    seqs, vehicle counts, speeds, occupancies, congestion indexes and lanes. `origin` is the
    one record they all come from (a block), or each row's record (a run).

    Why it is the reference: one minute means one zone-minute aggregate and one lake hour, and
    the caller has checked every record against the stored aggregate. Lateness is judged
    against the watermark the rows start from: aggregating a reading raises the watermark to
    at most the latest event time, and a spread within `allowed_lateness_ms` keeps every row
    at or above that minus the lateness, so no row can make another late. Dedupe stays per
    reading. Lake rows keep their order; float sums keep the reference's order
    (`add_in_order`); the aggregate's marker is the record of the last aggregated row, as the
    reference leaves it. The live sensor update is the reference's own (`core.update_sensors`),
    once, after the dedupe loop: it touches no field that dedupe or lateness read."""
    threshold = state.watermark_ms - settings.allowed_lateness_ms  # older than this: late
    late_all = ts_ms < threshold
    late_some = not late_all and first_ms < threshold
    sensor_ids, stamps, seqs = columns[0], columns[1], columns[2]
    sensors = state.sensors
    own_get = own.get
    # Positions (in row order) of duplicates, and of readings stored but not aggregated.
    dropped: list[int] = []
    stale: list[int] = []
    live_sensors: list[SensorState] = []  # the sensors of the aggregated readings, in order
    i = -1
    for sid, seq in zip(sensor_ids, seqs, strict=True):
        i += 1
        s = own_get(sid)
        if s is None:
            s = own_sensor(sensors, own, sid)
        hwm = s.hwm
        if seq > hwm:  # a new highest seq, the usual case: `SensorState.admit` inlined
            shift = seq - hwm
            s.window = ((s.window << shift) | 1) & _WINDOW_MASK if shift < DEDUPE_WINDOW else 1
            s.hwm = seq
        else:
            verdict = s.admit(seq)
            if verdict == DUPLICATE:
                s.duplicates += 1
                dropped.append(i)
                continue
            if verdict:  # beyond the dedupe window: stored, late
                s.late += 1
                stale.append(i)
                continue
        if late_all or (late_some and stamps[i] < threshold):
            s.late += 1
            stale.append(i)
            continue
        live_sensors.append(s)
    n = i + 1
    stored = n - len(dropped)
    late = len(stale)
    # A block's rows share its record, receive time and gateway; a run's travel with its rows.
    block = origin if type(origin) is ColumnBlock else None
    run = origin if type(origin) is RunOrigin else None
    for j in stale:  # received all the same (`core.heard_from`); each row's sensor is in `own`
        core.heard_from(own[sensor_ids[j]], block.envelope.received_at_ms if block is not None else run.received[j])
    if stored:  # the reference only creates a lake file it puts a row in
        received_at: int | Sequence[int]
        gateway: str | Sequence[str]
        if block is not None:
            received_at, gateway = block.envelope.received_at_ms, block.envelope.gateway_id
        elif run is not None:
            received_at, gateway = _without((run.received, run.gateways), n, dropped)
        out.lake[ts_ms // core.HOUR_MS].extend(
            _without(columns, n, dropped),
            zone_id=state.zone_id,
            gateway_id=gateway,
            received_at_ms=received_at,
            processed_at_ms=processed_at_ms,
        )
    live_n = stored - late
    if not live_n:
        return n, stored, late
    sensor_ids, stamps, _, vehicles, speeds, occupancies, congestions, _ = _without(columns, n, dropped + stale)
    received: Sequence[int]
    if block is not None:
        received_at = block.envelope.received_at_ms
        received = [received_at] * live_n
        # The reference's rule, reading by reading: the watermark follows event time, capped
        # at the receive time (a clock ahead cannot move it further).
        watermark = min(ts_ms if live_n == n else max(stamps), received_at)
        rec = block.record
    elif run is not None:
        received, records = _without((run.received, run.records), n, dropped + stale)
        watermark = max(map(min, stamps, received))
        rec = records[-1]  # the last aggregated row's, as the reference leaves the aggregate's marker
    core.update_sensors(
        live_sensors,
        zip(sensor_ids, stamps, vehicles, speeds, occupancies, congestions, strict=True),
        received,
        state.zone_id,
        out.alerts,
        settings.stuck_run_readings,
    )
    if watermark > state.watermark_ms:
        state.watermark_ms = watermark
    minute = ts_ms // core.MINUTE_MS
    agg = core.minute_aggregate(state.zone_id, minute, rec, minutes, out)
    if agg is not None:
        agg.readings += live_n
        agg.vehicles += sum(vehicles)  # ints: exact in any order
        if None in speeds:
            speeds = [v for v in speeds if v is not None]
        agg.speed_sum = add_in_order(agg.speed_sum, speeds)
        agg.speed_n += len(speeds)
        if None in occupancies:
            occupancies = [v for v in occupancies if v is not None]
        agg.occupancy_sum = add_in_order(agg.occupancy_sum, occupancies)
        agg.occupancy_n += len(occupancies)
        agg.congestion_sum = add_in_order(agg.congestion_sum, congestions)
        agg.marker_shard, agg.marker_seq = rec.shard_id, rec.sequence_number
    if minute > state.evaluated_minute:
        bucket = state.open_minutes.setdefault(minute, [0, 0.0])
        bucket[0] += live_n
        bucket[1] = add_in_order(bucket[1], congestions)
    return n, stored, late
