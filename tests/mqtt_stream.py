"""Test helpers: a real broker, the rule bridge and Kinesis (kinesalite), and what reads the stream back.

Shared by the integration tests that publish through MQTT and check what reaches Kinesis
(test_rule_bridge, test_replay, test_basic_ingest); their per-module CA, broker and kinesalite
are the ``ca``, ``broker`` and ``kinesalite`` fixtures in conftest.py.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from typing import Any

import orjson

from infra.local.broker import Broker
from infra.local.certs import LocalCA
from infra.local.platform import device_gateway
from infra.local.rule_bridge import RuleBridge
from streaming.devices.gateway import Gateway

PROJECT_SQL = (
    "SELECT encode(*, 'base64') AS payload, topic(3) AS zone_id, topic(4) AS gateway_id, "
    "clientid() AS client_id, timestamp() AS received_at FROM 'citypulse/telemetry/+/+'"
)
PROJECT_KEY = "${topic(3)}"
TIMEOUT = 30.0


def create_stream(kinesis: Any, name: str, shards: int = 2) -> None:
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    deadline = time.monotonic() + TIMEOUT
    while kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        assert time.monotonic() < deadline, f"stream {name} never became ACTIVE"


def offline_bridge(kinesis: Any, sql: str = PROJECT_SQL, key: str = PROJECT_KEY, **kw: Any) -> RuleBridge:
    """A bridge that is never started: for its rule, its topic filters and its batching."""
    return RuleBridge(
        sql=sql,
        partition_key=key,
        stream_name="s",
        broker_host="localhost",
        broker_port=1,
        ca_path="ca",
        cert_path="c",
        key_path="k",
        kinesis_client=kinesis,
        **kw,
    )


def start_bridge(kinesis: Any, ca: LocalCA, broker: Broker, stream: str, **kw: Any) -> RuleBridge:
    """The project rule bridged from ``broker`` into ``stream``, started; the caller stops it."""
    ident = ca.bridge_identity()
    bridge = RuleBridge(
        sql=PROJECT_SQL,
        partition_key=PROJECT_KEY,
        stream_name=stream,
        broker_host="localhost",
        broker_port=broker.port,
        ca_path=ca.cert_path,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        kinesis_client=kinesis,
        **kw,
    )
    bridge.start()
    return bridge


def connect_gateway(ca: LocalCA, broker: Broker, gateway_id: str, **kw: Any) -> Gateway:
    """A gateway with its own device certificate, connected to ``broker``."""
    gw = device_gateway(ca, gateway_id, "localhost", broker.port, **kw)
    gw.connect(TIMEOUT)
    return gw


def payload_of(record: dict[str, Any]) -> bytes:
    """The device's MQTT payload inside a Kinesis record the project rule wrote."""
    return base64.b64decode(orjson.loads(record["Data"])["payload"])


class StreamReader:
    """Reads every shard of a stream from the start, accumulating records across calls."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        self.records: list[dict[str, Any]] = []
        shards = kinesis.list_shards(StreamName=stream)["Shards"]
        self.iterators = {
            s["ShardId"]: kinesis.get_shard_iterator(
                StreamName=stream, ShardId=s["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            for s in shards
        }

    def poll(self) -> int:
        for shard, it in self.iterators.items():
            resp = self.kinesis.get_records(ShardIterator=it, Limit=10_000)
            self.iterators[shard] = resp["NextShardIterator"]
            self.records += resp["Records"]
        return len(self.records)

    def payloads(self) -> Counter[bytes]:
        return Counter(payload_of(r) for r in self.records)

    def by_payload(self) -> dict[bytes, list[dict[str, Any]]]:
        out: dict[bytes, list[dict[str, Any]]] = {}
        for r in self.records:
            out.setdefault(payload_of(r), []).append(r)
        return out

    def wait_for_all(self, expected: set[bytes]) -> Counter[bytes]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.poll()
            seen = self.payloads()
            if expected <= set(seen):
                return seen
            assert time.monotonic() < deadline, f"{len(expected - set(seen))} of {len(expected)} never arrived"

    def wait_for_count(self, expected: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + TIMEOUT
        while self.poll() < expected:
            assert time.monotonic() < deadline, f"{len(self.records)} of {expected} records reached Kinesis"
        return self.records
