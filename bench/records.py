"""Kinesis events as the processor Lambda receives them, built without a broker, for benchmarks.

The shapes follow the ingestion rule (docs/architecture.md §6): each Kinesis record's data is
the rule's JSON envelope around the base64 MQTT payload, and the Lambda event carries that
data base64-encoded again. The unit tests build their records on the same `envelope`
(tests/kinesis_records.py).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import orjson

from streaming.contract import columnar_message, format_ts, gateway_message
from streaming.processor.core import MINUTE_MS
from streaming.processor.envelope import rule_envelope as envelope
from streaming.registry import City, Sensor

BASE_MS = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000  # an hour boundary in 2026
SHARD_ID = "shardId-000000000000"
FIRST_SEQUENCE = 49_000_000_000_000_000_000


def reading(sensor: Sensor, seq: int, ts_ms: int, congestion: float = 0.2) -> dict[str, Any]:
    """A valid reading as a detector reports it; values vary a little so aggregates are not trivial."""
    return {
        "sensor_id": sensor.sensor_id,
        "zone_id": sensor.zone_id,
        "ts": format_ts(ts_ms),
        "seq": seq,
        "vehicle_count": 10 + seq % 7,
        "avg_speed_kmh": 42.5 + seq % 5,
        "occupancy_pct": 12.0 + seq % 3,
        "congestion_index": congestion,
        "lane": sensor.lane,
    }


def event_record(data: bytes, sequence: int, partition_key: str) -> dict[str, Any]:
    """One record of the Kinesis event Lambda hands the processor (shard `SHARD_ID`)."""
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": str(sequence),
            "data": base64.b64encode(data).decode(),
            "approximateArrivalTimestamp": 1_795_000_000.0,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{SHARD_ID}:{sequence}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::000000000000:role/citypulse-processor",
        "awsRegion": "eu-west-1",
        "eventSourceARN": "arn:aws:kinesis:eu-west-1:000000000000:stream/citypulse-telemetry",
    }


def _gateway_payloads(
    city: City, start_ms: int, columnar: bool = False, per_detector: bool = False, tick_ms: int = MINUTE_MS
) -> Iterator[tuple[bytes, Sensor, int]]:
    """One gateway message per gateway per tick, forever (seq = tick index); v1, or v2 with
    `columnar`. Every reading of a message carries the tick's last millisecond, as gateways
    reporting in step do, or with `per_detector` its detector's own time within the tick."""
    gateways = list(city.gateways().values())
    build = columnar_message if columnar else gateway_message
    # A detector's own millisecond in the tick, spread over the city: nearly every reading's
    # `ts` string is then distinct, as real detectors' are.
    offset = {s.sensor_id: i * 7_919 % tick_ms if per_detector else 0 for i, s in enumerate(city.sensors)}
    tick = 0
    while True:
        ts = start_ms + (tick + 1) * tick_ms - 1
        for sensors in gateways:
            readings = [reading(s, tick, ts - offset[s.sensor_id]) for s in sensors]
            msg = build(sensors[0].gateway_id, sensors[0].zone_id, ts, readings)
            yield orjson.dumps(msg), sensors[0], ts + 500
        tick += 1


def _single_payloads(city: City, start_ms: int) -> Iterator[tuple[bytes, Sensor, int]]:
    """One MQTT message per reading: every sensor once per minute."""
    minute = 0
    while True:
        ts = start_ms + (minute + 1) * MINUTE_MS - 1
        for s in city.sensors:
            yield orjson.dumps(reading(s, minute, ts)), s, ts + 500
        minute += 1


def kinesis_events(city: City, kind: str, records: int, batches: int, tick_ms: int = MINUTE_MS) -> list[dict[str, Any]]:
    """`batches` consecutive Lambda events of `records` records each, of `kind` "gateway" (v1
    messages), "columnar" (the same readings as v2 messages), "per_detector" (v2 messages whose
    readings each carry their own time within the tick) or "single", continuing one stream
    (sequence numbers and event time keep increasing). A gateway reports every `tick_ms` (a
    single-reading sensor once a minute)."""
    if kind == "single":
        payloads = _single_payloads(city, BASE_MS)
    else:
        columnar, per_detector = kind in ("columnar", "per_detector"), kind == "per_detector"
        payloads = _gateway_payloads(city, BASE_MS, columnar, per_detector, tick_ms)
    sequence = FIRST_SEQUENCE
    events = []
    for _ in range(batches):
        event_records = []
        for _ in range(records):
            payload, sensor, received = next(payloads)
            sequence += 1
            data = envelope(payload, sensor.zone_id, sensor.gateway_id, received)
            event_records.append(event_record(data, sequence, sensor.zone_id))
        events.append({"Records": event_records})
    return events
