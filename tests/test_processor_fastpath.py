"""The processor's fast path computes exactly what the reference path computes.

`decode_batch`/`apply_batch` are optimised; `decode_batch_reference`/`apply_batch_reference`
define the semantics one reading at a time. Hypothesis generates batches that mix valid
readings with every kind of invalid field, duplicates, out-of-order, late and future readings,
redelivered records, unknown sensors, wrong gateways and broken envelopes, repeated vehicle
counts (stuck runs, with a threshold lowered to 2 so that they start and end), in gateway
messages of both versions (v1 reading objects, v2 columns), applies them to
prior state left by an earlier batch (committed, or lost in a crash after the aggregates were
written), and requires identical DecodedBatch and BatchOutput from both paths.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kinesis_records import BASE_MS, StreamBuilder, envelope, reading

from streaming.contract import ContractError, columnar_message, format_ts, gateway_message, parse_ts_ms
from streaming.processor import columnar, core
from streaming.processor.columnar import ColumnBlock, _sent_at_ms, decode_plain
from streaming.processor.core import (
    MINUTE_MS,
    BatchOutput,
    DecodedBatch,
    DetectorSettings,
    Members,
    Record,
    apply_batch,
    apply_batch_reference,
    cached_ts_ms,
    canonical_stamps,
    decode_batch,
    decode_batch_reference,
)
from streaming.processor.envelope import _decode_untyped, decode_envelope, sent_at_ms
from streaming.processor.state import ZoneState
from streaming.registry import generate_city

CITY = generate_city(sensors=96, zones=3, seed=11)
REGISTRY = {s.sensor_id: s for s in CITY.sensors}
ZONES = {z.zone_id for z in CITY.zones}
GATEWAYS = list(CITY.gateways().values())
SHARD = "shardId-000000000000"
# Stuck runs of 2: short enough that random batches start, continue and end them.
DETECTORS = DetectorSettings(stuck_run_readings=2)

# (field, value) replacements; _MISSING deletes the field. Each is invalid, or valid in an unusual way.
_MISSING: Any = object()
MUTATIONS: list[tuple[str, Any]] = [
    ("sensor_id", _MISSING),
    ("sensor_id", None),
    ("sensor_id", 5),
    ("sensor_id", ""),
    ("sensor_id", "bad id!"),
    ("sensor_id", "S" * 65),
    ("sensor_id", "S-UNKNOWN"),
    ("sensor_id", ["S-1"]),
    ("sensor_id", {"id": 1}),
    ("zone_id", _MISSING),
    ("zone_id", 7),
    ("zone_id", "bad zone"),
    ("zone_id", "Z" * 33),
    ("zone_id", CITY.zones[1].zone_id),
    ("ts", _MISSING),
    ("ts", 123),
    ("ts", "2026-11-23 18:00:00Z"),
    ("ts", "2026-02-30T00:00:00.000Z"),
    ("ts", "2028-02-29T12:00:00.000Z"),
    ("ts", "1999-12-31T23:59:59.999Z"),
    ("ts", "2100-01-01T00:00:00.000Z"),
    ("ts", format_ts(BASE_MS + 5 * MINUTE_MS)[:-5] + "+00:00"),
    ("ts", "2026-11-23T18:00:00.1234567Z"),
    ("ts", format_ts(BASE_MS + 7 * MINUTE_MS)[:-5] + "Z"),
    ("ts", format_ts(BASE_MS) + "\n"),
    ("seq", _MISSING),
    ("seq", -1),
    ("seq", "7"),
    ("seq", True),
    ("seq", 7.0),
    ("seq", 7.5),
    ("seq", 2**63),
    ("seq", 1.8e19),
    ("vehicle_count", -1),
    ("vehicle_count", 10_001),
    ("vehicle_count", 3.0),
    ("vehicle_count", True),
    ("vehicle_count", "3"),
    ("vehicle_count", None),
    ("vehicle_count", 10_000),
    ("avg_speed_kmh", _MISSING),
    ("avg_speed_kmh", None),
    ("avg_speed_kmh", -3),
    ("avg_speed_kmh", 251),
    ("avg_speed_kmh", "fast"),
    ("avg_speed_kmh", True),
    ("avg_speed_kmh", 250),
    ("avg_speed_kmh", 0),
    ("avg_speed_kmh", 1e308),
    ("occupancy_pct", 101),
    ("occupancy_pct", -0.0),
    ("occupancy_pct", 50),
    ("occupancy_pct", -1e-300),
    ("congestion_index", _MISSING),
    ("congestion_index", 1.5),
    ("congestion_index", 0),
    ("congestion_index", 1),
    ("congestion_index", True),
    ("congestion_index", "0.5"),
    ("congestion_index", None),
    ("lane", 0),
    ("lane", 17),
    ("lane", 2.0),
    ("lane", True),
    ("lane", "1"),
    ("extra", {"nested": [1, 2]}),
]
NOT_OBJECTS: list[Any] = [5, "reading", None, [], [1, 2], True]


@st.composite
def readings_for(draw: st.DrawFn, gateway: int, minute: int | None = None) -> list[Any]:
    """Readings for a message of `gateway`, valid and not; all of one event-time minute when
    `minute` is given, else half the time."""
    own = GATEWAYS[gateway]
    zone = own[0].zone_id
    same_zone_other_gw = [s for g in GATEWAYS if g[0].zone_id == zone and g is not own for s in g]
    other_zone = [s for g in GATEWAYS if g[0].zone_id != zone for s in g]
    out: list[Any] = []
    # Half the messages fall in one event-time minute, as a gateway's do: the shape decode_batch
    # marks as a block for apply_batch (with duplicates, late, beyond-window and future readings
    # inside). Of those, half share one event time; the others give each detector its own.
    shared_minute = draw(st.one_of(st.none(), st.integers(0, 80))) if minute is None else minute
    shared_offset = draw(st.one_of(st.none(), st.sampled_from([0, 999, 30_500])))
    # "clean": every reading plainly valid; "one_bad": all but one, whose mutation the block's
    # column checks must catch. Both only with a shared event time (the block shape).
    mode = draw(st.sampled_from(["clean", "one_bad", "mixed"])) if shared_minute is not None else "mixed"
    clean = mode != "mixed"
    # Count-only detectors: no speed or occupancy at all (a v2 message then leaves the columns out).
    count_only = clean and draw(st.integers(0, 3)) == 0
    count = draw(st.integers(0, 8))
    bad_index = draw(st.integers(0, max(count - 1, 0))) if mode == "one_bad" else -1
    for i in range(count):
        pick = "own" if clean else draw(st.sampled_from(["own"] * 8 + ["wrong_gateway", "other_zone", "not_object"]))
        if pick == "not_object":
            out.append(draw(st.sampled_from(NOT_OBJECTS)))
            continue
        pool = {"own": own, "wrong_gateway": same_zone_other_gw or own, "other_zone": other_zone}[pick]
        sensor = draw(st.sampled_from(pool))
        # seq in a small range: duplicates, out of order, and beyond the 64-wide window.
        seq = draw(st.one_of(st.integers(0, 12), st.integers(60, 140)))
        if shared_minute is None:
            minute = draw(st.integers(0, 80))  # crosses an hour and the 15-minute lateness bound
            offset = draw(st.sampled_from([0, 999, 30_500]))
        else:
            minute = shared_minute
            offset = draw(st.sampled_from([0, 999, 30_500, 59_999])) if shared_offset is None else shared_offset
        r: dict[str, Any] = {
            "sensor_id": sensor.sensor_id,
            "zone_id": sensor.zone_id,
            "ts": format_ts(BASE_MS + minute * MINUTE_MS + offset),
            "seq": seq,
            # Often one of two counts, so that a sensor repeats itself (stuck runs), or reports zero.
            "vehicle_count": draw(st.one_of(st.integers(0, 40), st.sampled_from([0, 6, 6]))),
            "avg_speed_kmh": draw(st.sampled_from([42.5, 0.0, 250.0, 13.25])),
            "occupancy_pct": draw(st.sampled_from([12.0, 0.0, 99.5])),
            "congestion_index": draw(st.sampled_from([0.1, 0.3, 0.5, 0.75, 0.95, 1.0])),
            "lane": sensor.lane,
        }
        if count_only:
            del r["avg_speed_kmh"], r["occupancy_pct"]
        if i == bad_index or (not clean and draw(st.integers(0, 3)) == 0):
            name, value = draw(st.sampled_from(MUTATIONS))
            if value is _MISSING:
                r.pop(name, None)
            else:
                r[name] = value
        out.append(r)
    return out


def _broken(kind: str, gateway: int, received: int) -> bytes:
    gw, zone = GATEWAYS[gateway][0].gateway_id, GATEWAYS[gateway][0].zone_id
    sensors = GATEWAYS[gateway]
    v2 = columnar_message(gw, zone, received, [_plain(s, 1, received) for s in sensors[:3]])
    payloads = {
        "not_json": b"not json at all",
        "bad_json": envelope(b"{broken", zone, gw, received),
        "nan": envelope(b'{"sensor_id": NaN}', zone, gw, received),
        "unknown_zone": envelope(b"{}", "Z-NOPE", gw, received),
        "bad_base64": orjson.dumps({"payload": "%%%", "zone_id": zone, "gateway_id": gw, "received_at": received}),
        "no_received_at": orjson.dumps({"payload": "e30=", "zone_id": zone, "gateway_id": gw}),
        "forged": envelope(orjson.dumps(gateway_message("GW-FORGED", zone, received, [])), zone, gw, received),
        "wrong_version": envelope(
            orjson.dumps({**gateway_message(gw, zone, received, []), "schema_version": 2}), zone, gw, received
        ),
        "readings_not_list": envelope(
            orjson.dumps({**gateway_message(gw, zone, received, []), "readings": {}}), zone, gw, received
        ),
        "array": envelope(b"[1, 2]", zone, gw, received),
        "v2_short_column": envelope(orjson.dumps({**v2, "seq": [1, 2]}), zone, gw, received),
        "v2_column_not_list": envelope(orjson.dumps({**v2, "lane": 1}), zone, gw, received),
        "v2_no_sensor_ids": envelope(orjson.dumps({**v2, "sensor_id": None}), zone, gw, received),
        "v2_ts_number": envelope(orjson.dumps({**v2, "ts": 5}), zone, gw, received),
        "v2_with_readings": envelope(orjson.dumps({**v2, "readings": []}), zone, gw, received),
        # Shapes the typed v2 decode (columnar.decode_plain) must leave to the reference's parse:
        # valid for the reference (a field it ignores, a version that equals 2, a key given
        # twice, the last one winning), or refused by it (a lone surrogate, an integer orjson
        # reads as a float).
        "v2_extra_field": envelope(orjson.dumps({**v2, "firmware": "1.2.0"}), zone, gw, received),
        "v2_version_float": envelope(orjson.dumps({**v2, "schema_version": 2.0}), zone, gw, received),
        "v2_key_twice": envelope(orjson.dumps(v2)[:-1] + b',"seq":[7,8,9]}', zone, gw, received),
        "v2_lone_surrogate": envelope(
            orjson.dumps(v2).replace(sensors[0].sensor_id.encode(), b"\\ud800"), zone, gw, received
        ),
        "v2_huge_seq": envelope(orjson.dumps(v2)[:-1] + b',"seq":[99999999999999999999999,1,2]}', zone, gw, received),
        "bom": envelope(b"\xef\xbb\xbf{}", zone, gw, received),
    }
    return payloads[kind]


BROKEN_KINDS = [
    "not_json",
    "bad_json",
    "nan",
    "unknown_zone",
    "bad_base64",
    "no_received_at",
    "forged",
    "wrong_version",
    "readings_not_list",
    "array",
    "bom",
    "v2_short_column",
    "v2_column_not_list",
    "v2_no_sensor_ids",
    "v2_ts_number",
    "v2_with_readings",
    "v2_extra_field",
    "v2_version_float",
    "v2_key_twice",
    "v2_lone_surrogate",
    "v2_huge_seq",
]


def _plain(sensor: Any, seq: int, ts_ms: int) -> dict[str, Any]:
    return {
        "sensor_id": sensor.sensor_id,
        "zone_id": sensor.zone_id,
        "ts": format_ts(ts_ms),
        "seq": seq,
        "vehicle_count": 3,
        "avg_speed_kmh": 40.0,
        "occupancy_pct": 5.5,
        "congestion_index": 0.2,
        "lane": sensor.lane,
    }


def _as_columns(readings: list[Any], zone: str) -> list[dict[str, Any]]:
    """The generated readings as rows of a v2 message of `zone`: objects only, the message's zone
    for each (a v2 reading has no zone of its own); every other mutation stays in its column."""
    return [{**r, "zone_id": zone} for r in readings if isinstance(r, dict)]


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Record], list[Record], bool]:
    """Two consecutive batches; the second may redeliver records of the first and of itself.

    A batch is either a mix of every kind of record, or mostly single-reading messages whose
    readings fall in one or two minutes, each received at its own time: consecutive ones of a
    zone make the runs `apply_batch` applies together."""
    b = StreamBuilder(SHARD)
    first: list[Record] = []
    second: list[Record] = []
    mixed = ["gateway"] * 3 + ["columnar"] * 4 + ["single"] * 2 + ["broken", "redeliver"]
    mostly_single = ["single"] * 8 + ["columnar", "broken", "redeliver"]
    # The same minutes in both batches: a replay of both then has runs that cross from records
    # whose aggregates were written (before a crash) into records whose were not.
    minutes = draw(st.lists(st.integers(0, 80), min_size=1, max_size=2))
    for target in (first, second):
        singles = draw(st.booleans())
        for _ in range(draw(st.integers(1, 16 if singles else 10))):
            gateway = draw(st.integers(0, len(GATEWAYS) - 1))
            sensors = GATEWAYS[gateway]
            minute = draw(st.sampled_from(minutes)) if singles else None
            # receive time: sometimes before the readings' event time (future), sometimes much
            # later (silence); in a batch of singles mostly within a minute of the reading's
            received = BASE_MS + draw(st.integers(0, 90)) * MINUTE_MS
            if minute is not None and draw(st.integers(0, 3)):
                received = BASE_MS + minute * MINUTE_MS + draw(st.integers(0, 2 * MINUTE_MS))
            kind = draw(st.sampled_from(mostly_single if singles else mixed))
            if kind == "redeliver" and (first or target):
                target.append(draw(st.sampled_from(first + target)))
            elif kind == "single":
                rs = draw(readings_for(gateway, minute))
                payload = orjson.dumps(rs[0]) if rs else b"{}"
                target.append(b.record(envelope(payload, sensors[0].zone_id, sensors[0].gateway_id, received)))
            elif kind == "columnar":
                rows = _as_columns(draw(readings_for(gateway)), sensors[0].zone_id)
                target.append(b.gateway_record(sensors, rows, received, columnar=True))
            elif kind == "broken":
                target.append(b.record(_broken(draw(st.sampled_from(BROKEN_KINDS)), gateway, received)))
            else:
                target.append(b.gateway_record(sensors, draw(readings_for(gateway)), received))
    return first, second, draw(st.booleans())


def _items(items: list[Any]) -> list[Any]:
    """A zone's items with every column block (decode_batch's form of a plainly valid gateway
    message) replaced by the items it stands for."""
    return [one for item in items for one in (item.items() if isinstance(item, ColumnBlock) else [item])]


def _decoded_view(d: DecodedBatch) -> Any:
    """DecodedBatch as comparable data (ContractError compares by identity, so by code and text)."""
    return (
        {
            z: [
                (
                    i.record,
                    i.envelope,
                    i.index,
                    orjson.dumps(i.raw_of(), option=orjson.OPT_NON_STR_KEYS),
                    i.reading,
                    (i.error.code, str(i.error)) if i.error else None,
                )
                for i in _items(items)
            ]
            for z, items in d.by_zone.items()
        },
        [(rec, err.code, str(err), raw, env) for rec, err, raw, env in d.unattributed],
        d.last_sequence,
        d.sent_at,
    )


def _output_view(o: BatchOutput) -> Any:
    return (
        {h: c.columns for h, c in o.lake.items()},
        {h: c.columns for h, c in o.quarantine.items()},
        o.zone_states,
        o.minutes,
        o.shard_counters,
        o.alerts,
        dict(o.counts),
    )


def _both(
    records: list[Record], zone_states: dict, minutes: dict, shards: dict, detectors: DetectorSettings = DETECTORS
) -> BatchOutput:
    fast_decoded = decode_batch(records, REGISTRY, ZONES)
    ref_decoded = decode_batch_reference(records, REGISTRY, ZONES)
    assert _decoded_view(fast_decoded) == _decoded_view(ref_decoded)
    fast = apply_batch(fast_decoded, zone_states, minutes, shards, BASE_MS + 95 * MINUTE_MS, detectors)
    ref = apply_batch_reference(ref_decoded, zone_states, minutes, shards, BASE_MS + 95 * MINUTE_MS, detectors)
    assert _output_view(fast) == _output_view(ref)
    # Lossless: the store hands a container's own saved state back instead of its parse.
    assert all(ZoneState.from_bytes(z.to_bytes()) == z for z in fast.zone_states.values())
    return ref


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from([DETECTORS, replace(DETECTORS, allowed_lateness_ms=20_000)]))
def test_fast_path_equals_reference_on_any_batch(
    case: tuple[list[Record], list[Record], bool], detectors: DetectorSettings
) -> None:
    # A lateness of 20 s is shorter than a minute: a block's own readings could then make each
    # other late, so such a block must take the reference's steps.
    first, second, crashed = case
    out = _both(first, {}, {}, {}, detectors)
    # The second batch meets the first one's writes: all of them, or (a crash before the commit
    # point) only the aggregates.
    zone_states = {} if crashed else out.zone_states
    shards = {} if crashed else out.shard_counters
    _both(second, zone_states, out.minutes, shards, detectors)
    _both(first + second, zone_states, out.minutes, shards, detectors)


def test_fast_path_equals_reference_on_a_quiet_then_busy_zone() -> None:
    """Silence alerts and congestion hysteresis across batches, in both paths."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    state: dict = {}
    minutes: dict = {}
    kinds: list[str] = []
    # Minutes 7 apart (sensors fall silent between), then three in a row (clearing needs
    # consecutive closed minutes).
    for minute, (at, congestion) in enumerate(zip([0, 7, 14, 21, 22, 23], [0.9, 0.9, 0.9, 0.2, 0.2, 0.2], strict=True)):
        ts = BASE_MS + at * MINUTE_MS
        batch = [
            b.gateway_record(
                sensors[: 2 + minute % 3],
                [
                    {
                        "sensor_id": s.sensor_id,
                        "zone_id": s.zone_id,
                        "ts": format_ts(ts),
                        "seq": minute,
                        "vehicle_count": 3,
                        "congestion_index": congestion,
                        "lane": s.lane,
                    }
                    for s in sensors[: 2 + minute % 3]
                ],
                ts + 1000,
            )
        ]
        out = _both(batch, state, minutes, {})
        state, minutes = out.zone_states, {**minutes, **out.minutes}
        kinds += [a.detail_type for a in out.alerts]
    # Both paths agreed batch by batch (inside _both); the schedule did exercise the detectors.
    assert {"CongestionDetected", "CongestionCleared", "SensorSilent"} <= set(kinds)


def test_fast_path_equals_reference_through_stuck_episodes() -> None:
    """Gateway messages (the block path) and single readings (the per-reading path) carrying
    repeated counts, a zero, a straggler and a duplicate: both paths keep the same runs, raise the
    same SensorStuck once per episode, and count the same per-sensor duplicates and late."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    counts = [4, 4, 4, 4, 0, 4, 4, 4, 9, 9, 9]

    def block(seq: int, count: int) -> Record:
        ts = BASE_MS + seq * MINUTE_MS
        return b.gateway_record(sensors, [reading(s, seq, ts, vehicle_count=count) for s in sensors], ts + 1000)

    batch = [block(seq, count) for seq, count in enumerate(counts[:6])]
    resend = b.record(batch[3].data)  # a gateway resending a message: device duplicates
    batch += [block(seq, count) for seq, count in enumerate(counts[6:], start=6)]
    first = sensors[0]
    straggler = b.gateway_record(  # older than the sensor's newest reading, inside the lateness bound
        [first], [reading(first, 11, BASE_MS + 7 * MINUTE_MS, vehicle_count=1)], BASE_MS + 11 * MINUTE_MS
    )
    state: dict = {}
    minutes: dict = {}
    alerts = []
    for part in ([*batch[:6], resend], [*batch[6:], straggler]):
        out = _both(part, state, minutes, {})
        state, minutes = out.zone_states, {**minutes, **out.minutes}
        alerts += [a for a in out.alerts if a.detail_type == "SensorStuck"]
    zone = state[first.zone_id]
    # Threshold 2: episodes 4,4,4,4 (seq 0-3), 4,4,4 (seq 5-7) and 9,9,9 (seq 8-10), per sensor.
    assert len(alerts) == 3 * len(sensors)
    assert len({a.event_id for a in alerts}) == len(alerts)
    assert all(zone.sensors[s.sensor_id].stuck for s in sensors)
    assert all(zone.sensors[s.sensor_id].duplicates == 1 for s in sensors)
    # The straggler (count 1) neither ended nor extended the first sensor's run.
    assert (zone.sensors[first.sensor_id].repeat_run, zone.sensors[first.sensor_id].vehicle_count) == (3, 9)
    assert zone.sensors[first.sensor_id].hwm == 11
    assert {zone.sensors[s.sensor_id].repeat_run for s in sensors} == {3}


def test_quarantine_keeps_the_original_reading_bytes() -> None:
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    bad = {"sensor_id": sensors[0].sensor_id, "seq": "x"}
    out = _both([b.gateway_record(sensors, [bad], BASE_MS)], {}, {}, {})
    (raw,) = [r for c in out.quarantine.values() for r in c.columns["raw"]]
    assert orjson.loads(base64.b64decode(raw)) == bad


def _single(b: StreamBuilder, sensor: Any, seq: int, ts_ms: int, received: int) -> Record:
    """A single-reading message of `sensor`, as the rule puts it on the stream."""
    return b.record(envelope(orjson.dumps(_plain(sensor, seq, ts_ms)), sensor.zone_id, sensor.gateway_id, received))


def test_single_readings_of_a_zone_and_minute_are_applied_as_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consecutive single-reading messages of one zone and minute, each with its own receive
    time, reach `apply_run` together (so the property test above exercises runs, not only
    the reading-by-reading step), and the outcome is the reference's."""
    runs: list[int] = []
    apply_run = columnar.apply_run

    def counted(state: Any, own: Any, items: list[Any], *rest: Any) -> Any:
        runs.append(len(items))
        return apply_run(state, own, items, *rest)

    monkeypatch.setattr(columnar, "apply_run", counted)
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = BASE_MS + 10 * MINUTE_MS
    batch = [_single(b, s, 1, ts + i, ts + 1000 + i) for i, s in enumerate(sensors[:4])]
    batch.append(_single(b, sensors[0], 2, ts + MINUTE_MS, ts + MINUTE_MS + 500))  # the next minute: a new run
    _both(batch, {}, {}, {})
    assert runs == [4, 1]


def test_a_run_crossing_from_aggregated_records_into_new_ones_after_a_crash() -> None:
    """A crash after the zone-minute aggregates were written, before the zone state: the
    replay's run of singles begins with records the stored aggregate already holds and goes
    on into new ones of the same minute. Only the new ones may be added to it."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = BASE_MS + 10 * MINUTE_MS
    first = [_single(b, s, 1, ts + i, ts + 1000) for i, s in enumerate(sensors[:2])]
    second = [_single(b, s, 1, ts + 10 + i, ts + 2000) for i, s in enumerate(sensors[2:4])]
    out = _both(first, {}, {}, {})
    replay = _both(first + second, {}, out.minutes, {})  # the zone state was lost
    (agg,) = replay.minutes.values()
    assert agg.readings == 4


def test_block_lateness_boundary() -> None:
    """A gateway message exactly at, and one millisecond past, the 15-minute lateness bound:
    the block path's one lateness verdict per message must match the reference's per reading."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    watermark = BASE_MS + 40 * MINUTE_MS

    def message(ts_ms: int, seq: int) -> Record:
        rs = [
            {
                "sensor_id": s.sensor_id,
                "zone_id": s.zone_id,
                "ts": format_ts(ts_ms),
                "seq": seq,
                "vehicle_count": 4,
                "avg_speed_kmh": 33.5,
                "occupancy_pct": 7.25,
                "congestion_index": 0.45,
                "lane": s.lane,
            }
            for s in sensors
        ]
        return b.gateway_record(sensors, rs, watermark + 1000)

    out = _both([message(watermark, 10)], {}, {}, {})
    for seq, ts_ms in ((11, watermark - 15 * MINUTE_MS), (12, watermark - 15 * MINUTE_MS - 1)):
        later = _both([message(ts_ms, seq)], out.zone_states, out.minutes, {})
        assert later.counts["stored"] == len(sensors)
    assert later.counts["late"] == len(sensors)  # the second one is late, the first was not


def test_every_mutation_inside_an_otherwise_valid_gateway_message() -> None:
    """Each mutation (and each non-object) as the one odd reading of a message whose other
    readings are plainly valid and share its event time: the block shape, so the column checks
    of decode_batch must send exactly these messages back to the per-reading path."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = format_ts(BASE_MS + 3 * MINUTE_MS)
    for position in (0, len(sensors) - 1):
        for odd in [*MUTATIONS, *(("*", value) for value in NOT_OBJECTS)]:
            rs: list[Any] = [
                {
                    "sensor_id": s.sensor_id,
                    "zone_id": s.zone_id,
                    "ts": ts,
                    "seq": 5,
                    "vehicle_count": 9,
                    "avg_speed_kmh": 51.5,
                    "occupancy_pct": 20.0,
                    "congestion_index": 0.35,
                    "lane": s.lane,
                }
                for s in sensors
            ]
            name, value = odd
            if name == "*":
                rs[position] = value
            elif value is _MISSING:
                del rs[position][name]
            else:
                rs[position][name] = value
            _both([b.gateway_record(sensors, rs, BASE_MS + 4 * MINUTE_MS)], {}, {}, {})


def test_a_list_shared_by_every_reading_of_a_v1_message_is_no_event_time() -> None:
    """Found by a review: a `ts` equal in every reading was taken as the message's one event
    time before its type was checked, and a list of strings then passed for one time per
    reading. Two readings sharing a list of two: stored (the reference quarantines them); of
    one: the batch failed on a zip of unequal lengths (bisected, retried, dead-lettered)."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = BASE_MS + 10 * MINUTE_MS
    for shared in ([format_ts(ts)] * 2, [format_ts(ts)]):
        rs = [reading(s, 1, ts) for s in sensors[:2]]
        for r in rs:
            r["ts"] = shared
        out = _both([b.gateway_record(sensors, rs, ts + 1000)], {}, {}, {})
        assert dict(out.counts) == {"received": 2, "quarantined": 2}


def test_a_v2_sent_at_orjson_cannot_read_fails_the_message_on_both_paths() -> None:
    """Found by a review: the typed decode took any `sent_at`, and msgspec reads a 400-digit
    integer that orjson refuses: the fast path stored a message the reference quarantines."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = BASE_MS + 10 * MINUTE_MS
    zone, gw = sensors[0].zone_id, sensors[0].gateway_id
    v2 = columnar_message(gw, zone, ts, [reading(s, 1, ts) for s in sensors[:3]])
    sent_at = b'"sent_at":"' + v2["sent_at"].encode() + b'"'
    for odd, counts in [
        (b'"sent_at":' + b"9" * 400, {"quarantined_messages": 1}),
        (b'"sent_at":1795000200000', {"received": 3, "stored": 3}),  # not a timestamp: no latency, readings kept
    ]:
        payload = orjson.dumps(v2).replace(sent_at, odd)
        assert decode_plain(decode_envelope(envelope(payload, zone, gw, ts + 1000))) is None  # the reference's way
        out = _both([b.record(envelope(payload, zone, gw, ts + 1000))], {}, {}, {})
        assert dict(out.counts) == counts


def _minutes_of(sensors: list[Any], minutes: range, make: Any) -> list[BatchOutput]:
    """A batch a minute of one gateway message, `make(minute) -> (readings, received_ms)`,
    each meeting the state the one before left, on both paths; their outputs."""
    b = StreamBuilder(SHARD)
    zone_states: dict = {}
    aggregates: dict = {}
    outs = []
    for minute in minutes:
        readings, received = make(minute)
        out = _both([b.gateway_record(sensors, readings, received, columnar=True)], zone_states, aggregates, {})
        zone_states, aggregates = out.zone_states, {**aggregates, **out.minutes}
        outs.append(out)
    return outs


@pytest.mark.parametrize("bad", ["a value out of range", "a time from the future"])
def test_one_quarantined_reading_with_a_seq_far_ahead_does_not_lock_its_sensor_out(bad: str) -> None:
    """Found by a review: a quarantined reading's seq still moved the dedupe window, so one
    seq of 2**62 put every later reading of the sensor beyond it: late, out of the live values,
    and the sensor declared silent while it reported."""
    sensors = GATEWAYS[0][:4]

    def make(minute: int) -> tuple[list[Any], int]:
        ts = BASE_MS + minute * MINUTE_MS
        rs = [reading(s, 100 + minute, ts) for s in sensors]
        if minute == 3:
            rs[0]["seq"] = 2**62
            if bad == "a value out of range":
                rs[0]["vehicle_count"] = 99_999
            else:
                rs[0]["ts"] = format_ts(ts + 3_600_000)
        return rs, ts + 1000

    outs = _minutes_of(sensors, range(10), make)
    assert dict(outs[3].counts) == {"received": 4, "stored": 3, "quarantined": 1}
    for out in outs[4:]:
        assert dict(out.counts) == {"received": 4, "stored": 4} and out.alerts == []
    sensor = outs[-1].zone_states[sensors[0].zone_id].sensors[sensors[0].sensor_id]
    assert (sensor.hwm, sensor.silent, sensor.late) == (109, False, 0)


def test_a_quarantined_reading_sent_again_within_its_sensors_window_is_a_duplicate() -> None:
    """... and one a whole window ahead of its sensor's newest seq (or its first, when that is
    one: seq 101 from none) is not remembered, so sent again it is quarantined again."""
    sensors = GATEWAYS[0][:4]
    # (minute of the readings, whether sensor 0's is bad), batch by batch
    batches = [(1, True), (1, True), (2, False), (3, True), (3, True)]

    def make(batch: int) -> tuple[list[Any], int]:
        minute, bad = batches[batch]
        rs = [reading(s, 100 + minute, BASE_MS + minute * MINUTE_MS) for s in sensors]
        if bad:
            rs[0]["vehicle_count"] = 99_999
        return rs, BASE_MS + batch * MINUTE_MS + 1000

    counts = [dict(out.counts) for out in _minutes_of(sensors, range(len(batches)), make)]
    assert counts[0] == {"received": 4, "stored": 3, "quarantined": 1}
    assert counts[1] == {"received": 4, "duplicates": 3, "quarantined": 1}  # its first reading: not remembered
    assert counts[3] == {"received": 4, "stored": 3, "quarantined": 1}
    assert counts[4] == {"received": 4, "duplicates": 4}  # within the window of seq 102: remembered


def test_a_sensors_first_reading_quarantined_with_a_seq_far_ahead_does_not_lock_it_out() -> None:
    """Found by the diff's review: the first version let a first reading's seq through."""
    sensors = GATEWAYS[0][:4]

    def make(minute: int) -> tuple[list[Any], int]:
        ts = BASE_MS + minute * MINUTE_MS
        rs = [reading(s, 100 + minute, ts) for s in sensors]
        if minute == 0:
            rs[0]["seq"], rs[0]["vehicle_count"] = 2**62, 99_999
        return rs, ts + 1000

    outs = _minutes_of(sensors, range(3), make)
    assert [dict(out.counts) for out in outs[1:]] == [{"received": 4, "stored": 4}] * 2
    assert outs[-1].zone_states[sensors[0].zone_id].sensors[sensors[0].sensor_id].hwm == 102


def test_readings_that_arrive_late_keep_their_sensors_from_silence() -> None:
    """Found by a review: only live readings counted as received, so a congested zone whose
    gateway's clock stepped 30 minutes back was declared silent, its episode ended for silence,
    while its jammed readings kept coming (late)."""
    sensors = GATEWAYS[0][:4]

    def make(minute: int) -> tuple[list[Any], int]:
        received = BASE_MS + minute * MINUTE_MS + 1000
        skew = 0 if minute < 4 else -30 * MINUTE_MS
        return [reading(s, 100 + minute, received - 1000 + skew, 0.95) for s in sensors], received

    outs = _minutes_of(sensors, range(20), make)
    assert [a.event_id.rsplit("/", 1)[0] for out in outs for a in out.alerts] == ["CongestionDetected/Z-000"]
    assert all(out.counts["late"] == 4 for out in outs[5:18])
    zone = outs[-1].zone_states[sensors[0].zone_id]
    assert zone.congestion.congested and not any(s.silent for s in zone.sensors.values())


def test_minutes_from_before_a_severe_episode_neither_clear_nor_peak_it() -> None:
    """Found by a review: the severe rule opens its episode in the watermark's minute while
    earlier minutes are still open for stragglers; free-flowing ones closed after it cleared
    the episode at once, with a duration of -1 minute."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0][:4]

    def record(minute: int, index: float, received_minute: int) -> Record:
        ts = BASE_MS + minute * MINUTE_MS + 30_000
        rs = [reading(s, minute, ts, index) for s in sensors]
        return b.gateway_record(sensors, rs, BASE_MS + received_minute * MINUTE_MS + 31_000, columnar=True)

    zone_states: dict = {}
    aggregates: dict = {}
    alerts = []
    for batch in ([record(10, 0.2, 10)], [record(15, 0.95, 15)], [record(12, 0.2, 15), record(13, 0.2, 15)]):
        out = _both(batch, zone_states, aggregates, {})
        zone_states, aggregates = out.zone_states, {**aggregates, **out.minutes}
        alerts += [a.event_id for a in out.alerts]
    assert alerts == [f"CongestionDetected/{sensors[0].zone_id}/1"]
    congestion = zone_states[sensors[0].zone_id].congestion
    assert congestion.congested and congestion.peak_index == pytest.approx(0.95)


def test_only_the_registrys_sensor_ids_are_remembered_by_a_container() -> None:
    """Found by a review: every sensor id met was kept for the container's life, forged ones
    too (20 KB ids: 125 KB a message)."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    zone, gw = sensors[0].zone_id, sensors[0].gateway_id
    ts = BASE_MS + 10 * MINUTE_MS
    records = []
    for k in range(50):
        forged = {**reading(sensors[0], 1, ts), "sensor_id": f"forged-{k}-" + "x" * 2000}
        records.append(b.record(envelope(orjson.dumps(forged), zone, gw, ts + 1000)))
    records.append(b.record(envelope(orjson.dumps(reading(sensors[1], 1, ts)), zone, gw, ts + 1000)))
    out = _both(records, {}, {}, {})
    assert dict(out.counts) == {"received": 51, "stored": 1, "quarantined": 50}
    owners = core._owners_for(REGISTRY)
    assert sensors[1].sensor_id in owners and not any(k.startswith("forged-") for k in owners)


def test_a_bad_reading_in_a_columnar_message_is_quarantined_alone_with_its_row() -> None:
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    ts = BASE_MS + 3 * MINUTE_MS
    rows = [_plain(s, 7, ts) for s in sensors]
    rows[1]["vehicle_count"] = -4
    out = _both([b.gateway_record(sensors, rows, ts + 1000, columnar=True)], {}, {}, {})
    assert out.counts["stored"] == len(sensors) - 1
    (quarantine,) = out.quarantine.values()
    assert quarantine.columns["reason_code"] == ["out_of_range"]
    assert quarantine.columns["sensor_id"] == [sensors[1].sensor_id]
    assert orjson.loads(base64.b64decode(quarantine.columns["raw"][0])) == rows[1]  # the row, rebuilt


def test_v1_and_v2_messages_of_the_same_readings_have_the_same_outcome() -> None:
    sensors = GATEWAYS[1]
    ts = BASE_MS + 3 * MINUTE_MS
    rows = [_plain(s, 9, ts) for s in sensors]
    rows[0]["lane"] = 99  # one bad reading
    rows[-1].pop("avg_speed_kmh")  # one count-only reading
    outs = []
    for as_columns in (False, True):
        record = StreamBuilder(SHARD).gateway_record(sensors, rows, ts + 1000, columnar=as_columns)
        outs.append(_both([record, record], {}, {}, {}))  # and its redelivery
    v1, v2 = (_output_view(o) for o in outs)
    assert v1[0] == v2[0] and v1[2:] == v2[2:]  # lake rows, state, aggregates, alerts, counts
    assert outs[1].counts["duplicates"] == len(sensors)  # the bad reading's resend included
    # Quarantine rows differ only in the raw bytes: v1 keeps the object, v2 the rebuilt row.
    q1, q2 = (next(iter(o.quarantine.values())).columns for o in outs)
    assert {k: v for k, v in q1.items() if k != "raw"} == {k: v for k, v in q2.items() if k != "raw"}


def test_a_block_whose_minute_straddles_the_lateness_bound_is_late_reading_by_reading() -> None:
    """Per-detector event times in one minute: the zone's lateness bound falls inside the
    minute, so the block's readings before it are late (stored, not aggregated) and the rest
    are not. Both paths agree, and the block path was the one taken."""
    b = StreamBuilder(SHARD)
    sensors = GATEWAYS[0]
    watermark = BASE_MS + 20 * MINUTE_MS + 30_500  # bound: minute 5 + 30.5 s
    ahead = b.gateway_record(sensors, [reading(s, 50, watermark) for s in sensors], watermark + 1000, columnar=True)
    first = _both([ahead], {}, {}, {})
    straddling = [reading(s, 60, BASE_MS + 5 * MINUTE_MS + (0 if i % 2 else 59_999)) for i, s in enumerate(sensors)]
    record = b.gateway_record(sensors, straddling, watermark + 2000, columnar=True)
    decoded = decode_batch([record], REGISTRY, ZONES)
    assert [type(item) for item in decoded.by_zone[sensors[0].zone_id]] == [ColumnBlock]
    out = _both([record], first.zone_states, first.minutes, first.shard_counters)
    late = sum(1 for i in range(len(sensors)) if i % 2)
    assert 0 < late < len(sensors)
    assert out.counts["late"] == late and out.counts["stored"] == len(sensors)
    minute = out.minutes[(sensors[0].zone_id, (BASE_MS + 5 * MINUTE_MS) // MINUTE_MS)]
    assert minute.readings == len(sensors) - late


def _reference_ts_ms(ts: str) -> int:
    try:
        return parse_ts_ms(ts)
    except ContractError:
        return -1


def _swapped(ts: str, swap: tuple[int, str] | None) -> str:
    return ts if swap is None else ts[: swap[0]] + swap[1] + ts[swap[0] + 1 :]


# Epoch ms from 1999 to 2101: both ends of the contract's range inside, and beyond them.
_ANY_MS = st.integers(915_148_800_000, 4_133_980_800_000)
# What may replace one character of a canonical timestamp: ASCII and non-ASCII digits, the form's
# own separators, their look-alikes, and a character too many or too few.
_SWAPS = st.sampled_from([*"0123456789", "\u0663", "\uff11", ":", ".", "-", "T", "Z", "z", " ", "", "00", "+"])


@settings(max_examples=2000, deadline=None)
@given(_ANY_MS, st.one_of(st.none(), st.tuples(st.integers(0, 23), _SWAPS)), st.integers(0, 23))
def test_cached_timestamps_equal_the_contracts_parse(ms: int, swap: tuple[int, str] | None, probe: int) -> None:
    """`cached_ts_ms` (which skips the regex and datetime for canonical strings of a minute it has
    parsed) returns exactly what the contract's `parse_ts_ms` does, -1 for what it rejects."""
    canonical = format_ts(ms)
    ts = _swapped(canonical, swap)
    cache: dict[str, int] = {}
    cached_ts_ms(format_ts(ms - ms % MINUTE_MS), cache)  # the minute's prefix seen first
    assert cached_ts_ms(ts, cache) == _reference_ts_ms(ts)
    assert cached_ts_ms(ts, {}) == _reference_ts_ms(ts)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.tuples(_ANY_MS, st.one_of(st.none(), st.tuples(st.integers(0, 23), _SWAPS))).map(
            lambda m: _swapped(format_ts(m[0]), m[1])
        ),
        st.sampled_from([None, 5, 1.5, True, [], {"ts": 1}, "", "2026-11-23T18:05:07Z"]),
    )
)
def test_a_v2_messages_sent_at_reads_as_the_reference_reads_it(sent_at: Any) -> None:
    """The typed v2 decode reads `sent_at` through the canonical parser first; for any value
    (canonical, one character off, not a string) it is exactly `envelope.sent_at_ms`."""
    assert _sent_at_ms(sent_at) == sent_at_ms(sent_at)


def test_the_typed_v2_decode_takes_only_plain_columns_and_the_reference_agrees_on_the_rest() -> None:
    """`columnar.decode_plain` decodes a v2 message straight into checked columns. On the shapes
    it must not take (a field the reference ignores, a float version, a lone surrogate, an
    integer orjson reads as a float, a `readings` list) it declines, and the message is parsed
    the reference's way; a key given twice is taken with the last value, as orjson takes it.
    Both paths reach the same result, and the valid shapes still become blocks."""
    gateway = 2
    received = BASE_MS + 7 * MINUTE_MS
    zone = GATEWAYS[gateway][0].zone_id
    # kind: (seqs the typed decode yields or None, a block?, counts)
    expected: dict[str, tuple[list[int] | None, bool, dict[str, int]]] = {
        "v2_extra_field": (None, True, {"received": 3, "stored": 3}),
        "v2_version_float": (None, True, {"received": 3, "stored": 3}),
        "v2_key_twice": ([7, 8, 9], True, {"received": 3, "stored": 3}),
        "v2_huge_seq": (None, False, {"received": 3, "stored": 2, "quarantined": 1}),
        "v2_lone_surrogate": (None, False, {"quarantined_messages": 1}),
        "v2_with_readings": (None, False, {"quarantined_messages": 1}),
    }
    for kind, (seqs, is_block, counts) in expected.items():
        record = StreamBuilder(SHARD).record(_broken(kind, gateway, received))
        plain = decode_plain(decode_envelope(record.data))
        assert (plain.columns[2] if plain else None) == seqs, kind
        items = decode_batch([record], REGISTRY, ZONES).by_zone[zone]
        assert (type(items[0]) is ColumnBlock) == is_block, kind
        assert dict(_both([record], {}, {}, {}).counts) == counts, kind


_COLUMN = st.tuples(
    _ANY_MS,  # the column's minute
    st.lists(
        st.tuples(
            st.integers(0, MINUTE_MS - 1), st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 23), _SWAPS))
        ),
        max_size=6,
    ),
    st.booleans(),  # one string of the next minute
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_COLUMN, max_size=5))
def test_a_batch_of_timestamp_columns_parses_as_each_string_does(columns: list[Any]) -> None:
    """`canonical_stamps` (every `ts` column of a batch at once, with numpy) gives a column
    exactly the per-string `parse_ts_ms` of its strings, or None (the column then goes one
    string at a time); never a different number. It gives None only when a string is invalid,
    not in `format_ts`'s canonical form, or of another minute than the column's first."""
    texts = []
    for minute_ms, rows, next_minute in columns:
        minute_ms -= minute_ms % MINUTE_MS
        column = [_swapped(format_ts(minute_ms + offset), swap) for offset, swap in rows]
        if next_minute:
            column.append(format_ts(minute_ms + MINUTE_MS))
        texts.append(column)
    for column, stamps in zip(texts, canonical_stamps(texts), strict=True):
        expected = [_reference_ts_ms(t) for t in column]
        canonical = all(ms >= 0 and format_ts(ms) == t for t, ms in zip(column, expected, strict=True))
        one_minute = len({ms // MINUTE_MS for ms in expected}) == 1
        if stamps is not None or (canonical and one_minute):
            assert stamps == expected and canonical and one_minute, column


# Byte-level damage: (where, as a fraction of the length; how many bytes to drop; what to put there).
_DAMAGE = st.lists(
    st.tuples(
        st.floats(0, 1),
        st.integers(0, 3),
        st.one_of(
            st.binary(max_size=4),
            st.sampled_from([b"\xff", b"\xc3", b"\\ud800", b"[" * 3000, b"1e400", b"99999999999999999999", b'"', b","]),
        ),
    ),
    min_size=1,
    max_size=3,
)


def _damaged(data: bytes, damage: list[tuple[float, int, bytes]]) -> bytes:
    for where, drop, put in damage:
        at = int(where * len(data))
        data = data[:at] + put + data[at + drop :]
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["gateway", "columnar", "per_detector", "single"]),
    st.integers(0, len(GATEWAYS) - 1),
    _DAMAGE,
    st.booleans(),
)
def test_a_message_damaged_anywhere_fails_no_batch_and_both_paths_agree(
    kind: str, gateway: int, damage: list[tuple[float, int, bytes]], in_envelope: bool
) -> None:
    """Whatever bytes a message (or, with `in_envelope`, the rule's envelope around it) turns
    into — invalid UTF-8, a lone surrogate, nesting past any parser's depth, numbers out of
    range, a cut or a stray quote — decoding and applying the batch raises nothing, and the
    fast path reaches exactly the reference's verdict for the damaged record and its clean
    neighbour. (Found: msgspec's UnicodeDecodeError and RecursionError escaping the typed v2
    decode, failing the whole batch.)"""
    sensors = GATEWAYS[gateway]
    gw, zone = sensors[0].gateway_id, sensors[0].zone_id
    received = BASE_MS + 7 * MINUTE_MS
    offsets = [i * 7_919 % MINUTE_MS if kind == "per_detector" else 0 for i in range(len(sensors))]
    readings = [_plain(s, 3, received - MINUTE_MS + off) for s, off in zip(sensors, offsets, strict=True)]
    if kind == "single":
        payload = orjson.dumps(readings[0])
    else:
        build = gateway_message if kind == "gateway" else columnar_message
        payload = orjson.dumps(build(gw, zone, received, readings))
    b = StreamBuilder(SHARD)
    data = envelope(payload, zone, gw, received)
    data = _damaged(data, damage) if in_envelope else envelope(_damaged(payload, damage), zone, gw, received)
    clean = b.gateway_record(sensors, [_plain(s, 4, received) for s in sensors], received, columnar=True)
    out = _both([b.record(data), clean], {}, {}, {})
    assert out.counts["stored"] >= len(sensors)  # the clean neighbour, whatever became of the damaged one


def _envelope_verdict(decode: Any, data: bytes) -> Any:
    try:
        return decode(data)
    except ContractError as exc:
        return exc.code, str(exc)


_ENVELOPE_SHAPES = [
    b'"received_at":9223372036854775807',
    b'"received_at":9223372036854775808',
    b'"received_at":18446744073709551615',
    b'"received_at":18446744073709551616',
    b'"received_at":5.0',
    b'"received_at":true',
    b'"received_at":0',
    b'"received_at":-1',
    b'"received_at":null',
    b'"client_id":null',
    b'"client_id":7',
    b'"extra":{"a":[1e400]}',
    b'"zone_id":"Z-1","zone_id":"bad zone"',
    b'"payload":"e30"',
    b'"payload":7',
]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.sampled_from(_ENVELOPE_SHAPES).map(lambda b: [(0.5, 0, b"," + b)]), _DAMAGE), st.booleans())
def test_the_typed_envelope_decode_reaches_the_untyped_verdict(
    damage: list[tuple[float, int, bytes]], at_end: bool
) -> None:
    """`decode_envelope` decodes the rule's envelope typed and leaves everything else to the
    untyped decode (`_decode_untyped`, the reference's). On any bytes — the rule's envelope with
    a field added, repeated or of another type, or damaged anywhere — both give the same
    Envelope or the same error."""
    sensors = GATEWAYS[0]
    data = envelope(orjson.dumps(_plain(sensors[0], 1, BASE_MS)), sensors[0].zone_id, sensors[0].gateway_id, BASE_MS)
    if at_end:  # inserted before the closing brace, where a field is sure to be a whole one
        at = data.rindex(b"}")
        data = data[:at] + b"".join(put for _, _, put in damage) + data[at:]
    else:
        data = _damaged(data, damage)
    assert _envelope_verdict(decode_envelope, data) == _envelope_verdict(_decode_untyped, data)


# Base64 text: the standard alphabet and its padding, with the characters other decoders take
# (URL-safe, whitespace, newlines) or that are not ASCII.
_BASE64ISH = st.text(
    alphabet=st.sampled_from([*"ABCDQRSabyz0189+/=", "=", "-", "_", " ", "\n", "\r", "\u00e9"]), max_size=24
)


@settings(max_examples=500)
@given(st.one_of(_BASE64ISH, st.binary(max_size=18).map(lambda b: base64.b64encode(b).decode())))
def test_the_typed_envelope_takes_the_payloads_base64_as_the_untyped_decode_does(encoded: str) -> None:
    """The typed envelope decodes the payload's base64 itself (msgspec's `bytes`); it must take
    no string the untyped decode's `pybase64.b64decode(validate=True)` refuses, and give the
    same bytes for the rest. Either way the two decodes agree on the Envelope or the error."""
    data = orjson.dumps({"payload": encoded, "zone_id": "Z-001", "gateway_id": "gw-001", "received_at": BASE_MS})
    assert _envelope_verdict(decode_envelope, data) == _envelope_verdict(_decode_untyped, data)
    if encoded:  # the same text with its first character written as a JSON escape ("\u0051" for "Q")
        literal = orjson.dumps(encoded)
        escaped = data.replace(literal, b'"\\u%04x' % ord(encoded[0]) + orjson.dumps(encoded[1:])[1:], 1)
        assert escaped != data
        assert _envelope_verdict(decode_envelope, escaped) == _envelope_verdict(_decode_untyped, escaped)


def test_a_gateways_members_are_checked_by_set_or_by_its_last_accepted_list() -> None:
    """`Members.include` takes a list equal to the last one that passed without hashing it; any
    other list goes through the set, and a list changed after it passed is not taken on trust."""
    sensors = [s.sensor_id for s in GATEWAYS[0]]
    members = Members(frozenset(sensors))
    ids = list(sensors)
    assert members.include(ids) and members.last == sensors and members.last is not ids
    assert members.include(list(sensors))  # equal to the last: taken
    ids[0] = "S-999999"  # the caller's list changes after it passed
    assert not members.include(ids)
    assert not members.include([*sensors, "S-999999"]) and members.last == sensors
    assert members.include(sensors[::-1]) and members.last == sensors[::-1]  # another order, by the set
    assert not members.include([["unhashable"]]) and not members.include(("S-999999",))
    assert members.include(tuple(sensors)) and members.last == sensors[::-1]  # tuples (v1) are not kept
