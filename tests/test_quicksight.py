"""QuickSight as code: the analysis, its template and dashboard, the datasets and the DAG's refresh.

The template (infra/cloudformation/iot-analytics-system.yaml) declares datasets on the marts
and one analysis whose visuals read them; the dashboard is published from a template of the
analysis. These tests hold the pieces together: every column a visual names is a column of
its dataset, every dataset column is a column the mart really has (the marts built by dbt on
DuckDB, read from its catalog), and the hourly DAG refreshes exactly the declared datasets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from citypulse_batch.settings import SETTINGS
from infra.local.provision import load_template

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = load_template(REPO_ROOT / "infra" / "cloudformation" / "iot-analytics-system.yaml")
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
DATASETS = {lid: res for lid, res in RESOURCES.items() if res["Type"] == "AWS::QuickSight::DataSet"}
ANALYSIS = next(res for res in RESOURCES.values() if res["Type"] == "AWS::QuickSight::Analysis")
DEFINITION = ANALYSIS["Properties"]["Definition"]
# QuickSight input column type for each warehouse type family (DuckDB's names).
QUICKSIGHT_TYPE = {"VARCHAR": "STRING", "BIGINT": "INTEGER", "INTEGER": "INTEGER", "DOUBLE": "DECIMAL"}
QUICKSIGHT_TYPE |= {"DECIMAL": "DECIMAL", "TIMESTAMP": "DATETIME", "DATE": "DATETIME", "BOOLEAN": "BOOLEAN"}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _get_att(node: dict[str, Any]) -> str:
    """The logical id a `!GetAtt X.Arn` names."""
    logical_id, attribute = node["Fn::GetAtt"]
    assert attribute == "Arn", node
    return str(logical_id)


def _table(dataset: dict[str, Any]) -> dict[str, Any]:
    (table,) = dataset["Properties"]["PhysicalTableMap"].values()
    return dict(table["RelationalTable"])


def _declared() -> dict[str, str]:
    """Analysis dataset identifier -> logical id of the DataSet resource it points at."""
    return {d["Identifier"]: _get_att(d["DataSetArn"]) for d in DEFINITION["DataSetIdentifierDeclarations"]}


def _visuals() -> list[tuple[str, dict[str, Any]]]:
    """(sheet id, visual body) of every visual in the analysis."""
    return [
        (sheet["SheetId"], body)
        for sheet in DEFINITION["Sheets"]
        for visual in sheet.get("Visuals", [])
        for body in visual.values()
    ]


def test_the_analysis_covers_the_historical_views_of_the_live_dashboard() -> None:
    marts = {_table(DATASETS[lid])["Name"] for lid in _declared().values()}
    assert marts >= {
        "fct_zone_traffic_15min",
        "fct_zone_traffic_hourly",
        "fct_congestion_episodes",
        "fct_zone_peak_profiles",
        "fct_sensor_health_daily",
        "fct_corridor_rankings",
    }
    kinds = {kind for sheet in DEFINITION["Sheets"] for visual in sheet["Visuals"] for kind in visual}
    # Congestion over time, rankings, the zone x weekday x hour profile, tables of episodes and sensor days.
    assert kinds >= {"LineChartVisual", "BarChartVisual", "HeatMapVisual", "TableVisual"}


def test_every_dataset_a_visual_uses_is_declared_and_every_declared_one_is_used() -> None:
    declared = _declared()
    assert set(declared.values()) <= set(DATASETS), set(declared.values()) - set(DATASETS)
    used = {node["DataSetIdentifier"] for node in _walk(DEFINITION["Sheets"]) if "ColumnName" in node}
    used |= {node["DataSetIdentifier"] for node in _walk(DEFINITION["FilterGroups"]) if "ColumnName" in node}
    assert used == set(declared)


def test_every_column_a_visual_or_filter_names_is_a_column_of_its_dataset() -> None:
    declared = _declared()
    references = [node for node in _walk([DEFINITION["Sheets"], DEFINITION["FilterGroups"]]) if "ColumnName" in node]
    assert len(references) > 40
    for ref in references:
        columns = {c["Name"] for c in _table(DATASETS[declared[ref["DataSetIdentifier"]]])["InputColumns"]}
        assert ref["ColumnName"] in columns, ref


def test_visuals_fields_layouts_and_controls_are_consistent() -> None:
    field_ids = [node["FieldId"] for node in _walk(DEFINITION["Sheets"]) if "FieldId" in node and "Column" in node]
    assert len(field_ids) == len(set(field_ids)), "FieldIds must be unique in an analysis"
    sorted_by = {node["FieldId"] for node in _walk(DEFINITION["Sheets"]) if "Direction" in node}
    assert sorted_by <= set(field_ids)
    filters = {node["FilterId"] for node in _walk(DEFINITION["FilterGroups"]) if "FilterId" in node}
    for sheet in DEFINITION["Sheets"]:
        placed = [e["ElementId"] for e in _walk(sheet["Layouts"]) if e.get("ElementType") == "VISUAL"]
        visuals = [body["VisualId"] for visual in sheet["Visuals"] for body in visual.values()]
        assert sorted(placed) == sorted(visuals), sheet["SheetId"]
        for control in _walk(sheet.get("FilterControls", [])):
            if "SourceFilterId" in control:
                assert control["SourceFilterId"] in filters, control


def test_template_and_dashboard_bind_the_analysis_placeholders_to_the_same_datasets() -> None:
    declared = _declared()
    template = next(r for r in RESOURCES.values() if r["Type"] == "AWS::QuickSight::Template")
    dashboard = next(r for r in RESOURCES.values() if r["Type"] == "AWS::QuickSight::Dashboard")
    source = template["Properties"]["SourceEntity"]["SourceAnalysis"]
    published = dashboard["Properties"]["SourceEntity"]["SourceTemplate"]
    assert RESOURCES[_get_att(source["Arn"])] is ANALYSIS
    assert RESOURCES[_get_att(published["Arn"])] is template
    for references in (source["DataSetReferences"], published["DataSetReferences"]):
        assert {r["DataSetPlaceholder"]: _get_att(r["DataSetArn"]) for r in references} == declared
    for resource in (ANALYSIS, template, dashboard, *DATASETS.values()):
        assert resource["Condition"] == "QuickSightOn"


def test_the_hourly_dag_refreshes_exactly_the_declared_datasets() -> None:
    (parameter,) = [
        res
        for res in RESOURCES.values()
        if res["Type"] == "AWS::SSM::Parameter"
        and res["Properties"]["Name"]["Fn::Sub"].endswith("/" + SETTINGS["quicksight_dataset_ids"].variable)
    ]
    # MWAA reads Airflow Variables from /citypulse/<env>/airflow/variables/ (its secrets backend).
    assert parameter["Properties"]["Name"]["Fn::Sub"].startswith("/citypulse/${EnvName}/airflow/variables/")
    condition, when_on, when_off = parameter["Properties"]["Value"]["Fn::If"]
    assert condition == "QuickSightOn" and when_off.strip() == ""
    refreshed = [item.strip() for item in when_on["Fn::Sub"].split(",")]
    declared_ids = [ds["Properties"]["DataSetId"]["Fn::Sub"] for ds in DATASETS.values()]
    assert sorted(refreshed) == sorted(declared_ids)
    assert len(set(declared_ids)) == len(declared_ids)
    # ... and the DAG maps its ingestion over that Variable (tests/test_batch_dag.py runs the mapping).
    dag_source = (REPO_ROOT / "dags" / "citypulse_hourly.py").read_text()
    assert re.search(r'setting_list\("quicksight_dataset_ids"\)', dag_source)


@pytest.fixture(scope="module")
def mart_columns(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """mart -> column -> DuckDB type, from the marts dbt builds (empty) on a fresh DuckDB warehouse."""
    from dbt.cli.main import dbtRunner

    from citypulse_batch.dbt_build import build_args, find_project_dir
    from citypulse_batch.warehouse import DuckDBWarehouse

    work = tmp_path_factory.mktemp("quicksight-marts")
    warehouse = DuckDBWarehouse(work / "warehouse.duckdb")
    with warehouse.transaction() as cur:
        warehouse.ensure_raw_tables(cur)
    args = build_args(find_project_dir(), warehouse.dbt_target, "+marts", work, command="build")
    # --empty: every model built from zero rows, so the catalog has the real columns and types.
    args += ["--empty", "--resource-type", "model", "snapshot"]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in warehouse.dbt_env().items():
            patch.setenv(name, value)
        result = dbtRunner().invoke(args)
    assert result.success, result.exception
    con = warehouse.connect()
    try:
        rows = con.execute(
            "select table_name, column_name, data_type from information_schema.columns where table_schema = 'marts'"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, str]] = {}
    for table, column, data_type in rows:
        out.setdefault(table, {})[column] = data_type
    return out


@pytest.mark.integration
def test_every_dataset_column_is_a_column_the_mart_has_with_a_matching_type(
    mart_columns: dict[str, dict[str, str]],
) -> None:
    assert len(DATASETS) == 7
    for dataset in DATASETS.values():
        table = _table(dataset)
        assert table["Schema"] == "marts"
        have = mart_columns[table["Name"]]
        for column in table["InputColumns"]:
            assert column["Name"] in have, (table["Name"], column["Name"], sorted(have))
            family = have[column["Name"]].split("(")[0]
            assert QUICKSIGHT_TYPE[family] == column["Type"], (table["Name"], column, have[column["Name"]])
