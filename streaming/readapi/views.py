"""What the read API answers, computed from plain data: no AWS types, no I/O.

Inputs are the registry (`Zone`, `Sensor`), the processor's zone state (`ZoneState`, the
same blob the processor commits) and zone-minute rows (sums, as the processor stores them);
outputs are the JSON documents of the endpoints. Averages are computed from sums here, so
that any aggregation (1, 5, 15 minutes) is exact.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from streaming.contract import is_plain_id
from streaming.processor.state import SensorState, ZoneState
from streaming.readapi.params import MINUTE_MS, format_ts
from streaming.registry import ZONE_COLUMNS, Sensor, Zone

# The detector's own thresholds (streaming/processor/core.py DetectorSettings): a zone whose
# current minute is at or above RAISE is "heavy" before the detector has confirmed it.
CONGESTION_RAISE = 0.7
CONGESTION_CLEAR = 0.4
_KM_PER_DEG_LAT = 111.32


@dataclass(frozen=True, slots=True)
class LiveZone:
    """A zone's committed processor state and when the processor wrote it."""

    state: ZoneState
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One zone-minute item of the zone-metrics table."""

    minute: int  # epoch minute
    readings: int
    vehicles: int
    speed_sum: float
    speed_n: int
    occupancy_sum: float
    occupancy_n: int
    congestion_sum: float


def parse_zones(data: bytes) -> list[Zone]:
    """`zones.csv` from the lake → zones, in file order. ValueError on a bad header."""
    reader = csv.reader(io.StringIO(data.decode()))
    header = next(reader, None)
    if header != ZONE_COLUMNS:
        raise ValueError(f"zones header {header} != expected {ZONE_COLUMNS}")
    zones = [Zone(z, name, t, int(r), int(c), float(lat), float(lon)) for z, name, t, r, c, lat, lon in reader]
    # A zone id is an id, as the contract has it: it names the zone in keys, paths and the page.
    bad = [z.zone_id for z in zones if not is_plain_id(z.zone_id)]
    if bad:
        raise ValueError(f"zones.csv has zone ids that are not plain ids: {[b[:40] for b in bad[:5]]}")
    return zones


def zone_half_extent(zones: Sequence[Zone]) -> tuple[float, float]:
    """Half the side of a zone square in degrees (lat, lon), measured from the grid itself:
    neighbouring zone centres are one zone apart. Falls back to 1 km zones."""
    lat_steps = [
        abs(a.lat - b.lat) / abs(a.grid_row - b.grid_row)
        for a, b in itertools.pairwise(zones)
        if a.grid_row != b.grid_row
    ]
    lon_steps = [
        abs(a.lon - b.lon) / abs(a.grid_col - b.grid_col)
        for a, b in itertools.pairwise(zones)
        if a.grid_col != b.grid_col and a.grid_row == b.grid_row
    ]
    lat0 = zones[0].lat if zones else 52.3
    lat_step = min(lat_steps) if lat_steps else 1 / _KM_PER_DEG_LAT
    lon_step = min(lon_steps) if lon_steps else 1 / (_KM_PER_DEG_LAT * math.cos(math.radians(lat0)))
    return lat_step / 2, lon_step / 2


def congestion_level(congested: bool, index: float | None) -> str:
    """`congested` (confirmed by the detector), else `heavy`/`busy`/`free` by the current
    minute's mean index, or `unknown` without data."""
    if congested:
        return "congested"
    if index is None:
        return "unknown"
    if index >= CONGESTION_RAISE:
        return "heavy"
    if index > CONGESTION_CLEAR:
        return "busy"
    return "free"


def current_index(state: ZoneState) -> float | None:
    """Mean congestion index of the zone's current minute: its newest open minute at or before
    the watermark's. A sensor whose clock runs ahead (up to the processor's future bound) opens
    minutes past it, which must not stand for the zone (found by a review: one such sensor at
    0.9 made a zone of 99 at 0.2 "heavy")."""
    current = state.watermark_ms // MINUTE_MS
    minutes = [m for m in state.open_minutes if m <= current]
    if not minutes:
        return None
    n, total = state.open_minutes[max(minutes)]
    return round(total / n, 4) if n else None


def zone_view(zone: Zone, live: LiveZone | None, registered_sensors: int, now_ms: int) -> dict[str, Any]:
    state = live.state if live else None
    congested = bool(state and state.congestion.congested)
    silent = sum(1 for s in state.sensors.values() if s.silent) if state else 0
    # A stuck sensor keeps its flag until another count arrives: silent, it is counted silent.
    stuck = sum(1 for s in state.sensors.values() if s.stuck and not s.silent) if state else 0
    reporting = len(state.sensors) - silent if state else 0
    # A zone gone dark (every sensor silent) has no current minute: its last one is stale.
    index = current_index(state) if state and reporting else None
    start = state.congestion.episode_start_minute if state and congested else None
    return {
        "zone_id": zone.zone_id,
        "name": zone.name,
        "zone_type": zone.zone_type,
        "lat": zone.lat,
        "lon": zone.lon,
        "congestion": {
            "level": congestion_level(congested, index),
            "congested": congested,
            "current_index": index,
            "since": format_ts(start * MINUTE_MS) if start is not None else None,
            "peak_index": round(state.congestion.peak_index, 4) if state and congested else None,
        },
        "sensors": {
            "registered": registered_sensors,
            "reporting": reporting,
            "silent": silent,
            "never_seen": max(0, registered_sensors - reporting - silent),
            # Reporting, but the same non-zero count for a run of readings (DetectorSettings).
            "stuck": stuck,
        },
        "last_event_at": format_ts(state.watermark_ms) if state and state.watermark_ms else None,
        "updated_at": format_ts(live.updated_at_ms) if live else None,
        "age_s": round((now_ms - live.updated_at_ms) / 1000, 1) if live else None,
    }


def zone_feature(view: dict[str, Any], half_lat: float, half_lon: float) -> dict[str, Any]:
    """A zone as a GeoJSON square (lon/lat order, closed ring) with its view as properties."""
    lat, lon = view["lat"], view["lon"]
    ring = [
        [round(lon - half_lon, 6), round(lat - half_lat, 6)],
        [round(lon + half_lon, 6), round(lat - half_lat, 6)],
        [round(lon + half_lon, 6), round(lat + half_lat, 6)],
        [round(lon - half_lon, 6), round(lat + half_lat, 6)],
        [round(lon - half_lon, 6), round(lat - half_lat, 6)],
    ]
    return {
        "type": "Feature",
        "id": view["zone_id"],
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": view,
    }


def sensor_view(sensor: Sensor, live: SensorState | None, now_ms: int) -> dict[str, Any]:
    status = "never_seen" if live is None else ("silent" if live.silent else "reporting")
    out: dict[str, Any] = {
        "sensor_id": sensor.sensor_id,
        "zone_id": sensor.zone_id,
        "gateway_id": sensor.gateway_id,
        "road": sensor.road,
        "direction": sensor.direction,
        "lane": sensor.lane,
        "lanes": sensor.lanes,
        "speed_limit_kmh": sensor.speed_limit_kmh,
        "lat": sensor.lat,
        "lon": sensor.lon,
        "status": status,
        "live": None,
    }
    if live is not None:
        out["live"] = {
            "last_reading_at": format_ts(live.last_ts_ms) if live.last_ts_ms else None,
            "last_received_at": format_ts(live.last_received_ms) if live.last_received_ms else None,
            "received_age_s": round((now_ms - live.last_received_ms) / 1000, 1) if live.last_received_ms else None,
            "vehicle_count": live.vehicle_count,
            "avg_speed_kmh": live.avg_speed_kmh,
            "occupancy_pct": live.occupancy_pct,
            "congestion_index": live.congestion_index,
            "silent": live.silent,
            "stuck": live.stuck,
            "repeat_run": live.repeat_run,
            "duplicates": live.duplicates,
            "late": live.late,
            "last_seq": live.hwm,
        }
    return out


def _ratio(total: float, n: int, digits: int) -> float | None:
    return round(total / n, digits) if n else None


def aggregate_minutes(rows: Iterable[MinuteRow], step: int) -> list[dict[str, Any]]:
    """Zone-minute rows → one row per `step`-minute bucket (aligned to multiples of `step`
    minutes since the epoch), averages from the summed parts; buckets without data are left out."""
    buckets: dict[int, list[float]] = {}
    for r in rows:
        b = buckets.setdefault(r.minute - r.minute % step, [0, 0, 0.0, 0, 0.0, 0, 0.0, 0])
        b[0] += r.readings
        b[1] += r.vehicles
        b[2] += r.speed_sum
        b[3] += r.speed_n
        b[4] += r.occupancy_sum
        b[5] += r.occupancy_n
        b[6] += r.congestion_sum
        b[7] += 1
    out = []
    for start in sorted(buckets):
        readings, vehicles, ssum, sn, osum, on, csum, minutes = buckets[start]
        out.append(
            {
                "start": format_ts(start * MINUTE_MS),
                "minutes_with_data": int(minutes),
                "readings": int(readings),
                "vehicles": int(vehicles),
                "avg_speed_kmh": _ratio(ssum, int(sn), 1),
                "avg_occupancy_pct": _ratio(osum, int(on), 1),
                "avg_congestion_index": _ratio(csum, int(readings), 4),
            }
        )
    return out


STOPPED_AFTER_MINUTES = 5


def ingestion_view(
    rows_by_zone: dict[str, list[MinuteRow]], live: dict[str, LiveZone], first_minute: int, now_ms: int
) -> dict[str, Any]:
    """Readings stored per minute over all zones (event time), the current rate, and the lag
    of the live store: how far its newest event time and its newest write are behind now."""
    per_minute: dict[int, list[int]] = {}
    for rows in rows_by_zone.values():
        for r in rows:
            if r.minute >= first_minute:
                m = per_minute.setdefault(r.minute, [0, 0])
                m[0] += r.readings
                m[1] += 1
    now_minute = now_ms // MINUTE_MS
    series = [
        {
            "start": format_ts(m * MINUTE_MS),
            "readings": per_minute.get(m, [0, 0])[0],
            "zones": per_minute.get(m, [0, 0])[1],
            "readings_per_s": round(per_minute.get(m, [0, 0])[0] / 60, 2),
        }
        for m in range(first_minute, now_minute + 1)
    ]
    watermark = max((z.state.watermark_ms for z in live.values()), default=0)
    last_write = max((z.updated_at_ms for z in live.values()), default=0)  # the processor's commits only
    # The newest complete minute: the one before the minute still filling (the newest with
    # data, however far behind now the stream is read: a backlog, a replay); once the processor
    # has committed nothing for STOPPED_AFTER_MINUTES (the silence rule's 5), the stream has
    # stopped, and the last minute's rate is none (found by reviews: a stream stopped 30 min ago
    # showed its last rate; event times alone took a backlog for a stop).
    newest = max(per_minute, default=None)
    if newest is None:
        complete = None
    elif now_ms - last_write <= STOPPED_AFTER_MINUTES * MINUTE_MS:
        complete = newest - 1
    else:
        complete = now_minute - 1
    return {
        "minutes": series,
        "current": {
            "minute": format_ts(complete * MINUTE_MS) if complete is not None else None,
            "readings_per_s": round(per_minute.get(complete, [0])[0] / 60, 2) if complete is not None else 0.0,
        },
        "lag": {
            "newest_event_at": format_ts(watermark) if watermark else None,
            "event_lag_s": round((now_ms - watermark) / 1000, 1) if watermark else None,
            "last_write_at": format_ts(last_write) if last_write else None,
            "write_age_s": round((now_ms - last_write) / 1000, 1) if last_write else None,
        },
        "zones_reporting": len(live),
    }


def overview_view(zones: Sequence[dict[str, Any]], now_ms: int) -> dict[str, Any]:
    """City-wide counts for the dashboard's header: congestion levels and sensor health."""
    levels: dict[str, int] = {}
    sensors = {"registered": 0, "reporting": 0, "silent": 0, "never_seen": 0, "stuck": 0}
    for z in zones:
        level = z["congestion"]["level"]
        levels[level] = levels.get(level, 0) + 1
        for k in sensors:
            sensors[k] += z["sensors"][k]
    return {
        "at": format_ts(now_ms),
        "zones": {"total": len(zones), "by_level": levels},
        "sensors": sensors,
    }
