"""Loading one lake interval into the warehouse: exact, deduplicated, idempotent; then dbt on top.

Integration tests against ministack's S3 (started by the shared fixture) with a hand-made
fixture lake, on DuckDB (httpfs straight from S3, as Redshift COPYs) and on the local
PostgreSQL server (in a database created and dropped here).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from batch_lake import (
    PG,
    FixtureLake,
    assert_zone_mart,
    ministack_env,
    postgres_database,
    s3_client,
    unique_name,
    write_fixture_lake,
)

from citypulse_batch import warehouse as warehouse_module
from citypulse_batch.dbt_build import find_project_dir, run_dbt_build
from citypulse_batch.lake import Interval, Lake, S3Credentials
from citypulse_batch.warehouse import (
    RAW_TABLES,
    DuckDBWarehouse,
    PostgresWarehouse,
    Warehouse,
    readings_arrow_schema,
    warehouse_from_connection,
)
from infra.local.emulators import Emulator

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_env(ministack: Emulator) -> Iterator[dict[str, str]]:
    env = ministack_env(ministack)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def fixture_lake(s3_env: dict[str, str]) -> FixtureLake:
    return write_fixture_lake(s3_client(s3_env), unique_name("lake-load"))


@pytest.fixture(scope="module")
def lake(fixture_lake: FixtureLake, s3_env: dict[str, str]) -> Lake:
    session = boto3.Session()
    frozen = session.get_credentials().get_frozen_credentials()
    return Lake(
        fixture_lake.bucket, session.client("s3"), S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)
    )


@pytest.fixture(scope="module")
def interval(fixture_lake: FixtureLake) -> Interval:
    return Interval(fixture_lake.start, fixture_lake.end)


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    with postgres_database("citypulse_batch_test") as name:
        yield name


def _snapshot(warehouse: Warehouse, tables: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with warehouse.transaction() as cur:
        for table in tables:
            cur.execute(f"select * from {table} order by 1, 2, 3")
            out[table] = [tuple(row) for row in cur.fetchall()]
    return out


RAW = [f"raw.{t}" for t in RAW_TABLES]


def _assert_interval_loaded(warehouse: Warehouse, fixture_lake: FixtureLake, interval: Interval, summary: Any) -> None:
    rows = {tuple(r.values()) for r in warehouse.read_readings(interval).to_pylist()}
    assert rows == fixture_lake.expected_rows()
    assert summary.rows_loaded == len(rows) == 60
    assert (summary.reading_files, summary.rows_in_files) == (2, 62)
    assert (summary.duplicates_dropped, summary.rows_outside_interval) == (1, 1)
    assert (
        summary.quarantined_by_reason == fixture_lake.expected_quarantine() == {"out_of_range": 2, "bad_timestamp": 1}
    )
    assert (summary.sensors, summary.zones) == (12, 4)


def test_duckdb_load_holds_exactly_the_intervals_distinct_rows_and_reruns_identically(
    tmp_path: Path, fixture_lake: FixtureLake, lake: Lake, interval: Interval
) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    first = warehouse.load(interval, lake)
    _assert_interval_loaded(warehouse, fixture_lake, interval, first)
    before = _snapshot(warehouse, RAW)

    second = warehouse.load(interval, lake)

    assert second == first
    assert _snapshot(warehouse, RAW) == before


def test_duckdb_hands_the_checkpoint_the_interval_in_key_order_without_sorting_it(
    tmp_path: Path, fixture_lake: FixtureLake, lake: Lake, interval: Interval
) -> None:
    """DuckDB keeps an interval's readings in the checkpoint's order (`stores_in_read_order`):
    the load inserts them sorted on the key and the read takes them as stored, so GX quotes the
    same failure examples on every run."""
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    warehouse.load(interval, lake)

    assert "order by" not in warehouse.readings_query(interval)
    keys = [(r["sensor_id"], r["seq"]) for r in warehouse.read_readings(interval).to_pylist()]
    assert len(keys) == 60 and keys == sorted(keys)


def test_loading_the_next_hour_leaves_this_hour_untouched(
    tmp_path: Path, fixture_lake: FixtureLake, lake: Lake, interval: Interval
) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    warehouse.load(interval, lake)
    this_hour = warehouse.read_readings(interval).to_pylist()

    next_hour = Interval(interval.end, interval.end + timedelta(hours=1))
    summary = warehouse.load(next_hour, lake)

    assert summary.rows_loaded == 1 and summary.quarantined == 1
    assert warehouse.read_readings(interval).to_pylist() == this_hour


def test_warehouse_adapter_is_chosen_by_the_connection_type(tmp_path: Path) -> None:
    from airflow.sdk import Connection

    duck = warehouse_from_connection(Connection.from_uri(f"duckdb://{tmp_path}/w.duckdb", conn_id="w"))
    assert isinstance(duck, DuckDBWarehouse) and duck.path == tmp_path / "w.duckdb"
    assert duck.dbt_env() == {"CITYPULSE_DUCKDB_PATH": str(tmp_path / "w.duckdb")}
    pg = warehouse_from_connection(Connection.from_uri("postgres://postgres@127.0.0.1:5432/test", conn_id="w"))
    assert isinstance(pg, PostgresWarehouse) and pg.dbt_target == "postgres"
    assert pg.dbt_env()["CITYPULSE_PG_DBNAME"] == "test"
    # Redshift (the dbt side of it: test_batch_redshift_profile.py)
    assert warehouse_from_connection(Connection.from_uri("redshift://wg.example:5439/dev", conn_id="w")).engine == (
        "redshift"
    )
    with pytest.raises(ValueError, match="needs one of"):
        warehouse_from_connection(Connection.from_uri("mysql://u@h/db", conn_id="w"))


def _mart_rows(warehouse: Warehouse) -> list[tuple[Any, ...]]:
    with warehouse.transaction() as cur:
        cur.execute("select * from marts.fct_zone_traffic_15min")
        return [tuple(row) for row in cur.fetchall()]


def _assert_both_reads_agree(warehouse: PostgresWarehouse, interval: Interval, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL reads `raw.readings` through COPY and Arrow's CSV reader; the cursor's way
    (`Warehouse.read_readings`, Redshift's) must give the same table, fetched in several
    batches here: the nulls, the timestamps and the order alike."""
    by_copy = warehouse.read_readings(interval)
    monkeypatch.setattr(warehouse_module, "READ_BATCH_ROWS", 7)
    by_cursor = Warehouse.read_readings(warehouse, interval)
    assert by_copy.schema == by_cursor.schema == readings_arrow_schema()
    assert by_cursor.equals(by_copy) and by_copy.column("avg_speed_kmh").null_count == 1


def test_postgres_load_and_dbt_build_give_the_same_warehouse_and_reruns_change_nothing(
    postgres_db: str, fixture_lake: FixtureLake, lake: Lake, interval: Interval, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DuckDB gets the same treatment end to end in test_hourly_dag_run.py (the real DAG).
    warehouse = PostgresWarehouse(dbname=postgres_db, **PG)
    summary = warehouse.load(interval, lake)
    _assert_interval_loaded(warehouse, fixture_lake, interval, summary)
    _assert_both_reads_agree(warehouse, interval, monkeypatch)

    build = {"exclude": "tag:daily"}  # as the hourly DAG builds (settings: dbt_exclude)
    first = run_dbt_build(find_project_dir(), warehouse.dbt_target, interval, warehouse.dbt_env(), **build)
    assert first.success, first.failures or first.error
    assert (first.models_passed, first.models_failed, first.tests_failed) == (13, 0, 0)
    assert first.tests_passed >= 15
    assert_zone_mart(_mart_rows(warehouse), fixture_lake)
    tables = [*RAW, "marts.fct_zone_traffic_15min", "marts.dim_sensors"]
    before = _snapshot(warehouse, tables)
    assert len(before["marts.dim_sensors"]) == 12

    warehouse.load(interval, lake)
    again = run_dbt_build(find_project_dir(), warehouse.dbt_target, interval, warehouse.dbt_env(), **build)

    assert again.success, again.failures or again.error
    assert _snapshot(warehouse, tables) == before


class _CrashBefore:
    """A cursor that dies on the first statement starting with `prefix`, as a killed task would there."""

    def __init__(self, cursor: Any, prefix: str) -> None:
        self._cursor = cursor
        self._prefix = prefix

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith(self._prefix):
            raise RuntimeError(f"injected crash before: {sql.splitlines()[0]}")
        return self._cursor.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def _crashing(warehouse: Warehouse, prefix: str) -> Warehouse:
    """The same warehouse, whose transactions crash at `prefix` (the fault sits at the DB-API boundary)."""
    real = warehouse.transaction

    @contextmanager
    def transaction() -> Iterator[Any]:
        with real() as cur:
            yield _CrashBefore(cur, prefix)

    crashing = copy.copy(warehouse)
    crashing.transaction = transaction  # type: ignore[method-assign]
    return crashing


@pytest.mark.parametrize("engine", ["duckdb", "postgres"])
def test_a_load_that_dies_between_delete_and_insert_leaves_the_last_complete_load(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path, lake: Lake, interval: Interval
) -> None:
    if engine == "duckdb":
        warehouse: Warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
        placeholder = "?"
    else:
        warehouse = PostgresWarehouse(dbname=request.getfixturevalue("postgres_db"), **PG)
        placeholder = "%s"
    warehouse.load(interval, lake)
    clean = _snapshot(warehouse, RAW)
    # A row of the interval that is not in the lake: the next load's delete removes it, so
    # it is still there only if that delete died with its transaction.
    stray = dict(warehouse.read_readings(interval).to_pylist()[0], seq=999_999)
    with warehouse.transaction() as cur:
        cur.execute(
            f"insert into raw.readings ({', '.join(stray)}) values ({', '.join([placeholder] * len(stray))})",
            list(stray.values()),
        )
    before = _snapshot(warehouse, RAW)
    assert before != clean

    with pytest.raises(RuntimeError, match=r"injected crash before: insert into raw\.readings"):
        _crashing(warehouse, "insert into raw.readings").load(interval, lake)

    assert _snapshot(warehouse, RAW) == before
    warehouse.load(interval, lake)  # the retry
    assert _snapshot(warehouse, RAW) == clean


def test_two_loads_of_one_hour_at_once_leave_each_reading_once(
    postgres_db: str, lake: Lake, interval: Interval
) -> None:
    """Runs overlap (a backfill's beside the scheduled one, a later hour's look back): found by
    a review, the second load's delete missed the first's uncommitted rows, and the hour held
    every reading twice. The first load here stops before its commit until the second is seen
    waiting for it (or has finished: the defect)."""
    import threading

    import psycopg2

    statements_done, release = threading.Event(), threading.Event()

    class StopsBeforeCommit(PostgresWarehouse):
        @contextmanager
        def transaction(self) -> Iterator[Any]:
            with super().transaction() as cur:
                yield cur
                statements_done.set()
                assert release.wait(60)

    PostgresWarehouse(dbname=postgres_db, **PG).load(interval, lake)  # the hour as a first run left it
    errors: list[BaseException] = []

    def load(warehouse: Warehouse) -> None:
        try:
            warehouse.load(interval, lake)
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=load, args=(StopsBeforeCommit(dbname=postgres_db, **PG),))
    first.start()
    assert statements_done.wait(60)
    second = threading.Thread(target=load, args=(PostgresWarehouse(dbname=postgres_db, **PG),))
    second.start()
    deadline = time.monotonic() + 60

    def second_waits() -> bool:
        with psycopg2.connect(dbname=postgres_db, **PG) as con, con.cursor() as cur:
            cur.execute(
                "select count(*) from pg_stat_activity where datname = %s and wait_event_type = 'Lock'", (postgres_db,)
            )
            return cur.fetchone()[0] > 0

    while second.is_alive() and not second_waits():
        assert time.monotonic() < deadline, "the second load neither waited nor finished"
        time.sleep(0.05)  # polling another connection's state
    release.set()
    first.join(60)
    second.join(60)
    assert errors == []
    with psycopg2.connect(dbname=postgres_db, **PG) as con, con.cursor() as cur:
        cur.execute("select count(*), count(distinct (sensor_id, seq)) from raw.readings")
        rows, distinct = cur.fetchone()
    assert rows == distinct > 0


def test_redshift_copies_an_hours_files_in_one_command_from_a_manifest(lake: Lake, interval: Interval) -> None:
    """One COPY per lake object ran an hour's ~14,000 processor files one after another, which
    Redshift serialises (found by a review). The load now COPYs exactly the listed files in one
    command from a manifest (Parquet manifests must give each file's size), deleted after."""
    from citypulse_batch.lake import LOAD_MANIFESTS_PREFIX, list_partitions, readings_prefixes
    from citypulse_batch.warehouse import READINGS_COLUMNS, RedshiftWarehouse

    listing = list_partitions(lake, interval)
    keys = [k for p in readings_prefixes(interval) for k in listing[p]]
    assert len(keys) >= 2
    statements: list[str] = []
    manifests: dict[str, Any] = {}

    class Cursor:
        def execute(self, sql: str) -> None:  # Redshift reads the manifest while the COPY runs
            statements.append(sql)
            uri = sql.split("'")[1]
            key = uri.removeprefix(f"s3://{lake.bucket}/")
            manifests[key] = lake.read_json(key)

    RedshiftWarehouse("citypulse_warehouse", None, {})._stage_parquet(
        Cursor(), "stage_readings", lake, keys, READINGS_COLUMNS
    )
    assert len(statements) == 1 and statements[0].endswith("iam_role default format as parquet manifest")
    ((key, manifest),) = manifests.items()
    assert key.startswith(LOAD_MANIFESTS_PREFIX + "dt=") and "/hour=" in key
    sizes = {k: size for p in readings_prefixes(interval) for k, size in lake.list_objects(p)}
    assert manifest == {
        "entries": [{"url": lake.uri(k), "mandatory": True, "meta": {"content_length": sizes[k]}} for k in keys]
    }
    assert lake.read_json(key) is None  # deleted once the COPY has read it
