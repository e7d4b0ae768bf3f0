"""The batch path derives from the data contract: warehouse DDL, dbt sources and the GX suite.

Fast unit tests, no servers: a field added to or changed in `streaming.contract` (or the
registry's CSV header) without the batch side following makes one of these fail.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import yaml

from citypulse_batch.warehouse import (
    QUARANTINE_COUNTS_COLUMNS,
    RAW_TABLES,
    READINGS_COLUMNS,
    create_table_sql,
)
from expectations.readings import PANDAS_TYPES, reading_expectations
from streaming.contract import KEY_FIELDS, LAKE_FIELDS, READING_FIELDS, is_plain_id, warehouse_columns
from streaming.registry import SENSOR_COLUMNS, ZONE_COLUMNS

DBT_PROJECT = Path(__file__).resolve().parents[1] / "dbt_project"


def _source_columns() -> dict[tuple[str, str], list[str]]:
    doc = yaml.safe_load((DBT_PROJECT / "models/staging/lake/_lake__sources.yml").read_text())
    return {
        (source["name"], table["name"]): [c["name"] for c in table.get("columns", [])]
        for source in doc["sources"]
        for table in source["tables"]
    }


def test_raw_readings_ddl_is_the_contracts_warehouse_columns() -> None:
    assert [c for c, _, _ in READINGS_COLUMNS] == [f.name for f in LAKE_FIELDS]
    ddl = create_table_sql("raw.readings", READINGS_COLUMNS)
    for name, sql_type, nullable in warehouse_columns():
        assert f"{name} {sql_type}{'' if nullable else ' not null'}" in ddl


def test_registry_tables_follow_the_registry_csv_headers() -> None:
    assert [c for c, _, _ in RAW_TABLES["sensor_registry"]] == SENSOR_COLUMNS
    assert [c for c, _, _ in RAW_TABLES["zones"]] == ZONE_COLUMNS


def test_dbt_sources_list_exactly_the_raw_tables_columns() -> None:
    sources = _source_columns()
    assert sources[("lake", "readings")] == [c for c, _, _ in warehouse_columns()]
    assert sources[("lake", "quarantine_counts")] == [c for c, _, _ in QUARANTINE_COUNTS_COLUMNS]
    assert sources[("registry", "sensor_registry")] == SENSOR_COLUMNS
    assert sources[("registry", "zones")] == ZONE_COLUMNS


def test_suite_checks_every_contract_range_requirement_and_identifier() -> None:
    specs = reading_expectations()
    by_column: dict[str, list] = {}
    for spec in specs:
        by_column.setdefault(spec.column, []).append(spec)
    for field in READING_FIELDS:
        kinds = {s.expectation: s.kwargs for s in by_column[field.name]}
        assert kinds["ExpectColumnValuesToBeInTypeList"]["type_list"] == PANDAS_TYPES[field.kind]
        assert ("ExpectColumnValuesToNotBeNull" in kinds) is field.required, field.name
        if field.minimum is not None:
            ranges = [s.kwargs for s in by_column[field.name] if s.expectation == "ExpectColumnValuesToBeBetween"]
            assert {"column": field.name, "min_value": field.minimum, "max_value": field.maximum} in ranges
        if field.pattern is not None:
            # The contract's pattern, anchored for GX's search (`whole_value`): the same ids match.
            regex = kinds["ExpectColumnValuesToMatchRegex"]["regex"]
            assert regex == field.pattern.removesuffix("$") + r"\Z"
            assert all(bool(re.search(regex, v)) == is_plain_id(v) for v in ("S-1", "S-1\n", "S 1", "-S", "S.1:a"))
        if field.max_length is not None:
            assert kinds["ExpectColumnValueLengthsToBeBetween"]["max_value"] == field.max_length
    table_level = {s.expectation: s.kwargs for s in specs if s.column is None}
    assert table_level["ExpectCompoundColumnsToBeUnique"]["column_list"] == list(KEY_FIELDS)
    assert table_level["ExpectTableRowCountToBeBetween"]["min_value"] == 1
    assert table_level["ExpectTableColumnsToMatchSet"]["column_set"] == [f.name for f in LAKE_FIELDS]


def test_suite_bounds_ts_to_the_interval_in_naive_utc() -> None:
    start = datetime(2026, 3, 2, 10, tzinfo=UTC)
    end = datetime(2026, 3, 2, 11, tzinfo=UTC)
    last = reading_expectations(start, end)[-1]
    assert last.expectation == "ExpectColumnValuesToBeBetween"
    assert last.kwargs == {
        "column": "ts",
        "min_value": datetime(2026, 3, 2, 10),
        "max_value": datetime(2026, 3, 2, 11),
        "strict_max": True,
    }
