"""Hostile payloads through the processor core: nothing crashes, every reading is accounted for.

The corpus (tests/fixtures/hostile_payloads.py) is data, shared with the end-to-end fault
suite. Each payload goes through both the fast and the reference path on fresh state; each is
accepted or quarantined under the specific reason code the corpus names, and
received == stored + duplicates + quarantined (a message that cannot be split counts once as
a quarantined message).
"""

from __future__ import annotations

import base64
import gc
from collections import Counter

import orjson
import pytest
from fixtures.hostile_payloads import Hostile, build_corpus
from kinesis_records import BASE_MS, StreamBuilder, envelope

from bench.processor_bench import KINDS
from bench.records import kinesis_events
from streaming.processor.core import (
    BatchOutput,
    apply_batch,
    apply_batch_reference,
    decode_batch,
    decode_batch_reference,
)
from streaming.processor.handler import records_from_event
from streaming.registry import generate_city

CITY = generate_city(sensors=200, zones=4, seed=5)
REGISTRY = {s.sensor_id: s for s in CITY.sensors}
ZONES = {z.zone_id for z in CITY.zones}
_GATEWAYS = list(CITY.gateways().values())
OWN = _GATEWAYS[0]
SAME_ZONE_OTHER = next(g for g in _GATEWAYS[1:] if g[0].zone_id == OWN[0].zone_id)[0]
OTHER_ZONE = next(g for g in _GATEWAYS if g[0].zone_id != OWN[0].zone_id)[0]
TS_MS = BASE_MS + 90_000
CORPUS = build_corpus(OWN, SAME_ZONE_OTHER, OTHER_ZONE, TS_MS)


def _run(h: Hostile, fast: bool) -> BatchOutput:
    record = StreamBuilder().record(envelope(h.payload, OWN[0].zone_id, OWN[0].gateway_id, TS_MS + 500))
    decode, apply = (decode_batch, apply_batch) if fast else (decode_batch_reference, apply_batch_reference)
    return apply(decode([record], REGISTRY, ZONES), {}, {}, {}, TS_MS + 1000)


def test_corpus_is_large_and_named_uniquely() -> None:
    assert len(CORPUS) >= 40
    assert len({h.id for h in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("h", CORPUS, ids=[h.id for h in CORPUS])
def test_hostile_payload_is_quarantined_or_accepted_and_counted(h: Hostile, fast: bool) -> None:
    out = _run(h, fast)
    counts = out.counts
    codes = Counter(code for cols in out.quarantine.values() for code in cols.columns["reason_code"])
    if h.message_code:
        assert counts["quarantined_messages"] == 1
        assert codes == Counter({h.message_code: 1})
        assert counts.get("received", 0) == 0
    else:
        assert counts.get("quarantined_messages", 0) == 0
        assert codes == Counter(dict(h.codes))
        assert counts.get("stored", 0) == h.stored
        assert counts.get("duplicates", 0) == h.duplicates
        assert counts.get("received", 0) == counts.get("stored", 0) + counts.get("duplicates", 0) + counts.get(
            "quarantined", 0
        )
    assert sum(len(c) for c in out.lake.values()) == counts.get("stored", 0)
    # Every quarantine row explains itself and keeps bytes that can be replayed.
    for cols in out.quarantine.values():
        for reason, raw in zip(cols.columns["reason"], cols.columns["raw"], strict=True):
            assert reason
            base64.b64decode(raw, validate=True)


def test_both_paths_agree_on_the_whole_corpus_in_one_batch() -> None:
    b = StreamBuilder()
    records = [b.record(envelope(h.payload, OWN[0].zone_id, OWN[0].gateway_id, TS_MS + 500)) for h in CORPUS]
    fast = apply_batch(decode_batch(records, REGISTRY, ZONES), {}, {}, {}, TS_MS)
    ref = apply_batch_reference(decode_batch_reference(records, REGISTRY, ZONES), {}, {}, {}, TS_MS)
    assert dict(fast.counts) == dict(ref.counts)
    assert {h: c.columns for h, c in fast.quarantine.items()} == {h: c.columns for h, c in ref.quarantine.items()}
    assert fast.zone_states == ref.zone_states
    c = fast.counts
    assert c["received"] == c["stored"] + c["duplicates"] + c["quarantined"]


def test_a_reading_too_deep_to_reserialise_is_quarantined_with_its_message_bytes() -> None:
    (h,) = [h for h in CORPUS if h.id == "deeply-nested-field"]
    out = _run(h, fast=True)
    (raw,) = [r for cols in out.quarantine.values() for r in cols.columns["raw"]]
    assert base64.b64decode(raw) == h.payload
    assert orjson.loads(h.payload)["readings"]  # the message itself was readable


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "reference"])
def test_a_single_reading_message_is_quarantined_with_its_own_bytes(fast: bool) -> None:
    """A single-reading message is its reading: quarantine kept it re-serialised, which lost its
    spacing, its numbers' spelling and a key given twice (a forged seq; found by a review)."""
    own = OWN[0]
    payload = (
        b'{ "sensor_id" : "%s", "zone_id": "%s", "ts": "2026-03-02T07:00:00Z", "seq": 1, "seq": 7,'
        b' "vehicle_count": -1.0e0, "congestion_index": 0.2, "lane": 1 }'
        % (own.sensor_id.encode(), own.zone_id.encode())
    )
    b = StreamBuilder()
    records = [b.record(envelope(payload, own.zone_id, own.gateway_id, TS_MS + 500))]
    decode, apply = (decode_batch, apply_batch) if fast else (decode_batch_reference, apply_batch_reference)
    out = apply(decode(records, REGISTRY, ZONES), {}, {}, {}, TS_MS)
    (raw,) = [r for cols in out.quarantine.values() for r in cols.columns["raw"]]
    assert base64.b64decode(raw) == payload


def test_a_batch_leaves_no_cyclic_garbage() -> None:
    """Each phase moves what it built straight to the collector's oldest generation
    (`core._gc_paused`), which is only sound while a batch builds no reference cycles: hostile
    records (kept errors) and every kind of good record, decoded and applied with the collector
    off, leave nothing for it to find."""
    b = StreamBuilder()
    hostile = [b.record(envelope(h.payload, OWN[0].zone_id, OWN[0].gateway_id, TS_MS + 500)) for h in CORPUS]
    city = generate_city(sensors=400, zones=4, seed=3)
    registry = {s.sensor_id: s for s in city.sensors}
    zones = {z.zone_id for z in city.zones}
    good = [records_from_event(kinesis_events(city, kind, 40, 1)[0]) for kind in KINDS]
    batches = [(hostile, REGISTRY, ZONES)] + [(records, registry, zones) for records in good]
    for records, reg, zs in batches:  # first use: the libraries' own one-time caches
        apply_batch(decode_batch(records, reg, zs), {}, {}, {}, TS_MS)
    gc.collect()
    gc.disable()
    try:
        for records, reg, zs in batches:
            out = apply_batch(decode_batch(records, reg, zs), {}, {}, {}, TS_MS)
            assert out.counts["received"] > 0
            del out
        assert gc.collect() == 0
    finally:
        gc.enable()
