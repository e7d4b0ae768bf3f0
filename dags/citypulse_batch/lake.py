"""The S3 lake as the batch path sees it: partition layout, intervals, and a small S3 accessor.

Place in the flow: the streaming processor writes `raw/readings/` (partitioned by event time),
`quarantine/` (by receive time) and `registry/`; the hourly DAG waits for an interval's
partition, loads it into the warehouse and writes its run report under `reports/hourly/`.
The key layout is defined here once; the processor's writer and these readers are tested
against each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

READINGS_PREFIX = "raw/readings/"
QUARANTINE_PREFIX = "quarantine/"
SENSOR_REGISTRY_KEY = "registry/sensor_registry.csv"
ZONES_KEY = "registry/zones.csv"
REPORTS_PREFIX = "reports/hourly/"
# Where the daily DAG records that a day's build has begun (`daily_build_key`).
DAILY_BUILDS_PREFIX = "reports/daily/"
# Great Expectations validation results of each hourly run, partitioned like the data.
GX_RESULTS_PREFIX = "gx/validations/"
# Compaction manifests, partitioned like the data they describe, outside every table location.
COMPACTION_PREFIX = "compaction/"
# Which objects of each partition the warehouse holds the rows of (`citypulse_batch.ledger`).
LEDGER_PREFIX = "ledger/"
# The Redshift load's COPY manifests (one per load, deleted after it), partitioned like the data.
LOAD_MANIFESTS_PREFIX = "load-manifests/"

_HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Interval:
    """A half-open interval [start, end) of whole UTC hours: the unit every batch task works on."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None:
                raise ValueError(f"interval {name}={value.isoformat()} has no time zone; pass UTC")
            # Airflow hands out pendulum datetimes; normalise to plain UTC datetimes.
            value = datetime.fromtimestamp(value.timestamp(), UTC)
            if value.minute or value.second or value.microsecond:
                raise ValueError(f"interval {name}={value.isoformat()} is not on the hour: lake partitions are hourly")
            object.__setattr__(self, name, value)
        if self.start >= self.end:
            raise ValueError(f"empty interval [{self.start.isoformat()}, {self.end.isoformat()})")

    @classmethod
    def hour(cls, start: datetime) -> Interval:
        return cls(start, start + _HOUR)

    def hours(self) -> Iterator[datetime]:
        hour = self.start
        while hour < self.end:
            yield hour
            hour += _HOUR

    def days(self) -> list[Interval]:
        """The whole UTC days its hours fall in, in order."""
        starts = sorted({hour.replace(hour=0) for hour in self.hours()})
        return [Interval(day, day + timedelta(days=1)) for day in starts]

    def sql_bounds(self) -> tuple[str, str]:
        """Start and end as SQL timestamp literals (UTC, no zone) that Redshift, PostgreSQL and
        DuckDB all read. Built from datetimes, never from user text."""
        return sql_timestamp(self.start), sql_timestamp(self.end)

    def to_json(self) -> dict[str, str]:
        return {"start": _iso(self.start), "end": _iso(self.end)}


def sql_timestamp(moment: datetime) -> str:
    """A UTC moment as a SQL timestamp literal without zone, read alike by Redshift, PostgreSQL, DuckDB."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("timestamp '%Y-%m-%d %H:%M:%S'")


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# A key's `dt=YYYY-MM-DD/hour=HH/` partition (`partition`), its day and hour as groups.
PARTITION_RE = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")


def partition(hour: datetime) -> str:
    """`dt=YYYY-MM-DD/hour=HH/` of a UTC hour."""
    hour = hour.astimezone(UTC)
    return f"dt={hour:%Y-%m-%d}/hour={hour:%H}/"


def readings_prefixes(interval: Interval) -> list[str]:
    return [READINGS_PREFIX + partition(hour) for hour in interval.hours()]


def quarantine_prefixes(interval: Interval) -> list[str]:
    return [QUARANTINE_PREFIX + partition(hour) for hour in interval.hours()]


def partition_prefixes(interval: Interval) -> list[str]:
    """Every partition an interval's load reads: readings by event time, quarantine by receive time."""
    return readings_prefixes(interval) + quarantine_prefixes(interval)


def list_partitions(lake: Lake, interval: Interval) -> dict[str, list[str]]:
    """The Parquet objects of each partition an interval's load reads (`partition_prefixes`)."""
    return {prefix: lake.list_keys(prefix, ".parquet") for prefix in partition_prefixes(interval)}


def readings_wildcard(hour: datetime) -> str:
    """Wildcard key of an hour's reading files, for the partition sensor."""
    return READINGS_PREFIX + partition(hour) + "*.parquet"


def gx_results_prefix(hour: datetime) -> str:
    """Where the hourly run of `hour` keeps its Great Expectations validation results."""
    return GX_RESULTS_PREFIX + partition(hour)


def report_key(interval: Interval) -> str:
    return REPORTS_PREFIX + partition(interval.start) + "report.json"


def daily_build_key(day: datetime) -> str:
    """The record that the daily marts' build of the UTC day starting at `day` has begun,
    partitioned as the day's first hour (retention forgets it with that hour)."""
    return DAILY_BUILDS_PREFIX + partition(day) + "build.json"


@dataclass(frozen=True, slots=True)
class S3Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


class Lake:
    """One lake bucket through a boto3 S3 client (the provider's hook hands one out in Airflow).

    The credentials are kept for engines that read S3 themselves (DuckDB's httpfs, Redshift COPY
    with keys): they must see the lake exactly as the client does, endpoint included.
    """

    def __init__(self, bucket: str, client: Any, credentials: S3Credentials | None = None) -> None:
        self.bucket = bucket
        self.client = client
        self.credentials = credentials

    @property
    def endpoint_url(self) -> str:
        return str(self.client.meta.endpoint_url)

    @property
    def region(self) -> str:
        return str(self.client.meta.region_name or "us-east-1")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def list_keys(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys under a prefix ending in `suffix`, sorted (S3 lists in key order anyway)."""
        return [key for key, _ in self.list_objects(prefix, suffix)]

    def list_objects(self, prefix: str, suffix: str = "") -> list[tuple[str, int]]:
        """(key, size in bytes) of the objects under a prefix ending in `suffix`, sorted by key."""
        return [(key, size) for key, size, _ in self.list_entries(prefix, suffix)]

    def etags(self, prefix: str, suffix: str = "") -> dict[str, str]:
        """The ETag of each object under a prefix ending in `suffix`: it changes when an object
        is written again with other content."""
        return {key: etag for key, _, etag in self.list_entries(prefix, suffix)}

    def list_entries(self, prefix: str, suffix: str = "") -> list[tuple[str, int, str]]:
        """(key, size in bytes, ETag) of the objects under a prefix ending in `suffix`, sorted by
        key: one listing for a caller that needs both."""
        entries = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            contents = (o for o in page.get("Contents", ()) if o["Key"].endswith(suffix))
            entries.extend((o["Key"], int(o["Size"]), str(o["ETag"])) for o in contents)
        return sorted(entries)

    def delete(self, keys: Sequence[str]) -> None:
        """Delete the objects (gone ones too: S3 deletes are idempotent); raise if any could not be."""
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = keys[start : start + 1000]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            if response.get("Errors"):
                raise RuntimeError(f"could not delete from s3://{self.bucket}: {response['Errors'][:5]}")

    def filesystem(self) -> Any:
        """A pyarrow S3 filesystem that sees the lake exactly as the boto3 client does (endpoint,
        region, credentials): Arrow reads and writes Parquet on S3 itself, in parallel."""
        from pyarrow import fs

        endpoint = urlsplit(self.endpoint_url)
        on_aws = bool(endpoint.hostname and endpoint.hostname.endswith(".amazonaws.com"))
        credentials = self.credentials
        return fs.S3FileSystem(
            access_key=credentials.access_key if credentials else None,
            secret_key=credentials.secret_key if credentials else None,
            session_token=credentials.token if credentials else None,
            region=self.region,
            # On AWS the SDK finds the endpoint and addresses buckets by host; an emulator is one
            # endpoint that serves buckets by path.
            endpoint_override=None if on_aws else endpoint.netloc,
            scheme=endpoint.scheme or "https",
        )

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def write_json(self, key: str, document: dict[str, Any]) -> None:
        body = json.dumps(document, indent=2, sort_keys=True).encode()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")

    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON document at `key`, or None if there is none."""
        try:
            body = self.read(key)
        except self.client.exceptions.NoSuchKey:
            return None
        return dict(json.loads(body))
