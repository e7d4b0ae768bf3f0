"""Per-sensor health in the processor: live stuck detection and per-sensor accounting counters."""

from __future__ import annotations

import zlib
from pathlib import Path

import orjson
import pytest
import yaml
import zstandard
from kinesis_records import BASE_MS, StreamBuilder, reading

from streaming.processor.core import MINUTE_MS, BatchOutput, DetectorSettings, Record, apply_batch, decode_batch
from streaming.processor.state import DEDUPE_WINDOW, SensorState, ZoneState, state_document
from streaming.registry import generate_city

CITY = generate_city(sensors=120, zones=2, seed=5)
REGISTRY = {s.sensor_id: s for s in CITY.sensors}
ZONES = {z.zone_id for z in CITY.zones}
GATEWAY = next(iter(CITY.gateways().values()))
SENSOR = GATEWAY[0]
STUCK = DetectorSettings().stuck_run_readings
DBT_PROJECT = Path(__file__).resolve().parent.parent / "dbt_project" / "dbt_project.yml"


class Zone:
    """One zone's state carried from batch to batch, as the handler commits it."""

    def __init__(self) -> None:
        self.states: dict[str, ZoneState] = {}
        self.builder = StreamBuilder()
        self.alerts: list = []

    def run(self, records: list[Record]) -> BatchOutput:
        out = apply_batch(decode_batch(records, REGISTRY, ZONES), self.states, {}, {}, BASE_MS)
        self.states.update(out.zone_states)
        self.alerts += out.alerts
        return out

    def send(self, counts: list[int], first_seq: int = 0, sensors: list = GATEWAY) -> None:
        """One gateway message per count, a minute apart: every sensor reports that count."""
        for i, count in enumerate(counts):
            seq = first_seq + i
            ts = BASE_MS + seq * MINUTE_MS
            rs = [reading(s, seq, ts, vehicle_count=count) for s in sensors]
            self.run([self.builder.gateway_record(sensors, rs, ts + 500)])

    def sensor(self, sensor_id: str = SENSOR.sensor_id) -> SensorState:
        return self.states[SENSOR.zone_id].sensors[sensor_id]

    def stuck_alerts(self) -> list:
        return [a for a in self.alerts if a.detail_type == "SensorStuck"]


def test_the_processor_and_the_daily_mart_use_one_stuck_threshold() -> None:
    dbt_vars = yaml.safe_load(DBT_PROJECT.read_text())["vars"]
    assert dbt_vars["stuck_run_readings"] == STUCK


def test_a_repeated_non_zero_count_makes_a_sensor_stuck_once_per_episode() -> None:
    zone = Zone()
    zone.send([7] * (STUCK - 1))
    assert (zone.sensor().repeat_run, zone.sensor().stuck) == (STUCK - 1, False)
    assert zone.stuck_alerts() == []
    zone.send([7] * 5, first_seq=STUCK - 1)  # the run reaches the threshold, then goes on
    assert (zone.sensor().repeat_run, zone.sensor().stuck) == (STUCK + 4, True)
    alerts = [a for a in zone.stuck_alerts() if a.detail["sensor_id"] == SENSOR.sensor_id]
    assert len(alerts) == 1
    assert alerts[0].detail["repeat_run"] == STUCK and alerts[0].detail["vehicle_count"] == 7
    assert alerts[0].event_id == f"SensorStuck/{SENSOR.sensor_id}/{alerts[0].detail['detected_at']}"
    zone.send([8], first_seq=STUCK + 4)  # a new count ends the episode
    assert (zone.sensor().repeat_run, zone.sensor().stuck) == (1, False)
    zone.send([8] * STUCK, first_seq=STUCK + 5)  # a second episode raises again
    assert len(zone.stuck_alerts()) == 2 * len(GATEWAY)


def test_zero_counts_never_make_a_sensor_stuck_and_end_a_run() -> None:
    zone = Zone()
    zone.send([0] * (STUCK + 3))
    assert (zone.sensor().repeat_run, zone.sensor().stuck) == (0, False)
    zone.send([5] * (STUCK - 1) + [0] + [5] * (STUCK - 1), first_seq=STUCK + 3)
    assert (zone.sensor().repeat_run, zone.sensor().stuck) == (STUCK - 1, False)
    assert zone.stuck_alerts() == []


def test_an_out_of_order_reading_neither_breaks_nor_extends_the_run() -> None:
    zone = Zone()
    zone.send([3] * (STUCK - 1), first_seq=10)  # seq 10.., newest event time at seq 18
    # Missing seq 5 arrives late but inside the lateness bound, with a different count.
    ts = BASE_MS + (10 + STUCK - 1) * MINUTE_MS - 10 * MINUTE_MS
    zone.run([zone.builder.gateway_record([SENSOR], [reading(SENSOR, 5, ts, vehicle_count=99)], ts + 500)])
    assert (zone.sensor().repeat_run, zone.sensor().vehicle_count) == (STUCK - 1, 3)
    zone.send([3], first_seq=10 + STUCK - 1)
    assert zone.sensor().stuck


def test_per_sensor_duplicates_and_late_add_up_to_the_zone_counters() -> None:
    zone = Zone()
    zone.send([4] * 3)
    b = zone.builder
    first_msg = [reading(s, 0, BASE_MS, vehicle_count=4) for s in GATEWAY]
    zone.run([b.gateway_record(GATEWAY, first_msg, BASE_MS + 9 * MINUTE_MS)])  # resent: duplicates
    # The first sensor jumps far ahead, then an old seq beyond the dedupe window arrives: late.
    far = DEDUPE_WINDOW + 10
    ts = BASE_MS + 4 * MINUTE_MS
    zone.run([b.gateway_record([SENSOR], [reading(SENSOR, far, ts)], ts + 500)])
    zone.run([b.gateway_record([SENSOR], [reading(SENSOR, 5, ts)], ts + 600)])
    state = zone.states[SENSOR.zone_id]
    assert zone.sensor().duplicates == 1 and zone.sensor().late == 1
    assert sum(s.duplicates for s in state.sensors.values()) == state.counters["duplicates"] == len(GATEWAY)
    assert sum(s.late for s in state.sensors.values()) == state.counters["late"] == 1


def test_a_resent_invalid_reading_counts_as_its_sensors_duplicate() -> None:
    zone = Zone()
    bad = [reading(SENSOR, 3, BASE_MS, avg_speed_kmh=900)]
    for received in (BASE_MS + 1000, BASE_MS + 2000):
        zone.run([zone.builder.gateway_record([SENSOR], bad, received)])
    state = zone.states[SENSOR.zone_id]
    assert state.counters["quarantined"] == 1 and state.counters["duplicates"] == 1
    assert zone.sensor().duplicates == 1


def test_a_blob_written_before_the_health_fields_existed_still_reads() -> None:
    """Rows of nine fields (the layout before repeat_run/stuck/duplicates/late) decode with the
    new fields at their defaults; runs and counters then start from zero."""
    old_row = [12, 1, BASE_MS, BASE_MS + 500, 7, 42.5, 12.0, 0.2, False]
    doc = {
        "z": SENSOR.zone_id,
        "ms": "shardId-000000000000",
        "mq": "7",
        "wm": BASE_MS,
        "ev": -1,
        "om": {},
        "cg": [False, 0, None, 0.0],
        "s": {SENSOR.sensor_id: old_row},
        "c": {"received": 1, "stored": 1},
    }
    state = ZoneState.from_bytes(zlib.compress(orjson.dumps(doc)))
    sensor = state.sensors[SENSOR.sensor_id]
    assert (sensor.hwm, sensor.vehicle_count, sensor.silent) == (12, 7, False)
    assert (sensor.repeat_run, sensor.stuck, sensor.duplicates, sensor.late) == (0, False, 0, 0)


def test_a_zone_state_is_stored_a_column_per_field_and_reads_back_whole() -> None:
    state = ZoneState(SENSOR.zone_id)
    healthy = SensorState(hwm=3, window=1, last_ts_ms=BASE_MS, vehicle_count=9, repeat_run=1)
    odd = SensorState(hwm=3, window=1, duplicates=2)
    state.sensors = {"healthy": healthy, "odd": odd}
    doc = state_document(state.to_bytes())
    assert doc["si"] == ["healthy", "odd"]
    assert len(doc["sc"]) == len(healthy.row())  # every field a column, one value a sensor
    assert doc["sc"][0] == [3, 3] and doc["sc"][9] == [1, 0] and doc["sc"][11] == [0, 2]
    assert ZoneState.from_bytes(state.to_bytes()) == state
    assert ZoneState.from_bytes(ZoneState(SENSOR.zone_id).to_bytes()) == ZoneState(SENSOR.zone_id)


def test_a_blob_of_the_row_layout_still_reads() -> None:
    """States stored before session 13 hold a row a sensor, its trailing zero fields left out."""
    state = ZoneState(SENSOR.zone_id, marker_shard="shardId-000000000000", marker_seq=7, watermark_ms=BASE_MS)
    state.sensors = {
        "healthy": SensorState(hwm=3, window=1, last_ts_ms=BASE_MS, vehicle_count=9, repeat_run=1),
        "odd": SensorState(hwm=3, window=1, duplicates=2),
    }
    doc = state_document(state.to_bytes())
    del doc["si"], doc["sc"]
    doc["s"] = {
        "healthy": [3, 1, BASE_MS, 0, 9, None, None, 0.0, False, 1],
        "odd": [3, 1, 0, 0, 0, None, None, 0.0, False, 0, False, 2],
    }
    assert ZoneState.from_bytes(zlib.compress(orjson.dumps(doc), 1)) == state


def test_a_zone_state_is_a_zstd_frame_and_a_zlib_blob_of_before_still_reads() -> None:
    """Blobs are zstd since 2026-12-07; a table deployed before holds zlib ones (level 5) until
    each zone's next batch rewrites it, and the store's cache compares blobs byte for byte."""
    state = ZoneState(SENSOR.zone_id, marker_shard="shardId-000000000000", marker_seq=7, watermark_ms=BASE_MS)
    state.sensors = {"s": SensorState(hwm=3, window=1, last_ts_ms=BASE_MS, vehicle_count=9, repeat_run=1)}
    blob = state.to_bytes()
    assert blob[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame's magic number
    assert state.to_bytes() == blob  # deterministic: equal states, equal blobs
    before = zlib.compress(orjson.dumps(state_document(blob)), 5)
    assert ZoneState.from_bytes(before) == ZoneState.from_bytes(blob) == state
    with pytest.raises(zlib.error):
        ZoneState.from_bytes(b"\x28\xb5\x2f\x00" + blob[4:])  # neither format: refused, not misread


def test_the_sensors_times_are_stored_behind_the_watermark_and_a_blob_of_absolute_times_still_reads() -> None:
    """Since 2026-12-07 (`tw`) a sensor's two times are its distance behind the zone's watermark;
    blobs written before hold epoch milliseconds."""
    state = ZoneState(SENSOR.zone_id, marker_shard="shardId-000000000000", marker_seq=7, watermark_ms=BASE_MS)
    state.sensors = {
        "s": SensorState(hwm=3, window=1, last_ts_ms=BASE_MS - 1_500, last_received_ms=BASE_MS - 700),
        "never": SensorState(),  # no reading yet: its times are 0
    }
    doc = state_document(state.to_bytes())
    assert doc["tw"] and doc["sc"][2] == [1_500, BASE_MS] and doc["sc"][3] == [700, BASE_MS]
    assert ZoneState.from_bytes(state.to_bytes()) == state
    del doc["tw"]
    doc["sc"][2], doc["sc"][3] = [BASE_MS - 1_500, 0], [BASE_MS - 700, 0]
    assert ZoneState.from_bytes(zstandard.compress(orjson.dumps(doc))) == state
