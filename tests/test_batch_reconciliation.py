"""The marts reconciliation (Great Expectations 1.x): marts add up to raw, and zones have no gaps.

Unit tests: the real GX checkpoints on in-memory frames (no servers). Both sides' counts are
computed here from the readings the simple way (the raw side as the warehouse groups it), then
the marts are broken on purpose; the engines' side (`Warehouse.read_raw_bucket_counts` against
the dbt marts) is in `test_batch_known_answers.py` (DuckDB, PostgreSQL) and the gate in
`test_hourly_dag_run.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from citypulse_batch.warehouse import bucket_counts_schema
from expectations.marts import TRAFFIC_MARTS, reconciliation_frame
from expectations.runner import run_reconciliation

START = datetime(2026, 3, 2, 10, tzinfo=UTC)
END = START + timedelta(hours=1)
ZONE_15 = "fct_zone_traffic_15min"


def _readings(minutes: tuple[int, ...] = (1, 16, 31, 46)) -> pd.DataFrame:
    rows = []
    for n in range(4):
        for minute in minutes:
            ts = datetime(2026, 3, 2, 10, minute, n)
            rows.append({"sensor_id": f"S-{n}", "zone_id": f"Z-{n % 2}", "ts": ts, "vehicle_count": n + minute})
    return pd.DataFrame(rows)


def _marts(readings: pd.DataFrame) -> dict[str, list[tuple[Any, ...]]]:
    """(entity, bucket, readings, vehicles) per mart: raw grouped by the mart's buckets, what a correct build holds."""
    out = {}
    for spec in TRAFFIC_MARTS:
        frame = readings.assign(bucket=readings["ts"].dt.floor(f"{spec.minutes}min"))
        grouped = frame.groupby([spec.entity, "bucket"]).agg(n=("ts", "size"), v=("vehicle_count", "sum"))
        out[spec.table] = [(e, b.to_pydatetime(), int(n), int(v)) for (e, b), (n, v) in grouped.iterrows()]
    return out


def _table(rows: list[tuple[Any, ...]]) -> pa.Table:
    """One side's counts as the warehouse hands them over."""
    schema = bucket_counts_schema()
    return pa.Table.from_pylist([dict(zip(schema.names, row, strict=True)) for row in rows], schema=schema)


def _reconcile(raw: dict[str, list[tuple[Any, ...]]], marts: dict[str, list[tuple[Any, ...]]]) -> Any:
    return run_reconciliation(
        {t: _table(rows) for t, rows in raw.items()}, {t: _table(rows) for t, rows in marts.items()}, START, END
    )


def _failed(result: Any) -> set[tuple[str, str, str]]:
    return {
        (f["suite"].removeprefix("citypulse_reconcile_"), f["expectation"], str(f["column"])) for f in result.failures
    }


def test_a_correct_build_reconciles_every_mart() -> None:
    readings = _readings()
    result = _reconcile(_marts(readings), _marts(readings))
    assert result.success, result.failures
    # 4 marts x (2 pair equalities + 2 totals) + the spine of the 2 zone marts
    assert result.evaluated == result.passed == 18


def test_a_bucket_counted_wrong_in_one_mart_fails_its_buckets_and_totals() -> None:
    readings = _readings()
    marts = _marts(readings)
    zone, bucket, count, vehicles = marts[ZONE_15][2]
    marts[ZONE_15][2] = (zone, bucket, count + 1, vehicles)
    result = _reconcile(_marts(readings), marts)
    assert not result.success
    assert _failed(result) == {
        (
            "fct_zone_traffic_15min",
            "expect_column_pair_values_to_be_equal",
            "['raw_reading_count', 'mart_reading_count']",
        ),
        ("fct_zone_traffic_15min", "expect_column_sum_to_be_between", "mart_reading_count"),
    }
    assert result.passed == result.evaluated - 2


@pytest.mark.parametrize("spec", TRAFFIC_MARTS, ids=lambda spec: spec.table)
def test_a_mart_that_holds_every_row_twice_fails_its_buckets_and_totals(spec: Any) -> None:
    """Found by a review: merged as they came, each copy of a mart row met its own copy of the
    raw row, both sums doubled together, and the gate passed 18 of 18."""
    readings = _readings()
    marts = _marts(readings)
    marts[spec.table] = marts[spec.table] * 2
    result = _reconcile(_marts(readings), marts)
    assert {(mart, expectation) for mart, expectation, _ in _failed(result)} == {
        (spec.table, "expect_column_pair_values_to_be_equal"),
        (spec.table, "expect_column_sum_to_be_between"),
    }


def test_a_sensor_moved_to_another_zone_in_a_bucket_reconciles_over_its_two_rows() -> None:
    """A registry change within an hour: the sensor marts hold a row per (sensor, zone, bucket)."""
    readings = _readings()
    marts = _marts(readings)
    sensor_15 = "fct_sensor_traffic_15min"
    sensor, bucket, count, vehicles = marts[sensor_15][0]
    marts[sensor_15][0] = (sensor, bucket, 1, vehicles - 5)  # its readings in its old zone ...
    marts[sensor_15].append((sensor, bucket, count - 1, 5))  # ... and in its new one
    result = _reconcile(_marts(readings), marts)
    assert result.success, result.failures


def test_a_bucket_missing_from_the_mart_is_a_gap_and_a_shortfall() -> None:
    readings = _readings()
    marts = _marts(readings)
    del marts[ZONE_15][0]
    result = _reconcile(_marts(readings), marts)
    assert {(mart, expectation) for mart, expectation, _ in _failed(result)} == {
        ("fct_zone_traffic_15min", "expect_column_pair_values_to_be_equal"),
        ("fct_zone_traffic_15min", "expect_column_sum_to_be_between"),
        ("fct_zone_traffic_15min", "expect_column_values_to_be_between"),  # the spine
    }


def test_a_zone_silent_for_a_whole_quarter_is_a_gap_even_when_the_totals_agree() -> None:
    readings = _readings()
    # Zone Z-1 (sensors S-1, S-3) sends nothing in 10:15-10:30; raw and marts agree on that.
    readings = readings[~((readings["zone_id"] == "Z-1") & (readings["ts"].dt.minute == 16))]
    result = _reconcile(_marts(readings), _marts(readings))
    assert _failed(result) == {("fct_zone_traffic_15min", "expect_column_values_to_be_between", "mart_reading_count")}
    (failure,) = result.failures
    assert failure["unexpected_count"] == 1


def test_rows_outside_the_raw_data_count_as_zero_on_the_raw_side() -> None:
    readings = _readings()
    marts = _marts(readings)
    marts["fct_sensor_traffic_hourly"].append(("S-9", datetime(2026, 3, 2, 10), 3, 12))
    frame = reconciliation_frame(
        TRAFFIC_MARTS[1],
        _table(_marts(readings)["fct_sensor_traffic_hourly"]),
        _table(marts["fct_sensor_traffic_hourly"]),
        START,
        END,
    )
    ghost = frame[frame["entity_id"] == "S-9"].iloc[0]
    assert (ghost["raw_reading_count"], ghost["mart_reading_count"], ghost["mart_vehicle_count"]) == (0, 3, 12)
    assert not _reconcile(_marts(readings), marts).success


@pytest.mark.parametrize("spec", TRAFFIC_MARTS, ids=lambda s: s.table)
def test_the_spine_covers_every_bucket_of_the_interval_for_zones_only(spec: Any) -> None:
    readings = _readings(minutes=(1,))  # data in the first quarter only
    frame = reconciliation_frame(spec, _table(_marts(readings)[spec.table]), _table([]), START, END)
    entities = readings[spec.entity].nunique()
    buckets = 60 // spec.minutes if spec.spine else 1
    assert len(frame) == entities * buckets
