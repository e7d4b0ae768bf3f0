"""citypulse_hourly: one hour of the S3 lake -> warehouse raw -> dbt marts -> quality gate -> publish.

Place in the flow: the batch path. The streaming processor lands validated readings in the
lake, partitioned by event time; for each hourly `data_interval` this DAG

1. waits for the interval's lake partition (`S3KeySensor`, reschedule mode),
2. runs the Glue crawler over `raw/readings/` (creating or updating it first),
3. loads the interval into warehouse raw - delete-then-insert of exactly
   [data_interval_start, data_interval_end) by `ts`, deduplicated on (sensor_id, seq), plus
   the sensor registry and the interval's quarantine counts, in one transaction; and loads
   again each earlier hour (`late_lookback_hours`) whose lake partitions gained objects after
   its own load (`citypulse_batch.ledger`), which the steps below then take again too,
4. runs `dbt build` for the affected models with the interval in the environment
   (CITYPULSE_INTERVAL_START/_END),
   and, beside the build, compacts the interval's lake partitions (`citypulse_batch.compaction`),
5. runs the Great Expectations checkpoints (failure of either stops the publish): the
   contract's suite on the loaded rows, and the reconciliation of the traffic marts with
   them (interval totals, time spine); their validation results are stored in the lake,
6. refreshes the configured QuickSight datasets (mapped; none configured -> nothing runs),
7. puts `HourlyLoadCompleted` on the EventBridge bus,

and writes a run report to `reports/hourly/dt=…/hour=…/report.json` whatever happened.

The file is thin: task bodies live in `citypulse_batch` (on MWAA the dags folder is on
sys.path). Nothing here does I/O at parse time; settings are read when tasks run. Local and
AWS differ only by configuration: Airflow connections `aws_default` and
`citypulse_warehouse` (duckdb / postgres / redshift) and the settings in
`citypulse_batch.settings` (Variables `citypulse_*` or env `CITYPULSE_*`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from airflow.providers.amazon.aws.operators.eventbridge import EventBridgePutEventsOperator
from airflow.providers.amazon.aws.operators.quicksight import QuickSightCreateIngestionOperator
from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import dag, task

from citypulse_batch import airflow_compat
from citypulse_batch.airflow_compat import CronDataIntervalTimetable
from citypulse_batch.events import HOURLY_LOAD_COMPLETED, SOURCE, on_run_failure, on_task_failure
from citypulse_batch.lake import readings_wildcard
from citypulse_batch.settings import setting, setting_list
from citypulse_batch.steps import crawler_config, run_step

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "citypulse-data",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    # Doubles each retry (1, 2, 4 min), capped: transient S3/Glue/warehouse errors clear up.
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=15),
    "execution_timeout": timedelta(minutes=30),
    "on_failure_callback": on_task_failure,
}


@dag(
    dag_id="citypulse_hourly",
    description="Lake hour -> warehouse raw -> dbt marts -> Great Expectations -> QuickSight -> event",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    # One run at a time: the crawler cannot run twice at once and DuckDB has one writer.
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=4),
    # A run that times out skips its unfinished tasks, whose callbacks never run.
    on_failure_callback=on_run_failure,
    default_args=DEFAULT_ARGS,
    tags=["citypulse", "batch", "hourly"],
    doc_md=__doc__,
    user_defined_macros={"citypulse_setting": setting, "citypulse_readings_wildcard": readings_wildcard},
)
def citypulse_hourly() -> None:
    wait_for_partition = S3KeySensor(
        task_id="wait_for_partition",
        bucket_name="{{ citypulse_setting('lake_bucket') }}",
        bucket_key="{{ citypulse_readings_wildcard(data_interval_start) }}",
        wildcard_match=True,
        mode="reschedule",
        poke_interval=60,
        exponential_backoff=False,
        timeout=timedelta(hours=2).total_seconds(),
    )

    if airflow_compat.CRAWLER_LIFECYCLE_OPERATORS:

        @task.branch(task_id="crawler_exists", execution_timeout=timedelta(minutes=5))
        def crawler_exists() -> str:
            from citypulse_batch import steps

            return "update_crawler" if steps.crawler_exists() else "create_crawler"

        create_crawler = airflow_compat.GlueCrawlerCreateOperator(task_id="create_crawler", config=crawler_config())
        update_crawler = airflow_compat.GlueCrawlerUpdateOperator(task_id="update_crawler", config=crawler_config())
        run_crawler = airflow_compat.GlueCrawlerRunOperator(
            task_id="run_crawler",
            crawler_name="{{ citypulse_setting('glue_crawler') }}",
            poll_interval=5,
            # A retry after a lost response must wait for the crawl it started, not fail on it.
            fail_on_already_running=False,
            trigger_rule="none_failed_min_one_success",
        )
        wait_for_partition >> crawler_exists() >> [create_crawler, update_crawler] >> run_crawler
    else:  # MWAA's Airflow 3.0.x provider: one operator creates or updates, then runs (it cannot
        # wait for a crawl already running: a retry after a lost answer fails, and retries)
        from airflow.providers.amazon.aws.operators.glue_crawler import GlueCrawlerOperator

        run_crawler = GlueCrawlerOperator(task_id="run_crawler", config=crawler_config(), poll_interval=5)
        wait_for_partition >> run_crawler

    @task(task_id="load_warehouse")
    def load_warehouse(**context: Any) -> None:
        from citypulse_batch import steps

        run_step(steps.load, context, reloaded=False)

    # After the load (the warehouse holds the interval before its files change), beside the
    # build: it touches the lake only.
    @task(task_id="compact_lake")
    def compact_lake(**context: Any) -> None:
        from citypulse_batch import steps

        # The run names its generations: a retry of this task undoes its stopped attempt's at once.
        run_step(partial(steps.compact, run=context["run_id"]), context)

    # One build at a time across runs (a backfill's beside the scheduled one): the table models
    # and the registry snapshot are rebuilt whole, and two snapshot merges at once could each
    # add a current row. (The loads and the incremental marts take turns on their tables.)
    @task(task_id="dbt_build", execution_timeout=timedelta(minutes=45), max_active_tis_per_dag=1)
    def dbt_build(**context: Any) -> None:
        from citypulse_batch import steps

        # ... and the daily marts of each day of its hours whose daily build has begun: that
        # build may have read the day before this run's hours were in (late, or a run late).
        run_step(steps.build, context, daily=steps.DAILY_MARTS)

    @task(task_id="quality_check", execution_timeout=timedelta(minutes=20))
    def quality_check(**context: Any) -> None:
        from citypulse_batch import steps

        run_step(steps.check, context)

    @task(task_id="reconcile_marts", execution_timeout=timedelta(minutes=20))
    def reconcile_marts(**context: Any) -> None:
        from citypulse_batch import steps

        run_step(steps.reconcile, context)

    @task(task_id="quicksight_datasets", execution_timeout=timedelta(minutes=5))
    def quicksight_datasets(**context: Any) -> list[str]:
        from citypulse_batch import steps

        run_type = context["dag_run"].run_type
        run_type = str(getattr(run_type, "value", run_type))  # DagRunType, a str enum
        datasets = steps.datasets_to_refresh(run_type, setting_list("quicksight_dataset_ids"))
        if not datasets:
            print(f"a {run_type} run refreshes no QuickSight dataset (the next scheduled run does)")
        return datasets

    # Runs whatever happened upstream (all_done): the report is how a failed hour is explained.
    @task(task_id="write_report", trigger_rule="all_done", retries=1, execution_timeout=timedelta(minutes=5))
    def write_report(**context: Any) -> dict[str, Any]:
        from citypulse_batch import steps
        from citypulse_batch.lake import Interval

        ti = context["ti"]
        summaries = {
            name: ti.xcom_pull(task_ids=task_id, key="summary")
            for name, task_id in (
                ("load", "load_warehouse"),
                ("dbt", "dbt_build"),
                ("expectations", "quality_check"),
                ("reconciliation", "reconcile_marts"),
                ("compaction", "compact_lake"),
            )
        }
        interval = Interval(context["data_interval_start"], context["data_interval_end"])
        return steps.write_report(interval, ti.dag_id, ti.run_id, summaries)

    datasets = quicksight_datasets()
    publish = QuickSightCreateIngestionOperator.partial(
        task_id="publish",
        ingestion_id="citypulse-{{ data_interval_start.strftime('%Y%m%dT%H') }}-{{ ti.try_number }}",
        ingestion_type="FULL_REFRESH",
        execution_timeout=timedelta(minutes=30),
    ).expand(data_set_id=datasets)

    notify = EventBridgePutEventsOperator(
        task_id="notify",
        entries=[
            {
                "Source": SOURCE,
                "DetailType": HOURLY_LOAD_COMPLETED,
                "Detail": "{{ ti.xcom_pull(task_ids='write_report') | tojson }}",
                "EventBusName": "{{ citypulse_setting('event_bus') }}",
            }
        ],
        # Publishing nothing (no datasets configured) is fine; a failed quality gate is not.
        trigger_rule="none_failed",
        execution_timeout=timedelta(minutes=5),
    )

    loaded = load_warehouse()
    built = dbt_build()
    compacted = compact_lake()
    checked = quality_check()
    reconciled = reconcile_marts()
    report = write_report()

    run_crawler >> loaded
    loaded >> built >> [checked, reconciled] >> datasets
    loaded >> compacted
    [loaded, built, checked, reconciled, compacted] >> report
    [publish, report] >> notify


hourly_dag = citypulse_hourly()
