"""What the DAG files need that differs between Airflow 3.0.x (MWAA) and 3.3, in one place."""

from __future__ import annotations

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.0.x (MWAA) has it only in core
    from airflow.timetables.interval import CronDataIntervalTimetable

# The Amazon provider's crawler lifecycle operators (create, update, run) arrived in 2026 (9.3x);
# MWAA's Airflow 3.0.x constraints pin a provider from before, which has only the combined,
# now deprecated `GlueCrawlerOperator` (create or update, then run). Without this the hourly DAG
# failed to import on MWAA (found by a review).
try:
    from airflow.providers.amazon.aws.operators.glue_crawler import (
        GlueCrawlerCreateOperator,
        GlueCrawlerRunOperator,
        GlueCrawlerUpdateOperator,
    )

    CRAWLER_LIFECYCLE_OPERATORS = True
except ImportError:  # an Amazon provider before the lifecycle operators
    CRAWLER_LIFECYCLE_OPERATORS = False

__all__ = [
    "CRAWLER_LIFECYCLE_OPERATORS",
    "CronDataIntervalTimetable",
    "GlueCrawlerCreateOperator",
    "GlueCrawlerRunOperator",
    "GlueCrawlerUpdateOperator",
    "base_hook",
    "task_failure",
]


def base_hook() -> type:
    """`BaseHook`, for connections: in the Task SDK from Airflow 3.1, in core before (3.0.x,
    MWAA's line, where `from airflow.sdk import BaseHook` fails when the task runs)."""
    try:
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 3.0.x
        from airflow.hooks.base import BaseHook
    return BaseHook


def task_failure(exc: Exception, retryable: bool) -> Exception:
    """The exception that fails the task: a data verdict must not be retried."""
    if retryable:
        return exc
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # Airflow 3.0.x
        from airflow.exceptions import AirflowFailException
    return AirflowFailException(str(exc))
