"""Where the read API's data comes from: the registry in the lake (S3) and the live store
(DynamoDB tables `processor-state` and `zone-metrics`). Plain boto3; endpoints from the
environment, as everywhere in citypulse.

Reads are eventually consistent (half the cost of the processor's consistent reads; a
dashboard a second behind is fine) and cached briefly per process, so that many viewers
polling every few seconds cost one read of the zone states per `state_ttl_s`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from streaming.processor.state import ZoneState
from streaming.readapi.views import LiveZone, MinuteRow, parse_zones
from streaming.registry import Sensor, Zone, load_registry
from streaming.unprocessed import until_processed

_T = TypeVar("_T")


@dataclass(frozen=True)
class Registry:
    zones: tuple[Zone, ...]
    sensors: dict[str, Sensor]
    sensors_by_zone: dict[str, tuple[Sensor, ...]]

    @property
    def zones_by_id(self) -> dict[str, Zone]:
        return {z.zone_id: z for z in self.zones}

    @classmethod
    def build(cls, zones: Iterable[Zone], sensors: dict[str, Sensor]) -> Registry:
        by_zone: dict[str, list[Sensor]] = {}
        for s in sorted(sensors.values(), key=lambda s: s.sensor_id):
            by_zone.setdefault(s.zone_id, []).append(s)
        return cls(
            tuple(sorted(zones, key=lambda z: z.zone_id)),
            sensors,
            {z: tuple(v) for z, v in by_zone.items()},
        )


# The widest window `city_minute_rows` serves (the read API's `/ingestion?minutes=` at most).
CITY_WINDOW_MINUTES = 360


@dataclass
class _Cached:
    ttl_s: float
    value: Any = None
    at: float = -1e18
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, load: Callable[[], _T], fits: Callable[[Any], bool] | None = None) -> _T:
        """The value loaded at most `ttl_s` ago (and that `fits`, when given), else a new one."""
        with self.lock:
            if time.monotonic() - self.at > self.ttl_s or (fits is not None and not fits(self.value)):
                self.value = load()
                self.at = time.monotonic()
            return self.value


@dataclass
class LiveSource:
    dynamodb: Any
    s3: Any
    processor_table: str
    metrics_table: str
    lake_bucket: str
    registry_key: str = "registry/sensor_registry.csv"
    zones_key: str = "registry/zones.csv"
    registry_ttl_s: float = 300.0
    state_ttl_s: float = 1.0
    city_ttl_s: float = 5.0
    _registry: _Cached = field(init=False)
    _states: _Cached = field(init=False)
    _city: _Cached = field(init=False)

    def __post_init__(self) -> None:
        self._registry = _Cached(self.registry_ttl_s)
        self._states = _Cached(self.state_ttl_s)
        self._city = _Cached(self.city_ttl_s)

    @classmethod
    def from_env(cls) -> LiveSource:
        import boto3
        from botocore.config import Config

        return cls(
            # Enough connections for the parallel per-zone queries of `city_minute_rows`.
            dynamodb=boto3.client("dynamodb", config=Config(max_pool_connections=32)),
            s3=boto3.client("s3"),
            processor_table=os.environ["CITYPULSE_PROCESSOR_STATE_TABLE"],
            metrics_table=os.environ["CITYPULSE_ZONE_METRICS_TABLE"],
            lake_bucket=os.environ["CITYPULSE_LAKE_BUCKET"],
            registry_key=os.environ.get("CITYPULSE_REGISTRY_KEY", "registry/sensor_registry.csv"),
        )

    # -- registry ---------------------------------------------------------------------------

    def registry(self) -> Registry:
        return self._registry.get(self._load_registry)

    def _load_registry(self) -> Registry:
        def read(key: str) -> bytes:
            return self.s3.get_object(Bucket=self.lake_bucket, Key=key)["Body"].read()

        return Registry.build(parse_zones(read(self.zones_key)), load_registry(read(self.registry_key)))

    # -- live zone state --------------------------------------------------------------------

    def zone_states(self) -> dict[str, LiveZone]:
        """Every registered zone's committed state (zones without data yet are absent)."""
        return self._states.get(self._load_states)

    def _load_states(self) -> dict[str, LiveZone]:
        keys = [{"pk": {"S": f"zone#{z.zone_id}"}, "sk": {"S": "state"}} for z in self.registry().zones]
        out: dict[str, LiveZone] = {}
        for start in range(0, len(keys), 100):
            request = {
                "Keys": keys[start : start + 100],
                "ProjectionExpression": "#s, updated_at",
                "ExpressionAttributeNames": {"#s": "state"},
            }
            # Unprocessed keys (throttling) are asked again with back-off; StoreError if they stay.
            for item in until_processed(self.dynamodb, "batch_get_item", self.processor_table, request):
                state = ZoneState.from_bytes(item["state"]["B"])
                out[state.zone_id] = LiveZone(state, int(item.get("updated_at", {}).get("N", "0")))
        return out

    # -- zone-minute metrics ----------------------------------------------------------------

    def minute_rows(self, zone_id: str, first_minute: int, last_minute: int) -> list[MinuteRow]:
        """The zone's minute items with first_minute <= minute <= last_minute, in time order."""
        from streaming.processor.store import minute_bucket

        paginator = self.dynamodb.get_paginator("query")
        rows: list[MinuteRow] = []
        for page in paginator.paginate(
            TableName=self.metrics_table,
            KeyConditionExpression="zone_id = :z AND #b BETWEEN :lo AND :hi",
            ExpressionAttributeNames={"#b": "bucket"},
            ExpressionAttributeValues={
                ":z": {"S": zone_id},
                ":lo": {"S": minute_bucket(first_minute)},
                ":hi": {"S": minute_bucket(last_minute)},
            },
            ProjectionExpression="minute_start, readings, vehicles, speed_sum, speed_n, occupancy_sum, "
            "occupancy_n, congestion_sum",
        ):
            for i in page.get("Items", []):
                rows.append(
                    MinuteRow(
                        minute=int(i["minute_start"]["N"]) // 60_000,
                        readings=int(i["readings"]["N"]),
                        vehicles=int(i["vehicles"]["N"]),
                        speed_sum=float(i["speed_sum"]["N"]),
                        speed_n=int(i["speed_n"]["N"]),
                        occupancy_sum=float(i["occupancy_sum"]["N"]),
                        occupancy_n=int(i["occupancy_n"]["N"]),
                        congestion_sum=float(i["congestion_sum"]["N"]),
                    )
                )
        return rows

    def city_minute_rows(self, first_minute: int, last_minute: int) -> dict[str, list[MinuteRow]]:
        """Every zone's minute rows over a window of at most `CITY_WINDOW_MINUTES`: one Query
        per zone, a few in parallel. What was read is kept for `city_ttl_s` (until the minute
        turns) and cut to each request's window; a wider window than kept is read whole hours
        at a time. A caller asking again and again, or for every width in turn, costs the live
        tables a few reads of the city per interval, not one a request (found by a security
        review: a Query per zone a request), and the page's own 90-minute poll reads 120.
        """

        def load() -> tuple[int, int, dict[str, list[MinuteRow]]]:
            width = -(-(last_minute - first_minute + 1) // 60) * 60
            first = last_minute - min(width, CITY_WINDOW_MINUTES) + 1
            zones = [z.zone_id for z in self.registry().zones]
            with ThreadPoolExecutor(max_workers=16) as pool:
                return first, last_minute, dict(pool.map(lambda z: (z, self.minute_rows(z, first, last_minute)), zones))

        _, _, rows = self._city.get(load, fits=lambda v: v[0] <= first_minute and v[1] == last_minute)
        return {z: [r for r in zone_rows if first_minute <= r.minute <= last_minute] for z, zone_rows in rows.items()}
