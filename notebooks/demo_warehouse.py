"""A small demo warehouse for the studies: a few days of a small city, through the real dbt models.

Place in the flow: stands in for weeks of `citypulse_hourly` runs when there is no warehouse
at hand (tests, CI, a first look at the notebooks). The readings come from the devices'
traffic model (`streaming.devices.traffic`, the same function the simulator publishes) and
are written straight into warehouse raw (`raw.readings`, `raw.sensor_registry`,
`raw.zones`) as the hourly load would leave them; then `dbt build` runs the hourly models for
the whole range and the daily models (`tag:daily`) for its days, as the two DAGs do.

What the data holds, so the studies have something to find:

* a recurring bottleneck: an incident in one centre zone every day at 17:00 for 45 minutes,
  spilling back one ring of neighbours;
* one-off incidents elsewhere (one a day, at different hours);
* sensor faults at realistic rates (short silences, stuck values, speed drift), 5 % of
  detectors count-only, and three outages for the coverage study: one detector that never
  reports, one dead from the second day on, one off every night 00:00-06:00.

    python -m notebooks.demo_warehouse --out /tmp/citypulse-demo.duckdb [--days 3] [--sensors 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from citypulse_batch.dbt_build import DbtSummary, find_project_dir, run_dbt_build
from citypulse_batch.lake import Interval
from citypulse_batch.warehouse import RAW_TABLES, DuckDBWarehouse
from streaming.devices.traffic import Faults, Incident, TrafficModel
from streaming.registry import City, generate_city

DEFAULT_START = datetime(2026, 3, 1, tzinfo=UTC)  # a Sunday: the range shows a weekend day and weekdays
DAY_MINUTES = 1440
RECURRING_HOUR = 17
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoWarehouse:
    path: Path
    start: datetime
    end: datetime
    city: City
    readings: int
    recurring_zone: str
    dead_sensor: str
    builds: list[DbtSummary]
    seconds: float


def demo_faults() -> Faults:
    return Faults(
        invalid_reading_rate=0.0,  # the processor quarantines these: never in raw
        duplicate_message_rate=0.0,  # the load dedupes these: never in raw
        silence_rate=0.0005,
        stuck_rate=0.0003,
        drift_rate=0.0002,
    )


def demo_incidents(city: City, days: int, seed: int) -> tuple[str, list[Incident]]:
    """A daily 17:00 incident in one centre zone (recurring) and one-off incidents elsewhere."""
    centre = [z for z in city.zones if z.zone_type == "centre"] or list(city.zones)
    recurring = centre[seed % len(centre)]
    incidents = [
        Incident(recurring.zone_id, d * DAY_MINUTES + RECURRING_HOUR * 60, 45, severity=0.85, spread_hops=1)
        for d in range(days)
    ]
    others = [z for z in city.zones if z.zone_id != recurring.zone_id]
    for d in range(days):
        zone = others[(seed + 5 * d) % len(others)]
        hour = (9, 12, 20, 15, 7, 22, 11)[d % 7]
        incidents.append(Incident(zone.zone_id, d * DAY_MINUTES + hour * 60 + 10, 30 + 15 * (d % 3), severity=0.8))
    return recurring.zone_id, incidents


def demo_outages(city: City, days: int) -> dict[str, list[tuple[int, int]]]:
    """Minutes [start, end) in which a detector sends nothing, beyond the model's short silences."""
    ids = [s.sensor_id for s in city.sensors]
    total = days * DAY_MINUTES
    return {
        ids[len(ids) // 3]: [(0, total)],  # never reports
        ids[2 * len(ids) // 3]: [(DAY_MINUTES, total)],  # dead from the second day
        ids[-1]: [(d * DAY_MINUTES, d * DAY_MINUTES + 360) for d in range(days)],  # off every night
    }


def generate_readings(model: TrafficModel, days: int, outages: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    columns = [name for name, _, _ in RAW_TABLES["readings"]]
    rows: dict[str, list] = {name: [] for name in columns}
    for minute in range(days * DAY_MINUTES):
        for sensor in model.city.sensors:
            if model.is_silent(sensor, minute):
                continue
            if any(a <= minute < b for a, b in outages.get(sensor.sensor_id, ())):
                continue
            reading = model.reading(sensor, minute)
            ts = datetime.fromisoformat(reading["ts"]).replace(tzinfo=None)
            values = dict(
                reading,
                ts=ts,
                avg_speed_kmh=reading.get("avg_speed_kmh"),
                occupancy_pct=reading.get("occupancy_pct"),
                gateway_id=sensor.gateway_id,
                received_at=ts + timedelta(seconds=1),
                processed_at=ts + timedelta(seconds=2),
            )
            for name in columns:
                rows[name].append(values[name])
    return pd.DataFrame(rows, columns=columns)


def dead_sensor_of(outages: dict[str, list[tuple[int, int]]], days: int) -> str:
    return next(sensor for sensor, spans in outages.items() if spans == [(0, days * DAY_MINUTES)])


def build_demo_warehouse(
    path: Path,
    *,
    start: datetime = DEFAULT_START,
    days: int = 3,
    sensors: int = 60,
    zones: int = 16,
    seed: int = 11,
) -> DemoWarehouse:
    """Write `days` days of a small city into raw at `path` (replaced) and build every mart.

    dbt-duckdb keeps the file open (and locked) in this process afterwards: readers in other
    processes (the notebooks' kernels) need it built in a process of its own (`build_in_subprocess`).
    """
    started = time.monotonic()
    path = Path(path)
    path.unlink(missing_ok=True)
    city = generate_city(sensors=sensors, zones=zones, seed=seed)
    recurring_zone, incidents = demo_incidents(city, days, seed)
    outages = demo_outages(city, days)
    model = TrafficModel(city, seed, int(start.timestamp() * 1000), incidents, demo_faults())
    frame = generate_readings(model, days, outages)

    warehouse = DuckDBWarehouse(path)
    with warehouse.transaction() as con:
        warehouse.ensure_raw_tables(con)
        con.register("demo_readings", frame)
        con.execute("insert into raw.readings select * from demo_readings")
        con.unregister("demo_readings")
        for table, records in (("sensor_registry", city.sensors), ("zones", city.zones)):
            names = [name for name, _, _ in RAW_TABLES[table]]
            con.executemany(
                f"insert into raw.{table} ({', '.join(names)}) values ({', '.join('?' * len(names))})",
                [list(dataclasses.astuple(r)) for r in records],
            )

    interval = Interval(start, start + timedelta(days=days))
    project, env = find_project_dir(), warehouse.dbt_env()
    builds = [
        run_dbt_build(project, warehouse.dbt_target, interval, env, exclude="tag:daily"),
        run_dbt_build(project, warehouse.dbt_target, interval, env, select="tag:daily"),
    ]
    for summary in builds:
        if not summary.success:
            raise RuntimeError(f"dbt build of the demo warehouse failed: {summary.failures or summary.error}")
    dead = dead_sensor_of(outages, days)
    return DemoWarehouse(
        path,
        interval.start,
        interval.end,
        city,
        len(frame),
        recurring_zone,
        dead,
        builds,
        round(time.monotonic() - started, 1),
    )


def build_in_subprocess(path: Path, *, days: int = 3, sensors: int = 60, zones: int = 16, seed: int = 11) -> None:
    """`build_demo_warehouse` in a child process, so that no lock on the file outlives the build."""
    argv = [sys.executable, "-m", "notebooks.demo_warehouse", "--out", str(path), "--days", str(days)]
    argv += ["--sensors", str(sensors), "--zones", str(zones), "--seed", str(seed)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"demo warehouse build failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="DuckDB file to (re)create")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--sensors", type=int, default=60)
    parser.add_argument("--zones", type=int, default=16)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    demo = build_demo_warehouse(args.out, days=args.days, sensors=args.sensors, zones=args.zones, seed=args.seed)
    print(
        f"{demo.path}: {demo.readings:,} readings, {len(demo.city.sensors)} sensors, {len(demo.city.zones)} zones, "
        f"{demo.start:%Y-%m-%d} .. {demo.end:%Y-%m-%d} (end exclusive), built in {demo.seconds} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
