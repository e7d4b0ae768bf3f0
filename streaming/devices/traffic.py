"""A deterministic traffic model for the simulated city: what each detector would report.

Demand follows daily and weekly curves per zone type (two commuter peaks in the centre
and on arterials, a flatter day in residential streets, a long plateau on the ring
motorway). Speed, flow and occupancy come from one fundamental diagram (Greenshields:
flow/capacity = 4*k/kj*(1 - k/kj), speed = v_free*(1 - k/kj)) so they stay consistent.

An incident pushes its zone onto the congested branch of the diagram; the queue then
spills back upstream into the zones feeding it, one ring of grid neighbours at a time
(`spread_delay_minutes` per ring, a little milder each ring), and clears in the same
order after the incident ends. `TrafficModel.congestion()` lists every such episode.

Faults are injected at the rates in `Faults` so the platform's detection and accounting
have something to find:

* per reading: invalid values; count-only detectors (a property of the sensor);
* per sensor, as episodes: **silence** (no readings), **stuck** (the values of the
  episode's first minute repeated), **drift** (speed biased by a growing factor);
* per gateway: a **duplicate** publish, **bursts** (the gateway resends its last N
  messages), **late delivery** (it buffers some minutes and delivers them late, shuffled).

An episode rate is the chance per sensor-minute (gateway-minute) outside an episode that
one starts. `TrafficModel.ground_truth(minutes)` lists what was injected in a run, for the
tests and the fault suite to hold the processor's findings against.

Everything is a pure function of (city, seed, minute): the same seed gives the same
readings and the same send plan, byte for byte.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from typing import Any

from streaming.contract import format_ts
from streaming.registry import City, Sensor, Zone

MINUTE_MS = 60_000
JAM_DENSITY = 150.0  # vehicles per km per lane
# Lane capacity in vehicles per hour: signalised urban streets carry far less than a motorway.
CAPACITY_PER_LANE = {"highway": 1900, "arterial": 1000, "centre": 800, "residential": 600}
VEHICLE_LENGTH_M = 6.5  # effective length (vehicle + detector zone), for occupancy
# A drifting speed sensor is off by at most this share before it is noticed and recalibrated.
MAX_DRIFT = 0.6


@dataclass(frozen=True)
class Incident:
    zone_id: str
    start_minute: int  # minutes after the simulation start
    duration_minutes: int
    severity: float = 0.8  # 0..1: how far onto the congested branch
    spread_hops: int = 0  # rings of upstream neighbours the queue spills back into


@dataclass(frozen=True)
class Congestion:
    """Ground truth: zone `zone_id` on the congested branch for minutes [start, end)."""

    zone_id: str
    start_minute: int
    end_minute: int
    severity: float
    source_zone: str  # the incident's zone
    hops: int  # 0 = the incident itself


@dataclass(frozen=True)
class Faults:
    """Rates of injected faults. Episode lengths are (min, max) minutes, drawn uniformly."""

    invalid_reading_rate: float = 0.002  # per reading
    duplicate_message_rate: float = 0.005  # per gateway message: published twice
    count_only_rate: float = 0.05  # share of detectors that report no speed/occupancy
    silence_rate: float = 0.0  # per sensor-minute: the sensor stops reporting
    silence_minutes: tuple[int, int] = (3, 12)
    stuck_rate: float = 0.0  # per sensor-minute: the sensor repeats one minute's values
    stuck_minutes: tuple[int, int] = (5, 20)
    drift_rate: float = 0.0  # per sensor-minute: speed drifts away from the truth
    drift_minutes: tuple[int, int] = (30, 120)
    drift_per_minute: float = 0.01  # bias added per minute of drift (sign drawn per episode)
    burst_rate: float = 0.0  # per gateway-minute: the gateway resends its last N messages
    burst_messages: tuple[int, int] = (2, 5)
    late_rate: float = 0.0  # per gateway-minute: the gateway buffers and delivers late, shuffled
    late_minutes: tuple[int, int] = (2, 6)

    @classmethod
    def none(cls) -> Faults:
        return cls(invalid_reading_rate=0.0, duplicate_message_rate=0.0, count_only_rate=0.0)

    @classmethod
    def realistic(cls) -> Faults:
        """Every fault kind at a rate that shows up in a city-hour of a few thousand sensors."""
        return cls(
            silence_rate=0.0005,
            stuck_rate=0.0003,
            drift_rate=0.0002,
            burst_rate=0.002,
            late_rate=0.002,
        )


@dataclass(frozen=True)
class InjectedFault:
    """One injected fault: `kind` on `subject` (a sensor or gateway id) for minutes [start, end).

    kinds: silence, stuck, drift (sensors); duplicate, burst, late (gateways); invalid (one reading).
    """

    kind: str
    subject: str
    start_minute: int
    end_minute: int
    detail: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Send:
    """One publish in a gateway's plan: in wall-clock minute `slot`, the message with the
    readings of simulated minute `minute`. `resend` says why it is a copy of an earlier
    message ("duplicate" or "burst"), or is None for the first publish."""

    slot: int
    minute: int
    resend: str | None = None


@dataclass(frozen=True)
class GroundTruth:
    """What a run of `minutes` minutes injected, and what the processor should therefore see."""

    minutes: int
    faults: tuple[InjectedFault, ...]
    congestion: tuple[Congestion, ...]
    readings: int  # distinct readings published
    duplicate_messages: int
    duplicate_readings: int  # valid readings resent: what the processor counts as duplicates
    resent_invalid_readings: int  # invalid readings resent: quarantined once per copy

    def of_kind(self, kind: str) -> list[InjectedFault]:
        return [f for f in self.faults if f.kind == kind]

    def silent_sensors(self, at_least_minutes: int = 5) -> set[str]:
        """Sensors silent long enough to raise SensorSilent (the processor's threshold is 5 min)."""
        return {f.subject for f in self.of_kind("silence") if f.end_minute - f.start_minute >= at_least_minutes}


class _Episodes:
    """A subject's fault episodes, generated lazily in time order from its own random stream.

    Gaps between episodes are geometric, so in each minute outside an episode one starts
    with probability `rate`, independently of how far the run has been looked at.
    """

    def __init__(self, rng: random.Random, rate: float, length: tuple[int, int]) -> None:
        self._rng = rng
        self._rate = rate
        self._length = length
        self.spans: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._free_from = 0  # first minute after the last generated episode

    def _extend_to(self, minute: int) -> None:
        if self._rate <= 0:
            return
        while self._free_from <= minute:
            # Minutes without a start before the next one: geometric with p = rate.
            u = 1.0 - self._rng.random()
            gap = 0 if self._rate >= 1 else int(math.log(u) / math.log(1.0 - self._rate))
            start = self._free_from + gap
            end = start + self._rng.randint(*self._length)
            self.spans.append((start, end))
            self._starts.append(start)
            self._free_from = end

    def active(self, minute: int) -> tuple[int, int] | None:
        self._extend_to(minute)
        i = bisect.bisect_right(self._starts, minute) - 1
        if i >= 0 and self.spans[i][0] <= minute < self.spans[i][1]:
            return self.spans[i]
        return None

    def until(self, minutes: int) -> list[tuple[int, int]]:
        """Episodes starting before `minutes`."""
        self._extend_to(minutes)
        return [s for s in self.spans if s[0] < minutes]


@dataclass
class TrafficModel:
    city: City
    seed: int
    start_ms: int  # first simulated minute, aligned to a minute
    incidents: list[Incident] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    spread_delay_minutes: int = 3  # how long a queue takes to back up into the next ring of zones
    spread_decay: float = 0.9  # severity kept per ring
    # What is fixed about each detector (count-only or not) is drawn from this seed, the run's
    # when None: a feed that starts a model a day (`synthetic_lambda`) keeps its detectors' kinds
    # across days instead of drawing them again at every midnight (found by a review).
    sensor_seed: int | None = None
    _episodes: dict[tuple[str, str], _Episodes] = field(default_factory=dict, init=False, repr=False)
    _count_only: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    _congestion: dict[str, list[Congestion]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def with_random_incidents(
        cls,
        city: City,
        seed: int,
        start_ms: int,
        minutes: int,
        count: int = 2,
        faults: Faults | None = None,
        spread_hops: int = 0,
    ) -> TrafficModel:
        """A model with `count` incidents in distinct zones, placed within the run."""
        rng = random.Random(f"{seed}:incidents")
        zones = rng.sample([z.zone_id for z in city.zones], k=min(count, len(city.zones)))
        incidents = []
        for zone in zones:
            duration = max(4, minutes // 5)
            start = rng.randrange(1, max(2, minutes - duration - 4))
            incidents.append(Incident(zone, start, duration, severity=rng.uniform(0.7, 0.95), spread_hops=spread_hops))
        return cls(city, seed, start_ms, incidents, faults or Faults())

    # -- demand and congestion --------------------------------------------------------------

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

    def congestion(self) -> list[Congestion]:
        """Every congestion episode: the incidents and their spill-back into upstream zones."""
        return [c for episodes in self._congestion_by_zone().values() for c in episodes]

    def _congestion_by_zone(self) -> dict[str, list[Congestion]]:
        if self._congestion is None:
            by_cell: dict[tuple[int, int], Zone] = {(z.grid_row, z.grid_col): z for z in self.city.zones}
            zones = {z.zone_id: z for z in self.city.zones}
            out: dict[str, list[Congestion]] = {}
            for inc in self.incidents:
                origin = zones.get(inc.zone_id)
                for hops in range(inc.spread_hops + 1):
                    ring = [inc.zone_id] if hops == 0 or origin is None else _ring(origin, hops, by_cell)
                    delay = hops * self.spread_delay_minutes
                    severity = inc.severity * self.spread_decay**hops
                    for zone_id in ring:
                        out.setdefault(zone_id, []).append(
                            Congestion(
                                zone_id,
                                inc.start_minute + delay,
                                inc.start_minute + inc.duration_minutes + delay,
                                severity,
                                inc.zone_id,
                                hops,
                            )
                        )
            self._congestion = out
        return self._congestion

    def severity(self, zone_id: str, minute: int) -> float:
        """How far onto the congested branch the zone is in this minute (0 = free flow)."""
        return max(
            (
                c.severity
                for c in self._congestion_by_zone().get(zone_id, ())
                if c.start_minute <= minute < c.end_minute
            ),
            default=0.0,
        )

    # -- sensor faults ------------------------------------------------------------------------

    def _track(self, kind: str, subject: str) -> _Episodes:
        key = (kind, subject)
        track = self._episodes.get(key)
        if track is None:
            rate, length = {
                "silence": (self.faults.silence_rate, self.faults.silence_minutes),
                "stuck": (self.faults.stuck_rate, self.faults.stuck_minutes),
                "drift": (self.faults.drift_rate, self.faults.drift_minutes),
                # A burst is an event of one minute, not an episode.
                "burst": (self.faults.burst_rate, (1, 1)),
                "late": (self.faults.late_rate, self.faults.late_minutes),
            }[kind]
            track = _Episodes(random.Random(f"{self.seed}:{subject}:{kind}"), rate, length)
            self._episodes[key] = track
        return track

    def is_silent(self, sensor: Sensor, minute: int) -> bool:
        return self._track("silence", sensor.sensor_id).active(minute) is not None

    def _is_count_only(self, sensor: Sensor) -> bool:
        # A property of the sensor, not of the minute.
        known = self._count_only.get(sensor.sensor_id)
        if known is None:
            seed = self.seed if self.sensor_seed is None else self.sensor_seed
            known = random.Random(f"{seed}:{sensor.sensor_id}:kind").random() < self.faults.count_only_rate
            self._count_only[sensor.sensor_id] = known
        return known

    # -- readings -----------------------------------------------------------------------------

    def _true_values(self, sensor: Sensor, minute: int) -> tuple[random.Random, int, dict[str, Any]]:
        """What the detector measures in `minute` without sensor faults: (its rng, ts, values)."""
        rng = random.Random(f"{self.seed}:{sensor.sensor_id}:{minute}")
        minute_start = self.start_ms + minute * MINUTE_MS
        ts = minute_start + 30_000 + rng.randrange(29_000)  # end of the detector's interval
        free_speed = sensor.speed_limit_kmh * rng.uniform(0.95, 1.1)
        severity = self.severity(sensor.zone_id, minute)
        if severity > 0:
            # Congested branch: density above critical, flow falling as density rises.
            share = max(0.05, 1 - severity) * rng.uniform(0.85, 1.0)
            density = JAM_DENSITY / 2 * (1 + math.sqrt(1 - share))
        else:
            share = min(0.99, self.demand(sensor.zone_type, ts) * rng.uniform(0.8, 1.15))
            density = JAM_DENSITY / 2 * (1 - math.sqrt(1 - share))
        speed = max(2.0, free_speed * (1 - density / JAM_DENSITY))
        # Flow relative to capacity is the same `share` on both branches of the diagram.
        capacity_per_minute = CAPACITY_PER_LANE[sensor.zone_type] / 60
        flow_per_minute = share * capacity_per_minute
        # Counting noise, but never more vehicles than the lane can carry.
        noisy = round(rng.gauss(flow_per_minute, math.sqrt(flow_per_minute + 0.25)))
        count = min(math.floor(capacity_per_minute), max(0, noisy))
        values: dict[str, Any] = {
            "vehicle_count": count,
            "congestion_index": round(min(1.0, density / JAM_DENSITY), 4),
            "avg_speed_kmh": round(speed, 1),
            "occupancy_pct": round(min(100.0, density * VEHICLE_LENGTH_M / 10), 1),
        }
        return rng, ts, values

    def reading(self, sensor: Sensor, minute: int) -> dict[str, Any]:
        """One detector's reading for simulated minute `minute` (its seq is the epoch minute),
        with the sensor's faults applied (silence is the caller's business: `is_silent`)."""
        rng, ts, values = self._true_values(sensor, minute)
        stuck = self._track("stuck", sensor.sensor_id).active(minute)
        if stuck is not None and stuck[0] != minute:
            values = self._true_values(sensor, stuck[0])[2]
        drift = self._track("drift", sensor.sensor_id).active(minute)
        if drift is not None:
            sign = 1 if random.Random(f"{self.seed}:{sensor.sensor_id}:drift:{drift[0]}").random() < 0.5 else -1
            bias = sign * min(MAX_DRIFT, self.faults.drift_per_minute * (minute - drift[0] + 1))
            values = dict(values, avg_speed_kmh=round(min(250.0, values["avg_speed_kmh"] * (1 + bias)), 1))
        minute_start = self.start_ms + minute * MINUTE_MS
        out: dict[str, Any] = {
            "sensor_id": sensor.sensor_id,
            "zone_id": sensor.zone_id,
            "ts": format_ts(ts),
            "seq": minute_start // MINUTE_MS,
            "vehicle_count": values["vehicle_count"],
            "congestion_index": values["congestion_index"],
            "lane": sensor.lane,
        }
        if not self._is_count_only(sensor):
            out["avg_speed_kmh"] = values["avg_speed_kmh"]
            out["occupancy_pct"] = values["occupancy_pct"]
        if rng.random() < self.faults.invalid_reading_rate:
            out[rng.choice(["avg_speed_kmh", "congestion_index", "vehicle_count"])] = rng.choice([-5, 1e9, "fast"])
        return out

    def gateway_minute(self, gateway_id: str, sensors: list[Sensor], minute: int) -> list[dict[str, Any]]:
        """All readings one gateway sends for one simulated minute (silent sensors send none)."""
        return [self.reading(s, minute) for s in sensors if not self.is_silent(s, minute)]

    # -- gateway faults -----------------------------------------------------------------------

    def duplicate(self, gateway_id: str, minute: int) -> bool:
        """Whether this gateway's message for this minute is (faultily) published twice."""
        return random.Random(f"{self.seed}:{gateway_id}:{minute}:dup").random() < self.faults.duplicate_message_rate

    def burst(self, gateway_id: str, minute: int) -> int:
        """How many of its last messages the gateway resends in wall-clock minute `minute` (0: none)."""
        if self._track("burst", gateway_id).active(minute) is None:
            return 0
        return random.Random(f"{self.seed}:{gateway_id}:{minute}:burst").randint(*self.faults.burst_messages)

    def send_plan(self, gateway_id: str, minutes: int) -> list[list[Send]]:
        """The gateway's publishes per wall-clock minute over a run of `minutes` minutes.

        Normally minute m's message goes out in slot m. During a late-delivery episode
        [a, b) the messages of a..b-1 are held and go out in slot b (or the run's last
        slot), shuffled. A duplicate follows its message at once; a burst resends the
        gateway's last N messages at the end of its slot. Every minute is sent at least once.
        """
        late = self._track("late", gateway_id)
        slots: list[list[Send]] = [[] for _ in range(minutes)]
        held: list[int] = []
        history: list[int] = []  # minutes in the order first sent
        for slot in range(minutes):
            if late.active(slot) is not None and slot < minutes - 1:
                held.append(slot)
                due: list[int] = []
            elif held:
                due, held = [*held, slot], []
                random.Random(f"{self.seed}:{gateway_id}:{slot}:shuffle").shuffle(due)
            else:
                due = [slot]
            for minute in due:
                slots[slot].append(Send(slot, minute))
                history.append(minute)
                if self.duplicate(gateway_id, minute):
                    slots[slot].append(Send(slot, minute, "duplicate"))
            n = self.burst(gateway_id, slot)
            slots[slot] += [Send(slot, m, "burst") for m in history[-n:]] if n else []
        return slots

    # -- ground truth ---------------------------------------------------------------------------

    def ground_truth(self, minutes: int) -> GroundTruth:
        """Everything injected in a run of `minutes` minutes (costs about as much as the run)."""
        faults: list[InjectedFault] = []
        readings = duplicate_messages = duplicate_readings = resent_invalid = 0
        for gateway_id, sensors in self.city.gateways().items():
            for sensor in sensors:
                for kind in ("silence", "stuck", "drift"):
                    for start, end in self._track(kind, sensor.sensor_id).until(minutes):
                        faults.append(InjectedFault(kind, sensor.sensor_id, start, min(end, minutes)))
            valid: dict[int, int] = {}
            invalid: dict[int, int] = {}
            for minute in range(minutes):
                batch = self.gateway_minute(gateway_id, sensors, minute)
                bad = [r["sensor_id"] for r in batch if _is_invalid(r)]
                faults += [InjectedFault("invalid", sid, minute, minute + 1) for sid in bad]
                readings += len(batch)
                valid[minute], invalid[minute] = len(batch) - len(bad), len(bad)
            for start, end in self._track("late", gateway_id).until(minutes - 1):
                faults.append(InjectedFault("late", gateway_id, start, min(end, minutes - 1)))
            for slot, sends in enumerate(self.send_plan(gateway_id, minutes)):
                # A minute whose sensors were all silent has no message to resend.
                resent = [s for s in sends if s.resend and valid[s.minute] + invalid[s.minute]]
                duplicate_messages += len(resent)
                duplicate_readings += sum(valid[s.minute] for s in resent)
                resent_invalid += sum(invalid[s.minute] for s in resent)
                faults += [
                    InjectedFault("duplicate", gateway_id, s.minute, s.minute + 1)
                    for s in resent
                    if s.resend == "duplicate"
                ]
                burst = [s.minute for s in resent if s.resend == "burst"]
                if burst:
                    faults.append(InjectedFault("burst", gateway_id, slot, slot + 1, (("minutes", tuple(burst)),)))
        return GroundTruth(
            minutes=minutes,
            faults=tuple(faults),
            congestion=tuple(c for c in self.congestion() if c.start_minute < minutes),
            readings=readings,
            duplicate_messages=duplicate_messages,
            duplicate_readings=duplicate_readings,
            resent_invalid_readings=resent_invalid,
        )


def _ring(origin: Zone, hops: int, by_cell: dict[tuple[int, int], Zone]) -> list[str]:
    """Zones exactly `hops` grid steps (Manhattan) from `origin`, in id order."""
    out = []
    for dr in range(-hops, hops + 1):
        rest = hops - abs(dr)
        for dc in {-rest, rest}:
            zone = by_cell.get((origin.grid_row + dr, origin.grid_col + dc))
            if zone is not None:
                out.append(zone.zone_id)
    return sorted(out)


def _is_invalid(reading: dict[str, Any]) -> bool:
    from streaming.contract import ContractError, validate_reading

    try:
        validate_reading(reading)
    except ContractError:
        return True
    return False
