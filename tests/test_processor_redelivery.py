"""Redelivery against the real store: the processor over DynamoDB and S3 (ministack).

A clean delivery of a stream is compared with the same stream delivered the way Kinesis and
Lambda really do it: batches redelivered whole, batches already applied delivered again out of
order, old batches replayed, and a crash between the zone-minute aggregate write and the
zone-state commit (docs/architecture.md §4). Zone-minute items, zone state and the lake's
distinct rows must come out identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kinesis_records import BASE_MS, StreamBuilder, city_minutes, reading

from infra.local.scratch import fresh_processor
from streaming.parquet import read_parquet
from streaming.processor.core import Record
from streaming.processor.handler import Processor
from streaming.registry import generate_city

pytestmark = pytest.mark.integration

CITY = generate_city(sensors=160, zones=3, seed=9)


def _snapshot(p: Processor) -> dict[str, Any]:
    ddb, s3 = p.store.dynamodb, p.lake.s3
    minutes = sorted(
        (
            tuple(sorted((k, str(v)) for k, v in item.items()))
            for item in ddb.scan(TableName=p.settings.metrics_table, ConsistentRead=True)["Items"]
        ),
    )
    states = {s.zone_id: s for s in p.store.scan_zone_states()}
    rows: set[tuple] = set()
    listing = s3.list_objects_v2(Bucket=p.settings.lake_bucket, Prefix="raw/readings/")
    for obj in listing.get("Contents", []):
        table = read_parquet(p.lake.read_bytes(obj["Key"])).drop_columns(["processed_at"])
        rows |= {tuple(r.values()) for r in table.to_pylist()}
    return {"minutes": minutes, "states": states, "lake_rows": rows}


def _crash_once(p: Processor) -> Callable[[], bool]:
    """Make the next zone-state commit fail after the aggregates were written."""
    real = p.store.save_zone_states
    fired: list[bool] = []

    def flaky(states: Any, now_ms: int) -> None:
        if not fired:
            fired.append(True)
            raise RuntimeError("injected crash before the commit point")
        real(states, now_ms)

    p.store.save_zone_states = flaky  # type: ignore[method-assign]
    return lambda: bool(fired)


def test_redelivery_reordering_replays_and_a_crash_leave_the_clean_totals(aws_env: dict[str, str]) -> None:
    builder = StreamBuilder()
    records: list[Record] = list(city_minutes(CITY, 4, builder=builder))
    gateway = next(iter(CITY.gateways().values()))
    records += [builder.record(r.data) for r in records[:3]]  # gateways resending: device duplicates
    old = BASE_MS - 30 * 60_000  # new seqs with an event time far behind the zone's watermark: late
    records.append(builder.gateway_record(gateway, [reading(s, 50, old) for s in gateway], BASE_MS + 5 * 60_000))
    size = len(records) // 4 + 1
    b1, b2, b3, b4 = (records[i : i + size] for i in range(0, len(records), size))

    clean = fresh_processor(CITY)
    for batch in (b1, b2, b3, b4):
        clean.process(batch)
    expected = _snapshot(clean)
    assert expected["lake_rows"] and expected["minutes"]
    states = expected["states"].values()
    assert sum(s.counters.get("stored", 0) for s in states) == 4 * len(CITY.sensors) + len(gateway)
    # Per-sensor counters are the zone counters split by sensor, and the stream exercises them.
    for name in ("duplicates", "late"):
        per_sensor = sum(getattr(sensor, name) for s in states for sensor in s.sensors.values())
        assert per_sensor == sum(s.counters.get(name, 0) for s in states) > 0

    faulty = fresh_processor(CITY)
    faulty.process(b1)
    faulty.process(b1)  # redelivered whole
    crashed = _crash_once(faulty)
    with pytest.raises(RuntimeError, match="injected crash"):
        faulty.process(b2)  # aggregates written, zone state not
    assert crashed()
    faulty.process(b1 + b2)  # Lambda retries from the checkpoint, with an already-applied batch in front
    faulty.process(b3)
    faulty.process(b2)  # an old batch, already applied, delivered after a newer one
    faulty.process(b1 + b2 + b3)  # replay of everything so far
    faulty.process(b4)
    faulty.process(b4)
    assert _snapshot(faulty) == expected
