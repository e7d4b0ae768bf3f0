"""The readings expectation suite, derived from the data contract (`streaming.contract`).

Place in the flow: the hourly DAG's quality gate. After the interval is loaded and the marts
are built, `expectations.runner` validates the interval's `raw.readings` rows against this
suite; a failure stops the publish and raises an alert.

The suite is plain data (expectation class names and arguments) so that deriving it needs
no Great Expectations import (~6 s of CPU) and can be unit-tested against the contract:
every field's type, required-ness, range, length and pattern becomes an expectation here,
and a change to `READING_FIELDS` changes the suite with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streaming.contract import EARLIEST_TS, KEY_FIELDS, LAKE_FIELDS, LATEST_TS, SCHEMA_VERSION, FieldSpec

SUITE_NAME = f"citypulse_readings_v{SCHEMA_VERSION}"

# pandas dtype names each contract kind may arrive as from a warehouse. Text arrives as pandas'
# `StringDtype()` (the runner converts the other text dtypes to it), whose values can only be
# strings or nulls: GX then checks the column's dtype once. An `object` column (a frame built by
# hand) is checked value by value (`str`).
PANDAS_TYPES: dict[str, list[str]] = {
    "string": ["StringDtype", "object", "str"],
    "integer": ["int64", "int32", "Int64", "Int32"],
    "number": ["float64", "float32", "Float64"],
    "timestamp": ["datetime64[ns]", "datetime64[us]", "datetime64[ms]"],
}


@dataclass(frozen=True, slots=True)
class ExpectationSpec:
    """One expectation: a class in `great_expectations.expectations` and its arguments."""

    expectation: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def _naive_utc(moment: datetime) -> datetime:
    # The warehouse stores UTC without a zone; compare like with like.
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def whole_value(pattern: str) -> str:
    """The contract's pattern as GX must apply it. The contract matches a whole value
    (`re.fullmatch`; its `$` is JSON Schema's end of input); GX searches (`re.search`), where a
    final `$` also matches before a trailing newline, so `"S-1\\n"` would pass: `\\Z` ends it."""
    return pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern


def field_expectations(spec: FieldSpec) -> list[ExpectationSpec]:
    """What the contract says about one field, as expectations."""
    column = spec.name
    out = [
        ExpectationSpec("ExpectColumnToExist", {"column": column}),
        ExpectationSpec("ExpectColumnValuesToBeInTypeList", {"column": column, "type_list": PANDAS_TYPES[spec.kind]}),
    ]
    if spec.required:
        out.append(ExpectationSpec("ExpectColumnValuesToNotBeNull", {"column": column}))
    if spec.minimum is not None or spec.maximum is not None:
        out.append(
            ExpectationSpec(
                "ExpectColumnValuesToBeBetween",
                {"column": column, "min_value": spec.minimum, "max_value": spec.maximum},
            )
        )
    if spec.kind == "timestamp":
        out.append(
            ExpectationSpec(
                "ExpectColumnValuesToBeBetween",
                {
                    "column": column,
                    "min_value": _naive_utc(EARLIEST_TS),
                    "max_value": _naive_utc(LATEST_TS),
                    "strict_max": True,
                },
            )
        )
    if spec.max_length is not None:
        out.append(
            ExpectationSpec(
                "ExpectColumnValueLengthsToBeBetween", {"column": column, "min_value": 1, "max_value": spec.max_length}
            )
        )
    if spec.pattern is not None:
        out.append(
            ExpectationSpec("ExpectColumnValuesToMatchRegex", {"column": column, "regex": whole_value(spec.pattern)})
        )
    return out


def reading_expectations(
    interval_start: datetime | None = None, interval_end: datetime | None = None
) -> list[ExpectationSpec]:
    """The suite for a batch of lake readings; with an interval, every `ts` must lie inside it."""
    specs = [
        ExpectationSpec("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        ExpectationSpec(
            "ExpectTableColumnsToMatchSet", {"column_set": [f.name for f in LAKE_FIELDS], "exact_match": True}
        ),
        ExpectationSpec("ExpectCompoundColumnsToBeUnique", {"column_list": list(KEY_FIELDS)}),
    ]
    for spec in LAKE_FIELDS:
        specs.extend(field_expectations(spec))
    if interval_start is not None and interval_end is not None:
        specs.append(
            ExpectationSpec(
                "ExpectColumnValuesToBeBetween",
                {
                    "column": "ts",
                    "min_value": _naive_utc(interval_start),
                    "max_value": _naive_utc(interval_end),
                    "strict_max": True,
                },
            )
        )
    return specs
