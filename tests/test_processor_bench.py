"""The processor bench times what it says (bench/processor_bench.py; the numbers themselves live
in docs/performance.md, never in tests): every contender sees the same readings of each kind of
event, and the per-detector kind does carry one event time per detector."""

from __future__ import annotations

import binascii

import orjson
import pytest

from bench.processor_bench import FLOOR, KINDS, contenders
from bench.records import BASE_MS, kinesis_events
from streaming.processor import core
from streaming.processor.handler import records_from_event
from streaming.registry import generate_city

CITY = generate_city(sensors=300, zones=4, seed=3)
REGISTRY = {s.sensor_id: s for s in CITY.sensors}
ZONES = {z.zone_id for z in CITY.zones}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_contender_counts_the_same_readings(kind: str) -> None:
    warm, event = kinesis_events(CITY, kind, 40, 2)
    prior = core.apply_batch(core.decode_batch(records_from_event(warm), REGISTRY, ZONES), {}, {}, {}, BASE_MS)
    counts = {name: fn(event) for name, fn in contenders(kind, REGISTRY, ZONES, prior.zone_states).items()}
    assert len(set(counts.values())) == 1, counts
    assert counts[FLOOR] == 40 if kind == "single" else counts[FLOOR] > 40


def test_the_per_detector_kind_gives_each_detector_its_own_time_within_one_minute() -> None:
    (event,) = kinesis_events(CITY, "per_detector", 20, 1)
    for rec in event["Records"]:
        envelope = orjson.loads(binascii.a2b_base64(rec["kinesis"]["data"]))
        message = orjson.loads(binascii.a2b_base64(envelope["payload"]))
        stamps = message["ts"]
        if len(message["sensor_id"]) > 1:  # one string would mean one time for all
            assert isinstance(stamps, list) and len(set(stamps)) == len(stamps)
            assert len({ts[:16] for ts in stamps}) == 1  # one minute
