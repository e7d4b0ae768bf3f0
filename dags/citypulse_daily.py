"""citypulse_daily: one UTC day -> daily marts, retention, dbt docs.

Place in the flow: the batch path's daily housekeeping, after the day's hourly runs. For the
`data_interval` [00:00, 24:00) of a day it

1. builds the daily marts (`tag:daily`: sensor health and completeness, corridor rankings,
   peak-hour profiles) for the whole day, with their tests (`dbt build`),
2. applies retention: lake partitions and warehouse rows older than `retention_days` before
   the interval's end are deleted, then the engine vacuums where it supports it,
3. writes the dbt docs as a static site (`dbt docs generate --static`) to
   `<docs_dir>/dbt/index.html`, or to the lake's `docs/dbt/` when no directory is configured,
4. builds the Great Expectations data docs of the day's stored validation results (the hourly
   gates') to `<docs_dir>/gx/index.html` (or the lake's `docs/gx/`),

and every task's failure puts `PipelineFailed` on the bus. The build waits until an hour past
the day's end (`DAILY_BUILD_DELAY`, `steps.daily_build_due`): the hourly run of the day's last
hour starts at midnight too, and usually ends well within the hour. A run by hand of a day not
over yet (the demo) builds at once. The build first records in the lake that it has begun
(`steps.build_daily`): an hourly run that commits one of the day's hours after that (hour 23
later than the wait, an hour re-run or loaded again as late, a backfill) builds the day's
daily marts again (`steps.run_hours`), taking turns with this DAG's build on the marts.

Thin like `citypulse_hourly`: task bodies are in `citypulse_batch.steps`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import dag, task

from citypulse_batch.airflow_compat import CronDataIntervalTimetable
from citypulse_batch.events import on_run_failure, on_task_failure

# How long after the day's end its daily marts are built: the day's last hourly run (which starts
# at midnight too, then crawls and loads) must have loaded it by then.
DAILY_BUILD_DELAY = 60  # minutes

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "citypulse-data",
    "retries": 3,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(minutes=45),
    "on_failure_callback": on_task_failure,
}


def _run(step_name: str, context: dict[str, Any]) -> None:
    """Run `citypulse_batch.steps.<step_name>` for the day (`steps.run_step`)."""
    from citypulse_batch import steps

    steps.run_step(getattr(steps, step_name), context, reloaded=False)


@dag(
    dag_id="citypulse_daily",
    description="Day -> daily marts (sensor health, corridors, peak profiles) -> retention -> dbt docs, data docs",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=6),
    # A run that times out skips its unfinished tasks, whose callbacks never run.
    on_failure_callback=on_run_failure,
    default_args=DEFAULT_ARGS,
    tags=["citypulse", "batch", "daily"],
    doc_md=__doc__,
)
def citypulse_daily() -> None:
    @task.sensor(
        task_id="wait_for_last_hour", mode="reschedule", poke_interval=300, timeout=timedelta(hours=3).total_seconds()
    )
    def wait_for_last_hour(**context: Any) -> bool:
        from citypulse_batch.steps import daily_build_due

        return daily_build_due(context["data_interval_end"], datetime.now(UTC), timedelta(minutes=DAILY_BUILD_DELAY))

    @task(task_id="dbt_build_daily", execution_timeout=timedelta(hours=1))
    def dbt_build_daily(**context: Any) -> None:
        _run("build_daily", context)

    @task(task_id="retention")
    def retention(**context: Any) -> None:
        _run("retention", context)

    @task(task_id="dbt_docs", execution_timeout=timedelta(minutes=20))
    def dbt_docs(**context: Any) -> None:
        _run("dbt_docs", context)

    @task(task_id="data_docs", execution_timeout=timedelta(minutes=20))
    def data_docs(**context: Any) -> None:
        _run("data_docs", context)

    # Retention after the build (the build reads the day); docs last, describing what is left.
    wait_for_last_hour() >> dbt_build_daily() >> retention() >> [dbt_docs(), data_docs()]


daily_dag = citypulse_daily()
