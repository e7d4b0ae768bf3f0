"""Batch-path events on the EventBridge bus: `HourlyLoadCompleted` and `PipelineFailed`.

Place in the flow: the hourly DAG's last task announces a completed interval (through the
provider's `EventBridgePutEventsOperator`), and every task's failure callback announces a
failure (through the provider's `EventBridgeHook`). Rules on the bus route them to SNS /
Slack in AWS and to whatever the local platform subscribes.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from citypulse_batch.settings import AWS_CONN_ID, setting

SOURCE = "citypulse.batch"
HOURLY_LOAD_COMPLETED = "HourlyLoadCompleted"
PIPELINE_FAILED = "PipelineFailed"

# EventBridge rejects entries over 256 KB; error texts are cut well below that.
_MAX_ERROR_CHARS = 2000

# The line every task that has failed for good logs (its failure callback): the stack's metric
# filter on MWAA's task log group counts it (DagTaskFailuresMetricFilter; a test holds them equal).
FAILURE_LOG_LINE = "citypulse task failed"

log = logging.getLogger(__name__)


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def failure_detail(context: dict[str, Any]) -> dict[str, Any]:
    """The `PipelineFailed` detail for a failed task, from its Airflow context."""
    ti = context.get("ti") or context.get("task_instance")
    exception = context.get("exception")
    error = None if exception is None else f"{type(exception).__name__}: {exception}"[:_MAX_ERROR_CHARS]
    return {
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "map_index": getattr(ti, "map_index", None),
        "run_id": getattr(ti, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "interval": {"start": _iso(context.get("data_interval_start")), "end": _iso(context.get("data_interval_end"))},
        "error": error,
    }


def event_entry(detail_type: str, detail: dict[str, Any], bus: str) -> dict[str, str]:
    """One PutEvents entry."""
    return {
        "Source": SOURCE,
        "DetailType": detail_type,
        "Detail": json.dumps(detail, sort_keys=True, default=str),
        "EventBusName": bus,
    }


_NAMED = ("dag_id", "task_id", "run_id", "try_number")


def on_task_failure(context: dict[str, Any]) -> None:
    """Failure callback of every hourly task: put `PipelineFailed` on the bus.

    Never raises: a broken alert path must not hide the task's own failure in the logs. Logs
    `FAILURE_LOG_LINE` first, which the ops alarm counts, whether or not the event goes out.
    """
    _announce(failure_detail(context))


def on_run_failure(context: dict[str, Any]) -> None:
    """Failure callback of both DAGs, for a run that failed with no task failing: a run past
    its `dagrun_timeout` has its unfinished tasks skipped (no task callback runs, and the
    report is skipped with them), so without this it failed silently (found by a review). A
    run failed by a task was announced by that task's own callback: not again. It runs in the
    DAG processor, so its log line lands in the DAG-processing logs, which the failure metric
    filter (task logs) does not read: the event on the bus is the announcement."""
    reason = context.get("reason")
    if reason == "task_failure":
        return
    detail = failure_detail(context)
    dag = context.get("dag")
    detail["dag_id"] = detail["dag_id"] or getattr(dag, "dag_id", None)
    detail["run_id"] = detail["run_id"] or context.get("run_id")
    detail["reason"] = reason
    detail["error"] = detail["error"] or f"the run failed: {reason}"
    _announce(detail)


def _announce(detail: dict[str, Any]) -> None:
    log.error("%s: dag_id=%s task_id=%s run_id=%s try=%s", FAILURE_LOG_LINE, *(detail[k] for k in _NAMED))
    try:
        from airflow.providers.amazon.aws.hooks.eventbridge import EventBridgeHook

        entry = event_entry(PIPELINE_FAILED, detail, setting("event_bus"))
        response = EventBridgeHook(aws_conn_id=AWS_CONN_ID).conn.put_events(Entries=[entry])
        if response.get("FailedEntryCount"):
            log.error("EventBridge rejected the PipelineFailed event: %s", response.get("Entries"))
    except Exception:
        log.exception("could not put the PipelineFailed event on the bus")
