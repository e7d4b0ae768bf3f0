"""The contract: the fast validator agrees with the JSON Schema derived from the same spec."""

from __future__ import annotations

import math
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.contract import (
    GATEWAY_V1,
    GATEWAY_V2,
    LAKE_FIELDS,
    READING_FIELDS,
    ColumnarReadings,
    ContractError,
    columnar_json_schema,
    columnar_message,
    device_message,
    format_ts,
    gateway_message,
    json_schema,
    lake_arrow_schema,
    message_readings,
    parse_ts_ms,
    reading_to_json,
    validate_reading,
    warehouse_columns,
)

VALID: dict[str, Any] = {
    "sensor_id": "S-000042",
    "zone_id": "Z-007",
    "ts": "2026-11-23T18:00:00.123Z",
    "seq": 41,
    "vehicle_count": 12,
    "avg_speed_kmh": 47.5,
    "occupancy_pct": 8.25,
    "congestion_index": 0.31,
    "lane": 2,
}
SCHEMA = json_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def test_a_valid_reading_round_trips() -> None:
    r = validate_reading(VALID)
    assert reading_to_json(r) == VALID
    assert r.ts_ms == parse_ts_ms("2026-11-23T18:00:00.123Z")


def test_speed_and_occupancy_are_optional() -> None:
    r = validate_reading({k: v for k, v in VALID.items() if k not in ("avg_speed_kmh", "occupancy_pct")})
    assert r.avg_speed_kmh is None and r.occupancy_pct is None


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"avg_speed_kmh": -3}, "out_of_range", "avg_speed_kmh=-3 is outside 0..250"),
        ({"vehicle_count": True}, "wrong_type", "vehicle_count=True is not an integer"),
        ({"vehicle_count": 2.5}, "wrong_type", "not an integer"),
        ({"congestion_index": math.nan}, "not_finite", "congestion_index=nan"),
        ({"occupancy_pct": math.inf}, "not_finite", "occupancy_pct=inf"),
        ({"ts": "2026-11-23 18:00:00"}, "bad_timestamp", "ISO-8601"),
        ({"ts": "2026-11-23T18:00:00+01:00"}, "bad_timestamp", "UTC"),
        ({"ts": "2026-02-30T18:00:00Z"}, "bad_timestamp", "not a valid date"),
        ({"ts": "1999-12-31T23:59:59Z"}, "out_of_range", "outside 2000-2100"),
        ({"sensor_id": "S-1\n"}, "bad_identifier", "not a plain id"),
        ({"sensor_id": "'; drop table readings; --"}, "bad_identifier", "not a plain id"),
        ({"lane": 0}, "out_of_range", "lane=0"),
        ({"seq": -1}, "out_of_range", "seq=-1"),
    ],
)
def test_invalid_readings_say_what_is_wrong(change: dict[str, Any], code: str, words: str) -> None:
    with pytest.raises(ContractError) as err:
        validate_reading({**VALID, **change})
    assert err.value.code == code
    assert words in str(err.value)


def test_missing_required_field_is_named() -> None:
    for f in READING_FIELDS:
        if f.required:
            with pytest.raises(ContractError, match=f"{f.name} is missing"):
                validate_reading({k: v for k, v in VALID.items() if k != f.name})


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["S-1", "Z-2", "2026-11-23T18:00:00.000Z", "2026-11-23T18:00:00Z"]),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in READING_FIELDS]), _values, max_size=9))
def test_validator_and_json_schema_agree(mutation: dict[str, Any]) -> None:
    """Any reading the validator accepts, the published JSON Schema accepts, and vice versa.
    (JSON has one number type: 3.0 is an integer to both.)"""
    doc = {**VALID, **mutation}
    doc = {k: v for k, v in doc.items() if v is not None}
    try:
        validate_reading(doc)
        ours = True
    except ContractError:
        ours = False
    theirs = VALIDATOR.is_valid(doc)
    if any(isinstance(v, float) and not math.isfinite(v) for v in doc.values()):
        assert not ours  # NaN/Infinity cannot even be written in JSON
    else:
        assert ours == theirs, doc


@given(st.integers(946_684_800_000, 4_102_444_799_999))
def test_timestamps_round_trip(ms: int) -> None:
    assert parse_ts_ms(format_ts(ms)) == ms


def test_lake_and_warehouse_schemas_derive_from_the_contract() -> None:
    schema = lake_arrow_schema()
    assert schema.names == [f.name for f in LAKE_FIELDS]
    assert [c for c, _, _ in warehouse_columns()] == schema.names
    nullable = {c for c, _, n in warehouse_columns() if n}
    assert nullable == {"avg_speed_kmh", "occupancy_pct"}


# --- gateway message v2 (columns) -----------------------------------------------------------

V2_VALIDATOR = jsonschema.Draft202012Validator(columnar_json_schema(), format_checker=jsonschema.FormatChecker())
_MISSING: Any = object()


def _verdict(reading: dict[str, Any]) -> Any:
    try:
        return validate_reading(reading)
    except ContractError as exc:
        return exc.code, str(exc)


_rows = st.lists(
    st.dictionaries(st.sampled_from([f.name for f in READING_FIELDS if f.name != "zone_id"]), _values, max_size=3),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_rows)
def test_a_columnar_message_carries_each_reading_to_the_same_verdict(mutations: list[dict[str, Any]]) -> None:
    """Reading i of a v2 message, rebuilt from the columns after a JSON round trip, is accepted
    or rejected exactly as the reading itself would be (with the same Reading, or the same reason)."""
    readings = [{**VALID, **m} for m in mutations]
    if any(isinstance(v, float) and not math.isfinite(v) for r in readings for v in r.values()):
        return  # NaN/Infinity cannot be written in JSON
    msg = orjson.loads(orjson.dumps(columnar_message("GW-1", "Z-007", 1_795_000_000_000, readings)))
    rebuilt = ColumnarReadings(msg, "message")
    assert len(rebuilt) == len(readings)
    assert [_verdict(r) for r in rebuilt] == [_verdict(r) for r in readings]
    # The published schema accepts the message exactly when every reading is valid.
    valid = all(not isinstance(_verdict(r), tuple) for r in readings)
    assert V2_VALIDATOR.is_valid(msg) == valid, msg


def test_a_columnar_message_shares_one_ts_and_leaves_out_empty_optional_columns() -> None:
    counts_only = [{k: v for k, v in VALID.items() if k not in ("avg_speed_kmh", "occupancy_pct")}] * 2
    msg = columnar_message("GW-1", "Z-007", 1_795_000_000_000, counts_only)
    assert msg["schema_version"] == GATEWAY_V2
    assert msg["ts"] == VALID["ts"]
    assert "avg_speed_kmh" not in msg and "occupancy_pct" not in msg
    assert msg["seq"] == [41, 41]
    later = {**VALID, "ts": "2026-11-23T18:01:00.123Z"}
    assert columnar_message("GW-1", "Z-007", 0, [VALID, later])["ts"] == [VALID["ts"], later["ts"]]
    assert message_readings(msg) == counts_only


def test_a_gateway_sends_v1_when_a_reading_cannot_be_a_row_of_v2() -> None:
    assert device_message("GW-1", "Z-007", 0, [VALID])["schema_version"] == GATEWAY_V2
    for odd in ({**VALID, "zone_id": "Z-008"}, 5, "reading"):
        msg = device_message("GW-1", "Z-007", 0, [VALID, odd])
        assert msg == gateway_message("GW-1", "Z-007", 0, [VALID, odd])
        assert msg["schema_version"] == GATEWAY_V1
        assert message_readings(msg) == [VALID, odd]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sensor_id": "S-1"}, "sensor_id is not a list"),
        ({"seq": [1]}, "seq=[1] is not a list of 2"),
        ({"lane": 2}, "lane=2 is not a list of 2"),
        ({"ts": 5}, "ts=5 is neither one timestamp nor a list of 2"),
        ({"ts": ["2026-11-23T18:00:00.123Z"]}, "is neither one timestamp nor a list of 2"),
    ],
)
def test_a_columnar_message_that_cannot_be_split_says_why(change: dict[str, Any], words: str) -> None:
    msg = {**columnar_message("GW-1", "Z-007", 0, [VALID, VALID]), **change}
    with pytest.raises(ContractError) as err:
        ColumnarReadings(msg, "message from GW-1")
    assert err.value.code == "bad_columns"
    assert str(err.value).startswith("message from GW-1: ") and words in str(err.value)


def test_a_columnar_message_is_a_fraction_of_the_bytes_of_v1() -> None:
    readings = [{**VALID, "sensor_id": f"S-{i:06d}", "seq": 1000 + i, "lane": 1 + i % 3} for i in range(32)]
    v1 = len(orjson.dumps(gateway_message("GW-00001", "Z-007", 0, readings)))
    v2 = len(orjson.dumps(columnar_message("GW-00001", "Z-007", 0, readings)))
    assert v2 * 3 < v1, (v1, v2)
