"""Airflow's own backfill over hours partly loaded already gives the warehouse of loading each hour once.

Integration test: a two-hour lake (09:00 and 10:00) in ministack; hour 10 is loaded and built
already (the load and dbt step functions the DAG's tasks call), then
`infra.local.airflow.run_backfill` backfills [09:00, 11:00) with `airflow backfill create` and
a real scheduler (LocalExecutor) and API server, started for the backfill and stopped after.
The reference warehouse loads and builds each hour exactly once. Every table of raw, marts and
snapshots must be equal row for row.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from batch_lake import INTERVAL_START, ministack_env, partition, put_parquet, reading, s3_client, unique_name

from citypulse_batch.dbt_build import find_project_dir, run_dbt_build
from citypulse_batch.lake import Interval, Lake, S3Credentials
from citypulse_batch.warehouse import DuckDBWarehouse
from infra.local.airflow import run_backfill
from infra.local.emulators import Emulator
from streaming.contract import lake_arrow_schema
from streaming.registry import generate_city, registry_csv, zones_csv

pytestmark = pytest.mark.integration

HOURS = [INTERVAL_START - timedelta(hours=1), INTERVAL_START]
SEEN_AT = {
    "dbt_updated_at",
    "dbt_valid_from",
    "dbt_valid_to",
    "dbt_scd_id",
    "sensor_version_id",
    "valid_from",
    "valid_to",
}


def _write_lake(s3: Any, bucket: str) -> None:
    """Every sensor of a small city reports in each quarter of both hours; seqs grow across hours."""
    s3.create_bucket(Bucket=bucket)
    city = generate_city(sensors=12, zones=4, seed=3)
    s3.put_object(Bucket=bucket, Key="registry/sensor_registry.csv", Body=registry_csv(city))
    s3.put_object(Bucket=bucket, Key="registry/zones.csv", Body=zones_csv(city))
    for h, hour in enumerate(HOURS):
        rows = [
            reading(
                sensor.sensor_id,
                sensor.zone_id,
                100 * h + k,
                hour + timedelta(minutes=minute, seconds=n),
                gateway_id=sensor.gateway_id,
            )
            for n, sensor in enumerate(city.sensors)
            for k, minute in enumerate((2, 17, 31, 46))
        ]
        put_parquet(
            s3, bucket, f"raw/readings/{partition(hour)}shardId-000000000000-{h}.parquet", rows, lake_arrow_schema()
        )


def _snapshot(warehouse: DuckDBWarehouse) -> dict[str, list[tuple[Any, ...]]]:
    # Through the adapter's own connection: dbt (in this process) keeps the file open with it.
    with warehouse.transaction() as con:
        tables = [
            f"{schema}.{name}"
            for schema, name in con.execute(
                "select table_schema, table_name from information_schema.tables "
                "where table_type = 'BASE TABLE' and table_schema in ('raw', 'marts', 'snapshots') order by all"
            ).fetchall()
        ]
        # The SCD2 columns say when a registry version was first *seen* (dbt's snapshot time):
        # two warehouses built at different moments differ there by design; all else must not.
        out = {}
        for table in tables:
            columns = [c for (c,) in con.execute(f"select column_name from (describe {table})").fetchall()]
            kept = ", ".join(c for c in columns if c not in SEEN_AT)
            out[table] = con.execute(f"select {kept} from {table} order by all").fetchall()
        return out


def _load_and_build(warehouse: DuckDBWarehouse, lake: Lake, hour: Any) -> None:
    """One hour as the DAG's load and dbt steps do it (`citypulse_batch.steps.load`, `.build`)."""
    interval = Interval.hour(hour)
    warehouse.load(interval, lake)
    built = run_dbt_build(find_project_dir(), "duckdb", interval, warehouse.dbt_env(), exclude="tag:daily")
    assert built.success, built.failures or built.error


@pytest.mark.timeout(900)  # a scheduler running two DAG runs task by task, one process each
def test_backfill_over_a_loaded_hour_equals_loading_each_hour_once(
    ministack: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = ministack_env(ministack)
    bucket = unique_name("lake-backfill")
    s3 = s3_client(env)
    _write_lake(s3, bucket)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lake = Lake(bucket, s3, S3Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    backfilled = DuckDBWarehouse(tmp_path / "backfilled.duckdb")
    _load_and_build(backfilled, lake, HOURS[1])  # hour 10 is loaded already
    reference = DuckDBWarehouse(tmp_path / "reference.duckdb")
    for hour in HOURS:  # the reference: each hour loaded and built once
        _load_and_build(reference, lake, hour)

    env |= {
        "CITYPULSE_LAKE_BUCKET": bucket,
        "CITYPULSE_GLUE_CRAWLER": unique_name("crawler-backfill"),
        "CITYPULSE_DUCKDB_PATH": str(backfilled.path),
    }
    backfill = run_backfill(HOURS[0], HOURS[1] + timedelta(hours=1), env, tmp_path / "airflow")
    assert backfill.succeeded, f"{backfill.run_states}; logs in {backfill.log_dir}"
    assert set(backfill.run_states) == set(HOURS)

    got, expected = _snapshot(backfilled), _snapshot(reference)
    assert got.keys() == expected.keys()
    for table, rows in expected.items():
        assert got[table] == rows, table
    assert len(expected["raw.readings"]) == 2 * 12 * 4
    assert len(expected["marts.fct_zone_traffic_15min"]) == 2 * 4 * 4
