"""The traffic model (streaming/devices/traffic.py): the fundamental diagram, congestion spill-back,
injected faults at their rates, and the ground truth a run reports; and the simulator following it."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.contract import message_readings, parse_ts_ms
from streaming.devices.simulator import run_simulation
from streaming.devices.traffic import (
    CAPACITY_PER_LANE,
    JAM_DENSITY,
    MINUTE_MS,
    VEHICLE_LENGTH_M,
    Faults,
    Incident,
    TrafficModel,
)
from streaming.registry import City, generate_city

START_MS = 1_795_000_000_000 // MINUTE_MS * MINUTE_MS


@pytest.fixture(scope="module")
def city() -> City:
    return generate_city(sensors=1200, zones=49, seed=3)  # a 7 x 7 grid


def _centre(city: City) -> str:
    return next(z.zone_id for z in city.zones if (z.grid_row, z.grid_col) == (3, 3))


def _zone_at(city: City, row: int, col: int) -> str:
    return next(z.zone_id for z in city.zones if (z.grid_row, z.grid_col) == (row, col))


def test_same_seed_same_readings_and_plans_other_seed_other_readings(city: City) -> None:
    def run(seed: int) -> bytes:
        model = TrafficModel.with_random_incidents(city, seed, START_MS, 30, faults=Faults.realistic(), spread_hops=1)
        gateways = list(city.gateways().items())[:8]
        readings = [model.gateway_minute(gw, sensors, m) for gw, sensors in gateways for m in range(30)]
        plans = [model.send_plan(gw, 30) for gw, _ in gateways]
        return orjson.dumps([readings, [[[s.__dict__ for s in slot] for slot in p] for p in plans]])

    assert run(11) == run(11)
    assert run(11) != run(12)
    # Looking at minutes in another order (or twice) changes nothing: each is a pure function.
    model = TrafficModel(city, 5, START_MS, faults=Faults.realistic())
    gw, sensors = next(iter(city.gateways().items()))
    forward = [model.gateway_minute(gw, sensors, m) for m in range(20)]
    fresh = TrafficModel(city, 5, START_MS, faults=Faults.realistic())
    backward = [fresh.gateway_minute(gw, sensors, m) for m in reversed(range(20))][::-1]
    assert forward == backward


@settings(max_examples=60, deadline=None)
@given(
    sensor_index=st.integers(0, 1199),
    minute=st.integers(0, 24 * 60 * 7),
    severities=st.tuples(st.floats(0.05, 0.99), st.floats(0.05, 0.99)).map(sorted),
)
def test_on_the_congested_branch_speed_falls_as_occupancy_rises(
    city: City, sensor_index: int, minute: int, severities: list[float]
) -> None:
    sensor = city.sensors[sensor_index]
    milder, worse = (
        TrafficModel(city, 1, START_MS, [Incident(sensor.zone_id, 0, 10**6, sev)], Faults.none())._true_values(
            sensor, minute
        )[2]
        for sev in severities
    )
    # Same detector, same minute, same noise: only the severity differs.
    assert worse["occupancy_pct"] >= milder["occupancy_pct"]
    assert worse["avg_speed_kmh"] <= milder["avg_speed_kmh"]
    assert worse["congestion_index"] >= 0.5  # above critical density


@settings(max_examples=80, deadline=None)
@given(sensor_index=st.integers(0, 1199), minute=st.integers(0, 24 * 60 * 7), incident=st.booleans())
def test_speed_flow_and_occupancy_come_from_one_diagram(
    city: City, sensor_index: int, minute: int, incident: bool
) -> None:
    sensor = city.sensors[sensor_index]
    incidents = [Incident(sensor.zone_id, 0, 10**6, 0.9)] if incident else []
    model = TrafficModel(city, 2, START_MS, incidents, Faults.none())
    r = model.reading(sensor, minute)
    assert r["vehicle_count"] <= CAPACITY_PER_LANE[sensor.zone_type] / 60  # flow never above capacity
    density = r["congestion_index"] * JAM_DENSITY
    assert r["occupancy_pct"] == pytest.approx(density * VEHICLE_LENGTH_M / 10, abs=0.1)
    # Greenshields: speed = v_free * (1 - k/kj), v_free within 0.95..1.1 of the limit.
    ratio = 1 - r["congestion_index"]
    if r["avg_speed_kmh"] > 2.0:
        free_flow = sensor.speed_limit_kmh * ratio
        # Up to the rounding of speed (0.1 km/h) and index (1e-4).
        assert 0.95 * free_flow - 0.07 <= r["avg_speed_kmh"] <= 1.1 * free_flow + 0.07
    ts = parse_ts_ms(r["ts"])
    assert START_MS + minute * MINUTE_MS <= ts < START_MS + (minute + 1) * MINUTE_MS
    assert r["seq"] == ts // MINUTE_MS


def test_congestion_spills_back_into_neighbouring_zones_with_a_delay_then_clears(city: City) -> None:
    centre = _centre(city)
    model = TrafficModel(city, 4, START_MS, [Incident(centre, 10, 20, 0.9, spread_hops=2)], Faults.none())
    near, far, beyond = _zone_at(city, 3, 4), _zone_at(city, 2, 2), _zone_at(city, 0, 3)
    episodes = {(c.zone_id, c.hops): c for c in model.congestion()}
    assert len([c for c in episodes.values() if c.hops == 1]) == 4  # the ring of 4 grid neighbours
    assert len([c for c in episodes.values() if c.hops == 2]) == 8
    assert (episodes[(near, 1)].start_minute, episodes[(near, 1)].end_minute) == (13, 33)
    assert (episodes[(far, 2)].start_minute, episodes[(far, 2)].end_minute) == (16, 36)
    assert episodes[(far, 2)].severity < episodes[(near, 1)].severity < episodes[(centre, 0)].severity
    assert not any(c.zone_id == beyond for c in model.congestion())

    def mean_index(zone_id: str, minute: int) -> float:
        sensors = [s for s in city.sensors if s.zone_id == zone_id]
        return sum(model.reading(s, minute)["congestion_index"] for s in sensors) / len(sensors)

    # What the processor sees: above the raise threshold (0.7) only while the queue is there.
    assert mean_index(near, 12) < 0.7 <= mean_index(near, 13)
    assert mean_index(near, 32) >= 0.7 > mean_index(near, 33)
    assert mean_index(far, 15) < 0.7 <= mean_index(far, 16)
    assert max(mean_index(beyond, m) for m in (12, 20, 30)) < 0.7


def _eligible_and_starts(spans: list[tuple[int, int]], minutes: int) -> tuple[int, int]:
    busy = sum(min(e, minutes) - s for s, e in spans)
    return minutes - busy, len(spans)


@pytest.mark.parametrize("kind", ["silence", "stuck", "drift"])
def test_sensor_faults_start_at_their_rate(city: City, kind: str) -> None:
    rate = 0.004
    faults = replace(Faults.none(), **{f"{kind}_rate": rate})
    model = TrafficModel(city, 9, START_MS, faults=faults)
    minutes = 600
    eligible = starts = 0
    for sensor in city.sensors:
        e, s = _eligible_and_starts(model._track(kind, sensor.sensor_id).until(minutes), minutes)
        eligible, starts = eligible + e, starts + s
    expected = rate * eligible
    assert abs(starts - expected) < 4 * math.sqrt(expected), (starts, expected)
    truth = model.ground_truth(5)
    assert {f.kind for f in truth.faults} <= {kind}


def test_a_silent_sensor_sends_nothing_a_stuck_one_repeats_itself_a_drifting_one_drifts(city: City) -> None:
    faults = replace(Faults.none(), silence_rate=0.02, stuck_rate=0.02, drift_rate=0.02, drift_minutes=(20, 20))
    model = TrafficModel(city, 6, START_MS, faults=faults)
    truth = model.ground_truth(40)
    by_id = {s.sensor_id: s for s in city.sensors}
    silent = truth.of_kind("silence")[0]
    sensor = by_id[silent.subject]
    gw = city.gateways()[sensor.gateway_id]
    quiet = {
        m
        for f in truth.of_kind("silence")
        if f.subject == sensor.sensor_id
        for m in range(f.start_minute, f.end_minute)
    }
    for m in range(40):
        sent = {r["sensor_id"] for r in model.gateway_minute(sensor.gateway_id, gw, m)}
        assert (sensor.sensor_id in sent) == (m not in quiet)

    sticky = TrafficModel(city, 6, START_MS, faults=replace(Faults.none(), stuck_rate=0.02))
    honest = TrafficModel(city, 6, START_MS, faults=Faults.none())
    stuck = next(
        f
        for f in sticky.ground_truth(40).of_kind("stuck")
        if f.end_minute - f.start_minute >= 3 and sticky._track("stuck", f.subject).active(f.end_minute) is None
    )
    sensor = by_id[stuck.subject]
    values = [sticky.reading(sensor, m) for m in range(stuck.start_minute, stuck.end_minute)]
    keys = ("vehicle_count", "congestion_index", "avg_speed_kmh", "occupancy_pct")
    assert len({tuple(v.get(k) for k in keys) for v in values}) == 1
    assert values[0] == honest.reading(sensor, stuck.start_minute)
    assert len({v["seq"] for v in values}) == len(values)  # time still moves on
    assert sticky.reading(sensor, stuck.end_minute) == honest.reading(sensor, stuck.end_minute)

    drifting = TrafficModel(city, 6, START_MS, faults=replace(Faults.none(), drift_rate=0.02, drift_minutes=(20, 20)))
    drift = next(
        f
        for f in drifting.ground_truth(20).of_kind("drift")
        if "avg_speed_kmh" in honest.reading(by_id[f.subject], f.start_minute)
    )
    for k, m in enumerate(range(drift.start_minute, drift.end_minute)):
        biased = drifting.reading(by_id[drift.subject], m)["avg_speed_kmh"]
        true = honest.reading(by_id[drift.subject], m)["avg_speed_kmh"]
        # The bias grows by drift_per_minute each minute (up to the 0.1 km/h rounding of both).
        assert abs(abs(biased / true - 1) - 0.01 * (k + 1)) <= 0.11 / true
    after = next(m for m in range(drift.end_minute, 10**4) if drifting._track("drift", drift.subject).active(m) is None)
    assert drifting.reading(by_id[drift.subject], after) == honest.reading(by_id[drift.subject], after)


def test_gateway_plans_deliver_every_minute_and_resend_at_their_rates(city: City) -> None:
    faults = replace(Faults.none(), duplicate_message_rate=0.01, burst_rate=0.01, late_rate=0.01)
    model = TrafficModel(city, 8, START_MS, faults=faults)
    minutes = 300
    kinds: Counter[str] = Counter()
    late_minutes = shuffled = 0
    for gw in city.gateways():
        plan = model.send_plan(gw, minutes)
        firsts = [s for slot in plan for s in slot if s.resend is None]
        assert sorted(s.minute for s in firsts) == list(range(minutes))  # each exactly once, none lost
        assert all(s.slot >= s.minute for s in firsts)  # late, never early
        late_minutes += sum(s.slot > s.minute for s in firsts)
        order = [s.minute for s in firsts]
        shuffled += sum(a > b for a, b in itertools.pairwise(order))
        kinds.update(s.resend for slot in plan for s in slot if s.resend)
        sent_so_far: set[int] = set()
        for slot in plan:
            for s in slot:
                if s.resend is None:
                    sent_so_far.add(s.minute)
                else:
                    assert s.minute in sent_so_far  # only what was sent can be resent
    gateway_minutes = len(city.gateways()) * minutes
    assert abs(kinds["duplicate"] - 0.01 * gateway_minutes) < 4 * math.sqrt(0.01 * gateway_minutes)
    assert kinds["burst"] >= 2 * 0.5 * 0.01 * gateway_minutes  # >= 2 messages per burst, most minutes eligible
    assert late_minutes > 0 and shuffled > 0


class _FakeGateway:
    """Records publishes instead of sending them: the simulator's logic without a broker."""

    def __init__(self, gateway_id: str, log: list[tuple[str, bytes]]) -> None:
        self.gateway_id = gateway_id
        self.log = log

    def publish_telemetry(self, zone_id: str, payload: bytes) -> Future[None]:
        self.log.append((self.gateway_id, payload))
        f: Future[None] = Future()
        f.set_result(None)
        return f

    def flush(self, timeout: float) -> None:
        pass

    def disconnect(self) -> None:
        pass


def test_the_simulator_publishes_what_the_ground_truth_says(city: City) -> None:
    small = generate_city(sensors=300, zones=9, seed=3)
    faults = replace(Faults.realistic(), silence_rate=0.01, burst_rate=0.02, late_rate=0.02)
    model = TrafficModel.with_random_incidents(small, 5, START_MS, 60, faults=faults, spread_hops=1)
    truth = model.ground_truth(60)
    log: list[tuple[str, bytes]] = []
    result = run_simulation(model, 60, 0.0, lambda gw: _FakeGateway(gw, log))  # type: ignore[arg-type, return-value]

    keys = Counter((r["sensor_id"], r["seq"]) for _, p in log for r in message_readings(orjson.loads(p)))
    assert len(keys) == result.readings == truth.readings
    assert result.duplicate_messages == truth.duplicate_messages > 0
    assert sum(keys.values()) - len(keys) == truth.duplicate_readings + truth.resent_invalid_readings
    assert result.late_messages > 0
    silent = {
        (f.subject, START_MS // MINUTE_MS + m)
        for f in truth.of_kind("silence")
        for m in range(f.start_minute, f.end_minute)
    }
    assert silent and not silent & set(keys)
    # A resent message is the same bytes as the first publish, as a gateway's retransmission is.
    payloads = Counter(p for _, p in log)
    assert sum(payloads.values()) - len(payloads) == truth.duplicate_messages
