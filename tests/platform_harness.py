"""Shared test harness for suites that drive the running local platform (`citypulse up`).

Used by test_platform_reliability.py (audit, hostile corpus, logs) and test_fault_injection.py
(faults against a clean run): a started platform with its city and CA, gateways over mTLS,
the processor's per-zone counters, and waits that poll another process's progress with a
deadline (there is no event to wait on).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from infra.local.audit import _clients
from infra.local.certs import LocalCA
from infra.local.platform import PlatformInfo, demo_city, down, up
from streaming.contract import format_ts, gateway_message
from streaming.devices.gateway import Gateway
from streaming.registry import City, Sensor

MINUTE_MS = 60_000
WAIT_S = 120.0


@dataclass
class Platform:
    state: Path
    info: PlatformInfo
    city: City
    ca: LocalCA
    s3: Any
    ddb: Any

    @property
    def gateways(self) -> dict[str, list[Sensor]]:
        return self.city.gateways()

    def zones_with(self, n_gateways: int) -> list[str]:
        per_zone = Counter(sensors[0].zone_id for sensors in self.gateways.values())
        return sorted(z for z, n in per_zone.items() if n == n_gateways)

    def gateways_of(self, zone_id: str) -> list[list[Sensor]]:
        return sorted((s for s in self.gateways.values() if s[0].zone_id == zone_id), key=lambda s: s[0].gateway_id)

    def connect(self, gateway_id: str, *, basic_ingest: bool, **options: Any) -> Gateway:
        identity = self.ca.device_identity(gateway_id)
        gw = Gateway(
            gateway_id,
            endpoint=self.info.env["CITYPULSE_MQTT_HOST"],
            port=int(self.info.env["CITYPULSE_MQTT_PORT"]),
            cert_path=identity.cert_path,
            key_path=identity.key_path,
            ca_path=self.ca.cert_path,
            basic_ingest_rule=self.info.env["CITYPULSE_TOPIC_RULE"] if basic_ingest else None,
            **options,
        )
        gw.connect()
        return gw

    def zone_counters(self) -> dict[str, dict[str, int]]:
        from streaming.processor.store import StateStore

        env = self.info.env
        store = StateStore(self.ddb, env["CITYPULSE_PROCESSOR_STATE_TABLE"], env["CITYPULSE_ZONE_METRICS_TABLE"])
        return {z.zone_id: dict(z.counters) for z in store.scan_zone_states()}

    def wait_for_counters(
        self, expected: dict[str, dict[str, int]], key: str = "received", timeout: float = WAIT_S
    ) -> dict[str, dict[str, int]]:
        """Poll until every zone in `expected` has reached its expected `key` count."""
        deadline = time.monotonic() + timeout
        while True:
            counters = self.zone_counters()
            if all(counters.get(z, {}).get(key, 0) >= e.get(key, 0) for z, e in expected.items()):
                return counters
            assert time.monotonic() < deadline, f"processor did not catch up within {timeout} s"
            time.sleep(0.25)  # polling another process's progress; no event to wait on

    def download(self, prefix: str, into: Path) -> Path:
        bucket = self.info.env["CITYPULSE_LAKE_BUCKET"]
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                target = into / o["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
        return into / prefix

    def sqs(self) -> Any:
        import boto3

        env = self.info.env
        return boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        ).client("sqs", endpoint_url=env["AWS_ENDPOINT_URL_SQS"])

    def dlq_depth(self) -> int:
        """Messages on the processor's on-failure queue (visible or being read)."""
        attrs = self.sqs().get_queue_attributes(
            QueueUrl=self.info.env["CITYPULSE_PROCESSOR_DLQ_URL"],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@contextmanager
def running_platform(state: Path, sensors: int, seed: int, faults: Path | None = None) -> Iterator[Platform]:
    """`citypulse up` in `state` for the duration of the block, then `down`."""
    info = up(state, sensors=sensors, seed=seed, echo=lambda _line: None, faults=faults)
    try:
        s3, ddb = _clients(info.env)
        yield Platform(state, info, demo_city(sensors, seed), LocalCA.load_or_create(state / "pki"), s3, ddb)
    finally:
        down(state, echo=lambda _line: None)


def reading(sensor: Sensor, seq: int, ts_ms: int, **over: Any) -> dict[str, Any]:
    r = {
        "sensor_id": sensor.sensor_id,
        "zone_id": sensor.zone_id,
        "ts": format_ts(ts_ms),
        "seq": seq,
        "vehicle_count": 7,
        "avg_speed_kmh": 42.5,
        "occupancy_pct": 12.0,
        "congestion_index": 0.25,
        "lane": sensor.lane,
    }
    r.update(over)
    return r


def message(sensors: list[Sensor], readings: list[dict[str, Any]], sent_ms: int) -> bytes:
    return orjson.dumps(gateway_message(sensors[0].gateway_id, sensors[0].zone_id, sent_ms, readings))


def publish_all(platform: Platform, plan: dict[str, list[bytes]], *, basic_ingest: bool) -> None:
    """Each gateway publishes its messages in order over its own mTLS connection (QoS 1)."""
    zone_of = {gw: sensors[0].zone_id for gw, sensors in platform.gateways.items()}

    def run(gateway_id: str) -> None:
        gw = platform.connect(gateway_id, basic_ingest=basic_ingest)
        try:
            for payload in plan[gateway_id]:
                gw.publish_telemetry(zone_of[gateway_id], payload)
            stats = gw.flush(60)
            assert (stats.acked, stats.failed) == (len(plan[gateway_id]), 0)
        finally:
            gw.disconnect()

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(run, plan))
