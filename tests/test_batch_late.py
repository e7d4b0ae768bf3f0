"""Late lake objects: the load ledger, the compaction that leaves them, the run that loads them again.

Integration tests against ministack's S3 and a DuckDB warehouse with the batch fixture lake
(hour 10:00 loaded, its neighbours never): an object that reaches a loaded hour afterwards is
found by the next run (`ledger.late_hours`), left out of the hour's compaction until then, and
loaded with its hour again by `steps.load`, whose later steps run that hour again too
(`steps.run_hours`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from batch_lake import (
    INTERVAL_START,
    FailingClient,
    FixtureLake,
    ms,
    put_parquet,
    reading,
    s3_client,
    session_lake,
    unique_name,
    write_fixture_lake,
)

from citypulse_batch import ledger, steps
from citypulse_batch.compaction import compact, compact_partition, is_part, manifest_prefix, now_ms
from citypulse_batch.lake import (
    DAILY_BUILDS_PREFIX,
    LEDGER_PREFIX,
    Interval,
    Lake,
    daily_build_key,
    partition_prefixes,
    readings_prefixes,
)
from citypulse_batch.report import RELOADED, build_report
from citypulse_batch.retention import LAKE_PREFIXES, expired_keys
from citypulse_batch.steps import StepFailed, load_settled, run_hours
from citypulse_batch.warehouse import DuckDBWarehouse
from streaming.contract import lake_arrow_schema

pytestmark = pytest.mark.integration

HOUR = timedelta(hours=1)


@pytest.fixture
def fixture_lake(aws_env: dict[str, str]) -> FixtureLake:
    return write_fixture_lake(s3_client(aws_env), unique_name("lake-late"))


@pytest.fixture
def loaded(tmp_path: Path, fixture_lake: FixtureLake) -> tuple[Lake, DuckDBWarehouse, Interval]:
    """The fixture hour loaded (its ledgers written) and compacted, as its run leaves it."""
    lake = session_lake(fixture_lake.bucket)
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    hour = Interval(fixture_lake.start, fixture_lake.end)
    load_settled(warehouse, hour, lake)
    compact(lake, partition_prefixes(hour))
    return lake, warehouse, hour


def _late_object(lake: Lake, fixture_lake: FixtureLake) -> str:
    """An object of two new readings and one redelivered, landed in the loaded hour afterwards."""
    sensor = fixture_lake.city.sensors[0]
    ts = ms(fixture_lake.start + timedelta(minutes=50))
    (prefix,) = readings_prefixes(Interval(fixture_lake.start, fixture_lake.end))
    loaded_row = next(rows[0] for key, rows in fixture_lake.files.items() if key.startswith(prefix))
    rows = [
        reading(sensor.sensor_id, sensor.zone_id, 900, ts, gateway_id=sensor.gateway_id, lane=sensor.lane),
        reading(sensor.sensor_id, sensor.zone_id, 901, ts + timedelta(seconds=1), gateway_id=sensor.gateway_id),
        loaded_row,
    ]
    key = prefix + "shardId-000000000003-late.parquet"
    put_parquet(lake.client, lake.bucket, key, rows, lake_arrow_schema())
    return key


def _rows(warehouse: DuckDBWarehouse, hour: Interval) -> int:
    start, end = hour.sql_bounds()
    con = duckdb.connect(str(warehouse.path), read_only=True)
    try:
        return int(con.execute(f"select count(*) from raw.readings where ts >= {start} and ts < {end}").fetchone()[0])
    finally:
        con.close()


def test_the_ledger_names_what_the_warehouse_holds_through_the_compaction(loaded, fixture_lake) -> None:
    lake, _, hour = loaded
    for prefix in partition_prefixes(hour):
        # The compaction swapped its inputs for its part: the ledger is the partition as it is.
        assert ledger.loaded(lake, prefix) == set(lake.list_keys(prefix, ".parquet"))
    (readings,) = readings_prefixes(hour)
    assert [is_part(k) for k in lake.list_keys(readings, ".parquet")] == [True]
    # Nothing is late; the hours around, which no run loaded, are not either.
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == []
    assert ledger.late_hours(lake, Interval.hour(hour.start + 3 * HOUR), 6) == []
    assert ledger.loaded(lake, readings_prefixes(Interval.hour(hour.start - HOUR))[0]) is None


def test_a_late_object_is_found_left_out_of_compaction_and_loaded_again_with_its_hour(
    loaded, fixture_lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake, warehouse, hour = loaded
    before = _rows(warehouse, hour)
    late = _late_object(lake, fixture_lake)
    (readings,) = readings_prefixes(hour)
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == [hour.start]
    # Out of the lookback: left to a backfill.
    assert ledger.late_hours(lake, Interval.hour(hour.start + 3 * HOUR), 2) == []

    # The hour's compaction again (a retry of its run): the late object is not the warehouse's yet.
    summary = compact(lake, [readings])
    assert summary["partitions"][0]["objects_after"] == 2
    assert late in lake.list_keys(readings, ".parquet")

    # The next hour's load: its own hour, and the late one again.
    monkeypatch.setattr(steps, "warehouse", lambda: warehouse)
    monkeypatch.setattr(steps, "lake", lambda: lake)
    monkeypatch.setenv("CITYPULSE_LATE_LOOKBACK_HOURS", "6")
    result = steps.load(Interval.hour(hour.start + HOUR))
    assert result["interval"]["start"] == "2026-03-02T11:00:00Z"
    again = result[RELOADED]["2026-03-02T10:00:00Z"]
    assert again["rows_loaded"] == before + 2
    assert again["duplicates_dropped"] == 1 + 1  # the fixture's redelivery, and the late one's
    assert _rows(warehouse, hour) == before + 2
    assert build_report(Interval.hour(hour.start + HOUR), "d", "r", {"load": result})["reloaded_hours"] == [
        "2026-03-02T10:00:00Z"
    ]

    # Loaded: nothing is late any more, and the hour's next compaction gathers it.
    assert ledger.late_hours(lake, Interval.hour(hour.start + 2 * HOUR), 6) == []
    compact(lake, [readings])
    keys = lake.list_keys(readings, ".parquet")
    assert [is_part(k) for k in keys] == [True] and ledger.loaded(lake, readings) == set(keys)
    assert steps.load(Interval.hour(hour.start + 2 * HOUR)).get(RELOADED) is None
    # A retry of the run that loaded it again (its load task failed after, say) finds the hour
    # again, so that its later steps still run for it (found by a review).
    assert list(steps.load(Interval.hour(hour.start + HOUR))[RELOADED]) == ["2026-03-02T10:00:00Z"]


def test_another_runs_compaction_in_progress_is_neither_undone_nor_taken_for_late(loaded) -> None:
    """Runs of a backfill overlap: another hour's look back must not undo a compaction still
    being written, nor take its parts for late objects (found by a review)."""
    lake, _, hour = loaded
    (readings,) = readings_prefixes(hour)
    part = readings + "compacted-0123456789abcdef-00000-of-00002.parquet"
    lake.client.put_object(Bucket=lake.bucket, Key=part, Body=b"PAR1 being written")
    manifest = f"{manifest_prefix(readings)}0123456789abcdef.json"
    lake.write_json(manifest, {"state": "writing", "inputs": [], "parts": [part], "started_ms": now_ms()})

    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == []
    assert part in lake.list_keys(readings, ".parquet") and lake.read_json(manifest) is not None


def test_a_load_beside_a_live_compaction_of_its_hour_neither_undoes_it_nor_reads_its_parts(
    tmp_path: Path, fixture_lake: FixtureLake
) -> None:
    """Found by a review: run H+1 loaded hour H again while run H was compacting it; its load
    settled the partition, deleting H's part and manifest, and H then committed and deleted its
    inputs: the partition lost rows. A live generation is now left alone by every other run."""
    lake = session_lake(fixture_lake.bucket)
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    hour = Interval(fixture_lake.start, fixture_lake.end)
    first = load_settled(warehouse, hour, lake)
    (readings,) = readings_prefixes(hour)
    inputs = lake.list_keys(readings, ".parquet")
    # Run H's compaction as another run sees it mid-way: its manifest `writing`, a part uploaded
    # (here a copy of an input: rows the inputs hold too).
    part = readings + "compacted-0123456789abcdef-00000-of-00002.parquet"
    lake.client.copy_object(Bucket=lake.bucket, Key=part, CopySource={"Bucket": lake.bucket, "Key": inputs[0]})
    manifest = f"{manifest_prefix(readings)}0123456789abcdef.json"
    lake.write_json(manifest, {"state": "writing", "inputs": inputs, "parts": [part], "started_ms": now_ms()})

    again = load_settled(warehouse, hour, lake, reloaded_by="2026-03-02T11:00:00Z")

    # Its rows loaded once: the live part is no one's rows yet, and it is still there.
    assert (again.rows_loaded, again.duplicates_dropped) == (first.rows_loaded, first.duplicates_dropped)
    assert part in lake.list_keys(readings, ".parquet") and lake.read_json(manifest) is not None
    assert ledger.loaded(lake, readings) == set(inputs)
    assert compact_partition(lake, readings).skipped  # nor does another run compact it meanwhile


def test_an_object_in_the_ledger_but_gone_is_not_late(loaded) -> None:
    """A compaction's inputs deleted before its ledger swap (a stop): the partition holds fewer
    keys than the ledger names, never one it does not, so nothing is loaded again."""
    lake, _, hour = loaded
    (readings,) = readings_prefixes(hour)
    ledger.record(lake, readings, [*lake.list_keys(readings, ".parquet"), readings + "gone.parquet"])
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == []


@pytest.mark.parametrize("settled_by", ["the next run's look back", "the hour's next load"])
def test_a_compaction_stopped_before_its_ledger_swap_is_settled_not_taken_for_late(
    tmp_path: Path, fixture_lake: FixtureLake, settled_by: str
) -> None:
    lake = session_lake(fixture_lake.bucket)
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    hour = Interval(fixture_lake.start, fixture_lake.end)
    first = load_settled(warehouse, hour, lake)
    (readings,) = readings_prefixes(hour)
    inputs = set(lake.list_keys(readings, ".parquet"))
    # put_object: the lease (1), the manifest `writing` (2), `written` (3, the commit), the
    # ledger's swap (4).
    dying = Lake(lake.bucket, FailingClient(lake.client, put_object=4), lake.credentials)
    with pytest.raises(ConnectionError):
        compact_partition(dying, readings)
    assert ledger.loaded(lake, readings) == inputs  # the part is there, not in the ledger yet
    if settled_by == "the hour's next load":
        again = load_settled(warehouse, hour, lake)
        assert (again.rows_loaded, again.duplicates_dropped) == (first.rows_loaded, first.duplicates_dropped)
    # Either finishes the compaction (inputs deleted, the ledger swapped): nothing is late.
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == []
    (part,) = lake.list_keys(readings, ".parquet")
    assert is_part(part) and ledger.loaded(lake, readings) == {part}


def test_an_input_written_again_during_its_compaction_is_kept_and_loaded_again(
    tmp_path: Path, fixture_lake: FixtureLake
) -> None:
    """A processor's retry lands a batch again under the same key, with a reading more, while the
    compaction that read the first one is between its commit and its deletes."""
    lake = session_lake(fixture_lake.bucket)
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    hour = Interval(fixture_lake.start, fixture_lake.end)
    first = load_settled(warehouse, hour, lake)
    (readings,) = readings_prefixes(hour)
    dying = Lake(lake.bucket, FailingClient(lake.client, put_object=4), lake.credentials)
    with pytest.raises(ConnectionError):
        compact_partition(dying, readings)  # committed; stopped before its ledger swap
    rewritten = next(k for k in fixture_lake.files if k.startswith(readings))
    sensor = fixture_lake.city.sensors[0]
    extra = reading(sensor.sensor_id, sensor.zone_id, 950, ms(fixture_lake.start + timedelta(minutes=55)))
    put_parquet(lake.client, lake.bucket, rewritten, [*fixture_lake.files[rewritten], extra], lake_arrow_schema())

    # The next run's look back settles the compaction: the rewritten input stays, out of the ledger.
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == [hour.start]
    assert rewritten in lake.list_keys(readings, ".parquet")
    again = load_settled(warehouse, hour, lake)
    assert again.rows_loaded == first.rows_loaded + 1  # the part's rows, and the extra reading
    assert ledger.late_hours(lake, Interval.hour(hour.start + HOUR), 6) == []


def test_each_step_runs_again_for_the_reloaded_hours_and_fails_with_what_it_found() -> None:
    hour = Interval.hour(INTERVAL_START)
    seen: list[str] = []

    def step(interval: Interval) -> dict[str, Any]:
        seen.append(interval.to_json()["start"])
        if interval.start.hour == 8:
            raise StepFailed("checkpoint failed", {"success": False, "evaluated": 3})
        return {"success": True, "interval": interval.to_json()}

    assert run_hours(step, hour, []) == {"success": True, "interval": hour.to_json()}
    summary = run_hours(step, hour, ["2026-03-02T07:00:00Z"])
    assert summary[RELOADED]["2026-03-02T07:00:00Z"]["interval"]["end"] == "2026-03-02T08:00:00Z"
    with pytest.raises(StepFailed) as failed:
        run_hours(step, hour, ["2026-03-02T07:00:00Z", "2026-03-02T08:00:00Z"])
    assert "(2026-03-02T08:00:00Z, reloaded)" in str(failed.value)
    assert failed.value.summary[RELOADED]["2026-03-02T08:00:00Z"] == {"success": False, "evaluated": 3}
    assert failed.value.summary["success"] is False  # the report names the step failed
    # The interval first, then each reloaded hour in order, until one fails.
    first, second, third = ["10"], ["10", "07"], ["10", "07", "08"]
    assert seen == [f"2026-03-02T{h}:00:00Z" for h in first + second + third]


def test_retention_forgets_a_ledger_with_its_partition() -> None:
    (readings,) = readings_prefixes(Interval.hour(INTERVAL_START))
    key = ledger.ledger_key(readings)
    assert key.startswith(LEDGER_PREFIX) and LEDGER_PREFIX in LAKE_PREFIXES
    assert expired_keys([key], INTERVAL_START + HOUR) == [key]
    assert expired_keys([key], INTERVAL_START + HOUR - timedelta(seconds=1)) == []


def test_retention_forgets_a_daily_build_record_with_its_days_first_hour() -> None:
    day = INTERVAL_START.replace(hour=0)
    key = daily_build_key(day)
    assert key.startswith(DAILY_BUILDS_PREFIX) and DAILY_BUILDS_PREFIX in LAKE_PREFIXES
    assert expired_keys([key], day + HOUR) == [key]
    assert expired_keys([key], day + HOUR - timedelta(seconds=1)) == []


def test_a_run_builds_again_the_daily_marts_of_its_days_whose_daily_build_has_begun() -> None:
    """The daily DAG may build a day's marts before one of its hours is in: an hour loaded
    again as late (found by a review), or an hour whose own run ends after the daily build
    (hour 23 running late, an hour re-run by hand, a backfill: session 21). The run that
    commits such an hour builds the day again, whether that hour is its own or a reloaded one;
    it asks whether the daily build has begun only after its own builds, so that one which
    begins later reads them; a day whose build has not begun is left to it."""

    def at(text: str) -> datetime:
        return datetime.fromisoformat(text)

    log: list[str] = []
    begun_days = {"2026-03-02T00:00:00Z", "2026-03-04T00:00:00Z"}

    def hourly(interval: Interval) -> dict[str, Any]:
        log.append("hour " + interval.to_json()["start"])
        return {"success": True}

    def daily_build(interval: Interval) -> dict[str, Any]:
        log.append("day " + interval.to_json()["start"])
        if interval.start.day == 4:
            raise StepFailed("daily dbt build failed", {"success": False, "models_failed": 1})
        return {"success": True, "models_passed": 3}

    def begun(day: Interval) -> bool:
        log.append("begun? " + day.to_json()["start"])
        return day.to_json()["start"] in begun_days

    daily = steps.DailyMarts(daily_build, begun)
    # Its own hour, of a day whose build has begun (a run finishing late, or re-run by hand).
    summary = run_hours(hourly, Interval.hour(at("2026-03-02T23:00:00Z")), [], daily)
    assert log == ["hour 2026-03-02T23:00:00Z", "begun? 2026-03-02T00:00:00Z", "day 2026-03-02T00:00:00Z"]
    assert summary["days"]["2026-03-02T00:00:00Z"] == {"success": True, "models_passed": 3}
    report = build_report(Interval.hour(at("2026-03-02T23:00:00Z")), "d", "r", {"dbt": summary})
    assert report["daily_marts_built"] == ["2026-03-02T00:00:00Z"]

    # Reloaded hours of two days: each day asked once, after every hour's build; only the
    # begun one is built; the run's own day (not begun) is left to its daily build.
    log.clear()
    summary = run_hours(
        hourly, Interval.hour(at("2026-03-03T02:00:00Z")), ["2026-03-02T22:00:00Z", "2026-03-02T21:00:00Z"], daily
    )
    assert log == [
        "hour 2026-03-03T02:00:00Z",
        "hour 2026-03-02T22:00:00Z",
        "hour 2026-03-02T21:00:00Z",
        "begun? 2026-03-02T00:00:00Z",
        "begun? 2026-03-03T00:00:00Z",
        "day 2026-03-02T00:00:00Z",
    ]
    assert list(summary["days"]) == ["2026-03-02T00:00:00Z"]

    # No day begun: nothing built, and no `days` in the summary.
    log.clear()
    summary = run_hours(hourly, Interval.hour(at("2026-03-03T05:00:00Z")), [], daily)
    assert log == ["hour 2026-03-03T05:00:00Z", "begun? 2026-03-03T00:00:00Z"] and "days" not in summary

    # A daily build that fails fails the step with what it found.
    with pytest.raises(StepFailed) as failed:
        run_hours(hourly, Interval.hour(at("2026-03-04T00:00:00Z")), [], daily)
    assert "(2026-03-04T00:00:00Z, days)" in str(failed.value)
    assert failed.value.summary["days"]["2026-03-04T00:00:00Z"] == {"success": False, "models_failed": 1}
    assert failed.value.summary["success"] is False


def test_an_interval_names_the_whole_days_of_its_hours() -> None:
    days = Interval(datetime(2026, 3, 2, 22, tzinfo=UTC), datetime(2026, 3, 4, 1, tzinfo=UTC)).days()
    assert [d.to_json() for d in days] == [
        {"start": f"2026-03-0{n}T00:00:00Z", "end": f"2026-03-0{n + 1}T00:00:00Z"} for n in (2, 3, 4)
    ]
    assert Interval.hour(datetime(2026, 3, 2, 23, tzinfo=UTC)).days() == [
        Interval(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC))
    ]


def test_the_daily_build_waits_an_hour_past_its_day_unless_the_day_is_not_over() -> None:
    """The day's last hourly run starts at midnight with the daily run: the build waits an hour.
    A run by hand of a day still going (the demo) builds at once; a past day too."""
    end = datetime(2026, 3, 3, tzinfo=UTC)
    hour = timedelta(hours=1)
    assert not steps.daily_build_due(end, end + timedelta(minutes=5), hour)  # scheduled, just after midnight
    assert steps.daily_build_due(end, end + hour, hour)
    assert steps.daily_build_due(end, end - 10 * hour, hour)  # the day is not over: by hand
    assert steps.daily_build_due(end, end + timedelta(days=270), hour)  # a backfill
