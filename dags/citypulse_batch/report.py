"""The hourly run report: one small JSON document per interval, written to the lake.

Place in the flow: the last step of every hourly run, whatever happened before it, writes
`reports/hourly/dt=…/hour=…/report.json`. The platform's CLI summary and the completion
event read it, in AWS and locally alike, instead of scraping Airflow.
"""

from __future__ import annotations

from typing import Any

from citypulse_batch.lake import Interval

REPORT_VERSION = 1
STEPS = ("load", "dbt", "expectations", "reconciliation", "compaction")
# Where a step's summary holds those of the earlier hours the run loaded again, by hour.
RELOADED = "reloaded"
# ... and the daily build's of each whole day the run completed, by day.
DAYS = "days"


def build_report(
    interval: Interval, dag_id: str, run_id: str, steps: dict[str, dict[str, Any] | None]
) -> dict[str, Any]:
    """The run report from the step summaries (None for a step that did not get to report).

    Deterministic for the same inputs: no wall-clock time, so a re-run of an unchanged
    interval rewrites an identical document.
    """
    load = steps.get("load") or {}
    dbt = steps.get("dbt") or {}
    quality = steps.get("expectations") or {}
    reconciliation = steps.get("reconciliation") or {}
    compaction = steps.get("compaction") or {}
    failed_step = next((name for name in STEPS if not _succeeded(steps.get(name))), None)
    return {
        "report_version": REPORT_VERSION,
        "dag_id": dag_id,
        "run_id": run_id,
        "interval": interval.to_json(),
        "status": "succeeded" if failed_step is None else "failed",
        "failed_step": failed_step,
        "rows_loaded": load.get("rows_loaded"),
        "duplicates_dropped": load.get("duplicates_dropped"),
        "rows_outside_interval": load.get("rows_outside_interval"),
        "quarantined": load.get("quarantined"),
        "dbt_models_passed": dbt.get("models_passed"),
        "dbt_models_failed": dbt.get("models_failed"),
        "dbt_tests_passed": dbt.get("tests_passed"),
        "dbt_tests_failed": dbt.get("tests_failed"),
        "expectations_evaluated": quality.get("evaluated"),
        "expectations_passed": quality.get("passed"),
        "reconciliation_evaluated": reconciliation.get("evaluated"),
        "reconciliation_passed": reconciliation.get("passed"),
        "lake_objects_before_compaction": compaction.get("objects_before"),
        "lake_objects_after_compaction": compaction.get("objects_after"),
        # Earlier hours this run loaded again: objects reached their partitions after their load.
        "reloaded_hours": sorted(load.get(RELOADED, {})),
        # Whole days this run completed, whose daily marts it built again.
        "daily_marts_built": sorted(dbt.get(DAYS, {})),
        "steps": {name: steps.get(name) for name in STEPS},
    }


def _succeeded(summary: dict[str, Any] | None) -> bool:
    # A step that never reported did not succeed; the load has no verdict of its own.
    return summary is not None and summary.get("success", True) is True
