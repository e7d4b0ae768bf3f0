"""A small, known lake for the batch-path tests: one interval of readings as the processor lands them.

Not a test module: helpers the batch tests share. The fixture interval holds readings of a
tiny city in two shard files, one reading redelivered into both files, and readings just
outside the interval (one misfiled in the interval's own partition, others in the
neighbouring hours' partitions), the registry CSVs and a few quarantined records.
`expected_rows` and `expected_zone_traffic` say what the warehouse must end up with.
"""

from __future__ import annotations

import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.local.emulators import Emulator, aws_env
from streaming.contract import lake_arrow_schema, quarantine_arrow_schema
from streaming.registry import City, generate_city, registry_csv, zones_csv

INTERVAL_START = datetime(2026, 3, 2, 10, tzinfo=UTC)
INTERVAL_END = INTERVAL_START + timedelta(hours=1)


def ministack_env(ministack: Emulator) -> dict[str, str]:
    """Environment routing boto3 (and the Amazon provider) to ministack, test credentials."""
    return aws_env(ministack)


def s3_client(env: Mapping[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def reading(
    sensor_id: str,
    zone_id: str,
    seq: int,
    ts: datetime,
    *,
    gateway_id: str = "gw-000-00",
    processed_delay: timedelta = timedelta(seconds=2),
    **values: Any,
) -> dict[str, Any]:
    row = {
        "sensor_id": sensor_id,
        "zone_id": zone_id,
        "ts": ts,
        "seq": seq,
        "vehicle_count": 3 + seq % 5,
        "avg_speed_kmh": 30.0 + seq % 40,
        "occupancy_pct": 10.0 + seq % 50,
        "congestion_index": round((seq % 10) / 10, 1),
        "lane": 1,
        "gateway_id": gateway_id,
        "received_at": ts + timedelta(seconds=1),
        "processed_at": ts + processed_delay,
    }
    row.update(values)
    return row


def put_parquet(s3: Any, bucket: str, key: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def partition(hour: datetime) -> str:
    return f"dt={hour:%Y-%m-%d}/hour={hour:%H}/"


@dataclass
class FixtureLake:
    """What was written, so tests can derive the expected warehouse content independently."""

    bucket: str
    city: City
    start: datetime
    files: dict[str, list[dict[str, Any]]]
    quarantine: list[dict[str, Any]]

    @property
    def end(self) -> datetime:
        return self.start + timedelta(hours=1)

    def all_rows(self) -> Iterable[dict[str, Any]]:
        for rows in self.files.values():
            yield from rows

    def expected_rows(self) -> set[tuple[Any, ...]]:
        """Distinct (sensor_id, seq) rows with start <= ts < end, as warehouse tuples (UTC, naive)."""
        out: dict[tuple[str, int], tuple[Any, ...]] = {}
        for row in sorted(self.all_rows(), key=lambda r: r["processed_at"]):
            if self.start <= row["ts"] < self.end:
                out.setdefault((row["sensor_id"], row["seq"]), warehouse_tuple(row))
        return set(out.values())

    def expected_zone_traffic(self) -> dict[tuple[str, datetime], dict[str, Any]]:
        """zone x 15-minute bucket -> mart measures, computed in Python from the expected rows."""
        groups: dict[tuple[str, datetime], list[dict[str, Any]]] = defaultdict(list)
        names = list(lake_arrow_schema().names)
        for values in self.expected_rows():
            row = dict(zip(names, values, strict=True))
            ts = row["ts"]
            bucket = ts.replace(minute=ts.minute // 15 * 15, second=0, microsecond=0)
            groups[(row["zone_id"], bucket)].append(row)
        out = {}
        for key, rows in groups.items():
            speeds = [r["avg_speed_kmh"] for r in rows if r["avg_speed_kmh"] is not None]
            out[key] = {
                "reading_count": len(rows),
                "vehicle_count": sum(r["vehicle_count"] for r in rows),
                "avg_speed_kmh": sum(speeds) / len(speeds) if speeds else None,
                "active_sensor_count": len({r["sensor_id"] for r in rows}),
                "speed_reading_count": len(speeds),
            }
        return out

    def expected_quarantine(self) -> dict[str, int]:
        counted: dict[str, set[str]] = defaultdict(set)
        for row in self.quarantine:
            if self.start <= row["received_at"] < self.end:
                counted[row["reason_code"]].add(row["source_id"])
        return {reason: len(ids) for reason, ids in counted.items()}


def assert_zone_mart(rows: Iterable[tuple[Any, ...]], lake: FixtureLake) -> None:
    """`marts.fct_zone_traffic_15min` rows (in model column order) match the lake's expected traffic."""
    expected = lake.expected_zone_traffic()
    got = {}
    for zone, start, end, readings, vehicles, speed, _occupancy, _congestion, sensors, speed_readings in rows:
        assert end - start == timedelta(minutes=15), (zone, start, end)
        got[(zone, start)] = (readings, int(vehicles), None if speed is None else float(speed), sensors, speed_readings)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        readings, vehicles, speed, sensors, speed_readings = got[key]
        assert (readings, vehicles, sensors, speed_readings) == (
            want["reading_count"],
            want["vehicle_count"],
            want["active_sensor_count"],
            want["speed_reading_count"],
        ), key
        # The mart keeps 3 decimals of mean speed.
        assert speed is not None and abs(speed - want["avg_speed_kmh"]) <= 0.0005, key


def warehouse_tuple(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A lake row as the warehouse stores it: contract column order, timestamps UTC without zone."""
    return tuple(
        row[name].astimezone(UTC).replace(tzinfo=None) if isinstance(row[name], datetime) else row[name]
        for name in lake_arrow_schema().names
    )


def write_fixture_lake(
    s3: Any, bucket: str, start: datetime = INTERVAL_START, bad_row: dict[str, Any] | None = None
) -> FixtureLake:
    """Create the bucket and write one interval of lake (plus neighbours) as the processor would.

    `bad_row` overrides values of one reading (e.g. an out-of-range speed written straight to
    the lake, which the processor would have quarantined).
    """
    s3.create_bucket(Bucket=bucket)
    city = generate_city(sensors=12, zones=4, seed=3)
    s3.put_object(Bucket=bucket, Key="registry/sensor_registry.csv", Body=registry_csv(city))
    s3.put_object(Bucket=bucket, Key="registry/zones.csv", Body=zones_csv(city))

    inside: list[dict[str, Any]] = []
    for n, sensor in enumerate(city.sensors):
        for k, minute in enumerate((2, 17, 31, 46, 59)):
            ts = start + timedelta(minutes=minute, seconds=n, milliseconds=123 * k)
            inside.append(
                reading(
                    sensor.sensor_id, sensor.zone_id, 100 + k, ms(ts), gateway_id=sensor.gateway_id, lane=sensor.lane
                )
            )
    # A count-only detector reports no speed or occupancy.
    inside[1].update(avg_speed_kmh=None, occupancy_pct=None)
    if bad_row is not None:
        inside[7].update(bad_row)
    half = len(inside) // 2
    shard0, shard1 = inside[:half], inside[half:]
    # Kinesis redelivered one record: the processor landed it again, later, in the other file.
    redelivered = dict(shard0[3], processed_at=shard0[3]["processed_at"] + timedelta(seconds=30))
    shard1.append(redelivered)
    # A reading stamped exactly at the interval's end was misfiled into this hour's partition.
    s0 = city.sensors[0]
    shard1.append(reading(s0.sensor_id, s0.zone_id, 900, start + timedelta(hours=1)))
    before = [reading(s0.sensor_id, s0.zone_id, 99, start - timedelta(milliseconds=1))]
    after = [reading(s0.sensor_id, s0.zone_id, 901, start + timedelta(hours=1, milliseconds=1))]

    schema = lake_arrow_schema()
    files = {
        f"raw/readings/{partition(start)}shardId-000000000000-49650000000000000000000001.parquet": shard0,
        f"raw/readings/{partition(start)}shardId-000000000001-49650000000000000000000002.parquet": shard1,
        f"raw/readings/{partition(start - timedelta(hours=1))}shardId-000000000000-1.parquet": before,
        f"raw/readings/{partition(start + timedelta(hours=1))}shardId-000000000000-2.parquet": after,
    }
    for key, rows in files.items():
        put_parquet(s3, bucket, key, rows, schema)

    def quarantined(received_at: datetime, reason: str, source: str) -> dict[str, Any]:
        return {
            "received_at": received_at,
            "processed_at": received_at + timedelta(seconds=1),
            "reason_code": reason,
            "reason": f"{reason} in fixture",
            "sensor_id": s0.sensor_id,
            "gateway_id": s0.gateway_id,
            "zone_id": s0.zone_id,
            "source_id": source,
            "raw": "eyJzZW5zb3JfaWQiOiAiUy0wMDAwMDAifQ==",
        }

    q_rows = [
        quarantined(start + timedelta(minutes=5), "out_of_range", "shardId-0:1:0"),
        quarantined(start + timedelta(minutes=6), "out_of_range", "shardId-0:2:0"),
        quarantined(start + timedelta(minutes=6), "out_of_range", "shardId-0:2:0"),  # redelivered
        quarantined(start + timedelta(minutes=9), "bad_timestamp", "shardId-1:7:3"),
    ]
    # An undecodable message is quarantined whole: the base64 of a gateway's 100 KB message,
    # beyond the widest varchar Redshift has (65,535 bytes; a review found it failed the load).
    q_rows[3]["raw"] = "eyJyZWFkaW5ncyI6IFt" * 7020
    later = [quarantined(start + timedelta(hours=1, minutes=1), "out_of_range", "shardId-0:9:0")]
    put_parquet(s3, bucket, f"quarantine/{partition(start)}part-0.parquet", q_rows, quarantine_arrow_schema())
    put_parquet(
        s3,
        bucket,
        f"quarantine/{partition(start + timedelta(hours=1))}part-0.parquet",
        later,
        quarantine_arrow_schema(),
    )
    return FixtureLake(bucket, city, start, files, q_rows + later)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "password": ""}


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards (without a server the
    test is skipped, or fails under CI=true)."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        # CI provides a server (the CI machine, the workflow's service): there a missing one is
        # a failure, not a pass that tested nothing.
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no PostgreSQL at 127.0.0.1:5432: {exc}")
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    admin.autocommit = True
    name = unique_name(prefix).replace("-", "_")
    with admin.cursor() as cur:
        cur.execute(f"create database {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"drop database if exists {name} with (force)")
        admin.close()


class FailingClient:
    """A boto3 S3 client that raises on the `after`-th call (counted from 1) of each named method."""

    def __init__(self, client: Any, **after: int) -> None:
        self._client = client
        self._after = after
        self._calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name not in self._after:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls[name] += 1
            if self._calls[name] >= self._after[name]:
                raise ConnectionError(f"injected: {name} call {self._calls[name]}")
            return method(*args, **kwargs)

        return call


def session_lake(bucket: str, client: Any = None) -> Any:
    """The lake `bucket` as the DAG's steps see it, through this process's boto3 session (the
    emulator's, under `aws_env`), with `client` instead of the session's S3 client if given."""
    from citypulse_batch.lake import Lake, S3Credentials

    session = boto3.Session()
    frozen = session.get_credentials().get_frozen_credentials()
    return Lake(
        bucket, client or session.client("s3"), S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)
    )
