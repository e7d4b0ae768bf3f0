"""DAG integrity of `citypulse_hourly`: parses fast with no I/O, and has the promised shape.

Unit tests (no servers). The parse check runs in a fresh interpreter with sockets, SQLite
and AWS clients refused, exactly as `python dags/citypulse_hourly.py` would run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
DAG_FILE = DAGS / "citypulse_hourly.py"

_PARSE_PROBE = r"""
import json, runpy, socket, sqlite3, sys

import airflow.sdk  # the framework a DAG processor has loaded before it parses files

def refuse(*args, **kwargs):
    raise RuntimeError("I/O while parsing the DAG file")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sqlite3.connect = refuse
import botocore.session
botocore.session.Session.create_client = refuse

before = set(sys.modules)
namespace = runpy.run_path(sys.argv[1], run_name="__main__")
heavy = ("duckdb", "great_expectations", "dbt", "psycopg2", "pyarrow", "redshift_connector")
print(json.dumps({
    "dag_id": namespace["hourly_dag"].dag_id,
    "heavy": sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy),
}))
"""


def _run_probe(probe: str, airflow_home: Path) -> dict[str, Any]:
    """Run a probe script on the DAG file in a fresh interpreter; the JSON it prints last."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(DAGS)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", probe, str(DAG_FILE)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dag_file_parses_without_io_or_heavy_imports(tmp_path: Path) -> None:
    probe = _run_probe(_PARSE_PROBE, tmp_path)
    assert probe["dag_id"] == "citypulse_hourly"
    assert probe["heavy"] == []


@pytest.fixture(scope="module")
def dags(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as patch:
        # Airflow reads its home at import: keep its files out of the developer's ~/airflow.
        patch.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
        patch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(DAGS))
        assert bag.import_errors == {}
        yield bag.dags


@pytest.fixture(scope="module")
def dag(dags: dict[str, Any]) -> Any:
    return dags["citypulse_hourly"]


def _upstream_closure(dag: Any, task_id: str) -> set[str]:
    seen: set[str] = set()
    stack = [task_id]
    while stack:
        for up in dag.get_task(stack.pop()).upstream_task_ids:
            if up not in seen:
                seen.add(up)
                stack.append(up)
    return seen


def test_dag_is_acyclic_and_only_the_dags_folder_dag_is_found(dag: Any) -> None:
    state: dict[str, str] = {}

    def visit(task_id: str) -> None:
        if state.get(task_id) == "done":
            return
        assert state.get(task_id) != "open", f"cycle through {task_id}"
        state[task_id] = "open"
        for down in dag.get_task(task_id).downstream_task_ids:
            visit(down)
        state[task_id] = "done"

    for task_id in dag.task_ids:
        visit(task_id)
    assert len(state) == len(dag.task_ids) == 14


def test_every_task_has_owner_retries_backoff_timeout_and_failure_alert(dag: Any, dags: dict[str, Any]) -> None:
    from citypulse_batch.events import on_run_failure, on_task_failure

    assert dags["citypulse_daily"].on_failure_callback == dag.on_failure_callback == on_run_failure

    assert dag.owner == "citypulse-data"
    assert {"citypulse", "batch", "hourly"} <= set(dag.tags)
    assert dag.max_active_runs == 1
    for task in dag.tasks:
        assert task.owner == "citypulse-data"
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff > 1, task.task_id
        assert task.execution_timeout is not None and task.execution_timeout <= timedelta(hours=1), task.task_id
        callbacks = (
            task.on_failure_callback if isinstance(task.on_failure_callback, list) else [task.on_failure_callback]
        )
        assert on_task_failure in callbacks, task.task_id


def test_schedule_gives_hourly_data_intervals(dag: Any) -> None:
    import pendulum
    from airflow.serialization.encoders import coerce_to_core_timetable

    timetable = coerce_to_core_timetable(dag.timetable)
    interval = timetable.infer_manual_data_interval(run_after=pendulum.datetime(2026, 3, 2, 11, tz="UTC"))
    assert (interval.start, interval.end) == (
        datetime(2026, 3, 2, 10, tzinfo=UTC),
        datetime(2026, 3, 2, 11, tzinfo=UTC),
    )


def test_steps_run_in_the_promised_order(dag: Any) -> None:
    order = [
        "wait_for_partition",
        "crawler_exists",
        "run_crawler",
        "load_warehouse",
        "dbt_build",
        "quality_check",
        "quicksight_datasets",
        "publish",
        "notify",
    ]
    for earlier, later in itertools.pairwise(order):
        assert earlier in _upstream_closure(dag, later), f"{earlier} must run before {later}"
    assert {"create_crawler", "update_crawler"} == set(dag.get_task("run_crawler").upstream_task_ids)


def test_the_lake_is_compacted_once_loaded_beside_the_build_and_gates_and_before_the_report(dag: Any) -> None:
    assert set(dag.get_task("compact_lake").upstream_task_ids) == {"load_warehouse"}
    for task in ("dbt_build", "quality_check", "reconcile_marts", "publish"):
        assert "compact_lake" not in _upstream_closure(dag, task), task
    assert "compact_lake" in _upstream_closure(dag, "write_report")  # the report says what it did


def test_builds_of_overlapping_runs_take_turns(dag: Any) -> None:
    """A backfill's runs overlap the scheduled one: the table models and the registry snapshot
    must not be built by two runs at once (two snapshot merges could each add a current row)."""
    assert dag.get_task("dbt_build").max_active_tis_per_dag == 1
    assert dag.max_active_runs == 1  # the scheduled runs themselves, one at a time


def test_failed_checkpoint_blocks_publish_and_notify_but_not_the_report(dag: Any) -> None:
    assert dag.get_task("publish").trigger_rule == "all_success"
    assert dag.get_task("quicksight_datasets").trigger_rule == "all_success"
    # Nothing to publish (no datasets configured) must not block the completion event ...
    assert dag.get_task("notify").trigger_rule == "none_failed"
    # ... and the report explains failed hours too.
    report = dag.get_task("write_report")
    assert report.trigger_rule == "all_done"
    assert {"load_warehouse", "dbt_build", "quality_check", "reconcile_marts", "compact_lake"} == set(
        report.upstream_task_ids
    )
    assert "quality_check" not in _upstream_closure(dag, "write_report") - set(report.upstream_task_ids)
    # Both quality gates (the readings and the marts reconciliation) stand between dbt and the publish.
    for gate in ("quality_check", "reconcile_marts"):
        assert dag.get_task(gate).upstream_task_ids == {"dbt_build"}
        assert gate in dag.get_task("quicksight_datasets").upstream_task_ids
    assert dag.get_task("run_crawler").trigger_rule == "none_failed_min_one_success"


def test_publish_is_mapped_over_the_configured_datasets(dag: Any) -> None:
    publish = dag.get_task("publish")
    assert publish.operator_name == "QuickSightCreateIngestionOperator"
    assert publish.expand_input.value["data_set_id"].operator.task_id == "quicksight_datasets"
    assert dag.get_task("notify").operator_name == "EventBridgePutEventsOperator"
    assert dag.get_task("wait_for_partition").mode == "reschedule"


def test_settings_come_from_variables_then_environment_and_missing_ones_say_where(
    monkeypatch: pytest.MonkeyPatch, dag: Any
) -> None:
    from citypulse_batch.settings import MissingSettingError, setting, setting_list

    monkeypatch.setenv("CITYPULSE_EVENT_BUS", "from-env")
    assert setting("event_bus") == "from-env"
    monkeypatch.setenv("AIRFLOW_VAR_CITYPULSE_EVENT_BUS", "from-variable")
    assert setting("event_bus") == "from-variable"

    monkeypatch.delenv("CITYPULSE_QUICKSIGHT_DATASET_IDS", raising=False)
    assert setting_list("quicksight_dataset_ids") == []
    monkeypatch.setenv("CITYPULSE_QUICKSIGHT_DATASET_IDS", " traffic-15min, ,zones ")
    assert setting_list("quicksight_dataset_ids") == ["traffic-15min", "zones"]

    monkeypatch.delenv("CITYPULSE_LAKE_BUCKET", raising=False)
    with pytest.raises(MissingSettingError, match=r"citypulse_lake_bucket.*CITYPULSE_LAKE_BUCKET"):
        setting("lake_bucket")


def test_the_warehouse_connection_is_read_where_airflow_3_0_keeps_its_hook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """MWAA runs Airflow 3.0.x, whose Task SDK has no `BaseHook` (it moved there in 3.1): the
    steps' `from airflow.sdk import BaseHook` failed every warehouse task when it ran (found by
    a review). They take it from core there."""
    import types

    from airflow.hooks.base import BaseHook as CoreBaseHook

    from citypulse_batch import steps
    from citypulse_batch.warehouse import DuckDBWarehouse

    asked = []

    def get_connection(conn_id: str) -> Any:
        asked.append(conn_id)
        return types.SimpleNamespace(
            conn_id=conn_id, conn_type="duckdb", schema=str(tmp_path / "w.duckdb"), extra_dejson={}
        )

    monkeypatch.setattr(CoreBaseHook, "get_connection", staticmethod(get_connection))
    monkeypatch.setitem(sys.modules, "airflow.sdk", types.ModuleType("airflow.sdk"))  # 3.0's: no BaseHook
    warehouse = steps.warehouse()
    assert isinstance(warehouse, DuckDBWarehouse) and warehouse.path == tmp_path / "w.duckdb"
    assert asked == ["citypulse_warehouse"]


def test_a_run_that_fails_with_no_task_failing_is_announced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run past its dagrun_timeout has its unfinished tasks skipped: no task callback runs, so
    the run's own callback puts PipelineFailed on the bus (found by a review: it failed
    silently). A run failed by a task was announced by the task: not twice."""
    import types

    from airflow.providers.amazon.aws.hooks import eventbridge

    from citypulse_batch import events

    sent: list[dict[str, Any]] = []

    class Hook:
        def __init__(self, aws_conn_id: str) -> None:
            self.conn = types.SimpleNamespace(put_events=lambda Entries: sent.extend(Entries) or {})

    monkeypatch.setattr(eventbridge, "EventBridgeHook", Hook)
    monkeypatch.setattr(events, "setting", lambda name: "citypulse-bus")
    dag = types.SimpleNamespace(dag_id="citypulse_hourly")
    run = "scheduled__2026-03-02T10:00:00+00:00"
    events.on_run_failure({"dag": dag, "run_id": run, "reason": "task_failure"})
    assert sent == []
    events.on_run_failure({"dag": dag, "run_id": run, "reason": "timed_out"})
    assert [(e["DetailType"], e["EventBusName"]) for e in sent] == [("PipelineFailed", "citypulse-bus")]
    detail = json.loads(sent[0]["Detail"])
    assert (detail["dag_id"], detail["run_id"], detail["reason"]) == ("citypulse_hourly", run, "timed_out")
    assert detail["error"] == "the run failed: timed_out"


_OLD_PROVIDER_PROBE = r"""
import json, runpy, sys

# The Amazon provider MWAA's Airflow 3.0.x constraints pin predates the crawler lifecycle
# operators (2026): only the combined GlueCrawlerOperator is there.
from airflow.providers.amazon.aws.operators import glue_crawler
for name in ("GlueCrawlerCreateOperator", "GlueCrawlerUpdateOperator", "GlueCrawlerRunOperator"):
    delattr(glue_crawler, name)

dag = runpy.run_path(sys.argv[1], run_name="__main__")["hourly_dag"]
crawl = dag.get_task("run_crawler")
print(json.dumps({
    "operator": type(crawl).__name__,
    "upstream": sorted(crawl.upstream_task_ids),
    "downstream": sorted(crawl.downstream_task_ids),
    "config_name": crawl.config["Name"],
}))
"""


def test_the_dag_imports_with_the_amazon_provider_mwaa_installs(tmp_path: Path) -> None:
    """MWAA's provider has no crawler lifecycle operators: the DAG imported them and so failed
    to import at all there (found by a review). It falls back to the combined operator."""
    probe = _run_probe(_OLD_PROVIDER_PROBE, tmp_path)
    assert probe["operator"] == "GlueCrawlerOperator"
    assert (probe["upstream"], probe["downstream"]) == (["wait_for_partition"], ["load_warehouse"])
    assert probe["config_name"]


def test_a_backfill_refreshes_no_quicksight_dataset() -> None:
    """QuickSight allows 32 manual refreshes of a dataset a day (8 on Standard edition); the
    schedule takes 24, and each backfilled hour refreshed every dataset again, failing the
    publish, and the run, on good data (found by a review). A backfill's hours reach the
    dashboards with the next scheduled run's full refresh."""
    from airflow.utils.types import DagRunType

    from citypulse_batch.steps import datasets_to_refresh

    assert datasets_to_refresh(DagRunType.BACKFILL_JOB.value, ["zone", "sensor"]) == []
    for run_type in (DagRunType.SCHEDULED, DagRunType.MANUAL):
        assert datasets_to_refresh(run_type.value, ["zone", "sensor"]) == ["zone", "sensor"]
