"""The hourly DAG's task bodies: an interval in, a small JSON-able summary out.

Place in the flow: `dags/citypulse_hourly.py` wraps each function here in a task. They wire
the Airflow side (connections, Variables, the provider's hooks) to the plain modules that do
the work (`warehouse`, `dbt_build`, `expectations.runner`, `report`), which tests call
directly with emulator clients.

A step whose data is wrong raises `StepFailed` carrying its summary, so the run report can
still say what was evaluated; `retryable` tells the DAG whether a retry could help.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from citypulse_batch.lake import (
    Interval,
    Lake,
    S3Credentials,
    daily_build_key,
    gx_results_prefix,
    list_partitions,
    partition_prefixes,
    report_key,
)
from citypulse_batch.report import DAYS, RELOADED
from citypulse_batch.settings import AWS_CONN_ID, WAREHOUSE_CONN_ID, setting


class StepFailed(RuntimeError):
    """A step finished with a verdict of failure; `summary` says what it found."""

    def __init__(self, message: str, summary: dict[str, Any], *, retryable: bool = False) -> None:
        super().__init__(message)
        self.summary = summary
        self.retryable = retryable


def crawler_config() -> dict[str, Any]:
    """Glue crawler over the lake's raw readings, as templated operator config.

    New partitions only (`CRAWL_NEW_FOLDERS_ONLY`, which requires LOG change policies): each
    hour adds one `dt=/hour=` folder and a full re-crawl would re-read the whole lake. The same
    settings as the template's `RawReadingsCrawler` (tests/test_iac.py holds them together): the
    update operator rewrites whatever differs, every run.
    """
    return {
        "Name": "{{ citypulse_setting('glue_crawler') }}",
        "Role": "{{ citypulse_setting('glue_crawler_role') }}",
        "DatabaseName": "{{ citypulse_setting('glue_database') }}",
        "Targets": {"S3Targets": [{"Path": "s3://{{ citypulse_setting('lake_bucket') }}/raw/readings/"}]},
        "SchemaChangePolicy": {"UpdateBehavior": "LOG", "DeleteBehavior": "LOG"},
        "RecrawlPolicy": {"RecrawlBehavior": "CRAWL_NEW_FOLDERS_ONLY"},
        "Configuration": json.dumps(
            {
                "Version": 1.0,
                "Grouping": {"TableGroupingPolicy": "CombineCompatibleSchemas"},
                "CrawlerOutput": {"Partitions": {"AddOrUpdateBehavior": "InheritFromTable"}},
            }
        ),
    }


# QuickSight allows 32 manual SPICE refreshes of a dataset in 24 hours (Enterprise edition; 8 on
# Standard). The hourly schedule takes 24; a backfill of 9 hours more would fail its publish,
# and the run with it, on good data (found by a review).
NO_REFRESH_RUN_TYPES = frozenset({"backfill"})


def datasets_to_refresh(run_type: str, configured: list[str]) -> list[str]:
    """The QuickSight datasets a run refreshes: every configured one, except in a backfill,
    whose hours the next scheduled run's refresh (a full one) brings in with its own."""
    return [] if run_type in NO_REFRESH_RUN_TYPES else configured


def crawler_exists() -> bool:
    from airflow.providers.amazon.aws.hooks.glue_crawler import GlueCrawlerHook

    return bool(GlueCrawlerHook(aws_conn_id=AWS_CONN_ID).has_crawler(setting("glue_crawler")))


def lake() -> Lake:
    """The lake bucket through the provider's S3 hook (`aws_default`: region, endpoint, keys)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=AWS_CONN_ID)
    credentials = hook.get_credentials()
    return Lake(
        setting("lake_bucket"),
        hook.get_conn(),
        S3Credentials(credentials.access_key, credentials.secret_key, credentials.token),
    )


def warehouse() -> Any:
    """The warehouse adapter the `citypulse_warehouse` connection's type selects."""
    from citypulse_batch.airflow_compat import base_hook
    from citypulse_batch.warehouse import warehouse_from_connection

    return warehouse_from_connection(base_hook().get_connection(WAREHOUSE_CONN_ID))


Step = Callable[[Interval], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DailyMarts:
    """How an hourly run keeps the daily marts whole: `build` builds a day's, `begun` says
    whether the daily DAG's build of a day has begun (`run_hours`)."""

    build: Step
    begun: Callable[[Interval], bool]


def run_step(step: Step, context: Mapping[str, Any], *, reloaded: bool = True, daily: DailyMarts | None = None) -> None:
    """Run a step for the Airflow task's data interval; its summary goes to XCom key `summary`,
    also when the step fails (then a data verdict fails the task without retries).

    With `reloaded`, the step also runs for each earlier hour the run's load loaded again
    (`load`: objects reached it after its own run), after the data interval's; their
    summaries go under `RELOADED`, by hour. `daily`: then the daily marts of those hours' days
    are built again where the daily build had begun (`run_hours`), under `DAYS`."""
    from citypulse_batch.airflow_compat import task_failure

    interval = Interval(context["data_interval_start"], context["data_interval_end"])
    ti = context["ti"]
    hours: list[str] = []
    if reloaded:
        load_summary = ti.xcom_pull(task_ids="load_warehouse", key="summary") or {}
        hours = list(load_summary.get(RELOADED, {}))
    try:
        summary = run_hours(step, interval, hours, daily)
    except StepFailed as exc:
        ti.xcom_push(key="summary", value=exc.summary)
        raise task_failure(exc, exc.retryable) from exc
    ti.xcom_push(key="summary", value=summary)


def run_hours(step: Step, interval: Interval, hours: list[str], daily: DailyMarts | None = None) -> dict[str, Any]:
    """`step` of the interval, then of each hour in `hours` (ISO starts), whose summaries go
    under `RELOADED`. Then, with `daily`, `daily.build` of each day of the interval and of those
    hours whose daily build has begun (`daily.begun`), under `DAYS`: that build may have read
    the day before this run's own had committed. Asked only now, after them, so that a daily
    build not begun yet reads what they wrote. A step that fails on one of them fails with the
    summaries so far."""
    summary = step(interval)
    reloaded = [(hour, Interval.hour(datetime.fromisoformat(hour))) for hour in hours]
    _run_parts(summary, RELOADED, reloaded, step)
    if daily is not None:
        days = {day.start: day for part in [interval, *(p for _, p in reloaded)] for day in part.days()}
        begun = [day for _, day in sorted(days.items()) if daily.begun(day)]
        _run_parts(summary, DAYS, [(day.to_json()["start"], day) for day in begun], daily.build)
    return summary


def _run_parts(summary: dict[str, Any], key: str, parts: list[tuple[str, Interval]], step: Step) -> None:
    """`step` of each named part, its summary under `summary[key][name]`; the first to fail
    fails with the summaries so far."""
    for name, part in parts:
        done = summary.setdefault(key, {})
        try:
            done[name] = step(part)
        except StepFailed as exc:
            done[name] = exc.summary
            summary["success"] = False  # the run report's verdict on the step
            raise StepFailed(f"{exc} ({name}, {key})", summary, retryable=exc.retryable) from exc


def daily_build_due(day_end: datetime, now: datetime, delay: timedelta) -> bool:
    """Whether the daily build of the day ending at `day_end` may run at `now`: `delay` after
    the day's end, by when its last hourly run (which starts at the day's end too) has usually
    loaded it (one that has not builds the day again: `run_hours`); at once for a day not over
    yet (a run by hand: what is there is what there is)."""
    return now >= day_end + delay or now < day_end


def load(interval: Interval) -> dict[str, Any]:
    """Load the interval into warehouse raw (one transaction, idempotent), and again each hour
    of the `late_lookback_hours` before it whose partitions gained objects after its load
    (`ledger.late_hours`): a late reading reaches the warehouse, and the later steps of this
    run build, check and compact its hour again (`run_step`)."""
    from citypulse_batch.ledger import late_hours, run_name

    engine, the_lake = warehouse(), lake()
    late = late_hours(the_lake, interval, int(setting("late_lookback_hours")))
    summary = load_settled(engine, interval, the_lake).to_json()
    if late:
        # Each ledger names this run, so that a retry of this task finds the hour again even
        # once its ledger is complete (the later steps must still run for it).
        summary[RELOADED] = {
            Interval.hour(hour).to_json()["start"]: load_settled(
                engine, Interval.hour(hour), the_lake, reloaded_by=run_name(interval)
            ).to_json()
            for hour in late
        }
    return summary


def load_settled(engine: Any, interval: Interval, the_lake: Lake, reloaded_by: str | None = None) -> Any:
    """`engine.load` of the interval, once the compactions of its partitions are settled: one
    that stopped is finished or undone, and the parts of one still being written (another
    run's: runs overlap) are left out, so the load never reads a part beside its own inputs.
    Then the ledger of each partition records the objects it read (`citypulse_batch.ledger`)."""
    from citypulse_batch import ledger
    from citypulse_batch.compaction import settle

    writing = set()
    for prefix in partition_prefixes(interval):
        writing |= settle(the_lake, prefix).writing
    listing = {
        prefix: [key for key in keys if key not in writing]
        for prefix, keys in list_partitions(the_lake, interval).items()
    }
    summary = engine.load(interval, the_lake, listing)
    for prefix, keys in listing.items():
        ledger.record(the_lake, prefix, keys, reloaded_by)
    return summary


def compact(interval: Interval, run: str | None = None) -> dict[str, Any]:
    """Gather the interval's lake partitions (readings and quarantine) into a few large objects.
    `run`: the DAG run compacting (a retry of its task undoes what its stopped attempt left)."""
    from citypulse_batch import compaction

    return compaction.compact(lake(), partition_prefixes(interval), owner=run)


def build(interval: Interval) -> dict[str, Any]:
    """`dbt build` of the affected models for the interval, on the warehouse's dbt target."""
    return _dbt_build(interval, "dbt build", select=setting("dbt_select"), exclude=setting("dbt_exclude"))


def _dbt_build(interval: Interval, what: str, *, select: str, exclude: str = "") -> dict[str, Any]:
    """`dbt build` of the `select`ed nodes for the interval; its summary, or StepFailed."""
    from citypulse_batch.dbt_build import find_project_dir, parse_cache_dir, run_dbt_build

    engine = warehouse()
    project_dir = find_project_dir(setting("dbt_project_dir"))
    target = setting("dbt_target") or engine.dbt_target
    summary = run_dbt_build(
        project_dir=project_dir,
        target=target,
        interval=interval,
        env=engine.dbt_env(),
        select=select,
        exclude=exclude,
        executable=setting("dbt_executable"),
        parse_cache=parse_cache_dir(project_dir, target),
    ).to_json()
    if not summary["success"]:
        failed = summary["models_failed"] + summary["tests_failed"]
        # Failed models or tests are a verdict on the data; an error before any node ran
        # (connection, profile) may be transient.
        raise StepFailed(
            f"{what} failed: {failed} nodes failed; {summary['failures'] or summary['error']}",
            summary,
            retryable=failed == 0,
        )
    return summary


@contextmanager
def gx_results(interval: Interval) -> Iterator[Path]:
    """A GX file data context root for this run; its validation results are copied to the lake.

    Great Expectations 1.x stores results on a filesystem only, and MWAA workers share no
    disk: the run's store is a temporary directory, copied afterwards to
    `gx/validations/dt=…/hour=…/` (whatever the verdict), where the daily `data_docs` task
    collects the day's results.
    """
    root = Path(tempfile.mkdtemp(prefix="citypulse-gx-"))
    try:
        yield root
    finally:
        validations = root / "gx" / "uncommitted" / "validations"
        if validations.is_dir():
            _upload_tree(validations, gx_results_prefix(interval.start))
        shutil.rmtree(root, ignore_errors=True)


def _gate(summary: dict[str, Any], what: str) -> dict[str, Any]:
    if not summary["success"]:
        failed = [f"{f['suite']}: {f['expectation']}({f['column']})" for f in summary["failures"]]
        raise StepFailed(
            f"{what} failed: {summary['evaluated'] - summary['passed']} of "
            f"{summary['evaluated']} expectations: {', '.join(failed)}",
            summary,
        )
    return summary


def _run_name(interval: Interval) -> str:
    return interval.to_json()["start"]


def check(interval: Interval) -> dict[str, Any]:
    """The Great Expectations checkpoint on the interval's rows of `raw.readings`."""
    from expectations.runner import run_readings_checkpoint

    rows = warehouse().read_readings(interval)
    with gx_results(interval) as root:
        result = run_readings_checkpoint(
            rows, interval.start, interval.end, results_root=root, run_name=_run_name(interval)
        )
    return _gate(result.to_json(), "checkpoint")


def reconciliation(engine: Any, interval: Interval, results_root: Path | None = None) -> Any:
    """Reconcile the warehouse's traffic marts with its raw readings for the interval (a `CheckpointSummary`)."""
    from expectations.marts import TRAFFIC_MARTS
    from expectations.runner import run_reconciliation

    raw = {
        spec.table: engine.read_raw_bucket_counts(spec.buckets(interval.start, interval.end), spec.minutes, spec.entity)
        for spec in TRAFFIC_MARTS
    }
    marts = {
        spec.table: engine.read_bucket_counts(interval, spec.relation, spec.entity, spec.bucket)
        for spec in TRAFFIC_MARTS
    }
    return run_reconciliation(
        raw,
        marts,
        interval.start,
        interval.end,
        results_root=results_root,
        run_name=_run_name(interval),
    )


def reconcile(interval: Interval) -> dict[str, Any]:
    """The marts gate: traffic marts' interval totals and time spine against raw."""
    with gx_results(interval) as root:
        result = reconciliation(warehouse(), interval, root)
    return _gate(result.to_json(), "reconciliation")


def write_report(
    interval: Interval, dag_id: str, run_id: str, steps: dict[str, dict[str, Any] | None]
) -> dict[str, Any]:
    """Write the run report to the lake; return it without the per-step detail (the event)."""
    from citypulse_batch.report import build_report

    report = build_report(interval, dag_id, run_id, steps)
    the_lake = lake()
    key = report_key(interval)
    the_lake.write_json(key, report)
    event = {k: v for k, v in report.items() if k != "steps"}
    event["report_uri"] = the_lake.uri(key)
    return event


# --- daily ---------------------------------------------------------------------------------


def build_daily(interval: Interval) -> dict[str, Any]:
    """`dbt build` of the daily marts (sensor health, corridors, peak profiles) for whole days.
    First it records in the lake that each day's build has begun (`daily_build_key`): an hourly
    run that commits one of the day's hours after that builds the day again (`run_hours`)."""
    the_lake = lake()
    begun_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for day in interval.days():
        the_lake.write_json(daily_build_key(day.start), {"day": day.to_json(), "begun_at": begun_at})
    return _dbt_build(interval, "daily dbt build", select=setting("dbt_daily_select"))


def daily_build_begun(day: Interval) -> bool:
    """Whether the daily marts' build of `day` has begun (`build_daily` recorded it)."""
    return lake().read_json(daily_build_key(day.start)) is not None


# What the hourly DAG's build keeps the daily marts whole with (`run_hours`).
DAILY_MARTS = DailyMarts(build_daily, daily_build_begun)


def retention(interval: Interval) -> dict[str, Any]:
    """Delete lake partitions and warehouse rows older than `retention_days` before the interval's end."""
    from citypulse_batch.retention import apply_retention, cutoff_for

    cutoff = cutoff_for(interval.end, int(setting("retention_days")))
    return apply_retention(warehouse(), lake(), cutoff).to_json()


def docs_dir() -> tuple[Path, bool]:
    """Where docs are written: the configured directory (kept), or a temporary one (uploaded to the lake)."""
    configured = setting("docs_dir")
    if configured:
        return Path(configured), False
    return Path(tempfile.mkdtemp(prefix="citypulse-docs-")), True


def _upload_tree(root: Path, prefix: str) -> int:
    the_lake = lake()
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content_type = "text/html" if path.suffix == ".html" else "application/json"
        key = prefix + path.relative_to(root).as_posix()
        the_lake.client.put_object(Bucket=the_lake.bucket, Key=key, Body=path.read_bytes(), ContentType=content_type)
        count += 1
    return count


def dbt_docs(interval: Interval) -> dict[str, Any]:
    """`dbt docs generate --static` into `<docs_dir>/dbt/` (or the lake's `docs/dbt/`)."""
    from citypulse_batch.dbt_build import find_project_dir, generate_docs

    engine = warehouse()
    root, upload = docs_dir()
    result = generate_docs(
        find_project_dir(setting("dbt_project_dir")),
        setting("dbt_target") or engine.dbt_target,
        engine.dbt_env(),
        root / "dbt",
        setting("dbt_executable"),
    )
    if upload:
        result["uploaded"] = _upload_tree(root / "dbt", "docs/dbt/")
        result["index"] = lake().uri("docs/dbt/index.html")
        shutil.rmtree(root, ignore_errors=True)
    return result


def data_docs(interval: Interval) -> dict[str, Any]:
    """Great Expectations data docs of the interval's stored validation results, into `<docs_dir>/gx/`
    (or the lake's `docs/gx/`)."""
    from expectations.docs import build_data_docs

    the_lake = lake()
    root, upload = docs_dir()
    with tempfile.TemporaryDirectory(prefix="citypulse-gx-") as work:
        store = Path(work) / "validations"
        count = 0
        for hour in interval.hours():
            prefix = gx_results_prefix(hour)
            for key in the_lake.list_keys(prefix, ".json"):
                target = store / key.removeprefix(prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(the_lake.read(key))
                count += 1
        result = build_data_docs(store, root / "gx", Path(work) / "context")
    result["validation_results"] = count
    if upload:
        result["uploaded"] = _upload_tree(root / "gx", "docs/gx/")
        result["index"] = the_lake.uri("docs/gx/index.html")
        shutil.rmtree(root, ignore_errors=True)
    return result
