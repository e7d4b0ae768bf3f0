"""The real thing: `airflow dags test citypulse_hourly` against ministack S3/Glue/EventBridge.

Integration tests. One module fixture runs Airflow three times through
`infra.local.airflow.run_hourly` (the local CLI's entry point), two scenarios in parallel,
each with its own bucket, crawler, bus, DuckDB warehouse and Airflow home:

* good: the fixture lake interval, run twice - the second run must change nothing;
* bad:  the same interval with one out-of-range speed written straight to the lake - the
  checkpoint must fail, the publish must not run, and `PipelineFailed` must reach the bus.

After its two runs the good scenario runs the daily DAG (marts, retention, dbt docs, GX data
docs of the stored validation results), then a third hourly run over a tampered mart (a
15-minute bucket deleted, and the mart left out of the build as a stale one would be): the
marts reconciliation must fail, the publish must not run, and `PipelineFailed` must say why.

Events are observed the way an operator's subscriber would: an SQS queue behind a rule on
the scenario's bus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import duckdb
import pytest
from batch_lake import (
    FixtureLake,
    assert_zone_mart,
    ministack_env,
    s3_client,
    unique_name,
    write_fixture_lake,
)

from citypulse_batch.events import FAILURE_LOG_LINE
from citypulse_batch.lake import Interval, daily_build_key, readings_prefixes
from infra.local.airflow import DailyRun, HourlyRun, ensure_metadata_db, run_daily, run_hourly
from infra.local.emulators import Emulator

pytestmark = pytest.mark.integration

TABLES = [
    "raw.readings",
    "raw.sensor_registry",
    "raw.zones",
    "raw.quarantine_counts",
    "marts.fct_zone_traffic_15min",
    "marts.fct_sensor_traffic_15min",
    "marts.fct_zone_traffic_hourly",
    "marts.fct_sensor_traffic_hourly",
    "marts.fct_congestion_episodes",
    "marts.dim_sensors",
    "marts.dim_zones",
]


@dataclass
class Scenario:
    name: str
    lake: FixtureLake
    env: dict[str, str]
    home: Path
    queue_url: str
    runs: list[HourlyRun] = field(default_factory=list)
    tampered: HourlyRun | None = None
    daily: DailyRun | None = None
    after_daily: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    snapshots: list[dict[str, list[tuple[Any, ...]]]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def warehouse(self) -> Path:
        return Path(self.env["CITYPULSE_DUCKDB_PATH"])


def _client(service: str, env: dict[str, str]) -> Any:
    return boto3.client(
        service,
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _scenario(name: str, base_env: dict[str, str], tmp: Path, bad_row: dict[str, Any] | None) -> Scenario:
    bucket = unique_name(f"lake-{name}")
    lake = write_fixture_lake(s3_client(base_env), bucket, bad_row=bad_row)
    bus = unique_name(f"bus-{name}")
    events, sqs = _client("events", base_env), _client("sqs", base_env)
    events.create_event_bus(Name=bus)
    queue_url = sqs.create_queue(QueueName=unique_name(f"events-{name}"))["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="batch-events", EventBusName=bus, EventPattern=json.dumps({"source": ["citypulse.batch"]}))
    events.put_targets(Rule="batch-events", EventBusName=bus, Targets=[{"Id": "queue", "Arn": queue_arn}])
    env = {
        **base_env,
        "CITYPULSE_LAKE_BUCKET": bucket,
        "CITYPULSE_EVENT_BUS": bus,
        "CITYPULSE_GLUE_CRAWLER": unique_name(f"crawler-{name}"),
        "CITYPULSE_DUCKDB_PATH": str(tmp / f"{name}.duckdb"),
        "CITYPULSE_DOCS_DIR": str(tmp / f"docs-{name}"),
        "CITYPULSE_RETENTION_DAYS": "7",
    }
    return Scenario(name, lake, env, tmp / f"airflow-{name}", queue_url)


def _snapshot(path: Path, tables: list[str] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"select * from {t} order by all").fetchall() for t in tables}
    finally:
        con.close()


def _drain(scenario: Scenario) -> list[dict[str, Any]]:
    sqs = _client("sqs", scenario.env)
    out: list[dict[str, Any]] = []
    while True:
        # Long polling: the emulator answers as soon as a message is there, or after 1 s empty.
        got = sqs.receive_message(QueueUrl=scenario.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        messages = got.get("Messages", [])
        if not messages:
            return out
        for message in messages:
            out.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=scenario.queue_url, ReceiptHandle=message["ReceiptHandle"])


OLD_KEY = "raw/readings/dt=2026-02-01/hour=00/shardId-000000000000-1.parquet"
TAMPERED = "bucket_start = timestamp '2026-03-02 10:15:00' and zone_id = (select min(zone_id) from raw.zones)"
DAILY_TABLES = ["marts.fct_sensor_health_daily", "marts.fct_corridor_rankings", "marts.fct_zone_peak_profiles"]


def _good(scenario: Scenario) -> None:
    for _ in range(2):
        scenario.runs.append(run_hourly(scenario.lake.start, scenario.env, scenario.home))
        scenario.snapshots.append(_snapshot(scenario.warehouse))
    # Something past retention (7 days before the day's end, 2026-03-03): a lake partition
    # and a warehouse row from February; the daily run must delete both and nothing else.
    s3_client(scenario.env).put_object(Bucket=scenario.lake.bucket, Key=OLD_KEY, Body=b"old")
    con = duckdb.connect(str(scenario.warehouse))
    try:
        con.execute(
            "insert into raw.readings select * replace (timestamp '2026-02-01 00:00:01' as ts, 1 as seq) "
            "from raw.readings limit 1"
        )
    finally:
        con.close()
    scenario.daily = run_daily(scenario.lake.start.date(), scenario.env, scenario.home)
    scenario.after_daily = _snapshot(scenario.warehouse, [*TABLES, *DAILY_TABLES])
    con = duckdb.connect(str(scenario.warehouse))
    try:
        con.execute(f"delete from marts.fct_zone_traffic_15min where {TAMPERED}")
    finally:
        con.close()
    stale = {**scenario.env, "CITYPULSE_DBT_EXCLUDE": "tag:daily fct_zone_traffic_15min"}
    scenario.tampered = run_hourly(scenario.lake.start, stale, scenario.home)


def _bad(scenario: Scenario) -> None:
    scenario.runs.append(run_hourly(scenario.lake.start, scenario.env, scenario.home))


@pytest.fixture(scope="module")
def scenarios(ministack: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scenario]]:
    tmp = tmp_path_factory.mktemp("hourly")
    base_env = ministack_env(ministack)
    good = _scenario("good", base_env, tmp, None)
    bad = _scenario("bad", base_env, tmp, {"avg_speed_kmh": 400.0})
    ensure_metadata_db(good.home, good.env)
    ensure_metadata_db(bad.home, bad.env, seed_from=good.home)
    # Two Airflow homes, two processes: the scenarios share nothing but the emulator.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_good, good), pool.submit(_bad, bad)]
        for future in futures:
            future.result()
    for scenario in (good, bad):
        scenario.events = _drain(scenario)
    yield {"good": good, "bad": bad}


def _explain(run: HourlyRun) -> str:
    return f"{run.state} {run.task_states}\n{run.log_tail()}"


def test_hourly_run_succeeds_and_publishes_nothing_when_no_datasets_are_configured(scenarios) -> None:
    first, second = scenarios["good"].runs
    for run in (first, second):
        assert run.succeeded, _explain(run)
        for task in (
            "wait_for_partition",
            "crawler_exists",
            "run_crawler",
            "load_warehouse",
            "compact_lake",
            "dbt_build",
            "quality_check",
            "quicksight_datasets",
            "write_report",
            "notify",
        ):
            assert run.task_states[task] == "success", (task, _explain(run))
        assert run.task_states["publish"] == "skipped"  # mapped over an empty list
    # The crawler is created once, then updated: re-runs do not fail on an existing crawler.
    assert (first.task_states["create_crawler"], first.task_states["update_crawler"]) == ("success", "skipped")
    assert (second.task_states["create_crawler"], second.task_states["update_crawler"]) == ("skipped", "success")


def test_warehouse_holds_exactly_the_lakes_distinct_interval_rows(scenarios) -> None:
    good = scenarios["good"]
    readings = good.snapshots[0]["raw.readings"]
    assert set(readings) == good.lake.expected_rows()
    assert len(readings) == len(good.lake.expected_rows()) == 60


def test_mart_is_built_from_the_loaded_interval(scenarios) -> None:
    good = scenarios["good"]
    mart = good.snapshots[0]["marts.fct_zone_traffic_15min"]
    assert_zone_mart(mart, good.lake)
    assert sum(row[3] for row in mart) == 60  # reading_count over all buckets
    assert len(good.snapshots[0]["marts.dim_sensors"]) == 12


def test_report_says_checkpoint_passed_with_the_load_counts(scenarios) -> None:
    report = scenarios["good"].runs[0].report
    assert report is not None
    assert (report["status"], report["failed_step"]) == ("succeeded", None)
    assert report["interval"] == {"start": "2026-03-02T10:00:00Z", "end": "2026-03-02T11:00:00Z"}
    assert (report["rows_loaded"], report["duplicates_dropped"], report["quarantined"]) == (60, 1, 3)
    assert report["expectations_evaluated"] == report["expectations_passed"] > 40
    # 4 traffic marts x (2 per-bucket equalities + 2 interval totals) + 2 zone spines
    assert report["reconciliation_evaluated"] == report["reconciliation_passed"] == 18
    assert (report["dbt_models_passed"], report["dbt_models_failed"], report["dbt_tests_failed"]) == (13, 0, 0)
    # The interval's two reading files became one part; its one quarantine file stays as it is.
    assert (report["lake_objects_before_compaction"], report["lake_objects_after_compaction"]) == (3, 2)


def test_second_run_of_the_same_interval_changes_nothing(scenarios) -> None:
    first, second = scenarios["good"].snapshots
    assert first == second
    # ... in every hourly mart, which the first run filled (the fixture hour has no congestion).
    assert [table for table in TABLES if not first[table]] == ["marts.fct_congestion_episodes"]
    second_report = scenarios["good"].runs[1].report
    assert second_report["rows_loaded"] == 60  # read from the compacted part
    assert (second_report["lake_objects_before_compaction"], second_report["lake_objects_after_compaction"]) == (2, 2)


def test_each_completed_run_puts_hourly_load_completed_on_the_bus(scenarios) -> None:
    events = scenarios["good"].events
    # Two good runs, then the tampered one (see test_tampered_mart_fails_the_reconciliation...).
    assert [e["detail-type"] for e in events] == ["HourlyLoadCompleted", "HourlyLoadCompleted", "PipelineFailed"]
    detail = events[0]["detail"]
    assert (detail["status"], detail["rows_loaded"], detail["interval"]["start"]) == (
        "succeeded",
        60,
        "2026-03-02T10:00:00Z",
    )
    assert detail["report_uri"].endswith("reports/hourly/dt=2026-03-02/hour=10/report.json")


def test_out_of_range_row_fails_the_checkpoint_so_nothing_is_published(scenarios) -> None:
    bad = scenarios["bad"]
    (run,) = bad.runs
    assert run.state == "failed", _explain(run)
    assert run.task_states["dbt_build"] == "success"
    assert run.task_states["quality_check"] == "failed"
    for task in ("quicksight_datasets", "publish", "notify"):
        assert run.task_states[task] == "upstream_failed", (task, _explain(run))
    assert run.task_states["write_report"] == "success"

    report = run.report
    assert (report["status"], report["failed_step"]) == ("failed", "expectations")
    assert report["expectations_passed"] == report["expectations_evaluated"] - 1
    (failure,) = report["steps"]["expectations"]["failures"]
    assert (failure["column"], failure["unexpected_sample"]) == ("avg_speed_kmh", [400.0])


def test_failed_checkpoint_alerts_pipeline_failed_and_never_completed(scenarios) -> None:
    events = scenarios["bad"].events
    assert [e["detail-type"] for e in events] == ["PipelineFailed"]
    # The line the stack's DAG-failure metric counts, in what Airflow logged of the run.
    (run,) = scenarios["bad"].runs
    logged = run.log_path.read_text()
    assert logged.count(f"{FAILURE_LOG_LINE}: dag_id=citypulse_hourly task_id=quality_check") == 1, run.log_tail()
    detail = events[0]["detail"]
    assert (detail["dag_id"], detail["task_id"]) == ("citypulse_hourly", "quality_check")
    assert "avg_speed_kmh" in detail["error"]
    assert detail["interval"]["start"].startswith("2026-03-02T10:00:00")


def test_daily_run_builds_sensor_health_for_every_registered_sensor(scenarios) -> None:
    good = scenarios["good"]
    run = good.daily
    assert run is not None and run.succeeded, f"{run.state} {run.task_states}\n{run.log_tail()}"
    assert run.task_states == {
        "wait_for_last_hour": "success",  # a past day: past its last hour's run at once
        "dbt_build_daily": "success",
        "retention": "success",
        "dbt_docs": "success",
        "data_docs": "success",
    }
    build = run.summaries["dbt_build_daily"]
    assert (build["models_passed"], build["models_failed"], build["tests_failed"]) == (3, 0, 0)
    health = good.after_daily["marts.fct_sensor_health_daily"]
    # 12 registered sensors x 2026-03-02; 5 readings each in the loaded hour.
    assert len(health) == 12
    assert {row[1].isoformat() for row in health} == {"2026-03-02"}
    assert sum(row[3] for row in health) == 60
    assert len(good.after_daily["marts.fct_zone_peak_profiles"]) == 4  # 4 zones x Monday 10:00


def test_daily_retention_deletes_only_what_is_past_the_horizon(scenarios) -> None:
    good = scenarios["good"]
    summary = good.daily.summaries["retention"]
    assert summary["cutoff"] == "2026-02-24T00:00:00Z"
    assert summary["lake_objects_deleted"] == 1
    assert summary["rows_deleted"]["raw.readings"] == 1
    assert summary["vacuumed"] is True
    keys = {o["Key"] for o in s3_client(good.env).list_objects_v2(Bucket=good.lake.bucket)["Contents"]}
    assert OLD_KEY not in keys
    # The neighbouring hours' files are kept; the loaded hour's two are now one compacted part.
    loaded = readings_prefixes(Interval(good.lake.start, good.lake.end))[0]
    assert {k for k in good.lake.files if not k.startswith(loaded)} <= keys
    assert [k.removeprefix(loaded)[: len("compacted-")] for k in keys if k.startswith(loaded)] == ["compacted-"]
    # Everything the hourly runs built is still there, unchanged.
    assert {t: good.after_daily[t] for t in TABLES} == good.snapshots[-1]


def test_daily_run_writes_the_dbt_docs_as_a_static_site(scenarios) -> None:
    docs = scenarios["good"].daily.dbt_docs
    assert docs == Path(scenarios["good"].env["CITYPULSE_DOCS_DIR"]) / "dbt" / "index.html"
    html = docs.read_text()
    assert "fct_congestion_episodes" in html and "fct_sensor_health_daily" in html


def test_daily_run_builds_data_docs_from_the_stored_validation_results(scenarios) -> None:
    good = scenarios["good"]
    summary = good.daily.summaries["data_docs"]
    # Two hourly runs x (the readings suite + 4 reconciliation suites), stored in the lake.
    assert summary["validation_results"] == summary["validation_pages"] == 10
    index = Path(good.env["CITYPULSE_DOCS_DIR"]) / "gx" / "index.html"
    assert summary["index"] == str(index) and good.daily.data_docs == index
    html = index.read_text()
    for suite in ("citypulse_readings_v1", "citypulse_reconcile_fct_zone_traffic_15min"):
        assert suite in html
    keys = [o["Key"] for o in s3_client(good.env).list_objects_v2(Bucket=good.lake.bucket, Prefix="gx/")["Contents"]]
    assert all(k.startswith("gx/validations/dt=2026-03-02/hour=10/") for k in keys)


def test_an_hour_run_again_after_the_daily_build_builds_its_day_again(scenarios) -> None:
    """The daily run records in the lake that its build began; the hourly runs before it build
    no day, the run of the hour again after it (the tampered run, by hand) builds the day's
    daily marts again: that build read the day before the hour's run committed."""
    good = scenarios["good"]
    day = good.lake.start.replace(hour=0)
    body = s3_client(good.env).get_object(Bucket=good.lake.bucket, Key=daily_build_key(day))["Body"].read()
    assert json.loads(body)["day"] == {"start": "2026-03-02T00:00:00Z", "end": "2026-03-03T00:00:00Z"}
    assert [run.report["daily_marts_built"] for run in good.runs] == [[], []]
    assert good.tampered is not None and good.tampered.report["daily_marts_built"] == ["2026-03-02T00:00:00Z"]
    rebuilt = good.tampered.report["steps"]["dbt"]["days"]["2026-03-02T00:00:00Z"]
    assert rebuilt["success"] and rebuilt["models_failed"] == 0


def test_tampered_mart_fails_the_reconciliation_so_nothing_is_published(scenarios) -> None:
    good = scenarios["good"]
    run = good.tampered
    assert run is not None and run.state == "failed", _explain(run)
    assert (run.task_states["dbt_build"], run.task_states["quality_check"]) == ("success", "success")
    assert run.task_states["reconcile_marts"] == "failed"
    for task in ("quicksight_datasets", "publish", "notify"):
        assert run.task_states[task] == "upstream_failed", (task, _explain(run))
    report = run.report
    assert (report["status"], report["failed_step"]) == ("failed", "reconciliation")
    failed = {(f["suite"], f["expectation"]) for f in report["steps"]["reconciliation"]["failures"]}
    assert failed == {
        ("citypulse_reconcile_fct_zone_traffic_15min", "expect_column_pair_values_to_be_equal"),
        ("citypulse_reconcile_fct_zone_traffic_15min", "expect_column_sum_to_be_between"),
        ("citypulse_reconcile_fct_zone_traffic_15min", "expect_column_values_to_be_between"),
    }
    alert = good.events[-1]
    assert (alert["detail-type"], alert["detail"]["task_id"]) == ("PipelineFailed", "reconcile_marts")
    assert "fct_zone_traffic_15min" in alert["detail"]["error"]
