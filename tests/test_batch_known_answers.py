"""Known answers: a hand-computed city-hour through `dbt build` gives the same marts on DuckDB and PostgreSQL.

Integration tests (DuckDB in a temp file; PostgreSQL at 127.0.0.1:5432 in a database made
and dropped here). The fixture (`batch_city.py`) is written straight into warehouse raw;
the hourly build (interval 10:00-11:00, tag:daily excluded) and the daily build (the whole
day, tag:daily) run as the DAGs run them. Every expected value below is worked out by hand
from the fixture's table, the arithmetic in the comments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from batch_city import HOUR, SENSORS, load_city_hour
from batch_lake import PG, postgres_database

from citypulse_batch.dbt_build import DbtSummary, build_args, find_project_dir, interval_env, run_dbt_build
from citypulse_batch.lake import Interval
from citypulse_batch.warehouse import DuckDBWarehouse, PostgresWarehouse, Warehouse

pytestmark = pytest.mark.integration

DAY = Interval(HOUR - timedelta(hours=10), HOUR + timedelta(hours=14))


def t(hh_mm: str) -> datetime:
    hours, minutes = hh_mm.split(":")
    return datetime(2026, 3, 2, int(hours), int(minutes))


def d(text: str) -> Decimal:
    return Decimal(text)


# zone, bucket_start: readings, vehicles, speed, occupancy, congestion, sensors, readings with a speed
ZONE_15MIN = {
    # 10:00 S-1 (10, 20, 40, .9) + S-2 (6, 30, 30, .7): 16 vehicles, speed (20+30)/2, occ (40+30)/2, ci 1.6/2
    ("Z-001", t("10:00")): (2, 16, d("25.000"), d("35.000"), d("0.8000"), 2, 2),
    # 10:15 S-1 (10, 40, 20, .5) + S-2 (8, 50, 10, .5)
    ("Z-001", t("10:15")): (2, 18, d("45.000"), d("15.000"), d("0.5000"), 2, 2),
    # 10:30 S-1 (10, 60, 5, .2) + S-2 at 10:44:59.999 (4, -, -, .4): speed/occ from S-1 only, ci .6/2
    ("Z-001", t("10:30")): (2, 14, d("60.000"), d("5.000"), d("0.3000"), 2, 1),
    # 10:45 S-1 at 10:45:00.000 exactly (10, 10, 50, .75)
    ("Z-001", t("10:45")): (1, 10, d("10.000"), d("50.000"), d("0.7500"), 1, 1),
    # 10:00 S-3 (3, 30, 5, .2) + S-4 (5, 70, 8, .2): speed 100/2, occ 13/2
    ("Z-002", t("10:00")): (2, 8, d("50.000"), d("6.500"), d("0.2000"), 2, 2),
    # 10:15 S-3 (4, 20, 12, .6)
    ("Z-002", t("10:15")): (1, 4, d("20.000"), d("12.000"), d("0.6000"), 1, 1),
    # 10:30 S-3 (6, 10, 25, .7) + S-4 (6, 44, 25, .7): speed 54/2
    ("Z-002", t("10:30")): (2, 12, d("27.000"), d("25.000"), d("0.7000"), 2, 2),
    # 10:45 S-4 (2, 55, 15, .45)
    ("Z-002", t("10:45")): (1, 2, d("55.000"), d("15.000"), d("0.4500"), 1, 1),
}

ZONE_HOURLY = {
    # Z-001: 7 readings; vehicles 16+18+14+10 = 58; speed (20+30+40+50+60+10)/6 = 210/6 = 35;
    # occ (40+30+20+10+5+50)/6 = 155/6 = 25.8333; ci (.9+.7+.5+.5+.2+.4+.75)/7 = 3.95/7 = 0.56428
    ("Z-001", t("10:00")): (7, 58, d("35.000"), d("25.833"), d("0.5643"), 2, 6),
    # Z-002: 6 readings; vehicles 8+4+12+2 = 26; speed (30+70+20+10+44+55)/6 = 229/6 = 38.1667;
    # occ (5+8+12+25+25+15)/6 = 90/6 = 15; ci (.2+.2+.6+.7+.7+.45)/6 = 2.85/6 = 0.475
    ("Z-002", t("10:00")): (6, 26, d("38.167"), d("15.000"), d("0.4750"), 2, 6),
}

SENSOR_HOURLY = {
    # sensor: readings, vehicles, speed, occupancy, congestion, readings with a speed
    # S-1: vehicles 4 x 10; speed (20+40+60+10)/4 = 32.5; occ (40+20+5+50)/4 = 28.75; ci 2.35/4 = 0.5875
    "S-1": (4, 40, d("32.500"), d("28.750"), d("0.5875"), 4),
    # S-2: 6+8+4 = 18; speed (30+50)/2 (one count-only reading); occ (30+10)/2; ci 1.6/3 = 0.53333
    "S-2": (3, 18, d("40.000"), d("20.000"), d("0.5333"), 2),
    # S-3: 3+4+6 = 13; speed (30+20+10)/3 = 20; occ (5+12+25)/3 = 14; ci 1.5/3 = 0.5
    "S-3": (3, 13, d("20.000"), d("14.000"), d("0.5000"), 3),
    # S-4: 5+6+2 = 13; speed (70+44+55)/3 = 169/3 = 56.333; occ (8+25+15)/3 = 16; ci 1.35/3 = 0.45
    "S-4": (3, 13, d("56.333"), d("16.000"), d("0.4500"), 3),
}

# Hysteresis on the zone 15-minute ci: Z-001 .8 raises at 10:00, .5 holds, .3 clears at 10:30,
# .75 raises at 10:45 with no later bucket (ongoing). Z-002 .2 clear, .6 holds clear,
# .7 raises at 10:30, .45 holds to the end (ongoing).
EPISODES = {
    # zone, start: end, minutes, peak, buckets, ongoing
    ("Z-001", t("10:00")): (t("10:30"), 30, d("0.8000"), 2, False),
    ("Z-001", t("10:45")): (t("11:00"), 15, d("0.7500"), 1, True),
    ("Z-002", t("10:30")): (t("11:00"), 30, d("0.7000"), 2, True),
}

MARCH_2 = date(2026, 3, 2)
HEALTH = {
    # sensor: readings, expected 1440, active minutes, uptime = 100 x minutes / 1440,
    #         completeness = 100 x readings / 1440, longest repeated non-zero count, stuck (>= 10)
    # S-1: 4 readings in 4 minutes, 100 x 4/1440 = 0.2778; counts 10,10,10,10 -> run 4 < 10
    "S-1": (4, 1440, 4, d("0.278"), d("0.278"), 4, False),
    # S-2, S-3, S-4: 3 readings in 3 minutes, 100 x 3/1440 = 0.2083; counts all differ -> run 1
    "S-2": (3, 1440, 3, d("0.208"), d("0.208"), 1, False),
    "S-3": (3, 1440, 3, d("0.208"), d("0.208"), 1, False),
    "S-4": (3, 1440, 3, d("0.208"), d("0.208"), 1, False),
    # S-5 is registered but silent: a row of zeros
    "S-5": (0, 1440, 0, d("0.000"), d("0.000"), 0, False),
}

CORRIDORS = {
    # road: congestion rank, speed rank, sensors, readings, vehicles, speed, occupancy, congestion,
    #       readings with a speed
    # Oak Street = S-1 + S-2 + S-4: 10 readings from 3 sensors, 40+18+13 = 71 vehicles;
    # speed (20+40+60+10 + 30+50 + 70+44+55)/9 = 379/9 = 42.111; occ (115 + 40 + 48)/9 = 203/9 = 22.556;
    # ci (2.35 + 1.6 + 1.35)/10 = 0.53 -> most congested (1), but faster than Elm (2)
    "Oak Street": (1, 2, 3, 10, 71, d("42.111"), d("22.556"), d("0.5300"), 9),
    # Elm Avenue = S-3 (S-5 silent): 3 readings, 13 vehicles, speed 20, occ 14, ci 0.5
    "Elm Avenue": (2, 1, 1, 3, 13, d("20.000"), d("14.000"), d("0.5000"), 3),
}

PEAK_PROFILES = {
    # 2026-03-02 is a Monday: day_of_week 1; one hour observed, which is the peak hour
    ("Z-001", 1, 10): (1, d("58.000"), d("35.000"), d("0.5643"), True),
    ("Z-002", 1, 10): (1, d("26.000"), d("38.167"), d("0.4750"), True),
}

ZONES = {"Z-001": (2, 1), "Z-002": (3, 2)}  # current sensors, distinct roads


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    with postgres_database("citypulse_known") as name:
        yield name


def _build(warehouse: Warehouse) -> list[DbtSummary]:
    project = find_project_dir()
    hourly = run_dbt_build(project, warehouse.dbt_target, Interval.hour(HOUR), warehouse.dbt_env(), exclude="tag:daily")
    daily = run_dbt_build(project, warehouse.dbt_target, DAY, warehouse.dbt_env(), select="tag:daily")
    return [hourly, daily]


def _rows(warehouse: Warehouse, table: str) -> list[tuple[Any, ...]]:
    with warehouse.transaction() as cur:
        cur.execute(f"select * from marts.{table} order by 1, 2, 3")
        return [tuple(row) for row in cur.fetchall()]


def _by_key(rows: list[tuple[Any, ...]], width: int) -> dict[Any, tuple[Any, ...]]:
    out = {}
    for row in rows:
        key = row[:width] if width > 1 else row[0]
        assert key not in out, key
        out[key] = row[width:]
    return out


@pytest.fixture(scope="module", params=["duckdb", "postgres"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    if request.param == "duckdb":
        warehouse: Warehouse = DuckDBWarehouse(tmp_path_factory.mktemp("known") / "warehouse.duckdb")
        placeholder = "?"
    else:
        warehouse = PostgresWarehouse(dbname=request.getfixturevalue("postgres_db"), **PG)
        placeholder = "%s"
    load_city_hour(warehouse, placeholder)
    for summary in _build(warehouse):
        assert summary.success, summary.failures or summary.error
        assert summary.tests_failed == 0 and summary.tests_passed > 0
    return warehouse


def test_traffic_marts_hold_the_hand_computed_15_minute_and_hourly_values(built: Warehouse) -> None:
    zone_15 = {
        (z, start): (n, int(v), *rest)
        for z, start, end, n, v, *rest in _rows(built, "fct_zone_traffic_15min")
        if end - start == timedelta(minutes=15)
    }
    assert zone_15 == ZONE_15MIN
    zone_hourly = {
        (z, start): (n, int(v), *rest) for z, start, _end, n, v, *rest in _rows(built, "fct_zone_traffic_hourly")
    }
    assert zone_hourly == ZONE_HOURLY
    sensor_hourly = {
        s: (n, int(v), *rest)
        for s, start, _end, _zone, n, v, *rest in _rows(built, "fct_sensor_traffic_hourly")
        if start == t("10:00")
    }
    assert sensor_hourly == SENSOR_HOURLY
    # Per sensor and quarter, summed back to the zone quarters: the same totals.
    per_zone: dict[tuple[str, datetime], int] = {}
    for _sensor, start, _end, zone, n, *_ in _rows(built, "fct_sensor_traffic_15min"):
        per_zone[(zone, start)] = per_zone.get((zone, start), 0) + n
    assert per_zone == {key: value[0] for key, value in ZONE_15MIN.items()}


def test_congestion_episodes_follow_the_hysteresis(built: Warehouse) -> None:
    episodes = {
        (z, start): (end, int(minutes), peak, int(buckets), bool(ongoing))
        for z, start, end, minutes, peak, buckets, ongoing in _rows(built, "fct_congestion_episodes")
    }
    assert episodes == EPISODES


def test_sensor_health_counts_every_registered_sensor_for_the_day(built: Warehouse) -> None:
    health = {}
    for sensor, day, _zone, readings, expected, minutes, uptime, complete, run, stuck in _rows(
        built, "fct_sensor_health_daily"
    ):
        assert day == MARCH_2
        health[sensor] = (int(readings), int(expected), int(minutes), uptime, complete, int(run), bool(stuck))
    assert health == HEALTH


def test_corridors_peak_profiles_and_dimensions(built: Warehouse) -> None:
    corridors = {
        road: (int(c_rank), int(s_rank), int(sensors), int(n), int(v), *rest)
        for road, day, c_rank, s_rank, sensors, n, v, *rest in _rows(built, "fct_corridor_rankings")
        if day == MARCH_2
    }
    assert corridors == CORRIDORS
    profiles = {
        (z, int(dow), int(hour)): (int(n), *rest, bool(peak))
        for z, dow, hour, n, *rest, peak in _rows(built, "fct_zone_peak_profiles")
    }
    assert profiles == PEAK_PROFILES
    zones = {z: (int(sensors), int(roads)) for z, *_, sensors, roads in _rows(built, "dim_zones")}
    assert zones == ZONES
    current = [row for row in _rows(built, "dim_sensors") if row[-1]]
    assert sorted(row[1] for row in current) == [s[0] for s in SENSORS]


def test_a_day_rebuilt_after_a_sensor_was_retired_keeps_its_readings_in_the_corridors(tmp_path: Path) -> None:
    """Found by a review: the rankings joined the registry's current versions only, so a day
    built again (an hour of it loaded again as late) lost the readings of a sensor retired since:
    Oak Street fell from 3 sensors, 10 readings, 71 vehicles to 2, 7, 58."""
    warehouse = DuckDBWarehouse(tmp_path / "retired.duckdb")
    load_city_hour(warehouse, "?")
    for summary in _build(warehouse):
        assert summary.success, summary.failures or summary.error
    with warehouse.transaction() as cur:
        cur.execute("delete from raw.sensor_registry where sensor_id = 'S-4'")
    for summary in _build(warehouse):  # the snapshot closes S-4; the day is built again
        assert summary.success, summary.failures or summary.error
    corridors = {row[0]: row[4:7] for row in _rows(warehouse, "fct_corridor_rankings") if row[1] == MARCH_2}
    assert tuple(int(x) for x in corridors["Oak Street"]) == CORRIDORS["Oak Street"][2:5] == (3, 10, 71)


def test_the_marts_reconcile_with_raw_and_the_zone_spine_is_whole(built: Warehouse) -> None:
    from citypulse_batch.steps import reconciliation

    result = reconciliation(built, Interval.hour(HOUR))
    assert result.success, result.failures
    # 4 traffic marts x (2 per-bucket equalities + 2 interval totals) + 2 zone spines
    assert result.evaluated == result.passed == 18
    # Rows compared: sensor x quarter 4+3+3+3, sensor x hour 4, zone x quarter 2 x 4, zone x hour 2.
    assert result.rows == 13 + 4 + 8 + 2


def test_rebuilding_the_hour_and_the_day_changes_no_mart(built: Warehouse) -> None:
    # On every engine: the real DAG's rerun (test_hourly_dag_run.py) rebuilds the hour only.
    tables = [
        "fct_zone_traffic_15min",
        "fct_sensor_traffic_15min",
        "fct_zone_traffic_hourly",
        "fct_sensor_traffic_hourly",
        "fct_congestion_episodes",
        "fct_sensor_health_daily",
        "fct_corridor_rankings",
        "fct_zone_peak_profiles",
        "dim_zones",
        "dim_sensors",
    ]
    before = {table: _rows(built, table) for table in tables}
    for summary in _build(built):
        assert summary.success, summary.failures or summary.error
    assert {table: _rows(built, table) for table in tables} == before


def test_a_moved_sensor_gets_a_new_current_version_and_keeps_its_history(tmp_path: Path) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "scd2.duckdb")
    load_city_hour(warehouse, "?")
    project = find_project_dir()
    # The registry's side only (the traffic marts' relationship test would need them built).
    select, exclude = "source:registry+", "tag:daily test_name:relationships"
    first = run_dbt_build(project, "duckdb", None, warehouse.dbt_env(), select=select, exclude=exclude)
    assert first.success, first.failures or first.error
    with warehouse.transaction() as cur:
        cur.execute("update raw.sensor_registry set zone_id = 'Z-001' where sensor_id = 'S-5'")
    second = run_dbt_build(project, "duckdb", None, warehouse.dbt_env(), select=select, exclude=exclude)
    assert second.success, second.failures or second.error

    with warehouse.transaction() as cur:
        cur.execute(
            "select zone_id, valid_to is null, is_current from marts.dim_sensors "
            "where sensor_id = 'S-5' order by valid_from"
        )
        versions = cur.fetchall()
        cur.execute("select zone_id, sensor_count from marts.dim_zones order by zone_id")
        zones = cur.fetchall()
    assert [tuple(v) for v in versions] == [("Z-002", False, False), ("Z-001", True, True)]
    assert [tuple(z) for z in zones] == [("Z-001", 3), ("Z-002", 2)]


def test_a_sensor_moved_to_another_zone_within_the_hour_builds_and_reconciles(tmp_path: Path) -> None:
    """Found by a review: the processor stamps each reading with the zone the registry gave it
    then, so a sensor moved within an hour has readings of two zones in one bucket; the sensor
    marts' grain was (sensor, bucket), their unique test failed, and so did every build of the
    hour (a failed test is a verdict: no retry)."""
    from citypulse_batch.steps import reconciliation

    warehouse = DuckDBWarehouse(tmp_path / "moved.duckdb")
    load_city_hour(warehouse, "?")
    with warehouse.transaction() as cur:
        # S-3 (Z-002) reads at 10:01; moved to Z-001, it reads there at 10:05: one bucket, two zones.
        cur.execute(
            "insert into raw.readings select * replace (timestamp '2026-03-02 10:05:00' as ts, seq + 1000 as seq, "
            "'Z-001' as zone_id) from raw.readings where sensor_id = 'S-3' and ts < timestamp '2026-03-02 10:02:00'"
        )
    summary = run_dbt_build(find_project_dir(), "duckdb", Interval.hour(HOUR), warehouse.dbt_env(), exclude="tag:daily")
    assert summary.success, summary.failures or summary.error
    with warehouse.transaction() as cur:
        cur.execute(
            "select zone_id, reading_count from marts.fct_sensor_traffic_15min "
            "where sensor_id = 'S-3' and bucket_start = timestamp '2026-03-02 10:00:00' order by 1"
        )
        bucket = [tuple(row) for row in cur.fetchall()]
        cur.execute(
            "select zone_id, reading_count from marts.fct_sensor_traffic_hourly where sensor_id = 'S-3' order by 1"
        )
        hour = [tuple(row) for row in cur.fetchall()]
    assert bucket == [("Z-001", 1), ("Z-002", 1)]
    assert hour == [("Z-001", 1), ("Z-002", 3)]
    assert reconciliation(warehouse, Interval.hour(HOUR)).success


@pytest.mark.parametrize("engine", ["duckdb", "postgres"])
def test_the_snapshots_valid_times_are_utc_whatever_the_machines_zone(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: `valid_from` was `now()` in the session's zone, the machine's: in
    Tokyo, 9 hours ahead of every other time in the warehouse."""
    from datetime import UTC

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    with contextlib.ExitStack() as stack:
        if engine == "duckdb":
            warehouse: Warehouse = DuckDBWarehouse(tmp_path / "tz.duckdb")
            load_city_hour(warehouse, "?")
        else:  # a database of its own: the module's has its snapshot built already
            warehouse = PostgresWarehouse(dbname=stack.enter_context(postgres_database("citypulse_tz")), **PG)
            load_city_hour(warehouse, "%s")
        before = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        select, exclude = "source:registry+", "tag:daily test_name:relationships"
        summary = run_dbt_build(find_project_dir(), engine, None, warehouse.dbt_env(), select=select, exclude=exclude)
        assert summary.success, summary.failures or summary.error
        after = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=1)
        with warehouse.transaction() as cur:
            cur.execute("select min(valid_from), max(valid_from) from marts.dim_sensors")
            first, last = cur.fetchone()
    assert before - timedelta(seconds=1) <= first <= last <= after, (first, last, before, after)


def _unique_failures(summary: DbtSummary) -> list[str]:
    return [f for f in summary.failures if "unique_combination_of_columns_stg_lake__readings" in f]


def test_an_hourly_build_tests_its_interval_and_a_build_without_one_tests_everything(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A duplicate in an earlier hour fails only the unscoped build; one inside the hour fails the hour's.

    The builds share a parse cache, as a DAG's builds on one worker do: after the first, dbt
    reuses its parsed project, so an interval baked in at parse time would show here.
    """
    warehouse = DuckDBWarehouse(tmp_path / "scoped.duckdb")
    load_city_hour(warehouse, "?")
    project = find_project_dir()
    select, exclude = "source:lake+ source:registry+", "tag:daily"
    parses: list[str] = []

    def build(interval: Interval | None) -> DbtSummary:
        capfd.readouterr()
        summary = run_dbt_build(
            project,
            "duckdb",
            interval,
            warehouse.dbt_env(),
            select=select,
            exclude=exclude,
            parse_cache=tmp_path / "parse-cache",
        )
        parses.append("full" if "Unable to do partial parsing" in capfd.readouterr().out else "partial")
        return summary

    def duplicate_first_reading(shift: timedelta) -> None:
        with warehouse.transaction() as cur:
            cur.execute("create or replace temporary table twin as select * from raw.readings order by seq limit 1")
            cur.execute(f"update twin set ts = ts + interval '{int(shift.total_seconds())} seconds'")
            cur.execute("insert into raw.readings select * from twin")

    duplicate_first_reading(-timedelta(hours=2))  # the copy lies in 08:00-09:00, outside the interval
    hourly = build(Interval.hour(HOUR))
    assert hourly.success, hourly.failures or hourly.error
    everything = build(None)
    assert not everything.success and _unique_failures(everything), everything.failures

    duplicate_first_reading(timedelta(minutes=1))  # a second copy inside 10:00-11:00
    hourly = build(Interval.hour(HOUR))
    assert not hourly.success and _unique_failures(hourly), hourly.failures
    assert parses == ["full", "partial", "partial"]


def test_the_interval_reaches_dbt_from_the_environment_and_from_vars_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAGs pass the interval in the environment (`interval_env`); by hand `--vars` still
    work and win; with neither, a build covers everything."""
    from dbt.cli.main import dbtRunner

    monkeypatch.setenv("CITYPULSE_DUCKDB_PATH", str(tmp_path / "inline.duckdb"))
    base = build_args(find_project_dir(), "duckdb", "", tmp_path, command="compile")
    base += ["--quiet", "--inline", "select {{ interval_window('ts', 60) }}"]

    def window(*extra: str) -> str:
        result = dbtRunner().invoke([*base, *extra])
        assert result.success, result.exception
        return " ".join(result.result.results[0].node.compiled_code.split())

    for name, value in interval_env(None).items():
        monkeypatch.setenv(name, value)
    assert window() == "select 1 = 1"
    for name, value in interval_env(Interval.hour(HOUR)).items():
        monkeypatch.setenv(name, value)
    bounds = "select ts >= cast('{}' as timestamp) and ts < cast('{}' as timestamp)"
    assert window() == bounds.format("2026-03-02 10:00:00", "2026-03-02 11:00:00")
    by_hand = '{"interval_start": "2026-03-02 08:00:00", "interval_end": "2026-03-02 09:00:00"}'
    assert window("--vars", by_hand) == bounds.format("2026-03-02 08:00:00", "2026-03-02 09:00:00")
    # Bounds with a zone are brought to UTC (found by a review: they failed to compile).
    aware = '{"interval_start": "2026-03-02T10:00:00+02:00", "interval_end": "2026-03-02T09:00:00Z"}'
    assert window("--vars", aware) == bounds.format("2026-03-02 08:00:00", "2026-03-02 09:00:00")


def test_an_interval_scoped_not_null_test_still_sees_null_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scope keeps rows whose time column is null: the window alone dropped them, and a
    `not_null` test of that column could never fail in an hourly build (found by a review).
    The compiled test runs against a relation holding one null time, one inside and one
    outside the interval."""
    import duckdb
    from dbt.cli.main import dbtRunner

    path = tmp_path / "scope.duckdb"
    monkeypatch.setenv("CITYPULSE_DUCKDB_PATH", str(path))
    for name, value in interval_env(Interval.hour(HOUR)).items():
        monkeypatch.setenv(name, value)
    args = build_args(find_project_dir(), "duckdb", "", tmp_path, command="compile")
    result = dbtRunner().invoke([*args, "--quiet", "--select", "not_null_stg_lake__readings_measured_at"])
    assert result.success, result.exception
    (compiled,) = [r.node.compiled_code for r in result.result.results]

    con = duckdb.connect(str(path))
    try:
        con.execute("create schema staging")
        con.execute(
            "create table staging.stg_lake__readings as select * from (values "
            "(timestamp '2026-03-02 10:30:00'), (timestamp '2026-03-02 08:30:00'), (null)) t(measured_at)"
        )
        failures = con.execute(f"select count(*) from ({compiled}) t").fetchone()[0]
    finally:
        con.close()
    assert failures == 1


def test_marts_built_before_a_new_column_take_it_in_place(tmp_path: Path) -> None:
    """A warehouse whose marts predate `speed_reading_count` (built by an earlier release) keeps
    its history: the next build appends the column (null on the hours built before) instead of
    failing every run until someone rebuilds the marts from raw, and the peak profiles weigh
    those hours' speeds as they did then."""
    warehouse = DuckDBWarehouse(tmp_path / "upgraded.duckdb")
    load_city_hour(warehouse, "?")
    for summary in _build(warehouse):
        assert summary.success, summary.failures or summary.error
    added = [
        "fct_zone_traffic_15min",
        "fct_sensor_traffic_15min",
        "fct_zone_traffic_hourly",
        "fct_sensor_traffic_hourly",
        "fct_corridor_rankings",
    ]
    with warehouse.transaction() as cur:
        for table in added:
            cur.execute(f"alter table marts.{table} drop column speed_reading_count")
    project = find_project_dir()
    next_hour = Interval.hour(HOUR + timedelta(hours=1))
    later = run_dbt_build(project, warehouse.dbt_target, next_hour, warehouse.dbt_env(), exclude="tag:daily")
    assert later.success, later.failures or later.error
    daily = run_dbt_build(project, warehouse.dbt_target, DAY, warehouse.dbt_env(), select="tag:daily")
    assert daily.success, daily.failures or daily.error
    zone_hourly = _rows(warehouse, "fct_zone_traffic_hourly")
    assert [(row[0], row[3], row[-1]) for row in zone_hourly] == [("Z-001", 7, None), ("Z-002", 6, None)]
    # The daily build rebuilt the day's rankings with the column; profiles read the old hours.
    assert {row[0]: row[-1] for row in _rows(warehouse, "fct_corridor_rankings")} == {"Oak Street": 9, "Elm Avenue": 3}
    profiles = {
        (z, int(dow), int(hour)): (int(n), *rest, bool(peak))
        for z, dow, hour, n, *rest, peak in _rows(warehouse, "fct_zone_peak_profiles")
    }
    assert profiles == PEAK_PROFILES
    # Rebuilding the old hour fills it in.
    again = run_dbt_build(project, warehouse.dbt_target, Interval.hour(HOUR), warehouse.dbt_env(), exclude="tag:daily")
    assert again.success, again.failures or again.error
    zone_hourly = _rows(warehouse, "fct_zone_traffic_hourly")
    assert {row[0]: row[1:] for row in zone_hourly} == {
        z: (start, start + timedelta(hours=1), *values) for (z, start), values in ZONE_HOURLY.items()
    }
