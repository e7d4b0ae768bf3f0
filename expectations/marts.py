"""The marts reconciliation suites: what dbt built for an interval adds up to what was loaded.

Place in the flow: the hourly DAG's second quality gate, after `dbt build` and beside the
readings checkpoint. For each traffic mart the interval's rows are set against the same
interval's `raw.readings`, grouped in the warehouse by the mart's entity and literal time
buckets (`Warehouse.read_raw_bucket_counts`, not the models' SQL), so a bucketing or
filtering bug in the models cannot hide in both sides at once:

* reconciliation - per (entity, bucket) the mart's `reading_count` and `vehicle_count` equal
  the raw ones (a row on one side only counts 0 on the other), and the interval's mart totals
  equal the raw totals;
* time spine (zone marts) - every zone with a reading in the interval has a row for every
  15-minute bucket (resp. hour) of the interval. A zone that reported in the hour but is
  missing a whole bucket is a gap: either the mart lost it or the zone went dark for
  15 minutes; both must be looked at before the hour is published.

Like `expectations.readings`, the suites are plain data (no Great Expectations import);
`expectations.runner` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from expectations.readings import ExpectationSpec

SUITE_PREFIX = "citypulse_reconcile_"
MARTS_SCHEMA = "marts"
COLUMNS = [
    "entity_id",
    "bucket_start",
    "raw_reading_count",
    "mart_reading_count",
    "raw_vehicle_count",
    "mart_vehicle_count",
]


@dataclass(frozen=True, slots=True)
class MartSpec:
    """A traffic mart: its table, entity key, bucket column and grain, and whether it has a spine."""

    table: str
    entity: str
    bucket: str
    minutes: int
    spine: bool

    @property
    def suite(self) -> str:
        return SUITE_PREFIX + self.table

    @property
    def relation(self) -> str:
        return f"{MARTS_SCHEMA}.{self.table}"

    def buckets(self, start: datetime, end: datetime) -> list[datetime]:
        """The bucket starts of [start, end) (naive UTC, as the warehouse stores them)."""
        step = timedelta(minutes=self.minutes)
        out, moment = [], _naive_utc(start)
        while moment < _naive_utc(end):
            out.append(moment)
            moment += step
        return out


TRAFFIC_MARTS: tuple[MartSpec, ...] = (
    MartSpec("fct_sensor_traffic_15min", "sensor_id", "bucket_start", 15, spine=False),
    MartSpec("fct_sensor_traffic_hourly", "sensor_id", "hour_start", 60, spine=False),
    MartSpec("fct_zone_traffic_15min", "zone_id", "bucket_start", 15, spine=True),
    MartSpec("fct_zone_traffic_hourly", "zone_id", "hour_start", 60, spine=True),
)


def _naive_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def _counts(table: Any, side: str) -> Any:
    """One side's counts (a pyarrow Table: entity_id, bucket_start, reading_count,
    vehicle_count) as a frame whose count columns are named after the side."""
    frame = table.to_pandas()
    frame["entity_id"] = frame["entity_id"].astype(str)
    frame["bucket_start"] = frame["bucket_start"].astype("datetime64[us]")
    # One row per (entity, bucket): a mart may hold several (a sensor moved to another zone in the
    # bucket has a row in each), and rows twice must show as counts twice: merged as they came,
    # each copy met its own copy of the raw row and both sums doubled (found by a review).
    frame = frame.groupby(["entity_id", "bucket_start"], as_index=False, sort=False)[
        ["reading_count", "vehicle_count"]
    ].sum()
    return frame.rename(columns={c: f"{side}_{c}" for c in ("reading_count", "vehicle_count")})


def reconciliation_frame(
    spec: MartSpec,
    raw_rows: Any,
    mart_rows: Any,
    start: datetime,
    end: datetime,
) -> Any:
    """One row per (entity, bucket) seen in raw, in the mart, or on the spine, with both sides' counts.

    `raw_rows`: pyarrow Table (entity_id, bucket_start, reading_count, vehicle_count) of the
    interval's `raw.readings` grouped by the mart's entity and buckets
    (`Warehouse.read_raw_bucket_counts`); `mart_rows`: the same of the mart's rows inside the
    interval (`Warehouse.read_bucket_counts`).
    """
    import pandas as pd

    raw = _counts(raw_rows, "raw")
    frame = raw.merge(_counts(mart_rows, "mart"), on=["entity_id", "bucket_start"], how="outer")
    if spec.spine:
        entities = sorted(raw["entity_id"].unique())
        spine = pd.DataFrame(
            [(e, b) for e in entities for b in spec.buckets(start, end)], columns=["entity_id", "bucket_start"]
        ).astype({"bucket_start": "datetime64[us]"})
        frame = frame.merge(spine, on=["entity_id", "bucket_start"], how="outer")
    counts = [c for c in COLUMNS if c.endswith("_count")]
    frame[counts] = frame[counts].fillna(0).astype("int64")
    return frame[COLUMNS].sort_values(["entity_id", "bucket_start"]).reset_index(drop=True)


def reconciliation_expectations(spec: MartSpec, frame: Any) -> list[ExpectationSpec]:
    """The suite for one mart's reconciliation frame: per-bucket and total equality, and the spine."""
    specs = [
        ExpectationSpec(
            "ExpectColumnPairValuesToBeEqual", {"column_A": "raw_reading_count", "column_B": "mart_reading_count"}
        ),
        ExpectationSpec(
            "ExpectColumnPairValuesToBeEqual", {"column_A": "raw_vehicle_count", "column_B": "mart_vehicle_count"}
        ),
    ]
    for measure in ("reading_count", "vehicle_count"):
        total = int(frame[f"raw_{measure}"].sum())
        specs.append(
            ExpectationSpec(
                "ExpectColumnSumToBeBetween", {"column": f"mart_{measure}", "min_value": total, "max_value": total}
            )
        )
    if spec.spine:
        specs.append(ExpectationSpec("ExpectColumnValuesToBeBetween", {"column": "mart_reading_count", "min_value": 1}))
    return specs
