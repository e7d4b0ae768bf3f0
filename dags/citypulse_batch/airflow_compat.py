"""What the DAG files need that differs between Airflow 3.0.x (MWAA) and 3.3, in one place."""

from __future__ import annotations

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.0.x (MWAA) has it only in core
    from airflow.timetables.interval import CronDataIntervalTimetable

__all__ = ["CronDataIntervalTimetable", "task_failure"]


def task_failure(exc: Exception, retryable: bool) -> Exception:
    """The exception that fails the task: a data verdict must not be retried."""
    if retryable:
        return exc
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # Airflow 3.0.x
        from airflow.exceptions import AirflowFailException
    return AirflowFailException(str(exc))
