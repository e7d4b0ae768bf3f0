"""Reading an interval's `raw.readings` back from PostgreSQL for the quality checkpoint.

Run: `python -m bench.warehouse_read_bench [--rows N] [--repeat N]` (docs/performance.md, "Batch").

The hourly DAG's contract gate reads the interval's rows out of the warehouse into Arrow
(`Warehouse.read_readings`). DuckDB hands Arrow over natively; PostgreSQL and Redshift go
through a driver. This bench fills `raw.readings` of a scratch database on the local
PostgreSQL server with one synthetic city-hour (`--rows`, default 3,000,000: 50,000 sensors
once a minute, a tenth of the speeds null) and reads it back each way, alternating, each read
in a fresh process:

- **COPY** — `PostgresWarehouse.read_readings`: `COPY ... TO STDOUT` as CSV into a temporary
  file, parsed by Arrow's CSV reader;
- **cursor** — `Warehouse.read_readings`, what Redshift runs: DB-API `fetchmany` batches
  turned into Arrow a column at a time.

Reported per way: wall and CPU seconds (median), peak resident memory of the reading process.
The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import closing
from datetime import UTC, datetime

from citypulse_batch.lake import Interval
from citypulse_batch.warehouse import RAW_SCHEMA, PostgresWarehouse, Warehouse

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "password": ""}
DBNAME = "citypulse_bench_read"
DROP = f"drop database if exists {DBNAME} with (force)"
HOUR = datetime(2026, 12, 6, 3, tzinfo=UTC)
SENSORS = 50_000
WAYS = {"COPY": PostgresWarehouse.read_readings, "cursor": Warehouse.read_readings}


def _warehouse() -> PostgresWarehouse:
    return PostgresWarehouse(dbname=DBNAME, **PG)


def _admin(*statements: str) -> None:
    """Run `statements` on the server's `postgres` database, outside a transaction."""
    import psycopg2

    with closing(psycopg2.connect(dbname="postgres", **PG)) as admin:
        admin.autocommit = True
        with admin.cursor() as cur:
            for statement in statements:
                cur.execute(statement)


def fill(rows: int) -> None:
    """A fresh scratch database whose `raw.readings` holds `rows` readings of the hour."""
    _admin(DROP, f"create database {DBNAME}")
    warehouse = _warehouse()
    with warehouse.transaction() as cur:
        warehouse.ensure_raw_tables(cur)
        cur.execute(
            f"""insert into {RAW_SCHEMA}.readings (sensor_id, zone_id, ts, seq, vehicle_count, avg_speed_kmh,
                occupancy_pct, congestion_index, lane, gateway_id, received_at, processed_at)
            select 'S-' || lpad((i % {SENSORS})::text, 6, '0'), 'Z-' || lpad((i % 256)::text, 3, '0'),
                t + (i % 60000) * interval '1 millisecond', i / {SENSORS}, i % 40,
                case when i % 10 = 0 then null else 20 + (i % 900) / 10.0 end, (i % 1000) / 10.0,
                (i % 100) / 100.0, 1 + i % 3, 'G-' || lpad((i % 3000)::text, 4, '0'),
                t + interval '61 seconds', t + interval '62 seconds'
            from generate_series(0, {rows} - 1) i,
                lateral (select timestamp '{HOUR:%Y-%m-%d %H:%M:%S}' + (i / {SENSORS}) * interval '1 minute' as t) m"""
        )


def child(way: str) -> None:
    """One read in this process; its measures as JSON on stdout."""
    started, cpu = time.perf_counter(), time.process_time()
    table = WAYS[way](_warehouse(), Interval.hour(HOUR))
    print(
        json.dumps(
            {
                "rows": table.num_rows,
                "wall": time.perf_counter() - started,
                "cpu": time.process_time() - cpu,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="readings in the hour")
    parser.add_argument("--repeat", type=int, default=2, help="reads per way (alternating); medians reported")
    parser.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    fill(args.rows)
    try:
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for _ in range(args.repeat):
            for way in WAYS:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.warehouse_read_bench", "--child", way],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs[way].append(json.loads(out.stdout))
    finally:
        _admin(DROP)
    copy_wall = statistics.median(r["wall"] for r in runs["COPY"])
    print(f"\nraw.readings of one hour read back from PostgreSQL: {args.rows:,} rows, median of {args.repeat}")
    print("| way | wall s | CPU s | peak MB | wall x COPY |")
    print("|---|---:|---:|---:|---:|")
    for way, results in runs.items():
        assert all(r["rows"] == args.rows for r in results), (way, results)
        wall = statistics.median(r["wall"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        peak = max(r["peak_mb"] for r in results)
        print(f"| {way} | {wall:.2f} | {cpu:.2f} | {peak:,.0f} | {wall / copy_wall:.2f} |")


if __name__ == "__main__":
    main()
