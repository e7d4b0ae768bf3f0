"""Test helpers: build what the ingestion rule puts on Kinesis, without a broker.

Used by unit tests of the processor, on the benchmark's envelope (`bench.records`); the
integration tests produce the same records through the real broker and rule bridge.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from bench.records import BASE_MS, envelope
from streaming.contract import columnar_message, format_ts, gateway_message
from streaming.processor.core import Record
from streaming.registry import City, Sensor


def reading(sensor: Sensor, seq: int, ts_ms: int, congestion: float = 0.2, **over: Any) -> dict[str, Any]:
    r = {
        "sensor_id": sensor.sensor_id,
        "zone_id": sensor.zone_id,
        "ts": format_ts(ts_ms),
        "seq": seq,
        "vehicle_count": 10 + seq % 7,
        "avg_speed_kmh": 42.5,
        "occupancy_pct": 12.0,
        "congestion_index": congestion,
        "lane": sensor.lane,
    }
    r.update(over)
    return r


class StreamBuilder:
    """Hands out increasing sequence numbers per shard, like a Kinesis shard does."""

    def __init__(self, shard_id: str = "shardId-000000000000") -> None:
        self.shard_id = shard_id
        self.next_seq = 49_000_000_000_000_000_000

    def record(self, data: bytes) -> Record:
        self.next_seq += 1
        return Record(self.shard_id, self.next_seq, data)

    def gateway_record(
        self,
        sensors: list[Sensor],
        readings: list[dict[str, Any]],
        received_at_ms: int,
        sent_at_ms: int | None = None,
        *,
        columnar: bool = False,
    ) -> Record:
        """A gateway message of `readings`: v1, or v2 (columns) with `columnar`."""
        gw, zone = sensors[0].gateway_id, sensors[0].zone_id
        build = columnar_message if columnar else gateway_message
        msg = build(gw, zone, sent_at_ms or received_at_ms, readings)
        return self.record(envelope(orjson.dumps(msg), zone, gw, received_at_ms))


def city_minutes(
    city: City, minutes: int, start_ms: int = BASE_MS, congestion: float = 0.2, builder: StreamBuilder | None = None
) -> Iterator[Record]:
    """One gateway message per gateway per minute, seq = minute index."""
    b = builder or StreamBuilder()
    gateways = city.gateways()
    for m in range(minutes):
        ts = start_ms + (m + 1) * 60_000 - 1
        for sensors in gateways.values():
            yield b.gateway_record(sensors, [reading(s, m, ts, congestion) for s in sensors], ts + 500)
