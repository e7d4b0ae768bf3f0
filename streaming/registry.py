"""The sensor registry: which detector sits where, on which road, behind which gateway.

The registry is data, not code: a CSV (`sensor_registry.csv`, plus `zones.csv`) that the
processor loads from the lake for enrichment and the warehouse loads as `dim_sensors` /
`dim_zones`. A real city ships its own; `generate_city` builds a synthetic one —
zones on a street grid around a centre, deterministic from a seed — for the local
platform, the tests and the benchmarks.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields

ZONE_TYPES = ("centre", "arterial", "residential", "highway")

# Sensors per zone relative to a residential zone: the centre is instrumented densely.
_DENSITY = {"centre": 1.6, "arterial": 1.3, "residential": 0.7, "highway": 1.0}
_LANES = {"centre": (2, 2), "arterial": (2, 3), "residential": (1, 1), "highway": (3, 4)}
_SPEED_LIMIT = {"centre": 30, "arterial": 50, "residential": 30, "highway": 100}
# A roadside gateway aggregates the detectors of a few blocks.
SENSORS_PER_GATEWAY = 32
_ZONE_KM = 1.0
_BLOCKS_PER_ZONE = 4  # streets every 250 m
_ORIGIN = (52.3000, 4.8000)  # south-west corner of the synthetic city
_KM_PER_DEG_LAT = 111.32
_STREET_NAMES = (
    "Oak",
    "Maple",
    "Cedar",
    "Elm",
    "Pine",
    "Birch",
    "Willow",
    "Ash",
    "Linden",
    "Poplar",
    "Chestnut",
    "Alder",
    "Hazel",
    "Rowan",
    "Juniper",
    "Beech",
    "Spruce",
    "Laurel",
    "Holly",
    "Cypress",
    "Magnolia",
    "Sycamore",
    "Hawthorn",
    "Larch",
    "Yew",
    "Aspen",
    "Fir",
    "Hemlock",
    "Walnut",
    "Olive",
)


@dataclass(frozen=True, slots=True)
class Zone:
    zone_id: str
    name: str
    zone_type: str
    grid_row: int
    grid_col: int
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Sensor:
    sensor_id: str
    zone_id: str
    gateway_id: str
    zone_type: str
    road: str
    direction: str
    lane: int
    lanes: int
    speed_limit_kmh: int
    lat: float
    lon: float


@dataclass(frozen=True)
class City:
    """A generated city: its zones and sensors, in id order."""

    seed: int
    zones: tuple[Zone, ...]
    sensors: tuple[Sensor, ...]

    def gateways(self) -> dict[str, list[Sensor]]:
        """Gateway id → the sensors it serves (all in one zone), in id order."""
        out: dict[str, list[Sensor]] = {}
        for s in self.sensors:
            out.setdefault(s.gateway_id, []).append(s)
        return out


def _zone_type(row: int, col: int, side: int) -> str:
    centre = (side - 1) / 2
    if row in (0, side - 1) or col in (0, side - 1):
        return "highway"  # the ring motorway around the city
    if max(abs(row - centre), abs(col - centre)) <= 1.5:
        return "centre"
    if row % 4 == 0 or col % 4 == 0:
        return "arterial"
    return "residential"


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder)."""
    scale = total / sum(weights)
    raw = [w * scale for w in weights]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def generate_city(sensors: int = 50_000, zones: int = 256, seed: int = 7) -> City:
    """A synthetic city of `sensors` detectors over `zones` zones, the same for the same seed."""
    if sensors < zones:
        raise ValueError(f"need at least one sensor per zone: {sensors} sensors < {zones} zones")
    rng = random.Random(seed)
    side = math.ceil(math.sqrt(zones))
    km_per_deg_lon = _KM_PER_DEG_LAT * math.cos(math.radians(_ORIGIN[0]))

    def coords(x_km: float, y_km: float) -> tuple[float, float]:
        return (round(_ORIGIN[0] + y_km / _KM_PER_DEG_LAT, 6), round(_ORIGIN[1] + x_km / km_per_deg_lon, 6))

    zone_list: list[Zone] = []
    for index in range(zones):
        row, col = divmod(index, side)
        ztype = _zone_type(row, col, side)
        lat, lon = coords((col + 0.5) * _ZONE_KM, (row + 0.5) * _ZONE_KM)
        zone_list.append(Zone(f"Z-{index:03d}", f"{ztype.title()} {row:02d}-{col:02d}", ztype, row, col, lat, lon))

    counts = _apportion(sensors, [_DENSITY[z.zone_type] for z in zone_list])
    sensor_list: list[Sensor] = []
    block_km = _ZONE_KM / _BLOCKS_PER_ZONE
    for zone, count in zip(zone_list, counts, strict=True):
        zindex = int(zone.zone_id[2:])
        lo, hi = _LANES[zone.zone_type]
        for k in range(count):
            # Detectors sit on the street grid: pick a street, then a point along it.
            horizontal = rng.random() < 0.5
            street = rng.randrange(_BLOCKS_PER_ZONE + 1)
            along = rng.random() * _ZONE_KM
            if horizontal:
                global_street = zone.grid_row * _BLOCKS_PER_ZONE + street
                x, y = zone.grid_col * _ZONE_KM + along, zone.grid_row * _ZONE_KM + street * block_km
                direction = rng.choice("EW")
            else:
                global_street = zone.grid_col * _BLOCKS_PER_ZONE + street
                x, y = zone.grid_col * _ZONE_KM + street * block_km, zone.grid_row * _ZONE_KM + along
                direction = rng.choice("NS")
            name = _STREET_NAMES[global_street % len(_STREET_NAMES)]
            suffix = {"highway": " Ring", "arterial": " Avenue"}.get(zone.zone_type, " Street")
            road = f"{name}{suffix}" if zone.zone_type != "highway" else f"A{10 + global_street % 3} Ring"
            lanes = rng.randint(lo, hi)
            lat, lon = coords(x, y)
            sensor_list.append(
                Sensor(
                    sensor_id=f"S-{len(sensor_list):06d}",
                    zone_id=zone.zone_id,
                    gateway_id=f"gw-{zindex:03d}-{k // SENSORS_PER_GATEWAY:02d}",
                    zone_type=zone.zone_type,
                    road=road,
                    direction=direction,
                    lane=rng.randint(1, lanes),
                    lanes=lanes,
                    speed_limit_kmh=_SPEED_LIMIT[zone.zone_type],
                    lat=lat,
                    lon=lon,
                )
            )
    return City(seed=seed, zones=tuple(zone_list), sensors=tuple(sensor_list))


def _to_csv(rows: Iterable[tuple], header: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


SENSOR_COLUMNS = [f.name for f in fields(Sensor)]
ZONE_COLUMNS = [f.name for f in fields(Zone)]


def registry_csv(city: City) -> bytes:
    """`sensor_registry.csv`: one row per sensor."""
    return _to_csv((astuple(s) for s in city.sensors), SENSOR_COLUMNS)


def zones_csv(city: City) -> bytes:
    """`zones.csv`: one row per zone."""
    return _to_csv((astuple(z) for z in city.zones), ZONE_COLUMNS)


def load_registry(data: bytes) -> dict[str, Sensor]:
    """Parse `sensor_registry.csv` into sensor id → Sensor. Raises ValueError on a bad header."""
    reader = csv.reader(io.StringIO(data.decode()))
    header = next(reader, None)
    if header != SENSOR_COLUMNS:
        raise ValueError(f"sensor registry header {header} != expected {SENSOR_COLUMNS}")
    out: dict[str, Sensor] = {}
    for row in reader:
        sid, zone, gw, ztype, road, direction, lane, lanes, limit, lat, lon = row
        out[sid] = Sensor(
            sid, zone, gw, ztype, road, direction, int(lane), int(lanes), int(limit), float(lat), float(lon)
        )
    return out
