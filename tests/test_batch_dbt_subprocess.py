"""dbt from its own executable (MWAA's virtualenv) reports exactly like dbt in-process.

Integration test: the project venv's `dbt` run as a subprocess (`CITYPULSE_DBT_EXECUTABLE`
mode) builds the hand-computed city-hour on DuckDB; the counts come from its
`run_results.json` and the marts hold the known answers. Plus the parsing of failures and
of an error before any node ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from batch_city import HOUR, load_city_hour

from citypulse_batch.dbt_build import DbtSummary, count_results, find_project_dir, run_dbt_build
from citypulse_batch.lake import Interval
from citypulse_batch.warehouse import DuckDBWarehouse

DBT = Path(sys.executable).parent / "dbt"


@pytest.mark.integration
def test_dbt_executable_in_a_subprocess_builds_the_known_marts(tmp_path: Path) -> None:
    from test_batch_known_answers import ZONE_HOURLY

    assert DBT.is_file(), f"no dbt executable next to {sys.executable}"
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    load_city_hour(warehouse, "?")
    summary = run_dbt_build(
        find_project_dir(),
        "duckdb",
        Interval.hour(HOUR),
        warehouse.dbt_env(),
        exclude="tag:daily",
        executable=str(DBT),
    )
    assert summary.success, summary.failures or summary.error
    # The hourly selection, as the DAG run counts it in-process (test_hourly_dag_run.py).
    assert (summary.models_passed, summary.models_failed, summary.tests_failed) == (13, 0, 0)
    assert summary.tests_passed > 20
    with warehouse.transaction() as cur:
        cur.execute("select * from marts.fct_zone_traffic_hourly order by zone_id")
        hourly = {(z, start): (n, int(v), *rest) for z, start, _end, n, v, *rest in cur.fetchall()}
    assert hourly == ZONE_HOURLY


@pytest.mark.integration
def test_dbt_executable_that_cannot_run_is_an_error_not_a_pass(tmp_path: Path) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    summary = run_dbt_build(find_project_dir(), "no_such_target", None, warehouse.dbt_env(), executable=str(DBT))
    assert not summary.success
    assert summary.error is not None and "exited with 2" in summary.error and "no_such_target" in summary.error
    assert summary.models_passed == summary.tests_passed == 0


def test_run_results_are_counted_per_node_type_and_status(tmp_path: Path) -> None:
    results = [
        ("model.citypulse.fct_a", "success", None),
        ("model.citypulse.fct_b", "error", "Database Error\n  division by zero"),
        ("snapshot.citypulse.registry_sensors_snapshot", "success", None),
        ("model.citypulse.fct_c", "skipped", None),
        ("test.citypulse.unique_fct_a_id.1", "pass", None),
        ("test.citypulse.not_null_fct_a_id.2", "fail", "Got 3 results, configured to fail if != 0"),
        ("unit_test.citypulse.fct_a.episodes", "pass", None),
        ("test.citypulse.accepted_range.3", "warn", "Got 1 result"),
        ("test.citypulse.relationships.4", "skipped", None),
    ]
    path = tmp_path / "run_results.json"
    path.write_text(json.dumps({"results": [{"unique_id": u, "status": s, "message": m} for u, s, m in results]}))
    summary = DbtSummary(success=False, target="duckdb", select="x")
    count_results(summary, path)
    assert (summary.models_passed, summary.models_failed, summary.models_skipped) == (2, 1, 1)
    assert (summary.tests_passed, summary.tests_failed, summary.tests_warned, summary.tests_skipped) == (2, 1, 1, 1)
    assert summary.failures == [
        "model.citypulse.fct_b: error - Database Error",
        "test.citypulse.not_null_fct_a_id.2: fail - Got 3 results, configured to fail if != 0",
    ]
    count_results(summary, tmp_path / "missing.json")  # dbt never got to write one: nothing counted
    assert summary.models_passed == 2
