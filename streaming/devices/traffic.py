"""A deterministic traffic model for the simulated city: what each detector would report.

Demand follows daily and weekly curves per zone type (two commuter peaks in the centre
and on arterials, a flatter day in residential streets, a long plateau on the ring
motorway). Speed, flow and occupancy come from one fundamental diagram (Greenshields:
flow/capacity = 4*k/kj*(1 - k/kj), speed = v_free*(1 - k/kj)) so they stay consistent;
an incident pushes a zone onto the congested branch for a while and then lets it
recover. Faults (invalid values, duplicate publishes) are injected at configured rates
so that the platform's accounting has something to account for.

Everything is a pure function of (city, seed, minute): the same seed gives the same
readings, byte for byte.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from streaming.contract import format_ts
from streaming.registry import City, Sensor

MINUTE_MS = 60_000
JAM_DENSITY = 150.0  # vehicles per km per lane
# Lane capacity in vehicles per hour: signalised urban streets carry far less than a motorway.
CAPACITY_PER_LANE = {"highway": 1900, "arterial": 1000, "centre": 800, "residential": 600}
VEHICLE_LENGTH_M = 6.5  # effective length (vehicle + detector zone), for occupancy


@dataclass(frozen=True)
class Incident:
    zone_id: str
    start_minute: int  # minutes after the simulation start
    duration_minutes: int
    severity: float = 0.8  # 0..1: how far onto the congested branch


@dataclass(frozen=True)
class Faults:
    """Rates of injected faults (per reading / per message)."""

    invalid_reading_rate: float = 0.002
    duplicate_message_rate: float = 0.005
    count_only_rate: float = 0.05  # detectors that report no speed/occupancy


@dataclass
class TrafficModel:
    city: City
    seed: int
    start_ms: int  # first simulated minute, aligned to a minute
    incidents: list[Incident] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)

    @classmethod
    def with_random_incidents(
        cls, city: City, seed: int, start_ms: int, minutes: int, count: int = 2, faults: Faults | None = None
    ) -> TrafficModel:
        """A model with `count` incidents in distinct zones, placed within the run."""
        rng = random.Random(f"{seed}:incidents")
        zones = rng.sample([z.zone_id for z in city.zones], k=min(count, len(city.zones)))
        incidents = []
        for zone in zones:
            duration = max(4, minutes // 5)
            start = rng.randrange(1, max(2, minutes - duration - 4))
            incidents.append(Incident(zone, start, duration, severity=rng.uniform(0.7, 0.95)))
        return cls(city, seed, start_ms, incidents, faults or Faults())

    def demand(self, zone_type: str, ts_ms: int) -> float:
        """Share of capacity demanded (0..~1) at event time ts for a zone type."""
        hours = (ts_ms / 3_600_000) % 24
        weekday = int((ts_ms // 86_400_000 + 3) % 7)  # 0 = Monday (1970-01-01 was a Thursday)
        weekend = weekday >= 5

        def peak(centre: float, width: float) -> float:
            return math.exp(-((hours - centre) ** 2) / (2 * width**2))

        night = 0.08
        if zone_type in ("centre", "arterial"):
            curve = 0.35 * peak(13, 4) + (0.2 if weekend else 0.55) * (peak(8, 1.2) + peak(17.5, 1.5))
        elif zone_type == "highway":
            curve = 0.45 * peak(13, 5) + (0.15 if weekend else 0.45) * (peak(7.5, 1.5) + peak(17, 1.8))
        else:
            curve = 0.25 * peak(12, 4) + (0.1 if weekend else 0.3) * (peak(8, 1.5) + peak(18, 2))
        return min(0.97, night + curve)

    def _incident_severity(self, zone_id: str, minute: int) -> float:
        for inc in self.incidents:
            if inc.zone_id == zone_id and inc.start_minute <= minute < inc.start_minute + inc.duration_minutes:
                return inc.severity
        return 0.0

    def reading(self, sensor: Sensor, minute: int, rng: random.Random) -> dict[str, Any]:
        """One detector's reading for simulated minute `minute` (its seq is the epoch minute)."""
        minute_start = self.start_ms + minute * MINUTE_MS
        ts = minute_start + 30_000 + rng.randrange(29_000)  # end of the detector's interval
        free_speed = sensor.speed_limit_kmh * rng.uniform(0.95, 1.1)
        severity = self._incident_severity(sensor.zone_id, minute)
        if severity > 0:
            # Congested branch: density above critical, flow falling as density rises.
            share = max(0.05, 1 - severity) * rng.uniform(0.85, 1.0)
            density = JAM_DENSITY / 2 * (1 + math.sqrt(1 - share))
        else:
            share = min(0.99, self.demand(sensor.zone_type, ts) * rng.uniform(0.8, 1.15))
            density = JAM_DENSITY / 2 * (1 - math.sqrt(1 - share))
        speed = max(2.0, free_speed * (1 - density / JAM_DENSITY))
        # Flow relative to capacity is the same `share` on both branches of the diagram.
        flow_per_minute = share * CAPACITY_PER_LANE[sensor.zone_type] / 60
        count = max(0, round(rng.gauss(flow_per_minute, math.sqrt(flow_per_minute + 0.25))))
        out: dict[str, Any] = {
            "sensor_id": sensor.sensor_id,
            "zone_id": sensor.zone_id,
            "ts": format_ts(ts),
            "seq": minute_start // MINUTE_MS,
            "vehicle_count": count,
            "congestion_index": round(min(1.0, density / JAM_DENSITY), 4),
            "lane": sensor.lane,
        }
        # Count-only detectors are a property of the sensor, not of the minute.
        if random.Random(f"{self.seed}:{sensor.sensor_id}:kind").random() >= self.faults.count_only_rate:
            out["avg_speed_kmh"] = round(speed, 1)
            out["occupancy_pct"] = round(min(100.0, density * VEHICLE_LENGTH_M / 10), 1)
        if rng.random() < self.faults.invalid_reading_rate:
            out[rng.choice(["avg_speed_kmh", "congestion_index", "vehicle_count"])] = rng.choice([-5, 1e9, "fast"])
        return out

    def gateway_minute(self, gateway_id: str, sensors: list[Sensor], minute: int) -> list[dict[str, Any]]:
        """All readings one gateway sends for one simulated minute."""
        rng = random.Random(f"{self.seed}:{gateway_id}:{minute}")
        return [self.reading(s, minute, rng) for s in sensors]

    def duplicate(self, gateway_id: str, minute: int) -> bool:
        """Whether this gateway's message for this minute is (faultily) published twice."""
        return random.Random(f"{self.seed}:{gateway_id}:{minute}:dup").random() < self.faults.duplicate_message_rate
