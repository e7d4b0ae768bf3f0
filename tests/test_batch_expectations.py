"""The readings checkpoint (Great Expectations 1.x) passes clean intervals and names what is wrong.

Runs the real GX checkpoint on in-memory frames shaped like the warehouse returns them
(pyarrow, UTC without zone); no servers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from expectations.runner import run_readings_checkpoint
from streaming.contract import lake_arrow_schema

START = datetime(2026, 3, 2, 10, tzinfo=UTC)
END = START + timedelta(hours=1)

# The warehouse's shape: the lake schema with timestamps stored as UTC without zone.
SCHEMA = pa.schema(
    [pa.field(f.name, pa.timestamp("us") if pa.types.is_timestamp(f.type) else f.type) for f in lake_arrow_schema()]
)


def _rows() -> list[dict[str, Any]]:
    rows = []
    for seq in range(6):
        ts = datetime(2026, 3, 2, 10, 5 + seq * 9)
        rows.append(
            {
                "sensor_id": f"S-00000{seq % 3}",
                "zone_id": "Z-001",
                "ts": ts,
                "seq": seq,
                "vehicle_count": 4,
                "avg_speed_kmh": 42.5,
                "occupancy_pct": None if seq == 2 else 12.0,
                "congestion_index": 0.3,
                "lane": 2,
                "gateway_id": "gw-001-00",
                "received_at": ts + timedelta(seconds=1),
                "processed_at": ts + timedelta(seconds=2),
            }
        )
    return rows


def _check(rows: list[dict[str, Any]]) -> Any:
    return run_readings_checkpoint(pa.Table.from_pylist(rows, schema=SCHEMA), START, END)


def test_clean_interval_passes_every_expectation() -> None:
    result = _check(_rows())
    assert result.success, result.failures
    assert result.evaluated == result.passed > 40
    assert result.rows == 6


def test_every_broken_row_fails_the_checkpoint_and_is_named() -> None:
    import pandas as pd

    rows = _rows()
    rows[4]["avg_speed_kmh"] = 251.0  # above 250
    rows[5]["sensor_id"], rows[5]["seq"] = rows[0]["sensor_id"], rows[0]["seq"]  # redelivered key
    rows[1]["congestion_index"] = None  # required
    rows[3]["ts"] = datetime(2026, 3, 2, 11, 0)  # interval end
    rows[2]["zone_id"] = "Z 001; drop"  # not an id
    frame = pa.Table.from_pylist(rows, schema=SCHEMA).to_pandas()
    frame["gateway_id"] = pd.Series([7] * len(frame), dtype=object)  # not text

    result = run_readings_checkpoint(frame, START, END)

    assert not result.success
    assert {(f["expectation"], str(f["column"])) for f in result.failures} == {
        ("expect_column_values_to_be_between", "avg_speed_kmh"),
        ("expect_compound_columns_to_be_unique", str(["sensor_id", "seq"])),
        ("expect_column_values_to_not_be_null", "congestion_index"),
        ("expect_column_values_to_be_between", "ts"),
        ("expect_column_values_to_match_regex", "zone_id"),
        ("expect_column_values_to_be_in_type_list", "gateway_id"),
    }
    assert result.passed == result.evaluated - 6
    speed = next(f for f in result.failures if f["column"] == "avg_speed_kmh")
    assert speed["unexpected_count"] == 1 and speed["unexpected_sample"] == [251.0]


def test_text_is_checked_on_its_arrow_dtype_and_a_numeric_text_column_fails() -> None:
    # From Arrow, text becomes pandas' StringDtype() and its type is checked once on the dtype
    # (not per value); a warehouse column of numbers where the contract says text still fails.
    rows = _rows()
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.set_column(
        table.schema.get_field_index("gateway_id"), "gateway_id", pa.array([7] * len(rows), pa.int64())
    )

    result = run_readings_checkpoint(table, START, END)

    type_failures = [f for f in result.failures if f["expectation"] == "expect_column_values_to_be_in_type_list"]
    assert [f["column"] for f in type_failures] == ["gateway_id"]
    assert type_failures[0]["observed"] == "int64"


def test_an_empty_interval_fails_on_row_count() -> None:
    result = _check([])
    assert not result.success
    assert "expect_table_row_count_to_be_between" in {f["expectation"] for f in result.failures}


def test_an_id_with_a_trailing_newline_fails_as_the_contract_says() -> None:
    """GX searches a pattern (`re.search`): with the contract's `$`, "S-000001\\n" would pass
    although the contract refuses it (found by a review)."""
    rows = _rows()
    rows[0]["sensor_id"] = "S-000001\n"

    result = _check(rows)

    assert [(f["expectation"], f["column"]) for f in result.failures] == [
        ("expect_column_values_to_match_regex", "sensor_id")
    ]
