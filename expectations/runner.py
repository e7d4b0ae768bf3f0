"""Run the quality checkpoints with Great Expectations 1.x: the readings and the marts reconciliation.

Place in the flow: called by the hourly DAG's `quality_check` task with the interval's rows
of `raw.readings`, and by its `reconcile_marts` task with those rows and the traffic marts'
interval rows (read back from the warehouse after the load and `dbt build`). A task fails
when its checkpoint fails, which keeps the publish from running and fires the
`PipelineFailed` alert.

GX is imported inside the functions (its import costs ~6 s of CPU); no progress bars clutter
task logs. With `results_root` the run uses a GX file data context there, whose validation
results store keeps every result for the data docs (`expectations.docs`); without, nothing
is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from expectations.marts import TRAFFIC_MARTS, reconciliation_expectations, reconciliation_frame
from expectations.readings import SUITE_NAME, ExpectationSpec, reading_expectations

RECONCILIATION_NAME = "citypulse_reconcile_marts"

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
    """A pandas DataFrame from a pyarrow Table or DataFrame, its text as pandas' Arrow-backed
    `StringDtype()` and its timestamps as `datetime64[ns]`: the dtypes on which GX's checks run
    a column at a time (bench/batch_bench.py, docs/performance.md).

    Text: a column of exactly `StringDtype()` holds only strings and nulls, so GX's type list
    checks its dtype once; on `object` (or on pandas 3's default text dtype,
    StringDtype(na_value=nan), which GX's type list cannot name) it tests every value, and every
    null check walks Python objects. Timestamps: GX's range checks run element by element on
    datetime64[ms|us] (what the warehouse's timestamps arrive as), ~20x slower than on
    datetime64[ns]; contract timestamps (2000-2100) fit ns."""
    import pandas as pd
    import pyarrow as pa

    text = pd.StringDtype()
    if isinstance(data, pa.Table):
        # Converted on the way out of Arrow: ~30x cheaper than astype afterwards (3 M rows).
        return data.to_pandas(
            types_mapper=lambda t: text if pa.types.is_string(t) or pa.types.is_large_string(t) else None,
            coerce_temporal_nanoseconds=True,
        )
    frame = data
    for column in frame.columns:
        dtype = frame[column].dtype
        if isinstance(dtype, pd.StringDtype) and dtype != text:
            frame[column] = frame[column].astype(text)
        elif pd.api.types.is_datetime64_dtype(dtype) and dtype != "datetime64[ns]":
            frame[column] = frame[column].astype("datetime64[ns]")
    return frame


def _plain(value: Any) -> Any:
    # numpy scalars and timestamps in GX results become JSON-friendly values.
    return json.loads(json.dumps(value, default=str))


def _failure(result: Any, suite: str) -> dict[str, Any]:
    config = result.expectation_config
    detail = result.result or {}
    kwargs = config.kwargs
    pair = [kwargs["column_A"], kwargs["column_B"]] if "column_A" in kwargs else None
    failure = {
        "suite": suite,
        "expectation": config.type,
        "column": kwargs.get("column") or kwargs.get("column_list") or pair,
        "observed": detail.get("observed_value"),
        "unexpected_count": detail.get("unexpected_count"),
        "unexpected_sample": (detail.get("partial_unexpected_list") or [])[:_SAMPLE],
    }
    exception = result.exception_info or {}
    if exception.get("raised_exception"):
        failure["exception"] = str(exception.get("exception_message"))
    return _plain(failure)


@dataclass(frozen=True, slots=True)
class Validation:
    """One suite over one frame (pyarrow Table or pandas DataFrame)."""

    suite: str
    data: Any
    specs: list[ExpectationSpec]


def _context(results_root: Path | None) -> Any:
    """An ephemeral context, or a file context rooted at `results_root` that keeps suites and results."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    if results_root is None:
        return gx.get_context(
            mode="ephemeral",
            project_config=DataContextConfig(
                store_backend_defaults=InMemoryStoreBackendDefaults(),
                progress_bars=ProgressBarsConfig(globally=False),
            ),
        )
    context = gx.get_context(mode="file", project_root_dir=str(results_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_validations(
    name: str, validations: list[Validation], *, results_root: Path | None = None, run_name: str | None = None
) -> CheckpointSummary:
    """Run each validation as a GX checkpoint; one summary for all of them.

    `results_root`: a GX file data context there stores the suites and every validation
    result (`gx/uncommitted/validations/`), from which `expectations.docs` builds data docs;
    None keeps everything in memory. `run_name` names the run in those results (the interval).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.core.run_identifier import RunIdentifier

    started = time.monotonic()
    context = _context(results_root)
    source = context.data_sources.add_or_update_pandas("warehouse")
    # The run time is the validation's own (GX would parse a date-like run name into it,
    # and a rerun of the interval would then overwrite the first run's results).
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC)) if run_name else None
    evaluated = passed = rows = 0
    success = True
    failures: list[dict[str, Any]] = []
    for validation in validations:
        frame = _frame(validation.data)
        rows += len(frame)
        batch = source.add_dataframe_asset(validation.suite).add_batch_definition_whole_dataframe("interval")
        # The whole suite in one call: added one at a time, each expectation re-serialises the
        # suite so far into the store (quadratic; ~0.8 s for the 53 of the readings suite).
        expectations = [getattr(gxe, spec.expectation)(**spec.kwargs) for spec in validation.specs]
        suite = gx.ExpectationSuite(name=validation.suite, expectations=expectations)
        # Saved through the checkpoint alone, which saves its validation definition and that
        # its suite: each extra add_or_update of a stored suite compares every expectation
        # with every stored one (quadratic; ~0.27 s per pass for the readings suite).
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"{validation.suite}_checkpoint",
                validation_definitions=[
                    gx.ValidationDefinition(name=f"{validation.suite}_interval", data=batch, suite=suite)
                ],
                actions=[],
                # BASIC holds all a failure reports (observed value, unexpected count, the first
                # 20 unexpected values) and the data docs' observed values; SUMMARY's unexpected
                # value counts and index lists cost ~1.1 s more at 3 M rows (docs/performance.md).
                result_format={"result_format": "BASIC"},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        success = success and bool(result.success)
        for run in result.run_results.values():
            stats = run.statistics
            evaluated += int(stats["evaluated_expectations"])
            passed += int(stats["successful_expectations"])
            failures.extend(_failure(r, validation.suite) for r in run.results if not r.success)
    return CheckpointSummary(
        success=success,
        suite=name,
        rows=rows,
        evaluated=evaluated,
        passed=passed,
        failures=failures,
        seconds=round(time.monotonic() - started, 2),
    )


def run_readings_checkpoint(
    data: Any,
    interval_start: datetime,
    interval_end: datetime,
    *,
    results_root: Path | None = None,
    run_name: str | None = None,
) -> CheckpointSummary:
    """The hourly quality gate: the contract's suite plus "every ts inside the interval"."""
    validation = Validation(SUITE_NAME, data, reading_expectations(interval_start, interval_end))
    return run_validations(SUITE_NAME, [validation], results_root=results_root, run_name=run_name)


def run_reconciliation(
    raw_rows: dict[str, Any],
    mart_rows: dict[str, Any],
    interval_start: datetime,
    interval_end: datetime,
    *,
    results_root: Path | None = None,
    run_name: str | None = None,
) -> CheckpointSummary:
    """The marts gate: each traffic mart's interval reconciled with the interval's raw readings.

    `raw_rows`, `mart_rows`: table name -> pyarrow Table (entity_id, bucket_start,
    reading_count, vehicle_count) of raw grouped by that mart's entity and buckets
    (`Warehouse.read_raw_bucket_counts`), and of the mart's rows inside the interval
    (`Warehouse.read_bucket_counts`).
    """
    validations = []
    for spec in TRAFFIC_MARTS:
        frame = reconciliation_frame(spec, raw_rows[spec.table], mart_rows[spec.table], interval_start, interval_end)
        validations.append(Validation(spec.suite, frame, reconciliation_expectations(spec, frame)))
    return run_validations(RECONCILIATION_NAME, validations, results_root=results_root, run_name=run_name)
