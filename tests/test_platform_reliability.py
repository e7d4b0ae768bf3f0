"""Issue #8 on the running local platform: the audit balances against ground truth, the hostile
corpus survives the real MQTT path, and nothing secret reaches a log.

One platform (`citypulse up`, 8,192 sensors so that some zones have two gateways) is shared by
the module. Each test uses its own zones, so the processor's per-zone counters give exact
answers whatever order the tests run in:

* the audit workload: three single-gateway zones;
* the hostile corpus: one payload per two-gateway zone, published by that zone's first
  gateway over mTLS (broker → rule bridge → Kinesis → poller → real handler), so every payload
  meets fresh per-sensor state, as in the unit tests of the corpus.

Waiting for the processor polls its counters (another process's progress; there is no event
to wait on). Every wait ends on a barrier: a valid reading published after the payloads on the
same connection and topic, hence the same Kinesis partition, which the processor can only have
counted after what was published before it.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fixtures.hostile_payloads import MESSAGE, Hostile, build_corpus
from platform_harness import MINUTE_MS, Platform, running_platform
from platform_harness import message as _message
from platform_harness import publish_all as _publish_all
from platform_harness import reading as _reading

from infra.local.audit import render, run_audit
from infra.local.broker import MAX_PACKET_SIZE
from streaming.registry import Sensor

pytestmark = pytest.mark.integration

SENSORS, SEED = 8192, 5
ALL_TIME = (datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=2))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("platform"), SENSORS, SEED) as p:
        yield p


# --- 1. the audit ------------------------------------------------------------------------------


def test_audit_balances_and_matches_the_ground_truth_exactly(platform: Platform) -> None:
    zones = platform.zones_with(1)[:3]
    now_ms = int(time.time() * 1000)
    base = (now_ms // MINUTE_MS - 8) * MINUTE_MS
    plan: dict[str, list[bytes]] = {}
    # Ground truth, written down as the workload is built.
    stored: Counter[str] = Counter()  # distinct (sensor, seq) in the lake
    stored_in_window: Counter[str] = Counter()  # ... with ts in [base, base + 5 min)
    quarantined: dict[str, Counter[str]] = {}
    duplicates: Counter[str] = Counter()  # per sensor, as the processor counts them
    late: Counter[str] = Counter()
    truth: dict[str, Counter[str]] = {z: Counter() for z in zones}
    for i, zone in enumerate(zones):
        (sensors,) = platform.gateways_of(zone)
        t = truth[zone]
        n = len(sensors)
        messages = []
        for m in range(5):
            readings = []
            for k, s in enumerate(sensors):
                if m == 2 and k == 1:
                    readings.append(_reading(s, m, base + m * MINUTE_MS, vehicle_count=-1))
                    quarantined.setdefault(s.sensor_id, Counter())["out_of_range"] += 1
                elif m == 2 and k == 2:
                    readings.append(_reading(s, m, base + m * MINUTE_MS, avg_speed_kmh="fast"))
                    quarantined.setdefault(s.sensor_id, Counter())["wrong_type"] += 1
                else:
                    readings.append(_reading(s, m, base + m * MINUTE_MS))
                    stored[s.sensor_id] += 1
                    stored_in_window[s.sensor_id] += 1
            if m == 2 and i == 0:  # a forged identity: quarantined, never in a dedupe window
                readings.append(_reading(sensors[0], 7, base + m * MINUTE_MS, sensor_id="S-999999"))
                quarantined.setdefault("S-999999", Counter())["unknown_sensor"] += 1
            messages.append(_message(sensors, readings, base + m * MINUTE_MS))
        t.update(received=5 * n + (1 if i == 0 else 0), stored=5 * n - 2, quarantined=2 + (1 if i == 0 else 0))
        # Device resends, byte for byte: every reading of minute 3 is a duplicate.
        messages.append(messages[3])
        t.update(received=n, duplicates=n)
        duplicates.update(s.sensor_id for s in sensors)
        if i == 0:
            # Minute 2 again: its valid *and* its invalid readings (sound identity) are duplicates;
            # the forged reading is quarantined a second time (it has no window to be found in).
            messages.append(messages[2])
            t.update(received=n + 1, duplicates=n, quarantined=1)
            quarantined["S-999999"]["unknown_sensor"] += 1
            duplicates.update(s.sensor_id for s in sensors)  # invalid ones too: their identity is sound
        # A late reading: a new seq, an hour older than the zone's watermark: stored, counted late.
        messages.append(_message(sensors, [_reading(sensors[0], 100, base - 60 * MINUTE_MS)], now_ms))
        stored[sensors[0].sensor_id] += 1
        t.update(received=1, stored=1, late=1)
        late[sensors[0].sensor_id] += 1
        if i == 1:  # a message that cannot be split into readings
            messages.append(b'{"schema_version": 1, "readings": [')
            t.update(quarantined_messages=1)
        # The barrier: one more valid reading after everything else.
        messages.append(_message(sensors, [_reading(sensors[-1], 5, base + 5 * MINUTE_MS)], now_ms))
        stored[sensors[-1].sensor_id] += 1
        t.update(received=1, stored=1)
        plan[sensors[0].gateway_id] = messages

    _publish_all(platform, plan, basic_ingest=False)
    counters = platform.wait_for_counters({z: dict(t) for z, t in truth.items()})
    for zone in zones:
        got = {k: v for k, v in counters[zone].items() if not k.startswith("quarantined_") or k.endswith("messages")}
        assert got == dict(truth[zone]), zone

    report = run_audit(platform.state, *ALL_TIME)
    text = render(report)
    assert report.counters_balance, text
    for zone in zones:
        z = report.zones[zone]
        assert z.counters_balance and z.lake_matches_counters, (zone, text)
        assert z.sensors_match_counters and z.sensor_duplicates == truth[zone]["duplicates"], (zone, text)
        assert z.lake_stored == truth[zone]["stored"] and z.lake_restored == 0
        assert z.lake_quarantined == truth[zone]["quarantined"]
        assert z.lake_quarantined_messages == truth[zone]["quarantined_messages"]
    ours = {s.sensor_id for zone in zones for (sensors,) in [platform.gateways_of(zone)] for s in sensors}
    ours.add("S-999999")
    audited = {sid: s for sid, s in report.sensors.items() if sid in ours}
    assert {sid: s.stored for sid, s in audited.items() if s.stored} == dict(stored)
    assert {sid: dict(s.quarantined) for sid, s in audited.items() if s.quarantined} == {
        sid: dict(c) for sid, c in quarantined.items()
    }
    assert {sid: s.duplicates for sid, s in audited.items() if s.duplicates} == dict(duplicates)
    assert {sid: s.late for sid, s in audited.items() if s.late} == dict(late)
    for sid, s in audited.items():
        assert s.received_distinct == stored[sid] + sum(quarantined.get(sid, Counter()).values())
        assert s.received == s.received_distinct + duplicates[sid]
    # If nothing else ran on the platform yet, the whole-platform balance is exactly ours.
    if set(report.zones) == set(zones):
        assert report.balanced is True, text
        assert report.total("received") == sum(t["received"] for t in truth.values())
        assert report.total("duplicates") == sum(t["duplicates"] for t in truth.values())
    else:
        assert report.balanced in (True, None), text
    assert "balance" in text and "S-999999" in text

    # A narrower range: the late reading (an hour earlier) and the barriers fall outside it; the
    # counters cannot be cut to a range, so the balance is reported as not checked.
    window = run_audit(
        platform.state,
        datetime.fromtimestamp(base / 1000, UTC),
        datetime.fromtimestamp((base + 5 * MINUTE_MS) / 1000, UTC),
    )
    assert window.covers_all is False and window.balanced is None
    assert {sid: s.stored for sid, s in window.sensors.items() if sid in ours and s.stored} == dict(stored_in_window)
    assert "not checked" in render(window)


# --- 2. the hostile corpus through the real MQTT path ------------------------------------------


def _expected(h: Hostile) -> dict[str, int]:
    """The processor's counters for a zone that got `h` and then one valid barrier reading."""
    if h.message_code:
        return {"quarantined_messages": 1, f"quarantined_{h.message_code}": 1, "received": 1, "stored": 1}
    quarantined = sum(n for _, n in h.codes)
    out = {
        "received": h.stored + h.duplicates + quarantined + 1,
        "stored": h.stored + 1,
        "duplicates": h.duplicates,
        "quarantined": quarantined,
        **{f"quarantined_{code}": n for code, n in h.codes},
    }
    return {k: v for k, v in out.items() if v}


def test_hostile_corpus_through_mqtt_is_quarantined_or_accepted_and_counted(platform: Platform, tmp_path: Path) -> None:
    import duckdb

    zones = platform.zones_with(2)
    spare = platform.zones_with(1)[-1]  # a zone nothing publishes to: the "other zone" sensor's
    now_ms = int(time.time() * 1000)
    ts_ms = now_ms - 2 * MINUTE_MS
    cases: dict[str, tuple[Hostile, list[Sensor]]] = {}
    template = build_corpus(*_corpus_sensors(platform, zones[0], spare), ts_ms)
    routable = [h for h in template if len(h.payload) + 200 < MAX_PACKET_SIZE]
    assert len(zones) >= len(routable)
    plan: dict[str, list[bytes]] = {}
    for zone, h0 in zip(zones, routable, strict=False):
        own, same, other = _corpus_sensors(platform, zone, spare)
        (h,) = [c for c in build_corpus(own, same, other, ts_ms) if c.id == h0.id]
        barrier = _message(own, [_reading(own[-1], 1000, now_ms - MINUTE_MS)], now_ms)
        plan[own[0].gateway_id] = [h.payload, barrier]
        cases[zone] = (h, own)

    _publish_all(platform, plan, basic_ingest=True)
    counters = platform.wait_for_counters({z: {"stored": 1 + h.stored} for z, (h, _) in cases.items()}, key="stored")

    # No crash: every platform process alive, no batch sent to the on-failure destination.
    assert all(platform.info.running(name) for name in platform.info.pids), platform.info.pids
    logs = platform.state / "logs"
    for log in logs.glob("poller-*.log"):
        text = log.read_text(errors="replace")
        assert "on-failure destination" not in text and "handler raised" not in text, log
        assert '"batch failed' not in text, log
    dlq = platform.dlq_depth()
    assert dlq == 0

    # Counted: the processor's counters per payload (one zone each), exactly.
    mismatches = {
        h.id: (counters.get(zone, {}), _expected(h))
        for zone, (h, _) in cases.items()
        if counters.get(zone, {}) != _expected(h)
    }
    assert not mismatches, mismatches

    # Queryable: the quarantine read back with DuckDB straight over the lake's Parquet.
    root = platform.download("quarantine/", tmp_path)
    raw_root = platform.download("raw/readings/", tmp_path)
    con = duckdb.connect()
    q = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
    rows = con.execute(
        f"""select zone_id, reason_code, source_id like '%/-1' as whole, count(distinct source_id), count(*),
                   bool_and(length(reason) > 0), bool_and(raw is not null)
            from {q} where zone_id in (select unnest(?)) group by all""",
        [list(cases)],
    ).fetchall()
    got: dict[str, Counter[str]] = {z: Counter() for z in cases}
    for zone, code, whole, distinct, n, explained, kept in rows:
        assert explained and kept, (zone, code)
        assert n == distinct  # no row twice
        got[zone][MESSAGE if whole else code] += distinct
        if whole:
            got[zone][code] += distinct
    stored_rows = dict(
        con.execute(
            f"""select zone_id, count(distinct (sensor_id, seq))
                from read_parquet('{raw_root}/**/*.parquet', hive_partitioning = true) group by zone_id"""
        ).fetchall()
    )
    for zone, (h, _) in cases.items():
        want = Counter(dict(h.codes))
        if h.message_code:
            want = Counter({MESSAGE: 1, h.message_code: 1})
        assert got[zone] == want, h.id
        assert stored_rows.get(zone, 0) == h.stored + 1, h.id
    # The dashboard-level view of the same: the audit over all time still balances.
    report = run_audit(platform.state, *ALL_TIME)
    assert report.counters_balance and report.balanced is True, render(report)


def test_a_message_over_the_iot_core_limit_is_refused_at_the_broker(platform: Platform) -> None:
    """The corpus's oversized message cannot reach the processor: IoT Core (and the broker,
    whose `max_packet_size` mirrors it) refuses it and disconnects the device."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    zone = platform.zones_with(1)[-2]
    (sensors,) = platform.gateways_of(zone)
    own, same, other = sensors, sensors[-1], platform.gateways_of(platform.zones_with(1)[-3])[0][0]
    (h,) = [c for c in build_corpus(own, same, other, int(time.time() * 1000)) if c.id == "oversized-message"]
    assert len(h.payload) > 128 * 1024 and len(h.payload) > MAX_PACKET_SIZE
    identity = platform.ca.device_identity(own[0].gateway_id)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=own[0].gateway_id, clean_session=True)
    client.tls_set(
        ca_certs=str(platform.ca.cert_path), certfile=str(identity.cert_path), keyfile=str(identity.key_path)
    )
    connected, gone = threading.Event(), threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.on_disconnect = lambda *_: gone.set()
    client.connect("localhost", int(platform.info.env["CITYPULSE_MQTT_PORT"]))
    # Driven by hand rather than loop_start(), whose thread would reconnect and resend.
    deadline = time.monotonic() + 15
    while not connected.is_set() and time.monotonic() < deadline:
        client.loop(0.1)
    assert connected.is_set()
    client.publish(f"citypulse/telemetry/{zone}/{own[0].gateway_id}", h.payload, qos=1)
    while not gone.is_set() and time.monotonic() < deadline:
        if client.loop(0.1) != paho.MQTT_ERR_SUCCESS:
            gone.set()
    assert gone.is_set(), "the broker kept a client that sent an oversized packet"
    # Barrier: a valid reading afterwards is the only thing the zone ever counted.
    _publish_all(
        platform,
        {own[0].gateway_id: [_message(own, [_reading(own[1], 1, int(time.time() * 1000))], 0)]},
        basic_ingest=False,
    )
    counters = platform.wait_for_counters({zone: {"received": 1}})
    assert counters[zone] == {"received": 1, "stored": 1}


def _corpus_sensors(platform: Platform, zone: str, spare: str) -> tuple[list[Sensor], Sensor, Sensor]:
    first, second = platform.gateways_of(zone)
    return first, second[0], platform.gateways_of(spare)[0][0]


# --- 3. logs never hold certificates, keys or tokens -------------------------------------------

PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]+-----")


def test_logs_hold_no_certificates_keys_or_tokens(platform: Platform) -> None:
    """After the platform ran (and, in file order, after the workloads above), no log under the
    state directory contains a PEM block or any line of the platform's own key material."""
    logs = sorted((platform.state / "logs").glob("*.log")) + sorted(platform.state.rglob("mosquitto.log"))
    assert any(p.name.startswith("poller-") for p in logs) and any(p.name == "mosquitto.log" for p in logs)
    secrets: list[bytes] = []
    for key in (platform.state / "pki").rglob("*.key"):
        body = [line for line in key.read_bytes().splitlines() if line and not line.startswith(b"-----")]
        secrets += [line for line in body if len(line) >= 32]
    assert secrets, "the platform's private keys were not found"
    for path in logs:
        data = path.read_bytes()
        assert not PEM.search(data), path
        assert not any(s in data for s in secrets), path
        assert not re.search(rb"(AKIA|ASIA)[0-9A-Z]{16}", data), path
        assert not re.search(rb"(?i)(x-amz-security-token|aws_session_token)\W+\S{16,}", data), path
