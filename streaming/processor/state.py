"""Per-zone processor state: dedupe windows, live sensor values, congestion, counters.

The stream is partitioned by zone, so one zone's readings always travel through one
shard and one processor at a time. All of a zone's state therefore lives in one
DynamoDB item written once per batch: the item is the unit of exactly-once. It carries
a marker — the shard and the Kinesis sequence number of the last record applied — and
a redelivered record at or below the marker is skipped, whatever order or grouping the
redelivery arrives in. Within the marker, readings are deduplicated on
(`sensor_id`, `seq`) with a sliding bitmap window per sensor, so duplicate publishes
and out-of-order delivery are told apart in O(1) per reading.
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
import zstandard

# How many sequence numbers below a sensor's highest one are remembered. At one reading
# a minute this is an hour of out-of-order tolerance; older readings are "late".
DEDUPE_WINDOW = 64
_WINDOW_MASK = (1 << DEDUPE_WINDOW) - 1

NEW, DUPLICATE, BEYOND_WINDOW = 0, 1, 2


@dataclass(slots=True)
class SensorState:
    """What the processor remembers about one sensor (also its live value for dashboards)."""

    hwm: int = -1  # highest seq seen
    window: int = 0  # bit i set = seq (hwm - i) seen
    last_ts_ms: int = 0
    last_received_ms: int = 0
    vehicle_count: int = 0
    avg_speed_kmh: float | None = None
    occupancy_pct: float | None = None
    congestion_index: float = 0.0
    silent: bool = False
    # Readings in a row (by event time, newest first) repeating this non-zero vehicle count; 0
    # after a zero count. `stuck` once the run reaches DetectorSettings.stuck_run_readings.
    repeat_run: int = 0
    stuck: bool = False
    # This sensor's share of the zone's `duplicates` and `late` counters (same exactly-once rule).
    duplicates: int = 0
    late: int = 0

    def row(self) -> list[Any]:
        """Every field, in order: `SensorState(*s.row())` is a copy of `s`."""
        return [
            self.hwm,
            self.window,
            self.last_ts_ms,
            self.last_received_ms,
            self.vehicle_count,
            self.avg_speed_kmh,
            self.occupancy_pct,
            self.congestion_index,
            self.silent,
            self.repeat_run,
            self.stuck,
            self.duplicates,
            self.late,
        ]

    def admit(self, seq: int) -> int:
        """Record `seq` as seen; say whether it was NEW, a DUPLICATE, or BEYOND_WINDOW."""
        if seq > self.hwm:
            shift = seq - self.hwm
            self.window = ((self.window << shift) | 1) & _WINDOW_MASK if shift < DEDUPE_WINDOW else 1
            self.hwm = seq
            return NEW
        distance = self.hwm - seq
        if distance >= DEDUPE_WINDOW:
            return BEYOND_WINDOW
        bit = 1 << distance
        if self.window & bit:
            return DUPLICATE
        self.window |= bit
        return NEW

    def admit_quarantined(self, seq: int) -> int:
        """`admit` for a reading that is quarantined (its resend is then a duplicate, counted
        once), except that it may not move the window a whole window ahead: one bad `seq` (2**62,
        say) would put every later reading of the sensor beyond the window, late, out of the
        live values for good (found by a review), its first reading's too. Such a seq is not
        remembered (NEW): sent again, that reading is quarantined again."""
        if seq - self.hwm >= DEDUPE_WINDOW:
            return NEW
        return self.admit(seq)


# A sensor's fields in `SensorState(*values)` order: the columns of a stored zone state.
_SENSOR_FIELDS = tuple(f.name for f in fields(SensorState))
_SENSOR_ROW = operator.attrgetter(*_SENSOR_FIELDS)
# The sensors' two times, stored as their distance behind the zone's watermark (`to_bytes`).
_TIME_COLUMNS = (_SENSOR_FIELDS.index("last_ts_ms"), _SENSOR_FIELDS.index("last_received_ms"))

# zstd's level for a zone-state blob: where its size levels off (levels 2-5 are no smaller; 7
# saves 4 % at nearly five times the CPU).
STATE_ZSTD_LEVEL = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first bytes; a zlib stream's are 0x78 ...


def state_document(blob: bytes) -> dict[str, Any]:
    """The JSON document of a zone-state blob: zstd, or zlib as states were written until
    2026-12-07 (a deployed table holds those until each zone's next batch rewrites it)."""
    return orjson.loads(zstandard.decompress(blob) if blob[:4] == _ZSTD_MAGIC else zlib.decompress(blob))


@dataclass(slots=True)
class Congestion:
    """Hysteresis state of one zone: raise above one threshold, clear below a lower one,
    each only after the condition held for a minimum number of closed minutes (or raised at
    once by the severe vote, `core._detect_severe`)."""

    congested: bool = False
    streak: int = 0  # consecutive closed minutes pointing at the other state
    episode_start_minute: int | None = None
    peak_index: float = 0.0
    # The number of the zone's latest episode; each raise counts one. The episode's id: a retry
    # starts from the committed state, so it numbers the episode alike however its records are
    # grouped into batches. 0 in states written before the number existed.
    episode: int = 0


@dataclass(slots=True)
class ZoneState:
    zone_id: str
    marker_shard: str | None = None
    marker_seq: int = -1
    watermark_ms: int = 0  # highest event time applied, each capped at its receive time
    evaluated_minute: int = -1  # last closed minute the congestion detector looked at
    open_minutes: dict[int, list[float]] = field(default_factory=dict)  # minute → [readings, cong_sum]
    congestion: Congestion = field(default_factory=Congestion)
    sensors: dict[str, SensorState] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def already_applied(self, shard_id: str, seq: int) -> bool:
        """True if the record (shard, seq) was applied to this state before (a redelivery).

        Lambda finishes a parent shard before its children, so a record from a different
        shard than the marker's is always new."""
        return shard_id == self.marker_shard and seq <= self.marker_seq

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- serialisation: one compact binary attribute, cheap to write and to decode -------

    def to_bytes(self) -> bytes:
        """The state as the store's one binary attribute: JSON, the sensors a column per field
        (`si` their ids, `sc` the columns, in `SensorState`'s field order), zstd level 1. A
        column a field rather than a row a sensor: a field's values sit together and compress
        better. zstd level 1 against zlib level 5 (what blobs written before 2026-12-07 hold, still
        read): 13.8 B a sensor against 15.0 on the plan's sample states, compressed in a fifth of
        the CPU. The sensors' times go as their distance behind the watermark (`tw`): a few digits
        instead of thirteen, 13.0 B a sensor (docs/performance.md, "Plan")."""
        columns = list(zip(*map(_SENSOR_ROW, self.sensors.values()), strict=True)) or [[] for _ in _SENSOR_FIELDS]
        wm = self.watermark_ms
        for i in _TIME_COLUMNS:
            columns[i] = [wm - t for t in columns[i]]
        doc = {
            "z": self.zone_id,
            "ms": self.marker_shard,
            "mq": str(self.marker_seq),
            "wm": self.watermark_ms,
            "ev": self.evaluated_minute,
            "om": {str(k): v for k, v in self.open_minutes.items()},
            "cg": [
                self.congestion.congested,
                self.congestion.streak,
                self.congestion.episode_start_minute,
                self.congestion.peak_index,
                self.congestion.episode,
            ],
            "si": list(self.sensors),
            "sc": columns,
            "tw": True,
            "c": self.counters,
        }
        return zstandard.compress(orjson.dumps(doc), STATE_ZSTD_LEVEL)

    @classmethod
    def from_bytes(cls, data: bytes) -> ZoneState:
        """A state from `to_bytes`, or from a blob of the layout before it (a row a sensor, its
        trailing zero fields left out); a row or column from before a field existed is shorter,
        and the field takes its default."""
        doc = state_document(data)
        congested, streak, start, peak, *episode = doc["cg"]  # no episode number before 2026-12-06
        if "sc" in doc:
            columns = doc["sc"]
            if doc.get("tw"):  # times behind the watermark (since 2026-12-07), not epoch ms
                wm = doc["wm"]
                for i in _TIME_COLUMNS:
                    columns[i] = [wm - d for d in columns[i]]
            rows = zip(*columns, strict=True)  # every column holds one value a sensor
            sensors = {sid: SensorState(*row) for sid, row in zip(doc["si"], rows, strict=True)}
        else:
            sensors = {sid: SensorState(*row) for sid, row in doc["s"].items()}
        return cls(
            zone_id=doc["z"],
            marker_shard=doc["ms"],
            marker_seq=int(doc["mq"]),
            watermark_ms=doc["wm"],
            evaluated_minute=doc["ev"],
            open_minutes={int(k): v for k, v in doc["om"].items()},
            congestion=Congestion(congested, streak, start, peak, *episode),
            sensors=sensors,
            counters=doc["c"],
        )


@dataclass(slots=True)
class MinuteAggregate:
    """One zone-minute of traffic, summed so that partial aggregates add up exactly."""

    readings: int = 0
    vehicles: int = 0
    speed_sum: float = 0.0
    speed_n: int = 0
    occupancy_sum: float = 0.0
    occupancy_n: int = 0
    congestion_sum: float = 0.0
    marker_shard: str | None = None
    marker_seq: int = -1

    def already_applied(self, shard_id: str, seq: int) -> bool:
        return shard_id == self.marker_shard and seq <= self.marker_seq


@dataclass(slots=True)
class ShardCounters:
    """Counts for messages that cannot be attributed to a known zone (broken envelopes,
    unknown zones). Kept per shard, with the same redelivery marker as zone state."""

    shard_id: str
    marker_seq: int = -1
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
