"""The load generator's readings: each tick counts the vehicles of that tick, not the minute's.

Unit tests of `infra.local.load.TickReadings` (no platform): at 1 s ticks a detector reports a
Poisson share of the minute's flow, so the minute's vehicles are not multiplied by 60 and a
fault-free sensor does not look stuck to the processor's detector.
"""

from __future__ import annotations

import math

from infra.local.load import TickReadings
from infra.local.platform import demo_city
from streaming.devices.traffic import Faults, TrafficModel
from streaming.processor.core import Alert, DetectorSettings, update_sensors
from streaming.processor.state import SensorState

START_MS = 1_772_438_400_000  # 2026-03-02 08:00 UTC, a Monday morning peak
CITY = demo_city(400, 7)
MODEL = TrafficModel(CITY, 7, START_MS, [], Faults.none())
GATEWAYS = list(CITY.gateways().values())


def _minute(tick_s: float, sensors: list, minute: int = 3) -> list[list[int]]:
    """Each tick's vehicle counts, sensor by sensor, over one minute."""
    source = TickReadings(MODEL, sensors, tick_s)
    ticks = round(60 / tick_s)
    start = START_MS + minute * 60_000
    return [[r["vehicle_count"] for r in source.at(start + round(k * tick_s * 1000), k)] for k in range(ticks)]


def test_one_second_ticks_share_out_the_minutes_vehicles() -> None:
    expected = observed = 0
    for sensors in GATEWAYS:
        minute_counts = [MODEL.reading(s, 3)["vehicle_count"] for s in sensors]
        ticks = _minute(1, sensors)
        expected += sum(minute_counts)
        observed += sum(map(sum, ticks))
    assert expected > 1_000
    # A sum of Poisson draws: mean `expected`, standard deviation its square root.
    assert abs(observed - expected) < 5 * math.sqrt(expected)


def test_a_fault_free_sensor_does_not_repeat_its_count_like_a_stuck_one() -> None:
    """A minute of 1 s ticks through the processor's own live-state update: counts repeat
    now and then, as real ones do, but never long enough to raise `SensorStuck`."""
    run_limit = DetectorSettings().stuck_run_readings
    alerts: list[Alert] = []
    longest = 0
    for sensors in GATEWAYS:
        states = [SensorState() for _ in sensors]
        for k, counts in enumerate(_minute(1, sensors)):
            rows = [(s.sensor_id, k, count, None, None, 0.0) for s, count in zip(sensors, counts, strict=True)]
            update_sensors(states, rows, [k] * len(rows), sensors[0].zone_id, alerts, run_limit)
            longest = max(longest, *(state.repeat_run for state in states))
    assert alerts == []
    assert longest > 1


def test_ticks_of_a_minute_send_the_minutes_count() -> None:
    sensors = GATEWAYS[0]
    assert _minute(60, sensors) == [[MODEL.reading(s, 3)["vehicle_count"] for s in sensors]]


class _Counting:
    """The traffic model, counting the readings asked of it."""

    def __init__(self, model: TrafficModel) -> None:
        self.model, self.asked = model, 0
        self.seed, self.start_ms = model.seed, model.start_ms

    def reading(self, sensor, minute: int) -> dict:
        self.asked += 1
        return self.model.reading(sensor, minute)


def test_the_next_minute_is_computed_a_share_at_each_tick_not_all_at_its_start() -> None:
    sensors = max(GATEWAYS, key=len)
    model = _Counting(MODEL)
    source = TickReadings(model, sensors, 1)
    start = START_MS + 3 * 60_000
    asked = []
    for k in range(121):  # two minutes of 1 s ticks and the first of the third
        before = model.asked
        readings = source.at(start + k * 1000 + 250, k)  # a gateway a quarter into each tick
        asked.append(model.asked - before)
        if k in (60, 120):
            minute = 3 + k // 60
            expected = [MODEL.reading(s, minute) for s in sensors]
            assert [r["congestion_index"] for r in readings] == [r["congestion_index"] for r in expected]
            assert [r["avg_speed_kmh"] for r in readings] == [r["avg_speed_kmh"] for r in expected]
    # The first tick computes its own minute (nothing ahead yet); then every sensor's next minute
    # once per minute, never more than a sensor or two a tick.
    assert asked[0] == len(sensors) + 1
    assert sum(asked[1:61]) == sum(asked[61:121]) == len(sensors)
    assert max(asked[1:]) <= math.ceil(len(sensors) / 59)
