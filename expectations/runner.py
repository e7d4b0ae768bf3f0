"""Run the readings checkpoint: Great Expectations 1.x, ephemeral context, one interval's rows.

Place in the flow: called by the hourly DAG's `quality_check` task with the interval's rows
of `raw.readings` (read back from the warehouse after the load and `dbt build`). The task
fails when the checkpoint fails, which keeps the publish from running and fires the
`PipelineFailed` alert.

GX is imported inside `run_readings_checkpoint` (its import costs ~6 s of CPU); nothing is
written to disk (ephemeral context, no data docs) and no progress bars clutter task logs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from expectations.readings import SUITE_NAME, ExpectationSpec, reading_expectations

_SAMPLE = 5


@dataclass(slots=True)
class CheckpointSummary:
    """The checkpoint's verdict; small enough for XCom and the run report."""

    success: bool
    suite: str
    rows: int
    evaluated: int
    passed: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _frame(data: Any) -> Any:
    """A pandas DataFrame from a pyarrow Table or DataFrame, with text as `object` columns."""
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else data.to_pandas()
    for column in frame.columns:
        # GX's type list compares dtypes by identity; pandas' StringDtype variants (pandas 3
        # reads text as StringDtype(na_value=nan)) cannot be named there, `object` can.
        if isinstance(frame[column].dtype, pd.StringDtype):
            frame[column] = frame[column].astype(object)
    return frame


def _plain(value: Any) -> Any:
    # numpy scalars and timestamps in GX results become JSON-friendly values.
    return json.loads(json.dumps(value, default=str))


def _failure(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    detail = result.result or {}
    failure = {
        "expectation": config.type,
        "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
        "observed": detail.get("observed_value"),
        "unexpected_count": detail.get("unexpected_count"),
        "unexpected_sample": (detail.get("partial_unexpected_list") or [])[:_SAMPLE],
    }
    exception = result.exception_info or {}
    if exception.get("raised_exception"):
        failure["exception"] = str(exception.get("exception_message"))
    return _plain(failure)


def run_checkpoint(data: Any, specs: list[ExpectationSpec], suite_name: str = SUITE_NAME) -> CheckpointSummary:
    """Validate `data` (pyarrow Table or pandas DataFrame) against `specs` with a GX checkpoint."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    started = time.monotonic()
    frame = _frame(data)
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas("warehouse")
        .add_dataframe_asset("readings")
        .add_batch_definition_whole_dataframe("interval")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for spec in specs:
        suite.add_expectation(getattr(gxe, spec.expectation)(**spec.kwargs))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite_name}_interval", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{suite_name}_checkpoint",
            validation_definitions=[validation],
            actions=[],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})

    evaluated = passed = 0
    failures: list[dict[str, Any]] = []
    for run in result.run_results.values():
        stats = run.statistics
        evaluated += int(stats["evaluated_expectations"])
        passed += int(stats["successful_expectations"])
        failures.extend(_failure(r) for r in run.results if not r.success)
    return CheckpointSummary(
        success=bool(result.success),
        suite=suite_name,
        rows=len(frame),
        evaluated=evaluated,
        passed=passed,
        failures=failures,
        seconds=round(time.monotonic() - started, 2),
    )


def run_readings_checkpoint(data: Any, interval_start: datetime, interval_end: datetime) -> CheckpointSummary:
    """The hourly quality gate: the contract's suite plus "every ts inside the interval"."""
    return run_checkpoint(data, reading_expectations(interval_start, interval_end))
