"""Replaying recorded detector data (streaming/devices/replay.py): mapping, grouping, schedule,
and CSV / Parquet files published through a real broker and the rule bridge into Kinesis."""

from __future__ import annotations

import base64
import dataclasses
import functools
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mqtt_stream import StreamReader, connect_gateway, create_stream, start_bridge

from infra.local.broker import Broker
from infra.local.certs import LocalCA
from infra.local.emulators import Emulator, kinesis_client
from streaming.contract import MAX_MQTT_PAYLOAD_BYTES, device_message, format_ts, message_readings, validate_reading
from streaming.devices.replay import (
    REPLAY_GATEWAY,
    ColumnMap,
    ReplayError,
    Row,
    congestion_from,
    parse_time_ms,
    plan_replay,
    read_rows,
    run_replay,
)
from streaming.registry import City, generate_city

T0 = parse_time_ms("2026-03-02T07:00:00Z")


@pytest.fixture(scope="module")
def city() -> City:
    return generate_city(sensors=160, zones=9, seed=5)


@pytest.fixture(scope="module")
def registry(city: City) -> dict[str, Any]:
    return {s.sensor_id: s for s in city.sensors}


def test_the_column_map_parses_and_says_what_is_wrong() -> None:
    m = ColumnMap.parse("ts=timestamp, sensor_id=det_id,vehicle_count=flow,avg_speed_kmh=speed")
    assert (m.ts, m.sensor_id, m.vehicle_count, m.avg_speed_kmh, m.occupancy_pct) == (
        "timestamp",
        "det_id",
        "flow",
        "speed",
        None,
    )
    # Unmapped fields are read from columns of their own name when present.
    assert m.resolve(["timestamp", "det_id", "flow", "speed", "occupancy_pct"]) == {
        "ts": "timestamp",
        "sensor_id": "det_id",
        "vehicle_count": "flow",
        "avg_speed_kmh": "speed",
        "occupancy_pct": "occupancy_pct",
    }
    for bad in ("ts", "colour=c", "ts=a,ts=b", "ts="):
        with pytest.raises(ReplayError):
            ColumnMap.parse(bad)
    with pytest.raises(ReplayError, match="'flow'"):
        m.resolve(["timestamp", "det_id"])


def test_times_are_read_from_iso_strings_datetimes_and_epoch_numbers() -> None:
    expected = parse_time_ms("2026-03-02T07:00:30.250Z")
    for value in (
        "2026-03-02T07:00:30.250Z",
        "2026-03-02 07:00:30.250",  # no zone: UTC
        "2026-03-02T08:00:30.250+01:00",
        datetime(2026, 3, 2, 7, 0, 30, 250_000, tzinfo=UTC),
        expected,
        expected / 1000,
        str(expected / 1000),
        expected * 1000,  # epoch microseconds
        expected * 1_000_000,  # epoch nanoseconds (int64 Parquet, pandas)
        str(expected * 1_000_000),
    ):
        assert parse_time_ms(value) == expected, value
    # ISO's basic form is a date, not 20,260,302 epoch seconds (1970); found by a review.
    assert parse_time_ms("20260302") == parse_time_ms("2026-03-02T00:00:00Z")
    # ... but a run of digits that fromisoformat would also take is an epoch number (found by
    # the diff review: "1786010480000" read as 1786-01-01 04:80... and refused).
    for epoch_ms in (1_786_010_480_000, 1_768_010_100_000, 2_033_010_100_000):
        assert parse_time_ms(str(epoch_ms)) == epoch_ms
    for outside in (1, 10**19, "1969-12-31", 4_102_444_800_000):  # the contract's 2000-2100 only
        with pytest.raises(ValueError, match="is outside 2000-2100"):
            parse_time_ms(outside)
    with pytest.raises(ValueError):
        parse_time_ms("yesterday")
    for endless in ("inf", float("-inf"), "nan", float("nan")):
        with pytest.raises(ValueError):  # not an OverflowError the replay would not catch
            parse_time_ms(endless)


def test_a_detector_id_column_read_as_floats_names_the_detectors(tmp_path: Path) -> None:
    """pandas writes an integer id column with a gap as float64: 401234.0 became detector
    "401234.0" and the gap detector "nan", both unknown (found by a review)."""
    path = tmp_path / "float_ids.parquet"
    pq.write_table(pa.table({"t": ["2026-03-02T07:00:00Z"] * 2, "det": [401234.0, float("nan")], "flow": [3, 4]}), path)
    with pytest.raises(ReplayError, match=r"sensor_id .* is empty"):
        read_rows(path, ColumnMap.parse("ts=t,sensor_id=det,vehicle_count=flow"))
    pq.write_table(pa.table({"t": ["2026-03-02T07:00:00Z"], "det": [401234.0], "flow": [3]}), path)
    (row,) = read_rows(path, ColumnMap.parse("ts=t,sensor_id=det,vehicle_count=flow"))
    assert row.sensor_id == "401234"


def test_a_nan_measurement_is_a_gap_and_an_infinite_one_is_refused(tmp_path: Path) -> None:
    """NaN is how pandas writes a gap: the reading goes without it (its congestion derived from
    what it has), not with a congestion index of 0 from `max(0.0, nan)` (found by a review)."""
    path = tmp_path / "nan.csv"
    path.write_text("t,det,flow,speed,occ\n2026-03-02T07:00:20Z,D-1,12,15.0,nan\n")
    (row,) = read_rows(
        path, ColumnMap.parse("ts=t,sensor_id=det,vehicle_count=flow,avg_speed_kmh=speed,occupancy_pct=occ")
    )
    assert row.occupancy_pct is None and row.avg_speed_kmh == 15.0
    assert congestion_from(row, 30.0) == 0.5  # from the speed
    path.write_text("t,det,flow,speed\n2026-03-02T07:00:20Z,D-1,12,inf\ninf,D-1,12,1\n")
    with pytest.raises(ReplayError, match="row 2: 'inf' is not a finite number"):
        read_rows(path, ColumnMap.parse("ts=t,sensor_id=det,vehicle_count=flow,avg_speed_kmh=speed"))


def _rows(registry: dict[str, Any]) -> list[Row]:
    sensors = sorted(registry.values(), key=lambda s: s.sensor_id)
    a, b = sensors[0], sensors[-1]  # in different zones, so different gateways
    return [
        Row(a.sensor_id, T0 + 20_000, 12, 48.5, 11.2),
        Row(b.sensor_id, T0 + 50_000, 7, None, 30.0),
        Row(a.sensor_id, T0 + 60_000 + 20_000, 13, 47.0, 12.0),
        Row("DET-UNKNOWN-9", T0 + 5 * 60_000 + 1_000, 3),
        Row(a.sensor_id, T0 + 5 * 60_000 + 20_000, 0, 3.0, 90.0),
    ]


def test_readings_are_grouped_per_gateway_per_minute_on_a_schedule_scaled_by_speed(
    registry: dict[str, Any],
) -> None:
    rows = _rows(registry)
    a, b = registry[rows[0].sensor_id], registry[rows[1].sensor_id]
    plan = plan_replay(rows, registry, speed=60, unknown_zone="Z-000")
    got = [(m.offset_s, m.gateway_id, m.zone_id, [r["sensor_id"] for r in m.readings]) for m in plan.messages]
    assert got == sorted(
        [
            (0.0, a.gateway_id, a.zone_id, [a.sensor_id]),
            (0.0, b.gateway_id, b.zone_id, [b.sensor_id]),
            (1.0, a.gateway_id, a.zone_id, [a.sensor_id]),  # one recorded minute = 1 s at 60x
            (5.0, a.gateway_id, a.zone_id, [a.sensor_id]),
            (5.0, REPLAY_GATEWAY, "Z-000", ["DET-UNKNOWN-9"]),
        ]
    )
    assert plan.unknown_sensors == {"DET-UNKNOWN-9"}
    assert [m.offset_s for m in plan_replay(rows, registry, speed=1, unknown_zone="Z-000").messages] == [
        0.0,
        0.0,
        60.0,
        300.0,
        300.0,
    ]
    assert {m.offset_s for m in plan_replay(rows, registry, speed=float("inf"), unknown_zone="Z-000").messages} == {0.0}
    with pytest.raises(ReplayError):
        plan_replay(rows, registry, speed=0, unknown_zone="Z-000")
    for m in plan.messages:
        for r in m.readings:
            validate_reading(r)  # every reading honours the contract
    assert plan.seq_unit_s == 60
    assert [r["seq"] for m in plan.messages for r in m.readings if r["sensor_id"] == a.sensor_id] == [
        (T0 + 20_000) // 60_000,
        (T0 + 80_000) // 60_000,
        (T0 + 320_000) // 60_000,
    ]


def test_a_gateway_serving_two_zones_sends_each_zone_its_own_message(registry: dict[str, Any]) -> None:
    """A message is published on its zone's topic and the processor checks every reading's zone
    against it: a gateway's readings of two zones went out under the last zone seen in the file,
    and the other zone's were quarantined `zone_mismatch` (found by a review)."""
    a, b = list(registry.values())[:2]
    moved = dataclasses.replace(b, gateway_id=a.gateway_id, zone_id="Z-OTHER")
    spanning = {**registry, b.sensor_id: moved}
    plan = plan_replay(
        [Row(a.sensor_id, T0 + 1_000, 3), Row(b.sensor_id, T0 + 2_000, 4)], spanning, unknown_zone="Z-000"
    )
    assert sorted((m.gateway_id, m.zone_id, [r["sensor_id"] for r in m.readings]) for m in plan.messages) == sorted(
        [(a.gateway_id, a.zone_id, [a.sensor_id]), (a.gateway_id, "Z-OTHER", [b.sensor_id])]
    )
    for m in plan.messages:
        assert all(r["zone_id"] == m.zone_id for r in m.readings)


def test_detectors_reporting_more_than_once_a_minute_get_per_second_seqs(registry: dict[str, Any]) -> None:
    sid = next(iter(registry))
    plan = plan_replay([Row(sid, T0 + 20_000, 1), Row(sid, T0 + 40_000, 2)], registry, unknown_zone="Z-000")
    assert plan.seq_unit_s == 1
    assert [r["seq"] for r in plan.messages[0].readings] == [(T0 + 20_000) // 1000, (T0 + 40_000) // 1000]
    with pytest.raises(ReplayError, match=f"detector '{sid}' has two rows in the second"):
        plan_replay([Row(sid, T0 + 20_000, 1), Row(sid, T0 + 20_500, 2)], registry, unknown_zone="Z-000")


class _Clock:
    """A fake monotonic clock and stop event: waiting advances the clock, no real time passes."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        self.now += timeout
        return False


class _RecordingGateway:
    def __init__(self, gateway_id: str, clock: _Clock, log: list[tuple[float, str, bytes]]) -> None:
        self.gateway_id, self.clock, self.log = gateway_id, clock, log

    def publish_telemetry(self, zone_id: str, payload: bytes) -> Future[None]:
        self.log.append((self.clock.now, self.gateway_id, payload))
        f: Future[None] = Future()
        f.set_result(None)
        return f

    def flush(self, timeout: float) -> None:
        pass

    def disconnect(self) -> None:
        pass


def test_the_replay_publishes_each_message_at_its_scheduled_offset(registry: dict[str, Any]) -> None:
    plan = plan_replay(_rows(registry), registry, speed=30, unknown_zone="Z-000")
    clock = _Clock()
    log: list[tuple[float, str, bytes]] = []
    result = run_replay(
        plan,
        lambda gw: _RecordingGateway(gw, clock, log),  # type: ignore[arg-type, return-value]
        stop=clock,  # type: ignore[arg-type]
        clock=clock,
    )
    assert [round(t - 100.0, 6) for t, _, _ in log] == [0.0, 0.0, 2.0, 10.0, 10.0]
    assert (result.messages, result.readings, result.failed_publishes) == (5, 5, 0)
    assert result.seconds == pytest.approx(10.0)


# -- through the broker, the rule bridge and Kinesis ------------------------------------------------


@pytest.fixture(scope="module")
def kinesis(kinesalite: Emulator) -> Any:
    return kinesis_client(kinesalite.endpoint_url)


def _read_messages(kinesis: Any, stream: str, expected_messages: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    for rec in StreamReader(kinesis, stream).wait_for_count(expected_messages):
        record = orjson.loads(rec["Data"])
        out.append((record, orjson.loads(base64.b64decode(record["payload"]))))
    return out


def _recorded(registry: dict[str, Any]) -> list[dict[str, Any]]:
    """A recording of 3 minutes of 12 registry detectors plus 2 unknown ones, with its own column names."""
    sensors = [*sorted(registry)[:: len(registry) // 12][:12], "LOOP-0001", "LOOP-0002"]
    rows = []
    for minute in range(3):
        for i, sid in enumerate(sensors):
            rows.append(
                {
                    "det_id": sid,
                    "timestamp": T0 + minute * 60_000 + 1000 * i + 500,
                    "flow": (minute * 7 + i * 3) % 40,
                    "speed": round(20 + i * 2.5 + minute, 1),
                    "occ": round(5 + i * 1.5, 1) if i % 3 else None,  # some detectors report no occupancy
                }
            )
    return rows


MAP = "ts=timestamp,sensor_id=det_id,vehicle_count=flow,avg_speed_kmh=speed,occupancy_pct=occ"


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["timestamp,det_id,flow,speed,occ"]
    for r in rows:
        occ = "" if r["occ"] is None else str(r["occ"])
        lines.append(f"{format_ts(r['timestamp'])},{r['det_id']},{r['flow']},{r['speed']},{occ}")
    path.write_text("\n".join(lines) + "\n")


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.table(
        {
            "timestamp": pa.array(
                [datetime.fromtimestamp(r["timestamp"] / 1000, UTC) for r in rows], pa.timestamp("ms", tz="UTC")
            ),
            "det_id": pa.array([r["det_id"] for r in rows], pa.string()),
            "flow": pa.array([r["flow"] for r in rows], pa.int32()),
            "speed": pa.array([r["speed"] for r in rows], pa.float64()),
            "occ": pa.array([r["occ"] for r in rows], pa.float32()),
        }
    )
    pq.write_table(table, path)


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_every_recorded_row_arrives_in_kinesis_as_a_reading_with_the_mapped_values(
    fmt: str, ca: LocalCA, broker: Broker, kinesis: Any, registry: dict[str, Any], tmp_path: Path
) -> None:
    recorded = _recorded(registry)
    path = tmp_path / f"loops.{fmt}"
    (_write_csv if fmt == "csv" else _write_parquet)(recorded, path)
    plan = plan_replay(read_rows(path, ColumnMap.parse(MAP)), registry, speed=float("inf"), unknown_zone="Z-004")
    assert plan.unknown_sensors == {"LOOP-0001", "LOOP-0002"}
    stream = f"replay-{fmt}"
    create_stream(kinesis, stream, shards=1)
    bridge = start_bridge(kinesis, ca, broker, stream)
    try:
        result = run_replay(plan, functools.partial(connect_gateway, ca, broker))
        messages = _read_messages(kinesis, stream, len(plan.messages))
    finally:
        bridge.stop()
    assert (result.readings, result.failed_publishes) == (len(recorded), 0)

    arrived: dict[tuple[str, str], dict[str, Any]] = {}
    for record, message in messages:
        # The gateway that publishes a reading is the one the registry puts the detector behind.
        assert record["gateway_id"] == message["gateway_id"] == record["client_id"]
        assert record["zone_id"] == message["zone_id"]
        for reading in message_readings(message):
            validate_reading(reading)
            sensor = registry.get(reading["sensor_id"])
            assert record["gateway_id"] == (sensor.gateway_id if sensor else REPLAY_GATEWAY)
            assert reading["zone_id"] == (sensor.zone_id if sensor else "Z-004")
            key = (reading["sensor_id"], reading["ts"])
            assert key not in arrived, f"{key} arrived twice"
            arrived[key] = reading
    assert len(arrived) == len(recorded)
    for row in recorded:
        reading = arrived[(row["det_id"], format_ts(row["timestamp"]))]
        assert reading["vehicle_count"] == row["flow"]
        assert reading["avg_speed_kmh"] == pytest.approx(row["speed"])
        assert reading.get("occupancy_pct") == (pytest.approx(row["occ"]) if row["occ"] is not None else None)
        assert reading["seq"] == row["timestamp"] // 60_000


def test_messages_are_split_to_fit_iot_cores_payload_limit(registry: dict[str, Any]) -> None:
    """Long detector ids (not in the registry) make 500 readings a message too large: the plan
    halves a message until each fits, every reading in exactly one (found by a review)."""
    rows = [Row(f"DET-{'x' * 250}-{i:04d}", T0 + 1000, i) for i in range(500)]
    plan = plan_replay(rows, registry, unknown_zone="Z-000")
    sizes = [
        len(orjson.dumps(device_message(m.gateway_id, m.zone_id, 10**13 - 1, list(m.readings)))) for m in plan.messages
    ]
    assert len(plan.messages) == 2 and max(sizes) <= MAX_MQTT_PAYLOAD_BYTES
    assert sorted(r["sensor_id"] for m in plan.messages for r in m.readings) == sorted(r.sensor_id for r in rows)
