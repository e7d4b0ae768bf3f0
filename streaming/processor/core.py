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
import gc
import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson

from streaming.contract import (
    FIELDS_BY_NAME,
    MAX_SEQ,
    ContractError,
    Reading,
    format_ts,
    is_plain_id,
    parse_ts_ms,
    validate_reading,
)
from streaming.processor import columnar
from streaming.processor.envelope import Envelope, decode_envelope, is_single_reading, parse_readings
from streaming.processor.state import (
    BEYOND_WINDOW,
    DUPLICATE,
    Congestion,
    MinuteAggregate,
    SensorState,
    ShardCounters,
    ZoneState,
)
from streaming.registry import Sensor

MINUTE_MS = 60_000
HOUR_MS = 3_600_000


@dataclass(slots=True)
class Record:
    """A Kinesis record without AWS types: where it sits in the stream and its bytes.

    Never modified once made; not frozen, since it is made once per record and a frozen
    dataclass takes ~3x as long to construct (~0.4 us against ~0.13)."""

    shard_id: str
    sequence_number: int
    data: bytes


@dataclass(frozen=True)
class DetectorSettings:
    """Thresholds of the detectors; documented in docs/architecture.md."""

    congestion_raise: float = 0.7  # zone-minute mean congestion index that raises an episode
    congestion_clear: float = 0.4  # ... and that clears it (hysteresis band between)
    congestion_min_minutes: int = 2  # consecutive closed minutes before either transition
    # The severe rule raises without waiting for minutes to close: at least `severe_share` of the
    # zone's reporting sensors (a reading within `severe_window_ms` of the zone's watermark; at
    # least `severe_min_sensors` of them) read this index or more in their latest reading.
    # Clearing keeps the minimum duration above.
    congestion_severe: float = 0.85
    severe_share: float = 0.5
    severe_min_sensors: int = 3
    severe_window_ms: int = 2 * MINUTE_MS
    allowed_lateness_ms: int = 15 * MINUTE_MS  # older than the zone's watermark by more: "late"
    max_future_skew_ms: int = 5 * MINUTE_MS  # event time ahead of receive time by more: rejected
    silence_ms: int = 5 * MINUTE_MS  # a sensor quiet this long (receive time) is "silent"
    # The same non-zero vehicle count this many readings in a row: "stuck". The daily mart
    # fct_sensor_health_daily applies the same rule (dbt var stuck_run_readings; a test holds them equal).
    stuck_run_readings: int = 10


@dataclass(frozen=True)
class Alert:
    """An event for the alerts bus. `event_id` is deterministic, so consumers can drop
    the copies a retried batch may send."""

    detail_type: str  # CongestionDetected | CongestionCleared | SensorSilent | SensorStuck
    event_id: str
    detail: dict[str, Any]


@dataclass(slots=True)
class _Item:
    record: Record
    envelope: Envelope
    index: int
    raw: Any  # the reading as parsed, or IN_PAYLOAD (the whole message is the reading: `raw_of`)
    reading: Reading | None  # None → `error` says why
    error: ContractError | None
    # (sensor_id, seq) of an invalid reading whose identity is sound (a registry sensor of this
    # zone, delivered by its own gateway): its resend is then a duplicate, not a second quarantine.
    key: tuple[str, int] | None = None

    def raw_of(self) -> Any:
        """The reading as the reference parsed it (for quarantine bytes): parsed from the message
        again when a typed decode kept none (`columnar.decode_single`), which is rarely needed."""
        return orjson.loads(self.envelope.payload) if self.raw is IN_PAYLOAD else self.raw


IN_PAYLOAD: Any = object()  # `_Item.raw` of a single-reading message decoded typed


@dataclass
class DecodedBatch:
    """Phase-1 result: readings grouped by zone, plus what could not be attributed."""

    # In message order; `decode_batch` keeps a plainly valid gateway message as one
    # `columnar.ColumnBlock`, which stands for the items `block.items()` of the reference.
    by_zone: dict[str, list[_Item | columnar.ColumnBlock]] = field(default_factory=dict)
    unattributed: list[tuple[Record, ContractError, bytes, Envelope | None]] = field(default_factory=list)
    last_sequence: dict[str, int] = field(default_factory=dict)  # shard → highest seq in batch
    # (record, gateway publish time) of each message that has one, for latency metrics.
    sent_at: list[tuple[Record, int]] = field(default_factory=list)
    # The newest receive time of the batch's records: how far the stream has been read (the
    # sweeper reads the processor's lag behind the street from it, `sweeper.processing_lag_ms`).
    received_through: int = 0

    def minute_keys(self) -> set[tuple[str, int]]:
        """(zone, minute) of every valid reading: the aggregates phase 2 needs loaded."""
        keys = set()
        for zone, items in self.by_zone.items():
            for item in items:
                if type(item) is columnar.ColumnBlock:
                    keys.add((zone, item.ts_ms // MINUTE_MS))
                elif item.reading is not None:
                    keys.add((zone, item.reading.ts_ms // MINUTE_MS))
        return keys


def _detached(exc: ContractError) -> ContractError:
    """`exc` as a batch keeps it (its code and message): without its traceback and chained
    exceptions, whose frames reach back to the batch being built and would make a reference
    cycle of it, garbage only the cyclic collector could free (see `_gc_paused`)."""
    exc.__traceback__ = exc.__cause__ = exc.__context__ = None
    return exc


def _open_envelope(
    rec: Record, out: DecodedBatch, zones: set[str]
) -> tuple[Envelope, list[_Item | columnar.ColumnBlock]] | None:
    """The first part of phase 1 both decoders share: note the record's position, decode its
    envelope, and record a record that names no zone of the registry. Returns the envelope and
    the zone's item list, or None when nothing is left to do."""
    out.last_sequence[rec.shard_id] = max(out.last_sequence.get(rec.shard_id, -1), rec.sequence_number)
    try:
        env = decode_envelope(rec.data)
    except ContractError as exc:
        out.unattributed.append((rec, _detached(exc), rec.data, None))
        return None
    if env.received_at_ms > out.received_through:
        out.received_through = env.received_at_ms
    if env.zone_id not in zones:
        unknown = ContractError("unknown_zone", f"topic zone {env.zone_id} is not in the registry")
        out.unattributed.append((rec, unknown, env.payload, env))
        return None
    return env, out.by_zone.setdefault(env.zone_id, [])


def _open_message(
    rec: Record, env: Envelope, items: list[_Item | columnar.ColumnBlock], out: DecodedBatch
) -> Sequence[Any] | None:
    """The second part: parse the message into its raw readings, or record why it cannot be
    split into readings (and return None)."""
    try:
        raws, sent_at_ms = parse_readings(env)
    except ContractError as exc:
        items.append(_Item(rec, env, -1, None, None, _detached(exc)))
        return None
    if sent_at_ms is not None:
        out.sent_at.append((rec, sent_at_ms))
    return raws


def decode_batch_reference(records: Iterable[Record], registry: Mapping[str, Sensor], zones: set[str]) -> DecodedBatch:
    """Phase 1, reference: decode and validate, without any state, one reading at a time
    through the contract's validator. This is the definition of phase 1; `decode_batch`
    must produce exactly the same DecodedBatch (a property test holds them together)."""
    out = DecodedBatch()
    for rec in records:
        opened = _open_envelope(rec, out, zones)
        if opened is None:
            continue
        env, items = opened
        raws = _open_message(rec, env, items, out)
        if raws is None:
            continue
        for index, raw in enumerate(raws):
            try:
                reading = validate_reading(raw)
                _check_against_registry(reading, env, registry)
            except ContractError as exc:
                items.append(_Item(rec, env, index, raw, None, _detached(exc), key=_dedupe_key(raw, env, registry)))
                continue
            items.append(_Item(rec, env, index, raw, reading, None))
    return out


def _check_against_registry(r: Reading, env: Envelope, registry: Mapping[str, Sensor]) -> None:
    sensor = registry.get(r.sensor_id)
    if sensor is None:
        raise ContractError("unknown_sensor", f"reading {r.sensor_id} seq {r.seq}: sensor is not in the registry")
    if r.zone_id != sensor.zone_id:
        raise ContractError(
            "zone_mismatch",
            f"reading {r.sensor_id} seq {r.seq}: zone_id={r.zone_id} but the "
            f"registry places the sensor in {sensor.zone_id}",
        )
    if env.zone_id != sensor.zone_id:
        raise ContractError(
            "zone_mismatch",
            f"reading {r.sensor_id} seq {r.seq}: published on zone topic "
            f"{env.zone_id} but the sensor is in {sensor.zone_id}",
        )
    if env.gateway_id != sensor.gateway_id:
        raise ContractError(
            "wrong_gateway",
            f"reading {r.sensor_id} seq {r.seq}: delivered by {env.gateway_id} "
            f"but the sensor belongs to {sensor.gateway_id}",
        )


def _dedupe_key(raw: Any, env: Envelope, registry: Mapping[str, Sensor]) -> tuple[str, int] | None:
    """The (sensor_id, seq) of an invalid reading, if its identity checks out against the
    registry and the envelope; None otherwise (so a forger cannot use up a sensor's seq)."""
    if not isinstance(raw, dict):
        return None
    sensor_id, seq = raw.get("sensor_id"), raw.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ or not isinstance(sensor_id, str):
        return None
    sensor = registry.get(sensor_id)
    if sensor is None or raw.get("zone_id") != sensor.zone_id:
        return None
    if sensor.zone_id != env.zone_id or sensor.gateway_id != env.gateway_id:
        return None
    return sensor_id, seq


def decode_batch(records: Iterable[Record], registry: Mapping[str, Sensor], zones: set[str]) -> DecodedBatch:
    """Phase 1: decode and validate, without any state — exactly `decode_batch_reference`, faster.

    The contract's validator builds an error context, runs regexes and parses a timestamp for
    every reading. Almost every reading is normal, so here a reading whose fields all have the
    exact type and range of a normal reading, and whose sensor, zone and gateway match the
    registry, is accepted with a few comparisons (`_accept`), timestamps parsed once per
    distinct string. Anything else goes through the reference validator, which alone decides
    and explains a rejection: the fast path may only accept what the reference accepts, and
    then builds the same Reading.

    A gateway message (v2 columns, or v1 objects) whose readings are all plainly valid and fall
    in one event-time minute is checked a column at a time and kept as columns (`columnar.accept`), for
    `apply_batch` to take as a block.
    """
    with _gc_paused():
        return _decode(records, registry, zones)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one phase of a batch.

    A batch keeps ~300,000 reading dicts, Readings and items alive until it is written, and
    each allocation burst triggers collections that traverse all of them, again and again:
    measured at ~40 % of `decode_batch`'s time. Nothing a phase builds is cyclic (kept errors
    are `_detached`; `test_a_batch_leaves_no_cyclic_garbage` holds it), so reference counting
    frees all of it anyway.

    When the phase ends, what it built moves straight into the collector's oldest generation
    (`gc.freeze()` then `gc.unfreeze()`: two O(1) list splices) before the collector resumes
    (if it was on). Resumed as it was, its first young-generation pass would traverse
    everything the phase allocated, once per phase: 45-55 ms of a ~700 ms gateway batch,
    twice. The objects stay tracked; a stray cycle is still freed, by the next full collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _decode(records: Iterable[Record], registry: Mapping[str, Sensor], zones: set[str]) -> DecodedBatch:
    out = DecodedBatch()
    owners = _owners_for(registry)
    members = _members_for(registry)
    ts_cache: dict[str, int] = {}
    # First every envelope, and every v2 message decoded straight into checked columns, so
    # that the batch's per-reading `ts` strings are parsed together (`canonical_stamps`).
    opened = []
    own_times: list[columnar.PlainMessage] = []  # those whose readings each have their own `ts`
    for rec in records:
        envelope_and_items = _open_envelope(rec, out, zones)
        if envelope_and_items is not None:
            env, items = envelope_and_items
            plain = columnar.decode_plain(env)
            if plain is not None and plain.ts_list is not None:
                own_times.append(plain)
            opened.append((rec, env, items, plain))
    for plain, stamps in zip(own_times, canonical_stamps([p.ts_list for p in own_times]), strict=True):
        plain.stamps = stamps
    for rec, env, items, plain in opened:
        zone_id, gateway_id = env.zone_id, env.gateway_id
        if plain is not None:
            # Usually a block.
            members_here = members.get((zone_id, gateway_id))
            block = columnar.block_of(rec, env, plain.columns, members_here, ts_cache, plain.stamps)
            if block is not None:
                if plain.sent_at_ms is not None:
                    out.sent_at.append((rec, plain.sent_at_ms))
                items.append(block)
                continue
        else:
            reading = columnar.decode_single(env, registry, owners, ts_cache)
            if reading is not None:
                items.append(_Item(rec, env, 0, IN_PAYLOAD, reading, None))
                continue
        raws = _open_message(rec, env, items, out)
        if raws is None:
            continue
        if len(raws) > 1 or type(raws) is not list:
            block = columnar.accept(rec, env, raws, members.get((zone_id, gateway_id)), ts_cache)
            if block is not None:
                # Every reading plainly valid and of one event-time minute: phase 2 may apply them as a block.
                items.append(block)
                continue
        for index, raw in enumerate(raws):
            reading = _accept(raw, zone_id, gateway_id, registry, owners, ts_cache) if type(raw) is dict else None
            if reading is None:
                try:
                    reading = validate_reading(raw)
                    _check_against_registry(reading, env, registry)
                except ContractError as exc:
                    items.append(_Item(rec, env, index, raw, None, _detached(exc), key=_dedupe_key(raw, env, registry)))
                    continue
            items.append(_Item(rec, env, index, raw, reading, None))
    return out


# The contract's ranges, read once (the fast path must not keep its own copy of the contract).
_SEQ_MIN, _SEQ_MAX = FIELDS_BY_NAME["seq"].minimum, FIELDS_BY_NAME["seq"].maximum
_VEHICLES_MIN, _VEHICLES_MAX = FIELDS_BY_NAME["vehicle_count"].minimum, FIELDS_BY_NAME["vehicle_count"].maximum
_LANE_MIN, _LANE_MAX = FIELDS_BY_NAME["lane"].minimum, FIELDS_BY_NAME["lane"].maximum
_SPEED_MIN, _SPEED_MAX = FIELDS_BY_NAME["avg_speed_kmh"].minimum, FIELDS_BY_NAME["avg_speed_kmh"].maximum
_OCCUPANCY_MIN, _OCCUPANCY_MAX = FIELDS_BY_NAME["occupancy_pct"].minimum, FIELDS_BY_NAME["occupancy_pct"].maximum
_CONGESTION_MIN, _CONGESTION_MAX = (
    FIELDS_BY_NAME["congestion_index"].minimum,
    FIELDS_BY_NAME["congestion_index"].maximum,
)
_SENSOR_ID_LEN = FIELDS_BY_NAME["sensor_id"].max_length or 0
_ZONE_ID_LEN = FIELDS_BY_NAME["zone_id"].max_length or 0
_NOT_SEEN: Any = object()


# The processor loads its registry once per container and never changes it, so the owner of
# each sensor id is looked up once per container, not once per batch (a batch of gateway
# messages meets ~50,000 distinct sensors). Keyed by identity; a new registry object starts afresh.
_owners_cache: list[Any] = [None, {}]


def _owners_for(registry: Mapping[str, Sensor]) -> dict[str, tuple[str, str] | None]:
    if _owners_cache[0] is not registry:
        _owners_cache[:] = [registry, {}]
    return _owners_cache[1]


def _owner(sensor_id: str, registry: Mapping[str, Sensor]) -> tuple[str, str] | None:
    """(zone, gateway) of a registered sensor whose ids the contract accepts, else None."""
    sensor = registry.get(sensor_id)
    if sensor is None or not is_plain_id(sensor_id, _SENSOR_ID_LEN) or not is_plain_id(sensor.zone_id, _ZONE_ID_LEN):
        return None
    return sensor.zone_id, sensor.gateway_id


class Members:
    """The sensor ids `_owner` places in one zone and gateway, and the last list of a message's
    sensor ids found to be all of them."""

    __slots__ = ("ids", "last")

    def __init__(self, ids: frozenset[str]) -> None:
        self.ids = ids
        self.last: list[str] | None = None

    def include(self, sensor_ids: Any) -> bool:
        """True if every element of `sensor_ids` is one of `ids`. A gateway sends the same
        sensors in the same order message after message, so a list equal to the last one that
        passed is compared (~20 ns an id) rather than hashed and looked up (~100 ns)."""
        if sensor_ids == self.last:
            return True
        try:
            # TypeError: an unhashable sensor_id; a non-string one is simply not a member.
            if not self.ids.issuperset(sensor_ids):
                return False
        except TypeError:
            return False
        if type(sensor_ids) is list:
            self.last = list(sensor_ids)
        return True


def owner_of(
    sensor_id: str, registry: Mapping[str, Sensor], owners: dict[str, tuple[str, str] | None]
) -> tuple[str, str] | None:
    """`_owner(sensor_id)`, looked up once per container (`owners`: `_owners_for(registry)`)."""
    owner = owners.get(sensor_id, _NOT_SEEN)
    if owner is _NOT_SEEN:
        owner = _owner(sensor_id, registry)
        # Only the registry's ids are kept: any string may come, and a container lives long
        # (found by a review: forged 20 KB ids grew it by 125 KB a message).
        if sensor_id in registry:
            owners[sensor_id] = owner
    return owner


_members_cache: list[Any] = [None, {}]


def _members_for(registry: Mapping[str, Sensor]) -> dict[tuple[str, str], Members]:
    """(zone, gateway) → the `Members` there, once per registry object: a gateway message's
    sensors are then checked with one C-level comparison or `issuperset`."""
    if _members_cache[0] is not registry:
        groups: dict[tuple[str, str], set[str]] = defaultdict(set)
        for sensor_id in registry:
            owner = _owner(sensor_id, registry)
            if owner is not None:
                groups[owner].add(sensor_id)
        _members_cache[:] = [registry, {k: Members(frozenset(v)) for k, v in groups.items()}]
    return _members_cache[1]


def cached_ts_ms(ts: str, ts_cache: dict[str, int]) -> int:
    """`parse_ts_ms(ts)`, once per distinct string in a batch (a gateway's readings share one);
    -1 when it is not a valid timestamp (the reference validator will say why)."""
    ts_ms = ts_cache.get(ts)
    if ts_ms is None:
        ts_ms = _canonical_ts_ms(ts)
        if ts_ms is None:
            try:
                ts_ms = parse_ts_ms(ts)
            except ContractError:
                ts_ms = -1
        ts_cache[ts] = ts_ms
    return ts_ms


# Minute prefixes ("2026-11-23T18:05:") → epoch ms of the minute, or -1 for a prefix whose minute
# `parse_ts_ms` does not accept whole. Per container, bounded like envelope._PLAIN_IDS.
_MINUTES: dict[str, int] = {}
_MINUTES_MAX = 100_000


def _canonical_ts_ms(ts: str) -> int | None:
    """Epoch ms of `ts` in the form `format_ts` writes (`YYYY-MM-DDTHH:MM:SS.mmmZ`), without the
    regex and `datetime` of `parse_ts_ms` for each of a minute's distinct strings (detectors that
    each report their own time); None for a string of any other form, which `parse_ts_ms` then
    decides. Exactly `parse_ts_ms(ts)`: the minute's first and last millisecond both passed it
    (a valid date and time, inside the contract's range), and seconds 00-59 and milliseconds in
    ASCII digits keep `ts` a valid time of that minute."""
    if len(ts) != 24 or ts[19] != "." or ts[23] != "Z":
        return None
    seconds, millis = ts[17:19], ts[20:23]
    if not (seconds.isascii() and seconds.isdigit() and millis.isascii() and millis.isdigit()) or seconds > "59":
        return None
    minute = _minute_ms(ts[:17])
    if minute < 0:
        return None
    return minute + int(seconds) * 1000 + int(millis)


def _minute_ms(prefix: str) -> int:
    """Epoch ms of the minute a canonical prefix (`2026-11-23T18:05:`) names, or -1 unless
    `parse_ts_ms` accepts the minute's first and last millisecond."""
    minute = _MINUTES.get(prefix)
    if minute is None:
        try:
            minute = parse_ts_ms(prefix + "00.000Z")
            parse_ts_ms(prefix + "59.999Z")
        except ContractError:
            minute = -1
        if len(_MINUTES) >= _MINUTES_MAX:
            _MINUTES.clear()
        _MINUTES[prefix] = minute
    return minute


_TS_LEN_ONLY = {24}  # len("2026-11-23T18:05:07.123Z")
_SECOND_AND_MILLI_DIGITS = np.array([17, 18, 20, 21, 22])


def canonical_stamps(columns: Sequence[Sequence[str]]) -> list[list[int] | None]:
    """For each column of timestamp strings (the `ts` list of a v2 message whose detectors each
    report their own time), `[_canonical_ts_ms(t) for t in column]` when every string of the
    column is in the canonical form and all share its first string's minute; None for any
    other column (its strings are then parsed one at a time).

    All columns of a batch in one pass: their strings are joined into one ASCII buffer read as
    a 24-byte row per string, and the separators, the digits, the shared minute prefix and the
    seconds (00-59) are checked with numpy, a column at a time; each column's minute comes from
    `_minute_ms`, as for one string. Per string, `_canonical_ts_ms` costs ~0.8 µs of Python; a
    batch of 285,000 such strings took ~220 ms that way (docs/performance.md, "Processor")."""
    out: list[list[int] | None] = [None] * len(columns)
    picked: list[int] = []  # positions in `columns` of the candidates, in order
    minutes: list[int] = []
    counts: list[int] = []
    parts: list[str] = []
    for i, column in enumerate(columns):
        if not column or set(map(len, column)) != _TS_LEN_ONLY:
            continue
        joined = "".join(column)
        if not joined.isascii():
            continue
        minute = _minute_ms(column[0][:17])
        if minute < 0:
            continue
        picked.append(i)
        minutes.append(minute)
        counts.append(len(column))
        parts.append(joined)
    if not parts:
        return out
    rows = np.frombuffer("".join(parts).encode("ascii"), dtype=np.uint8).reshape(-1, 24)
    n = np.array(counts)
    starts = np.cumsum(n) - n
    digits = rows[:, _SECOND_AND_MILLI_DIGITS].astype(np.int64) - ord("0")
    seconds = digits[:, 0] * 10 + digits[:, 1]
    ok = (
        (rows[:, :17] == rows[np.repeat(starts, n), :17]).all(axis=1)
        & (rows[:, 19] == ord("."))
        & (rows[:, 23] == ord("Z"))
        & ((digits >= 0) & (digits <= 9)).all(axis=1)
        & (seconds <= 59)
    )
    whole = np.logical_and.reduceat(ok, starts).tolist()
    stamps = (
        np.repeat(np.array(minutes, dtype=np.int64), n) + seconds * 1000 + digits[:, 2:] @ np.array([100, 10, 1])
    ).tolist()
    for i, start, count, good in zip(picked, starts.tolist(), counts, whole, strict=True):
        if good:
            out[i] = stamps[start : start + count]
    return out


def _accept(
    raw: dict[str, Any],
    zone_id: str,
    gateway_id: str,
    registry: Mapping[str, Sensor],
    owners: dict[str, tuple[str, str] | None],
    ts_cache: dict[str, int],
) -> Reading | None:
    """The Reading `validate_reading` + the registry checks would return, if the reading is
    plainly valid; None when in any doubt (the caller then asks the reference validator)."""
    sensor_id = raw.get("sensor_id")
    if type(sensor_id) is not str:
        return None
    owner = owner_of(sensor_id, registry, owners)
    # The reading's zone, the topic's zone and the registry's zone agree; the gateway owns it.
    if owner is None or owner[0] != zone_id or owner[1] != gateway_id or raw.get("zone_id") != zone_id:
        return None
    seq = raw.get("seq")
    vehicles = raw.get("vehicle_count")
    lane = raw.get("lane")
    # `type(x) is int` rejects bool (and integral floats, which the reference converts).
    if (
        type(seq) is not int
        or type(vehicles) is not int
        or type(lane) is not int
        or not _SEQ_MIN <= seq <= _SEQ_MAX
        or not _VEHICLES_MIN <= vehicles <= _VEHICLES_MAX
        or not _LANE_MIN <= lane <= _LANE_MAX
    ):
        return None
    # Numbers: floats in range as they are (NaN fails the comparison); ints are rare and the
    # reference converts them, so they defer. Optional fields may be absent or null.
    congestion = raw.get("congestion_index")
    if type(congestion) is not float or not _CONGESTION_MIN <= congestion <= _CONGESTION_MAX:
        return None
    speed = raw.get("avg_speed_kmh")
    if speed is not None and (type(speed) is not float or not _SPEED_MIN <= speed <= _SPEED_MAX):
        return None
    occupancy = raw.get("occupancy_pct")
    if occupancy is not None and (type(occupancy) is not float or not _OCCUPANCY_MIN <= occupancy <= _OCCUPANCY_MAX):
        return None
    ts = raw.get("ts")
    if type(ts) is not str:
        return None
    ts_ms = cached_ts_ms(ts, ts_cache)
    if ts_ms < 0:
        return None
    return Reading(sensor_id, zone_id, ts_ms, seq, vehicles, speed, occupancy, congestion, lane)  # type: ignore[arg-type]


class LakeColumns:
    """Column lists for one lake file (one event-time hour): cheap to append, and pyarrow
    turns them into a table without a per-row object."""

    NAMES = (
        "sensor_id",
        "zone_id",
        "ts",
        "seq",
        "vehicle_count",
        "avg_speed_kmh",
        "occupancy_pct",
        "congestion_index",
        "lane",
        "gateway_id",
        "received_at",
        "processed_at",
    )

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self.NAMES}
        self.zone_ids: set[str | None] = set()  # the zones whose rows these are (the object's name)

    def append(self, r: Reading, gateway_id: str, received_at_ms: int, processed_at_ms: int) -> None:
        self.zone_ids.add(r.zone_id)
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

    def extend(
        self,
        columns: tuple[Sequence[Any], ...],
        *,
        zone_id: str,
        gateway_id: str | Sequence[str],
        received_at_ms: int | Sequence[int],
        processed_at_ms: int,
    ) -> None:
        """`append` of each row of one zone's readings: `columns` are their sensor ids, event
        times, seqs, vehicle counts, speeds, occupancies, congestion indexes and lanes; the
        gateway and the receive time are one for all (a message's) or one per row (a run's)."""
        self.zone_ids.add(zone_id)
        c = self.columns
        sensor_ids, stamps, seqs, vehicles, speeds, occupancies, congestions, lanes = columns
        k = len(seqs)
        c["sensor_id"] += sensor_ids
        c["zone_id"] += [zone_id] * k
        c["ts"] += stamps
        c["seq"] += seqs
        c["vehicle_count"] += vehicles
        c["avg_speed_kmh"] += speeds
        c["occupancy_pct"] += occupancies
        c["congestion_index"] += congestions
        c["lane"] += lanes
        c["gateway_id"] += [gateway_id] * k if type(gateway_id) is str else gateway_id
        c["received_at"] += [received_at_ms] * k if type(received_at_ms) is int else received_at_ms
        c["processed_at"] += [processed_at_ms] * k

    def __len__(self) -> int:
        return len(self.columns["seq"])


class QuarantineColumns:
    NAMES = (
        "received_at",
        "processed_at",
        "reason_code",
        "reason",
        "sensor_id",
        "gateway_id",
        "zone_id",
        "source_id",
        "raw",
    )

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self.NAMES}
        self.zone_ids: set[str | None] = set()  # the zones whose rows these are; None: no zone's

    def append(
        self,
        *,
        received_at_ms: int,
        processed_at_ms: int,
        error: ContractError,
        raw: bytes,
        record: Record,
        index: int,
        sensor_id: str | None = None,
        gateway_id: str | None = None,
        zone_id: str | None = None,
    ) -> None:
        self.zone_ids.add(zone_id)
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
    # Records skipped as applied before (a redelivery): their messages' latency was measured
    # when they were applied; measured again, a retry would skew the latency histograms.
    redelivered: set[tuple[str, int]] = field(default_factory=set)  # (shard, sequence number)


def _reading_bytes(raw: Any, env: Envelope) -> bytes:
    """The bytes quarantine keeps of a reading: the message's own when the message is that one
    reading (a single-reading message: re-serialised, its spacing, number spelling and repeated
    keys were lost; found by a review), else the reading re-serialised out of its gateway batch.
    orjson writes at most 255 levels of nesting but reads 1,024, so a hostile reading can parse
    and not serialise: then keep the whole message, which holds the original bytes, rather than
    fail the batch on it forever."""
    if _is_single_reading(env.payload):
        return env.payload
    try:
        return orjson.dumps(raw, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return env.payload


def _is_single_reading(payload: bytes) -> bool:
    """Whether a message is one reading rather than a gateway batch (`parse_readings`' rule).
    Parsed again: only quarantine asks, and it is rare."""
    try:
        return is_single_reading(orjson.loads(payload))
    except orjson.JSONDecodeError:
        return False


def _sensor_id_of(raw: Any) -> str | None:
    if isinstance(raw, dict):
        sid = raw.get("sensor_id")
        if isinstance(sid, str):
            return sid[:64]
    return None


def apply_batch_reference(
    decoded: DecodedBatch,
    zone_states: Mapping[str, ZoneState],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    shard_counters: Mapping[str, ShardCounters],
    processed_at_ms: int,
    settings: DetectorSettings = DetectorSettings(),
) -> BatchOutput:
    """Phase 2, reference: apply the decoded batch to prior state, one reading at a time.
    Inputs are not modified. This is the definition of phase 2; `apply_batch` must produce
    exactly the same BatchOutput."""
    return _apply(decoded, zone_states, minutes, shard_counters, processed_at_ms, settings, fast=False)


def apply_batch(
    decoded: DecodedBatch,
    zone_states: Mapping[str, ZoneState],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    shard_counters: Mapping[str, ShardCounters],
    processed_at_ms: int,
    settings: DetectorSettings = DetectorSettings(),
) -> BatchOutput:
    """Phase 2: apply the decoded batch to prior state. Inputs are not modified.

    Exactly `apply_batch_reference`, faster: the redelivery check runs once per record instead
    of once per reading, counters are summed locally, the prior state is copied on write instead
    of through its serialised form (`_copy_zone_state`), and a message `decode_batch` kept as
    columns is applied by `columnar.apply_rows`. Quarantine and future timestamps take the
    reference's per-item step unchanged. The cyclic collector is paused, as in `decode_batch`."""
    with _gc_paused():
        return _apply(decoded, zone_states, minutes, shard_counters, processed_at_ms, settings, fast=True)


def _apply(
    decoded: DecodedBatch,
    zone_states: Mapping[str, ZoneState],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    shard_counters: Mapping[str, ShardCounters],
    processed_at_ms: int,
    settings: DetectorSettings,
    *,
    fast: bool,
) -> BatchOutput:
    out = BatchOutput()
    for rec, err, raw, env in decoded.unattributed:
        sc = out.shard_counters.get(rec.shard_id)
        if sc is None:
            prior = shard_counters.get(rec.shard_id)
            sc = ShardCounters(rec.shard_id, prior.marker_seq if prior else -1, dict(prior.counters) if prior else {})
            out.shard_counters[rec.shard_id] = sc
        if rec.sequence_number <= sc.marker_seq:
            out.counts["redelivered_records"] += 1
            out.redelivered.add((rec.shard_id, rec.sequence_number))
            continue
        sc.marker_seq = rec.sequence_number
        sc.count("quarantined_messages")
        sc.count(f"quarantined_{err.code}")
        out.counts["quarantined_messages"] += 1
        received = env.received_at_ms if env else processed_at_ms
        out.quarantine[received // HOUR_MS].append(
            received_at_ms=received,
            processed_at_ms=processed_at_ms,
            error=err,
            raw=raw,
            record=rec,
            index=-1,
            gateway_id=env.gateway_id if env else None,
            zone_id=env.zone_id if env else None,
        )

    for zone_id, items in decoded.by_zone.items():
        prior = zone_states.get(zone_id)
        if fast:
            state = _copy_zone_state(prior) if prior else ZoneState(zone_id)
            _apply_zone_fast(state, items, minutes, out, processed_at_ms, settings)
        else:
            state = ZoneState.from_bytes(prior.to_bytes()) if prior else ZoneState(zone_id)
            _apply_zone_reference(state, items, minutes, out, processed_at_ms, settings)
        out.zone_states[zone_id] = state
    return out


def _apply_zone_reference(
    state: ZoneState,
    items: list[_Item],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: BatchOutput,
    processed_at_ms: int,
    settings: DetectorSettings,
) -> None:
    counts = out.counts
    last_record: Record | None = None
    latest_received = 0
    for item in items:
        rec = item.record
        if state.already_applied(rec.shard_id, rec.sequence_number):
            if item.index <= 0:
                counts["redelivered_records"] += 1
                out.redelivered.add((rec.shard_id, rec.sequence_number))
            continue
        last_record = rec
        latest_received = max(latest_received, item.envelope.received_at_ms)
        _apply_item(state, item, minutes, out, processed_at_ms, settings)
    _finish_zone(state, last_record, latest_received, out, settings)


def _copy_zone_state(z: ZoneState) -> ZoneState:
    """A copy equal to `ZoneState.from_bytes(z.to_bytes())` (the reference's copy) without
    compressing and parsing a 50,000-sensor document, and without copying the sensors: they
    stay shared with `z` until the batch changes one, which `columnar.own_sensor` copies first."""
    c = z.congestion
    return ZoneState(
        zone_id=z.zone_id,
        marker_shard=z.marker_shard,
        marker_seq=z.marker_seq,
        watermark_ms=z.watermark_ms,
        evaluated_minute=z.evaluated_minute,
        open_minutes={m: list(bucket) for m, bucket in z.open_minutes.items()},
        congestion=Congestion(c.congested, c.streak, c.episode_start_minute, c.peak_index, c.episode),
        sensors=dict(z.sensors),
        counters=dict(z.counters),
    )


def _apply_zone_fast(
    state: ZoneState,
    items: list[_Item | columnar.ColumnBlock],
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: BatchOutput,
    processed_at_ms: int,
    settings: DetectorSettings,
) -> None:
    """`_apply_zone_reference` with the per-record work hoisted out of the per-reading loop.
    A message decoded as columns is applied as a block (`columnar.apply_rows`); consecutive
    valid readings taken one at a time (single-reading messages) are gathered into a run of
    one event-time minute and applied the same way (`columnar.apply_run`). Anything else takes
    the reference's step. The sensors are copied on write: every step that may change one owns
    it first (`columnar.own_sensor`)."""
    sensors = state.sensors
    own: dict[str, SensorState] = {}  # the sensors this batch copied
    zone_id = state.zone_id
    skew = settings.max_future_skew_ms
    lateness = settings.allowed_lateness_ms
    # A run's readings share a minute: its spread is then within the lateness (see `apply_run`).
    runs = lateness >= MINUTE_MS - 1
    received = stored = duplicates = late = redelivered = 0
    last_record: Record | None = None
    latest_received = 0
    current: Record | None = None
    applied = False
    env: Envelope | None = None
    limit = 0
    # The pending run: its items, its minute, and the stored aggregate of that minute (a
    # record that aggregate already has is applied the reference's way).
    run: list[_Item] = []
    run_minute = -1
    run_prior: MinuteAggregate | None = None

    def tally(result: tuple[int, int, int]) -> None:
        """Count what a block or a run returned: received, stored, late."""
        nonlocal received, stored, duplicates, late
        n, n_stored, n_late = result
        received += n
        stored += n_stored
        duplicates += n - n_stored
        late += n_late

    def flush() -> None:
        tally(columnar.apply_run(state, own, run, minutes, out, processed_at_ms, settings))
        run.clear()

    for item in items:
        rec = item.record
        if rec is not current:
            # A record's items are contiguous and the marker only moves after the loop, so the
            # redelivery verdict is the same for all of them.
            current = rec
            applied = state.already_applied(rec.shard_id, rec.sequence_number)
            if not applied:
                env = item.envelope
                last_record = rec
                latest_received = max(latest_received, env.received_at_ms)
                limit = env.received_at_ms + skew
        if applied:
            if item.index <= 0:
                redelivered += 1
                out.redelivered.add((rec.shard_id, rec.sequence_number))
            continue
        if type(item) is columnar.ColumnBlock:
            if run:
                flush()
            if item.ts_ms <= limit and item.ts_ms - item.first_ms <= lateness:
                tally(
                    columnar.apply_rows(
                        state,
                        own,
                        item.columns,
                        item.first_ms,
                        item.ts_ms,
                        item,
                        minutes,
                        out,
                        processed_at_ms,
                        settings,
                    )
                )
                continue
            for one in item.items():  # in the future (or a spread wider than the lateness): the reference's steps
                columnar.own_sensor(sensors, own, one.reading.sensor_id)  # type: ignore[union-attr]
                _apply_item(state, one, minutes, out, processed_at_ms, settings)
            continue
        r = item.reading
        if r is not None and r.ts_ms <= limit and runs:
            minute = r.ts_ms // MINUTE_MS
            if minute != run_minute:
                if run:
                    flush()
                run_minute = minute
                run_prior = minutes.get((zone_id, minute))
            if run_prior is None or not run_prior.already_applied(rec.shard_id, rec.sequence_number):
                run.append(item)
                continue
        if run:
            flush()
        sensor_id = r.sensor_id if r is not None else item.key[0] if item.key is not None else None
        if sensor_id is not None:
            columnar.own_sensor(sensors, own, sensor_id)
        _apply_item(state, item, minutes, out, processed_at_ms, settings)
    if run:
        flush()
    counts = out.counts
    # Only counters that moved: the reference never creates a zero entry.
    for name, n in (("received", received), ("duplicates", duplicates), ("stored", stored), ("late", late)):
        if n:
            state.count(name, n)
            counts[name] += n
    if redelivered:
        counts["redelivered_records"] += redelivered
    _finish_zone(state, last_record, latest_received, out, settings)


def _sensor(state: ZoneState, sensor_id: str) -> SensorState:
    """The zone's state of `sensor_id`, created on its first reading."""
    sensor = state.sensors.get(sensor_id)
    if sensor is None:
        sensor = state.sensors[sensor_id] = SensorState()
    return sensor


def _apply_item(
    state: ZoneState,
    item: _Item,
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: BatchOutput,
    processed_at_ms: int,
    settings: DetectorSettings,
) -> None:
    """One item of a record not applied before: quarantine it, or dedupe, land and aggregate it."""
    zone_id = state.zone_id
    counts = out.counts
    rec = item.record
    env = item.envelope
    if item.reading is None:
        err = item.error
        assert err is not None
        unit = "quarantined_messages" if item.index < 0 else "quarantined"
        if item.index >= 0:
            state.count("received")
            counts["received"] += 1
            if item.key is not None:
                sensor_id, seq = item.key
                sensor = _sensor(state, sensor_id)
                if sensor.admit_quarantined(seq) == DUPLICATE:
                    # The same invalid reading again (a resent message): quarantined once, counted once.
                    sensor.duplicates += 1
                    state.count("duplicates")
                    counts["duplicates"] += 1
                    return
        state.count(unit)
        state.count(f"quarantined_{err.code}")
        counts[unit] += 1
        raw = env.payload if item.index < 0 else _reading_bytes(item.raw_of(), env)
        out.quarantine[env.received_at_ms // HOUR_MS].append(
            received_at_ms=env.received_at_ms,
            processed_at_ms=processed_at_ms,
            error=err,
            raw=raw,
            record=rec,
            index=item.index,
            sensor_id=_sensor_id_of(item.raw_of()),
            gateway_id=env.gateway_id,
            zone_id=zone_id,
        )
        return
    r = item.reading
    state.count("received")
    counts["received"] += 1
    sensor = _sensor(state, r.sensor_id)
    future = r.ts_ms > env.received_at_ms + settings.max_future_skew_ms
    verdict = sensor.admit_quarantined(r.seq) if future else sensor.admit(r.seq)
    if verdict == DUPLICATE:
        sensor.duplicates += 1
        state.count("duplicates")
        counts["duplicates"] += 1
        return
    if future:
        err = ContractError(
            "future_timestamp",
            f"reading {r.sensor_id} seq {r.seq}: ts={format_ts(r.ts_ms)} "
            f"is after receive time {format_ts(env.received_at_ms)}",
        )
        state.count("quarantined")
        state.count("quarantined_future_timestamp")
        counts["quarantined"] += 1
        out.quarantine[env.received_at_ms // HOUR_MS].append(
            received_at_ms=env.received_at_ms,
            processed_at_ms=processed_at_ms,
            error=err,
            raw=_reading_bytes(item.raw_of(), env),
            record=rec,
            index=item.index,
            sensor_id=r.sensor_id,
            gateway_id=env.gateway_id,
            zone_id=zone_id,
        )
        return
    out.lake[r.ts_ms // HOUR_MS].append(r, env.gateway_id, env.received_at_ms, processed_at_ms)
    state.count("stored")
    counts["stored"] += 1
    if verdict == BEYOND_WINDOW or r.ts_ms < state.watermark_ms - settings.allowed_lateness_ms:
        # Kept in the lake (the warehouse load dedupes it), left out of live aggregates; but
        # received, so the sensor is not silent (found by a review: a gateway whose clock
        # stepped back was declared dark while its readings kept coming).
        sensor.late += 1
        state.count("late")
        counts["late"] += 1
        heard_from(sensor, env.received_at_ms)
        return
    _aggregate(state, sensor, r, env, rec, minutes, out, settings)


def _finish_zone(
    state: ZoneState, last_record: Record | None, latest_received: int, out: BatchOutput, settings: DetectorSettings
) -> None:
    """Move the zone's marker, close complete minutes, look for silent sensors."""
    if last_record is None:
        return  # the whole zone's share of the batch was a redelivery
    state.marker_shard = last_record.shard_id
    state.marker_seq = last_record.sequence_number
    _close_minutes(state, out, settings)
    _detect_severe(state, out, settings)
    detect_silence(state, latest_received, out.alerts, settings)


def _aggregate(
    state: ZoneState,
    sensor: SensorState,
    r: Reading,
    env: Envelope,
    rec: Record,
    minutes: Mapping[tuple[str, int], MinuteAggregate],
    out: BatchOutput,
    settings: DetectorSettings,
) -> None:
    update_sensors(
        (sensor,), (LIVE_ROW(r),), (env.received_at_ms,), state.zone_id, out.alerts, settings.stuck_run_readings
    )
    # The watermark follows event time, capped at the receive time: a device whose clock runs
    # ahead (within max_future_skew_ms) must not make its neighbours' readings late.
    state.watermark_ms = max(state.watermark_ms, min(r.ts_ms, env.received_at_ms))

    minute = r.ts_ms // MINUTE_MS
    agg = minute_aggregate(state.zone_id, minute, rec, minutes, out)
    if agg is not None:
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


# The fields of a Reading `update_sensors` reads, in the order of its rows.
LIVE_ROW = operator.attrgetter(
    "sensor_id", "ts_ms", "vehicle_count", "avg_speed_kmh", "occupancy_pct", "congestion_index"
)


def minute_aggregate(
    zone_id: str, minute: int, rec: Record, minutes: Mapping[tuple[str, int], MinuteAggregate], out: BatchOutput
) -> MinuteAggregate | None:
    """The zone-minute aggregate a reading of `rec` adds to, or None when the stored one already
    has the record. Checked against the stored aggregate, not the one being built: the item may
    have been written by an earlier attempt of this batch that died before the zone state."""
    key = (zone_id, minute)
    prior = minutes.get(key)
    if prior is not None and prior.already_applied(rec.shard_id, rec.sequence_number):
        return None
    agg = out.minutes.get(key)
    if agg is None:
        agg = out.minutes[key] = replace(prior) if prior else MinuteAggregate()
    return agg


def update_sensors(
    sensors: Sequence[SensorState],
    rows: Iterable[tuple[str, int, int, float | None, float | None, float]],
    received: Sequence[int],
    zone_id: str,
    alerts: list[Alert],
    stuck_run: int,
) -> None:
    """The per-reading update of live sensor state, for readings that are new (not duplicates)
    and not late, in order (`sensors[i]` is row i's, received at `received[i]`): the one place
    every path does it — the reference one reading at a time (rows of Readings: `LIVE_ROW`),
    the column blocks and runs once (rows zipped from the columns). A row is (sensor_id,
    ts_ms, vehicle_count, avg_speed_kmh, occupancy_pct, congestion_index). Live values, receive
    time, silence, and the repeat run with its stuck episodes.

    A reading older than the sensor's newest (out of order, inside the lateness bound) still
    counts as received (silence) but changes neither the live values nor the repeat run: the
    run follows event time forward only, so a straggler never breaks or extends it. The daily
    mart, which sorts the whole day, is the authority on such days (docs/architecture.md §5)."""
    for sensor, (sensor_id, ts, count, speed, occupancy, congestion), received_at_ms in zip(
        sensors, rows, received, strict=True
    ):
        if ts >= sensor.last_ts_ms:
            # Zero is a quiet road, never "stuck": a zero count ends a run and starts none.
            run = sensor.repeat_run + 1 if count and count == sensor.vehicle_count else (1 if count else 0)
            sensor.repeat_run = run
            if run >= stuck_run:
                if not sensor.stuck:
                    sensor.stuck = True
                    alerts.append(_stuck_alert(sensor, sensor_id, ts, count, received_at_ms, zone_id))
            elif sensor.stuck:
                sensor.stuck = False
            sensor.last_ts_ms = ts
            sensor.vehicle_count = count
            sensor.avg_speed_kmh = speed
            sensor.occupancy_pct = occupancy
            sensor.congestion_index = congestion
        # `heard_from`, inlined: once per live reading.
        if received_at_ms > sensor.last_received_ms:
            sensor.last_received_ms = received_at_ms
        if sensor.silent:
            sensor.silent = False


def heard_from(sensor: SensorState, received_at_ms: int) -> None:
    """A stored reading of the sensor arrived (live or late): it is not silent."""
    if received_at_ms > sensor.last_received_ms:
        sensor.last_received_ms = received_at_ms
    if sensor.silent:
        sensor.silent = False


def _stuck_alert(
    sensor: SensorState, sensor_id: str, ts_ms: int, vehicle_count: int, received_at_ms: int, zone_id: str
) -> Alert:
    """`SensorStuck`, once per episode: raised by the reading that completes the run."""
    detected_at = format_ts(ts_ms)
    return Alert(
        "SensorStuck",
        f"SensorStuck/{sensor_id}/{detected_at}",
        {
            "sensor_id": sensor_id,
            "zone_id": zone_id,
            "vehicle_count": vehicle_count,
            "repeat_run": sensor.repeat_run,
            "detected_at": detected_at,
            "received_at": format_ts(received_at_ms),
        },
    )


def _close_minutes(state: ZoneState, out: BatchOutput, s: DetectorSettings) -> None:
    """Evaluate every minute that is complete (a later minute has been seen)."""
    current = state.watermark_ms // MINUTE_MS
    c = state.congestion
    for minute in sorted(m for m in state.open_minutes if m < current):
        n, total = state.open_minutes.pop(minute)
        # Rounded: readings of exactly a threshold must meet it, and a float sum of three 0.7s is
        # 0.6999999999999998 (the sum itself keeps its order, which the fast path reproduces).
        mean = round(total / n, 9) if n else 0.0
        if minute != state.evaluated_minute + 1:
            c.streak = 0  # minutes without readings between: the minutes are not consecutive
        state.evaluated_minute = max(state.evaluated_minute, minute)
        if c.congested and minute < c.episode_start_minute:
            # A straggler's minute from before the episode (the severe rule raises it in the
            # watermark's minute, later minutes still open): it neither clears nor peaks it
            # (found by a review: it cleared one with a duration of -1 minute).
            continue
        if not c.congested:
            c.streak = c.streak + 1 if mean >= s.congestion_raise else 0
            if c.streak >= s.congestion_min_minutes:
                start = minute - s.congestion_min_minutes + 1
                # Decided when the minute closed.
                decided_at = format_ts((minute + 1) * MINUTE_MS)
                _raise_congestion(state, out, start, minute, mean, rule="sustained", detected_at=decided_at)
        else:
            c.peak_index = max(c.peak_index, mean)
            c.streak = c.streak + 1 if mean <= s.congestion_clear else 0
            if c.streak >= s.congestion_min_minutes:
                _clear_congestion(state, out.alerts, minute, mean, reason="readings")


def _detect_severe(state: ZoneState, out: BatchOutput, s: DetectorSettings) -> None:
    """Raise at once when most of the zone is jammed now: at least `severe_share` of the sensors
    reporting within `severe_window_ms` of the watermark and not silent (and at least
    `severe_min_sensors` of them) read `congestion_severe` or more in their latest reading. A
    vote of the sensors' live values, so one faulty sensor cannot raise it. The episode starts
    in the watermark's minute (a retry that groups the records otherwise may decide in another
    batch, hence another minute; the episode's number, its id, stays the same). Clearing is the
    closed minutes' rule, or the zone going dark (`detect_silence`)."""
    c = state.congestion
    if c.congested:
        return
    since = state.watermark_ms - s.severe_window_ms
    threshold = s.congestion_severe
    reporting = severe = 0
    total = 0.0
    for sensor in state.sensors.values():
        # A silent sensor's value is stale: it votes no more than a sensor outside the window
        # (else a zone gone dark, its episode ended for silence, would raise again on its last
        # values with each batch that brings no valid reading).
        if sensor.last_ts_ms >= since and not sensor.silent:
            reporting += 1
            index = sensor.congestion_index
            total += index
            if index >= threshold:
                severe += 1
    if reporting < s.severe_min_sensors or severe < s.severe_share * reporting:
        return
    minute = state.watermark_ms // MINUTE_MS
    _raise_congestion(
        state,
        out,
        minute,
        minute,
        total / reporting,
        rule="severe",
        detected_at=format_ts(state.watermark_ms),
        sensors_reporting=reporting,
        sensors_severe=severe,
    )


def _raise_congestion(
    state: ZoneState, out: BatchOutput, start_minute: int, minute: int, mean: float, **decided: Any
) -> None:
    """Open the zone's next episode (its number is its id) and send its `CongestionDetected`:
    the one place either rule raises."""
    c = state.congestion
    c.congested, c.streak, c.peak_index, c.episode_start_minute = True, 0, mean, start_minute
    c.episode += 1
    out.alerts.append(_congestion_alert("CongestionDetected", state, minute, mean, **decided))


def _clear_congestion(state: ZoneState, alerts: list[Alert], minute: int, mean: float, reason: str) -> None:
    """End the zone's episode with its `CongestionCleared`: the one place an episode ends.
    `reason`: "readings" (closed minutes at or below the clear threshold) or "silent" (the zone
    went dark, `detect_silence`). A clear for silence has an id of its own: a sweep whose write
    loses to a processor commit that brought readings back may have sent it while the episode
    goes on, and the episode's own clear must not be dropped as its copy."""
    alert = _congestion_alert("CongestionCleared", state, minute, mean, reason=reason)
    if reason != "readings":
        alert = replace(alert, event_id=f"{alert.event_id}/{reason}")
    alerts.append(alert)
    c = state.congestion
    c.congested, c.streak, c.episode_start_minute, c.peak_index = False, 0, None, 0.0


def _congestion_alert(kind: str, state: ZoneState, minute: int, mean: float, **decided: Any) -> Alert:
    """A congestion event. `decided`: what a `CongestionDetected` adds, the `rule` that raised it
    ("sustained": closed minutes; "severe": the zone's sensors now) and when (`detected_at`, event
    time), and for "severe" the vote (`sensors_reporting`, `sensors_severe`)."""
    c = state.congestion
    start = c.episode_start_minute if c.episode_start_minute is not None else minute
    # Numbered, not named by its start: the severe vote's start depends on where a batch ends,
    # which a retry may move. Episode 0: raised before the number existed, named as it was then.
    episode_id = f"{state.zone_id}/{c.episode}" if c.episode else f"{state.zone_id}/{format_ts(start * MINUTE_MS)}"
    detail: dict[str, Any] = {
        "zone_id": state.zone_id,
        "episode_id": episode_id,
        "started_at": format_ts(start * MINUTE_MS),
        "minute": format_ts(minute * MINUTE_MS),
        "congestion_index": round(mean, 4),
        "peak_congestion_index": round(c.peak_index, 4),
    }
    detail.update(decided)
    if kind == "CongestionCleared":
        detail["cleared_at"] = format_ts((minute + 1) * MINUTE_MS)
        detail["duration_minutes"] = minute + 1 - start
    return Alert(kind, f"{kind}/{episode_id}", detail)


def detect_silence(state: ZoneState, now_ms: int, alerts: list[Alert], s: DetectorSettings) -> None:
    """Mark sensors quiet for `silence_ms` before `now_ms` (receive time) silent, with one
    `SensorSilent` each. The processor calls it with the batch's receive time; the sweeper
    (`sweeper.py`), for zones that send nothing at all, with the clock. The id depends only on
    the sensor's last receive time, so whichever notices first, the episode has one id.

    A congested zone whose every reporting sensor is then silent has gone dark: no closed minute
    can clear its episode any more, and it would show congested until readings return. Its
    episode ends (`CongestionCleared`, reason "silent", its congestion index the mean of the
    sensors' last readings, cleared at the end of the last minute its readings reached).
    Readings that come back congested raise a new episode by the usual rules."""
    for sensor_id, sensor in state.sensors.items():
        if not sensor.silent and sensor.last_received_ms and now_ms - sensor.last_received_ms >= s.silence_ms:
            # A new object, not a change: the fast path shares unchanged sensors with the prior state.
            state.sensors[sensor_id] = sensor = replace(sensor, silent=True)
            alerts.append(
                Alert(
                    "SensorSilent",
                    f"SensorSilent/{sensor_id}/{sensor.last_received_ms}",
                    {
                        "sensor_id": sensor_id,
                        "zone_id": state.zone_id,
                        "last_reading_at": format_ts(sensor.last_ts_ms),
                        "last_received_at": format_ts(sensor.last_received_ms),
                        "silent_for_s": (now_ms - sensor.last_received_ms) // 1000,
                    },
                )
            )
    if state.congestion.congested:
        reporting = [sensor for sensor in state.sensors.values() if sensor.last_received_ms]
        if reporting and all(sensor.silent for sensor in reporting):
            mean = sum(sensor.congestion_index for sensor in reporting) / len(reporting)
            _clear_congestion(state, alerts, state.watermark_ms // MINUTE_MS, mean, reason="silent")
