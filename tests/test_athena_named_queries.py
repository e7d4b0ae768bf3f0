"""The template's Athena named queries, run on their local stand-in: DuckDB over a Parquet lake.

Locally the queries are not deployed (ministack's CloudFormation has no named queries); the
stand-in table (infra/local/provision.py) says DuckDB runs the same SQL over the lake. This
runs each query over a small lake written with the contract's lake schema, laid out as the
processor writes it (raw/readings/dt=.../hour=...), so the SQL and the column names stay true.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.local.provision import DEFAULT_TEMPLATE, load_template, stand_in_for
from streaming.contract import lake_arrow_schema

T0 = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)


def _lake(root: Path) -> None:
    """Two hours of readings: three sensors; S-3 falls silent after 18:10; one reading landed twice."""
    rows: dict[int, list[dict[str, object]]] = {18: [], 19: []}
    for minute in range(0, 120, 5):
        for sensor in ("S-1", "S-2", "S-3"):
            if sensor == "S-3" and minute > 10:
                continue
            ts = T0.timestamp() * 1000 + minute * 60_000
            rows[18 + minute // 60].append(
                {
                    "sensor_id": sensor,
                    "zone_id": "Z-1" if sensor != "S-2" else "Z-2",
                    "ts": datetime.fromtimestamp(ts / 1000, UTC),
                    "seq": minute,
                    "vehicle_count": 10,
                    "avg_speed_kmh": 40.0,
                    "occupancy_pct": 12.0,
                    "congestion_index": 0.25,
                    "lane": 1,
                    "gateway_id": "gw-1",
                    "received_at": datetime.fromtimestamp(ts / 1000, UTC),
                    "processed_at": datetime.fromtimestamp(ts / 1000, UTC),
                }
            )
    rows[18].append(dict(rows[18][0]))  # a bisected retry wrote this reading twice
    schema = lake_arrow_schema()
    for hour, batch in rows.items():
        folder = root / "raw" / "readings" / "dt=2026-11-23" / f"hour={hour:02d}"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(batch, schema=schema), folder / "batch.parquet")


@pytest.fixture(scope="module")
def queries() -> dict[str, str]:
    resources = load_template(DEFAULT_TEMPLATE)["Resources"]
    named = {
        res["Properties"]["Name"]: res["Properties"]["QueryString"]
        for lid, res in resources.items()
        if res["Type"] == "AWS::Athena::NamedQuery"
    }
    for lid, res in resources.items():
        if res["Type"] == "AWS::Athena::NamedQuery":
            assert "DuckDB" in stand_in_for(lid, res["Type"]).by  # type: ignore[union-attr]
    return named


def _run(root: Path, sql: str) -> list[tuple[object, ...]]:
    con = duckdb.connect()
    pattern = str(root / "raw" / "readings" / "*" / "*" / "*.parquet").replace("'", "''")
    con.execute(f"CREATE VIEW readings AS SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)")
    return con.execute(sql).fetchall()


def test_the_named_queries_run_on_the_local_lake(tmp_path: Path, queries: dict[str, str]) -> None:
    assert set(queries) == {"zone volume by hour", "silent sensors", "duplicate readings"}
    _lake(tmp_path)

    volume = _run(tmp_path, queries["zone volume by hour"])
    by_zone_hour = {(zone, int(hour)): (n, vehicles) for zone, hour, n, vehicles, _ in volume}
    assert by_zone_hour[("Z-2", 18)] == (12, 120)
    assert by_zone_hour[("Z-1", 18)] == (12 + 3 + 1, 160)  # S-1 all hour, S-3 until 18:10, one duplicate

    silent = _run(tmp_path, queries["silent sensors"])
    assert [row[0] for row in silent] == ["S-3"]

    duplicates = _run(tmp_path, queries["duplicate readings"])
    assert duplicates == [("S-1", 0, 2)]
