"""Retention: forget lake partitions and warehouse rows older than the configured horizon.

Place in the flow: the daily DAG's `retention` task. The horizon is counted back from the
end of the run's data interval (never from the wall clock), so a rerun or backfill of a day
deletes exactly what the original run deleted. Lake partitions are whole `dt=/hour=` folders
(raw readings, quarantine, hourly reports and daily build records, GX results, compaction
manifests, load ledgers, a stopped Redshift load's COPY manifest); warehouse rows are deleted
by their time column, in one transaction, then the engine reclaims the space where it can
(PostgreSQL `VACUUM ANALYZE`, Redshift `VACUUM DELETE ONLY`, DuckDB `CHECKPOINT`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from citypulse_batch.lake import (
    COMPACTION_PREFIX,
    DAILY_BUILDS_PREFIX,
    GX_RESULTS_PREFIX,
    LEDGER_PREFIX,
    LOAD_MANIFESTS_PREFIX,
    PARTITION_RE,
    QUARANTINE_PREFIX,
    READINGS_PREFIX,
    REPORTS_PREFIX,
    Lake,
)

# Warehouse tables with a time column: raw and the time-keyed marts (dimensions and the
# whole-history profiles/episodes are rebuilt from what remains).
RETAINED_TABLES: dict[str, str] = {
    "raw.readings": "ts",
    "raw.quarantine_counts": "received_hour",
    "marts.fct_zone_traffic_15min": "bucket_start",
    "marts.fct_sensor_traffic_15min": "bucket_start",
    "marts.fct_zone_traffic_hourly": "hour_start",
    "marts.fct_sensor_traffic_hourly": "hour_start",
    "marts.fct_sensor_health_daily": "reading_date",
    "marts.fct_corridor_rankings": "ranking_date",
}
LAKE_PREFIXES = (
    READINGS_PREFIX,
    QUARANTINE_PREFIX,
    REPORTS_PREFIX,
    DAILY_BUILDS_PREFIX,
    GX_RESULTS_PREFIX,
    COMPACTION_PREFIX,
    LEDGER_PREFIX,
    LOAD_MANIFESTS_PREFIX,  # a load stopped between writing its manifest and deleting it
)


@dataclass(slots=True)
class RetentionSummary:
    cutoff: str
    lake_objects_deleted: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)
    vacuumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cutoff_for(interval_end: datetime, retention_days: int) -> datetime:
    """The first instant kept: whole days back from the interval's end (UTC)."""
    if retention_days < 1:
        raise ValueError(f"retention_days={retention_days}: keep at least one day")
    return interval_end.astimezone(UTC) - timedelta(days=retention_days)


def expired_keys(keys: list[str], cutoff: datetime) -> list[str]:
    """Keys inside a `dt=/hour=` partition that ends at or before `cutoff`."""
    out = []
    for key in keys:
        match = PARTITION_RE.search(key)
        if match is None:
            continue
        hour = datetime.strptime(f"{match[1]} {match[2]}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        if hour + timedelta(hours=1) <= cutoff:
            out.append(key)
    return out


def apply_retention(warehouse: Any, lake: Lake, cutoff: datetime) -> RetentionSummary:
    """Delete what lies before `cutoff` from the lake and the warehouse; idempotent."""
    summary = RetentionSummary(cutoff=cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"))
    for prefix in LAKE_PREFIXES:
        expired = expired_keys(lake.list_keys(prefix), cutoff)
        lake.delete(expired)
        summary.lake_objects_deleted += len(expired)
    bound = cutoff.strftime("timestamp '%Y-%m-%d %H:%M:%S'")
    with warehouse.transaction() as cur:
        existing = warehouse.existing_tables(cur)
        for table, column in RETAINED_TABLES.items():
            if table not in existing:
                continue
            cur.execute(f"select count(*) from {table} where {column} < {bound}")
            count = int(cur.fetchone()[0])
            if count:
                cur.execute(f"delete from {table} where {column} < {bound}")
            summary.rows_deleted[table] = count
    summary.vacuumed = warehouse.reclaim([t for t, n in summary.rows_deleted.items() if n])
    return summary
