"""A hand-computed city-hour for the marts' known-answer tests.

Not a test module: the fixture. Two zones, five sensors on two roads, one hour
(2026-03-02 10:00-11:00 UTC, a Monday) of readings written straight into warehouse raw
(`raw.readings`, `raw.sensor_registry`, `raw.zones`), so the test exercises dbt alone. The
expected mart rows are in `tests/test_batch_known_answers.py`, worked out by hand from the
table below, not computed by code.

    sensor zone   road        readings: minute -> (vehicles, speed km/h, occupancy %, congestion)
    S-1    Z-001  Oak Street  02 (10, 20, 40, .9)  17 (10, 40, 20, .5)  31 (10, 60, 5, .2)  45:00.000 (10, 10, 50, .75)
    S-2    Z-001  Oak Street  05 (6, 30, 30, .7)   20 (8, 50, 10, .5)   44:59.999 (4, -, -, .4)
    S-3    Z-002  Elm Avenue  01 (3, 30, 5, .2)    16 (4, 20, 12, .6)   33 (6, 10, 25, .7)
    S-4    Z-002  Oak Street  03 (5, 70, 8, .2)    34 (6, 44, 25, .7)   50 (2, 55, 15, .45)
    S-5    Z-002  Elm Avenue  (silent)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from citypulse_batch.warehouse import RAW_TABLES, Warehouse

HOUR = datetime(2026, 3, 2, 10, tzinfo=UTC)

ZONES = [
    # zone_id, name, zone_type, grid_row, grid_col, lat, lon
    ("Z-001", "Centre 00-00", "centre", 0, 0, 52.3045, 4.8073),
    ("Z-002", "Arterial 00-01", "arterial", 0, 1, 52.3045, 4.8220),
]
SENSORS = [
    # sensor_id, zone_id, gateway_id, zone_type, road, direction, lane, lanes, speed_limit_kmh, lat, lon
    ("S-1", "Z-001", "gw-001-00", "centre", "Oak Street", "E", 1, 2, 30, 52.3040, 4.8070),
    ("S-2", "Z-001", "gw-001-00", "centre", "Oak Street", "W", 2, 2, 30, 52.3041, 4.8071),
    ("S-3", "Z-002", "gw-002-00", "arterial", "Elm Avenue", "N", 1, 3, 50, 52.3042, 4.8210),
    ("S-4", "Z-002", "gw-002-00", "arterial", "Oak Street", "E", 1, 3, 50, 52.3043, 4.8211),
    ("S-5", "Z-002", "gw-002-00", "arterial", "Elm Avenue", "S", 2, 3, 50, 52.3044, 4.8212),
]
# sensor_id, (minute, second, millisecond), vehicles, speed, occupancy, congestion
READINGS: list[tuple[str, tuple[int, int, int], int, float | None, float | None, float]] = [
    ("S-1", (2, 0, 0), 10, 20.0, 40.0, 0.9),
    ("S-1", (17, 0, 0), 10, 40.0, 20.0, 0.5),
    ("S-1", (31, 0, 0), 10, 60.0, 5.0, 0.2),
    ("S-1", (45, 0, 0), 10, 10.0, 50.0, 0.75),
    ("S-2", (5, 0, 0), 6, 30.0, 30.0, 0.7),
    ("S-2", (20, 0, 0), 8, 50.0, 10.0, 0.5),
    ("S-2", (44, 59, 999), 4, None, None, 0.4),  # count-only reading, last millisecond of a bucket
    ("S-3", (1, 0, 0), 3, 30.0, 5.0, 0.2),
    ("S-3", (16, 0, 0), 4, 20.0, 12.0, 0.6),
    ("S-3", (33, 0, 0), 6, 10.0, 25.0, 0.7),
    ("S-4", (3, 0, 0), 5, 70.0, 8.0, 0.2),
    ("S-4", (34, 0, 0), 6, 44.0, 25.0, 0.7),
    ("S-4", (50, 0, 0), 2, 55.0, 15.0, 0.45),
]


def reading_rows() -> list[tuple[Any, ...]]:
    """`raw.readings` rows in the contract's column order (timestamps naive UTC)."""
    zone_of = {s[0]: s[1] for s in SENSORS}
    gateway_of = {s[0]: s[2] for s in SENSORS}
    lane_of = {s[0]: s[6] for s in SENSORS}
    rows = []
    for seq, (sensor, (minute, second, milli), vehicles, speed, occupancy, congestion) in enumerate(READINGS, 1):
        ts = (HOUR + timedelta(minutes=minute, seconds=second, milliseconds=milli)).replace(tzinfo=None)
        values = {
            "sensor_id": sensor,
            "zone_id": zone_of[sensor],
            "ts": ts,
            "seq": seq,
            "vehicle_count": vehicles,
            "avg_speed_kmh": speed,
            "occupancy_pct": occupancy,
            "congestion_index": congestion,
            "lane": lane_of[sensor],
            "gateway_id": gateway_of[sensor],
            "received_at": ts + timedelta(seconds=1),
            "processed_at": ts + timedelta(seconds=2),
        }
        rows.append(tuple(values[name] for name, _, _ in RAW_TABLES["readings"]))
    return rows


def load_city_hour(warehouse: Warehouse, placeholder: str) -> None:
    """Replace warehouse raw with the fixture (`placeholder`: the driver's paramstyle, `?` or `%s`)."""
    tables = {"readings": reading_rows(), "sensor_registry": SENSORS, "zones": ZONES}
    with warehouse.transaction() as cur:
        warehouse.ensure_raw_tables(cur)
        for table, rows in tables.items():
            names = [name for name, _, _ in RAW_TABLES[table]]
            cur.execute(f"delete from raw.{table}")
            cur.executemany(
                f"insert into raw.{table} ({', '.join(names)}) values ({', '.join([placeholder] * len(names))})",
                [list(row) for row in rows],
            )
