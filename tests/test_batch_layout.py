"""Pure logic of the batch path: interval rules, lake keys, dbt arguments and the run report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from citypulse_batch.dbt_build import build_args, find_project_dir, interval_env, parse_cache_dir
from citypulse_batch.lake import Interval, quarantine_prefixes, readings_prefixes, readings_wildcard, report_key
from citypulse_batch.report import build_report

START = datetime(2026, 3, 2, 23, tzinfo=UTC)


def test_interval_is_whole_utc_hours_and_normalises_other_zones() -> None:
    two_hours = Interval(START, START + timedelta(hours=2))
    assert readings_prefixes(two_hours) == [
        "raw/readings/dt=2026-03-02/hour=23/",
        "raw/readings/dt=2026-03-03/hour=00/",
    ]
    assert quarantine_prefixes(Interval.hour(START)) == ["quarantine/dt=2026-03-02/hour=23/"]
    cet = timezone(timedelta(hours=1))
    assert Interval.hour(datetime(2026, 3, 3, 0, tzinfo=cet)).start == START
    assert Interval.hour(START).sql_bounds() == ("timestamp '2026-03-02 23:00:00'", "timestamp '2026-03-03 00:00:00'")


@pytest.mark.parametrize(
    "start, end, message",
    [
        (datetime(2026, 3, 2, 10), datetime(2026, 3, 2, 11), "no time zone"),
        (START + timedelta(minutes=15), START + timedelta(hours=1), "not on the hour"),
        (START, START, "empty interval"),
    ],
)
def test_interval_rejects_what_the_hourly_partitions_cannot_serve(start, end, message) -> None:
    with pytest.raises(ValueError, match=message):
        Interval(start, end)


def test_sensor_and_report_keys_follow_the_partition_layout() -> None:
    assert readings_wildcard(START) == "raw/readings/dt=2026-03-02/hour=23/*.parquet"
    assert report_key(Interval.hour(START)) == "reports/hourly/dt=2026-03-02/hour=23/report.json"


def test_dbt_build_gets_the_interval_in_its_environment_and_writes_outside_the_project(tmp_path: Path) -> None:
    project = find_project_dir()
    args = build_args(project, "postgres", "source:lake+ source:registry+", tmp_path)
    assert args[0] == "build"
    assert args[args.index("--target") + 1] == "postgres"
    # --vars would change every hour, and a change of vars makes dbt parse the project afresh.
    assert "--vars" not in args
    assert interval_env(Interval.hour(START)) == {
        "CITYPULSE_INTERVAL_START": "2026-03-02 23:00:00",
        "CITYPULSE_INTERVAL_END": "2026-03-03 00:00:00",
    }
    assert interval_env(None) == {"CITYPULSE_INTERVAL_START": "", "CITYPULSE_INTERVAL_END": ""}
    assert args[args.index("--select") + 1 : args.index("--select") + 3] == ["source:lake+", "source:registry+"]
    assert Path(args[args.index("--target-path") + 1]).parent == tmp_path


def test_the_parse_cache_is_one_per_project_and_target() -> None:
    project = find_project_dir()
    assert parse_cache_dir(project, "duckdb") == parse_cache_dir(project, "duckdb")
    assert parse_cache_dir(project, "duckdb") != parse_cache_dir(project, "postgres")
    assert parse_cache_dir(project, "duckdb") != parse_cache_dir(project.parent, "duckdb")


def test_report_names_the_first_step_that_did_not_succeed() -> None:
    interval = Interval.hour(START)
    load = {"rows_loaded": 60, "duplicates_dropped": 1, "quarantined": 3}
    dbt = {"success": True, "models_passed": 6, "models_failed": 0, "tests_passed": 17, "tests_failed": 0}
    gx_ok = {"success": True, "evaluated": 5, "passed": 5}
    recon_ok = {"success": True, "evaluated": 18, "passed": 18}
    compacted = {"objects_before": 3, "objects_after": 2, "rows_rewritten": 62, "skipped": [], "partitions": []}
    steps = {"load": load, "dbt": dbt, "expectations": gx_ok, "reconciliation": recon_ok, "compaction": compacted}
    ok = build_report(interval, "d", "r", steps)
    assert (ok["status"], ok["failed_step"], ok["rows_loaded"], ok["expectations_passed"]) == ("succeeded", None, 60, 5)
    assert ok["reconciliation_passed"] == 18
    assert (ok["lake_objects_before_compaction"], ok["lake_objects_after_compaction"]) == (3, 2)
    # A compaction that never reported (its task failed) is named, after the steps before it.
    not_compacted = build_report(interval, "d", "r", {**steps, "compaction": None})
    assert (not_compacted["status"], not_compacted["failed_step"]) == ("failed", "compaction")
    gx_failed = build_report(
        interval, "d", "r", {**steps, "expectations": {"success": False, "evaluated": 5, "passed": 4}}
    )
    assert (gx_failed["status"], gx_failed["failed_step"]) == ("failed", "expectations")
    recon_failed = build_report(
        interval, "d", "r", {**steps, "reconciliation": {"success": False, "evaluated": 18, "passed": 15}}
    )
    assert (recon_failed["status"], recon_failed["failed_step"]) == ("failed", "reconciliation")
    never_loaded = build_report(
        interval,
        "d",
        "r",
        {"load": None, "dbt": None, "expectations": None, "reconciliation": None, "compaction": None},
    )
    assert (never_loaded["failed_step"], never_loaded["rows_loaded"]) == ("load", None)
