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
    s3 = p.lake.s3
    minutes = sorted(tuple(sorted((k, str(v)) for k, v in item.items())) for item in _scan(p))
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

    def flaky(states: Any, now_ms: int, minutes: Any, received_through: int) -> None:
        if not fired:
            fired.append(True)
            raise RuntimeError("injected crash before the commit point")
        real(states, now_ms, minutes, received_through)

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


def _minute_in_parts(builder: StreamBuilder, minute: int, parts: int) -> list[list[Record]]:
    """One minute of the city in `parts` batches, each with a share of every gateway's sensors:
    every batch adds to each zone's one zone-minute."""
    ts = BASE_MS + (minute + 1) * 60_000 - 1
    return [
        [
            builder.gateway_record(share, [reading(s, minute, ts) for s in share], ts + 500 + i)
            for sensors in CITY.gateways().values()
            if (share := sensors[i::parts])
        ]
        for i in range(parts)  # batch by batch: the stream numbers them in this order
    ]


def _metrics_keys_read(p: Processor) -> list[int]:
    """Keys each BatchGetItem of the processor asks the metrics table for, as they are sent."""
    asked: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        asked.append(len(params["RequestItems"].get(p.settings.metrics_table, {}).get("Keys", [])))

    p.store.dynamodb.meta.events.register("provide-client-params.dynamodb.BatchGetItem", count)
    return asked


def test_a_container_reads_a_zone_minute_once_and_holds_it_while_it_alone_commits_the_zone(
    aws_env: dict[str, str],
) -> None:
    builder = StreamBuilder()
    first, second = _minute_in_parts(builder, 0, 2)
    (later,) = _minute_in_parts(builder, 1, 1)
    p = fresh_processor(CITY)
    asked = _metrics_keys_read(p)
    zones = len(CITY.zones)

    p.process(first)
    assert sum(asked) == zones  # each zone's minute 0, not yet written
    asked.clear()
    p.process(second)
    assert sum(asked) == 0  # held: this container wrote them and committed their zones since
    p.process(later)
    assert sum(asked) == zones  # minute 1: new

    minute_0 = [int(i["readings"]["N"]) for i in _scan(p) if int(i["minute_start"]["N"]) == BASE_MS]
    assert len(minute_0) == zones and sum(minute_0) == len(CITY.sensors)  # both halves, neither twice


def _scan(p: Processor) -> list[dict[str, Any]]:
    return p.store.dynamodb.scan(TableName=p.settings.metrics_table, ConsistentRead=True)["Items"]


def test_containers_taking_turns_on_a_zone_and_a_crash_leave_the_clean_totals(aws_env: dict[str, str]) -> None:
    """Lambda may run a shard's next batch in another container (one at a time). A container
    whose zone another has committed since must read that zone's minutes again, not add to
    what it held: every batch here adds to the same zone-minutes."""
    builder = StreamBuilder()
    b1, b2, b3, b4, b5 = _minute_in_parts(builder, 0, 5)

    clean = fresh_processor(CITY)
    for batch in (b1, b2, b3, b4, b5):
        clean.process(batch)
    expected = _snapshot(clean)

    a = fresh_processor(CITY)
    b = Processor.for_settings(a.settings)  # a second container: the same tables, nothing held
    a.process(b1)
    b.process(b2)
    a.process(b3)  # what `a` held of b1 no longer holds: `b` committed b2
    crashed = _crash_once(b)
    with pytest.raises(RuntimeError, match="injected crash"):
        b.process(b4)  # b4's aggregates written, its zone states not
    assert crashed()
    a.process(b4)  # the retry, in the other container
    b.process(b4 + b5)  # and again, with the next batch, where it failed
    assert _snapshot(b) == expected


def test_a_retry_after_some_zones_committed_keeps_the_lake_rows_of_the_others(aws_env: dict[str, str]) -> None:
    """The commit writes zone states in parallel requests: some zones may commit before the
    batch fails. Its retry skips them and lands only the rest; it must not replace the lake
    object that holds the committed zones' rows (found by a review: the object was named
    after the batch alone, and the retry's smaller one replaced it)."""
    records = list(city_minutes(CITY, 2, builder=StreamBuilder()))
    clean = fresh_processor(CITY)
    clean.process(records)

    faulty = fresh_processor(CITY)
    real = faulty.store.save_zone_states

    def partly(states: Any, now_ms: int, minutes: Any, received_through: int) -> None:
        first = min(states)
        real({first: states[first]}, now_ms, minutes, received_through)  # one zone commits, then the batch fails
        raise RuntimeError("injected: the other zones' commit failed")

    faulty.store.save_zone_states = partly  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        faulty.process(records)
    faulty.store.save_zone_states = real  # type: ignore[method-assign]
    faulty.process(records)  # the retry: the committed zone's records are skipped

    assert _snapshot(faulty) == _snapshot(clean)


def test_a_redrive_holds_a_record_of_no_known_zone_the_shard_has_moved_past(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead-lettered record on an unknown zone's topic is decided by its shard's marker, not a
    zone's. The redrive asked only the zone states, so once the mapping had quarantined a later
    unknown-zone record, the dead one was redriven into a skip and its queue message deleted:
    no quarantine row, no count (found by a review). It is held now; one the shard has not
    passed is delivered and quarantined."""
    from streaming.processor import handler
    from streaming.processor.envelope import rule_envelope

    p = fresh_processor(CITY)
    monkeypatch.setattr(handler, "_processor", lambda: p)
    b = StreamBuilder()
    by_zone = {sensors[0].zone_id: sensors for sensors in CITY.gateways().values()}
    sensors_a, sensors_b = list(by_zone.values())[:2]  # two gateways of two zones
    ts = BASE_MS + 59_999
    zone_a = b.gateway_record(sensors_a, [reading(s, 0, ts) for s in sensors_a], ts + 500)
    dead_unknown = b.record(rule_envelope(b'{"x":1}', "Z-NOT-IN-REGISTRY", "gw-x", ts + 600))
    # Meanwhile the mapping moved on: zone B's data and another unknown-zone message.
    zone_b = b.gateway_record(sensors_b, [reading(s, 0, ts) for s in sensors_b], ts + 700)
    live_unknown = b.record(rule_envelope(b'{"y":2}', "Z-OTHER-UNKNOWN", "gw-y", ts + 800))
    p.process([zone_b, live_unknown])
    later_unknown = b.record(rule_envelope(b'{"z":3}', "Z-LATER-UNKNOWN", "gw-z", ts + 900))

    def shape(rec: Record, zone: str) -> dict[str, Any]:
        return {"PartitionKey": zone, "SequenceNumber": str(rec.sequence_number), "Data": rec.data}

    dead = [
        shape(zone_a, sensors_a[0].zone_id),
        shape(dead_unknown, "Z-NOT-IN-REGISTRY"),
        shape(later_unknown, "Z-LATER-UNKNOWN"),
    ]
    held = handler.records_already_applied(zone_a.shard_id, dead)
    assert held == [str(dead_unknown.sequence_number)]
    redriven = [r for r in (zone_a, dead_unknown, later_unknown) if str(r.sequence_number) not in held]
    counts = p.process(redriven)["counts"]
    assert (counts["quarantined_messages"], counts.get("redelivered_records", 0)) == (1, 0)


def test_a_redelivered_batch_measures_no_latency_again(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambda delivers a committed batch again (an invocation that timed out after its commit):
    nothing is applied, yet every message's latency was logged a second time, later, skewing
    the latency the demo and the load test report (found by a review)."""
    from bench.records import SHARD_ID, event_record
    from infra.local.poller import LambdaContext
    from streaming.processor import handler

    p = fresh_processor(CITY)
    monkeypatch.setattr(handler, "_processor", lambda: p)
    b = StreamBuilder(SHARD_ID)
    ts = BASE_MS + 59_999
    records = [b.gateway_record(s, [reading(x, 0, ts) for x in s], ts + 500) for s in CITY.gateways().values()]
    event = {"Records": [event_record(r.data, r.sequence_number, "zone") for r in records]}
    context = LambdaContext(function_name="processor", aws_request_id="request")
    logs: list[dict[str, Any]] = []  # the summaries the handler logs
    monkeypatch.setattr(handler.logger, "info", lambda message, extra: logs.append(extra))
    for _ in range(2):
        assert handler.handler(event, context) == {"batchItemFailures": []}
    samples = [
        (sum(log["latency_ms_histogram"].values()), sum(log["stream_ms_histogram"].values()), log["counts"])
        for log in logs
    ]
    assert samples[0][:2] == (len(records), len(records))
    assert samples[1] == (0, 0, {"redelivered_records": len(records)})
