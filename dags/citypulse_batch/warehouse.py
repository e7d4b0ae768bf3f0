"""The warehouse's raw layer: load one interval of the lake, idempotently, into any engine.

Place in the flow: third step of the hourly DAG, after the partition sensor and the Glue
crawler, before `dbt build`. One adapter per engine, chosen by the type of the Airflow
connection `citypulse_warehouse` (configuration, not code paths):

* ``duckdb``  - local default; reads the lake's Parquet and CSV straight from S3 with httpfs,
  configured from the same boto3 client the provider uses (endpoint, keys, path-style).
* ``postgres`` - option; Parquet read with pyarrow through that client, `COPY FROM STDIN`.
* ``redshift`` - AWS; one `COPY ... FORMAT AS PARQUET MANIFEST` of the listed files, with the
  cluster's IAM role, through the Amazon provider's `RedshiftSQLHook`.

Whatever the engine, a load is one transaction: stage the interval's files (temporary tables
copied into; on DuckDB temporary views over the Parquet, read once by the insert), delete
exactly `[start, end)` by `ts` from `raw.readings`, insert the staged rows
deduplicated on (`sensor_id`, `seq`), replace the registry tables and the interval's
quarantine counts (counted from three columns of the quarantine files: `quarantine_counts`).
Running it twice leaves the same tables. The DDL of `raw.readings` comes
from `streaming.contract.warehouse_columns()`, the registry's from `streaming.registry`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from citypulse_batch.lake import (
    LOAD_MANIFESTS_PREFIX,
    PARTITION_RE,
    SENSOR_REGISTRY_KEY,
    ZONES_KEY,
    Interval,
    Lake,
    list_partitions,
    quarantine_prefixes,
    readings_prefixes,
    sql_timestamp,
)
from streaming.contract import KEY_FIELDS, lake_arrow_schema, warehouse_columns
from streaming.registry import Sensor, Zone

RAW_SCHEMA = "raw"
# Rows fetched and converted to Arrow at a time (`Warehouse._query_arrow`).
READ_BATCH_ROWS = 100_000

Column = tuple[str, str, bool]  # name, SQL type, nullable

_PY_SQL_TYPES = {"str": "varchar(256)", "int": "bigint", "float": "double precision"}


def _quote(value: str) -> str:
    """A string literal for DuckDB and PostgreSQL, whose literals take a backslash as itself."""
    return "'" + value.replace("'", "''") + "'"


def _redshift_quote(value: str) -> str:
    """A string literal for Redshift, which reads a backslash in one as an escape: doubled as
    its own QUOTE_LITERAL does, else a value ending in a backslash would end the literal early."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quarantine_counts(lake: Lake, keys: Sequence[str], interval: Interval) -> list[tuple[datetime, str, int]]:
    """(receive hour, reason code, quarantined) of the interval's quarantine files, a redelivered
    record counted once (it keeps its `source_id`), in hour and reason order.

    Counted here, from three columns of each file, rather than by staging the files in the
    warehouse: a quarantined message keeps its whole payload in `raw` (base64; up to 128 KB of
    MQTT payload), which outgrows Redshift's widest varchar (65,535 bytes), and Redshift's
    Parquet COPY must load every column and cannot truncate. One rejected message then failed
    its hour's load on Redshift and PostgreSQL, every retry alike (found by a review)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from streaming.parquet import read_parquet

    if not keys:
        return []
    table = pa.concat_tables(
        read_parquet(lake.read(key), columns=["received_at", "reason_code", "source_id"]) for key in keys
    )
    received = table["received_at"]
    start = pa.scalar(interval.start, received.type)
    end = pa.scalar(interval.end, received.type)
    table = table.filter(pc.and_(pc.greater_equal(received, start), pc.less(received, end)))
    table = table.append_column("hour", pc.floor_temporal(table["received_at"], unit="hour"))
    grouped = table.group_by(["hour", "reason_code"]).aggregate([("source_id", "count_distinct")])
    rows = zip(
        grouped["hour"].to_pylist(),
        grouped["reason_code"].to_pylist(),
        grouped["source_id_count_distinct"].to_pylist(),
        strict=True,
    )
    return sorted((hour, reason, int(count)) for hour, reason, count in rows)


def registry_columns(record: type) -> list[Column]:
    """Columns of a registry table, from the registry's record dataclass (the CSV header)."""
    return [(f.name, _PY_SQL_TYPES[str(f.type)], False) for f in dataclasses.fields(record)]


READINGS_COLUMNS: list[Column] = warehouse_columns()
QUARANTINE_COUNTS_COLUMNS: list[Column] = [
    ("received_hour", "timestamp", False),
    ("reason_code", "varchar(256)", False),
    ("quarantined_count", "bigint", False),
]
RAW_TABLES: dict[str, list[Column]] = {
    "readings": READINGS_COLUMNS,
    "sensor_registry": registry_columns(Sensor),
    "zones": registry_columns(Zone),
    "quarantine_counts": QUARANTINE_COUNTS_COLUMNS,
}


def create_table_sql(name: str, columns: Sequence[Column], *, temporary: bool = False) -> str:
    body = ",\n    ".join(f"{col} {sql_type}{'' if nullable else ' not null'}" for col, sql_type, nullable in columns)
    kind = "temporary table" if temporary else "table if not exists"
    return f"create {kind} {name} (\n    {body}\n)"


def _names(columns: Sequence[Column]) -> str:
    return ", ".join(col for col, _, _ in columns)


@dataclass(slots=True)
class LoadSummary:
    """What one interval's load did; small enough for XCom and the run report."""

    interval: dict[str, str]
    engine: str
    reading_files: int
    rows_in_files: int
    rows_outside_interval: int
    rows_loaded: int
    duplicates_dropped: int
    quarantine_files: int
    quarantined: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    sensors: int = 0
    zones: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def readings_arrow_schema() -> Any:
    """The Arrow schema of `raw.readings` rows read back: the contract's types, timestamps UTC
    without zone, as the warehouse stores them."""
    import pyarrow as pa

    return pa.schema(
        [pa.field(f.name, pa.timestamp("ms") if pa.types.is_timestamp(f.type) else f.type) for f in lake_arrow_schema()]
    )


def bucket_counts_schema() -> Any:
    """The Arrow schema of a reconciliation side (`read_raw_bucket_counts`, `read_bucket_counts`):
    per entity (sensor or zone) and bucket start (UTC without zone), its readings and vehicles."""
    import pyarrow as pa

    return pa.schema(
        [
            ("entity_id", pa.string()),
            ("bucket_start", pa.timestamp("us")),
            ("reading_count", pa.int64()),
            ("vehicle_count", pa.int64()),
        ]
    )


# The checkpoint's order of an interval's readings: the same failure examples on every run.
READINGS_ORDER = ", ".join(KEY_FIELDS)


class Warehouse(ABC):
    """One warehouse engine. Subclasses stage lake files; the merge SQL is shared."""

    engine: ClassVar[str]
    # An engine whose scan of one table returns rows in the order they were inserted stores an
    # interval's readings in the checkpoint's order (`READINGS_ORDER`) and reads them back
    # without sorting. Elsewhere the read sorts them.
    stores_in_read_order: ClassVar[bool] = False

    @property
    def dbt_target(self) -> str:
        return self.engine

    @abstractmethod
    def dbt_env(self) -> dict[str, str]:
        """Environment the dbt profile (dbt_project/profiles.yml) reads for this engine."""

    @abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A DB-API cursor inside one transaction: committed on success, rolled back on error."""

    def _stage_parquet(self, cur: Any, table: str, lake: Lake, keys: list[str], columns: Sequence[Column]) -> None:
        """Append the rows of the lake's Parquet files to a staging table (engines that stage by copying)."""
        raise NotImplementedError(f"{type(self).__name__} stages Parquet through its own _stage_files")

    @abstractmethod
    def _stage_csv(self, cur: Any, table: str, lake: Lake, key: str, columns: Sequence[Column]) -> None:
        """Append the rows of a lake CSV file (with header) to a staging table."""

    def _staging_table(self, cur: Any, name: str, columns: Sequence[Column]) -> None:
        cur.execute(f"drop table if exists {name}")
        cur.execute(create_table_sql(name, columns, temporary=True))

    def _stage_files(self, cur: Any, name: str, lake: Lake, keys: list[str], columns: Sequence[Column]) -> None:
        """A staging relation `name` holding the rows of the lake's Parquet files: a temporary table, copied into."""
        self._staging_table(cur, name, columns)
        if keys:
            self._stage_parquet(cur, name, lake, keys, columns)

    def existing_tables(self, cur: Any) -> set[str]:
        """`schema.table` of every base table (information_schema: the same on all three engines)."""
        cur.execute("select table_schema, table_name from information_schema.tables where table_type = 'BASE TABLE'")
        return {f"{schema}.{name}" for schema, name in cur.fetchall()}

    def reclaim(self, tables: list[str]) -> bool:
        """Give back the space of deleted rows, where the engine needs telling; True if it did."""
        return False

    def ensure_raw_tables(self, cur: Any) -> None:
        cur.execute(f"create schema if not exists {RAW_SCHEMA}")
        for table, columns in RAW_TABLES.items():
            cur.execute(create_table_sql(f"{RAW_SCHEMA}.{table}", columns))

    # How a load holds `raw.readings` until it commits, so that two loads of one hour (runs
    # overlap: a backfill's beside the scheduled one, a later hour's look back) take turns: each
    # deletes what the other inserted. Without it, under READ COMMITTED, the second's delete
    # misses the first's uncommitted rows and the hour holds every reading twice (found by a
    # review). Every load takes it first, so the other raw tables are held in turn as well.
    # None: the engine has one writer at a time anyway (DuckDB).
    lock_raw_sql: str | None = None
    # A string literal of this engine's SQL.
    quote: ClassVar[Callable[[str], str]] = staticmethod(_quote)

    def load(self, interval: Interval, lake: Lake, listing: Mapping[str, Sequence[str]] | None = None) -> LoadSummary:
        """Replace the interval in `raw.readings` and `raw.quarantine_counts`, and the registry.

        `listing`: the objects to read, by partition prefix (`list_partitions`), when the caller
        keeps a record of what was loaded (`citypulse_batch.ledger`); listed here when None."""
        if listing is None:
            listing = list_partitions(lake, interval)
        reading_keys = [k for p in readings_prefixes(interval) for k in listing[p]]
        quarantine_keys = [k for p in quarantine_prefixes(interval) for k in listing[p]]
        start, end = interval.sql_bounds()
        in_interval = f"ts >= {start} and ts < {end}"
        cols = _names(READINGS_COLUMNS)
        key = ", ".join(KEY_FIELDS)

        with self.transaction() as cur:
            self.ensure_raw_tables(cur)
            if self.lock_raw_sql:
                cur.execute(self.lock_raw_sql)
            self._stage_files(cur, "stage_readings", lake, reading_keys, READINGS_COLUMNS)
            self._staging_table(cur, "stage_sensor_registry", RAW_TABLES["sensor_registry"])
            self._staging_table(cur, "stage_zones", RAW_TABLES["zones"])
            self._stage_csv(cur, "stage_sensor_registry", lake, SENSOR_REGISTRY_KEY, RAW_TABLES["sensor_registry"])
            self._stage_csv(cur, "stage_zones", lake, ZONES_KEY, RAW_TABLES["zones"])

            cur.execute(
                f"select count(*), coalesce(sum(case when {in_interval} then 1 else 0 end), 0) from stage_readings"
            )
            rows_in_files, rows_in_interval = (int(v) for v in cur.fetchone())

            cur.execute(f"delete from {RAW_SCHEMA}.readings where {in_interval}")
            # A redelivered Kinesis record lands twice: keep its first processing, deterministically.
            cur.execute(
                f"insert into {RAW_SCHEMA}.readings ({cols})\n"
                f"select {cols} from (\n"
                f"    select {cols}, row_number() over (\n"
                f"        partition by {key} order by processed_at, received_at, gateway_id\n"
                f"    ) as copy_rank\n"
                f"    from stage_readings\n"
                f"    where {in_interval}\n"
                f") ranked\n"
                f"where copy_rank = 1" + (f"\norder by {READINGS_ORDER}" if self.stores_in_read_order else "")
            )
            cur.execute(f"select count(*) from {RAW_SCHEMA}.readings where {in_interval}")
            rows_loaded = int(cur.fetchone()[0])

            cur.execute(
                f"delete from {RAW_SCHEMA}.quarantine_counts where received_hour >= {start} and received_hour < {end}"
            )
            counted = quarantine_counts(lake, quarantine_keys, interval)
            if counted:
                values = ",\n".join(
                    f"({sql_timestamp(hour)}, {self.quote(reason)}, {count})" for hour, reason, count in counted
                )
                cur.execute(
                    f"insert into {RAW_SCHEMA}.quarantine_counts ({_names(QUARANTINE_COUNTS_COLUMNS)}) values\n{values}"
                )
            cur.execute(
                f"select reason_code, sum(quarantined_count) from {RAW_SCHEMA}.quarantine_counts "
                f"where received_hour >= {start} and received_hour < {end} group by reason_code"
            )
            by_reason = {str(reason): int(count) for reason, count in cur.fetchall()}

            counts = {}
            for table in ("sensor_registry", "zones"):
                names = _names(RAW_TABLES[table])
                cur.execute(f"delete from {RAW_SCHEMA}.{table}")
                cur.execute(f"insert into {RAW_SCHEMA}.{table} ({names}) select {names} from stage_{table}")
                cur.execute(f"select count(*) from {RAW_SCHEMA}.{table}")
                counts[table] = int(cur.fetchone()[0])

        return LoadSummary(
            interval=interval.to_json(),
            engine=self.engine,
            reading_files=len(reading_keys),
            rows_in_files=rows_in_files,
            rows_outside_interval=rows_in_files - rows_in_interval,
            rows_loaded=rows_loaded,
            duplicates_dropped=rows_in_interval - rows_loaded,
            quarantine_files=len(quarantine_keys),
            quarantined=sum(by_reason.values()),
            quarantined_by_reason=dict(sorted(by_reason.items())),
            sensors=counts["sensor_registry"],
            zones=counts["zones"],
        )

    def readings_query(self, interval: Interval) -> str:
        """The interval's rows of `raw.readings` in the checkpoint's order: sorted, unless this
        engine keeps them in it (`stores_in_read_order`)."""
        start, end = interval.sql_bounds()
        order = "" if self.stores_in_read_order else f" order by {READINGS_ORDER}"
        return f"select {_names(READINGS_COLUMNS)} from {RAW_SCHEMA}.readings where ts >= {start} and ts < {end}{order}"

    def read_readings(self, interval: Interval) -> Any:
        """The interval's rows of `raw.readings` as a pyarrow Table, for the quality checkpoint."""
        return self._query_arrow(self.readings_query(interval), readings_arrow_schema())

    def _query_arrow(self, sql: str, schema: Any) -> Any:
        """A query's rows as a pyarrow Table of `schema` (its columns in the query's order).

        Fetched `READ_BATCH_ROWS` at a time, each batch turned into Arrow a column at a time:
        the Python values of a city-hour (3 M rows) never exist all at once. Fetched whole and
        converted through a dict per row, they took 30 s and 4.4 GB on PostgreSQL; this way
        24 s and 1.5 GB (docs/performance.md, "Batch"). PostgreSQL itself reads the readings
        through COPY; DuckDB hands Arrow over natively."""
        import pyarrow as pa

        # DB-API drivers return typed Python values (int, float, str, naive datetime).
        batches = []
        with self.transaction() as cur:
            cur.execute(sql)
            while rows := cur.fetchmany(READ_BATCH_ROWS):
                columns = zip(*rows, strict=True)
                arrays = [pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)]
                batches.append(pa.record_batch(arrays, schema=schema))
        return pa.Table.from_batches(batches, schema=schema)

    def read_raw_bucket_counts(self, bucket_starts: Sequence[datetime], minutes: int, entity: str) -> Any:
        """`raw.readings` counted per entity and bucket: a pyarrow Table of `bucket_counts_schema()`.

        The raw side of the marts reconciliation, computed where the rows are and independently
        of the dbt models: the buckets are literal [start, start + minutes) ranges (portable SQL
        on all three engines), not the models' bucketing expressions.
        """
        step = timedelta(minutes=minutes)
        spine = "\n    union all ".join(
            f"select {sql_timestamp(b)} as bucket_start, {sql_timestamp(b + step)} as bucket_end" for b in bucket_starts
        )
        start, end = sql_timestamp(bucket_starts[0]), sql_timestamp(bucket_starts[-1] + step)
        return self._query_arrow(
            f"select r.{entity}, b.bucket_start, count(*), coalesce(sum(r.vehicle_count), 0)\n"
            f"from {RAW_SCHEMA}.readings r\n"
            f"join (\n    {spine}\n) b on r.ts >= b.bucket_start and r.ts < b.bucket_end\n"
            f"where r.ts >= {start} and r.ts < {end}\n"
            f"group by r.{entity}, b.bucket_start\n"
            f"order by 1, 2",
            bucket_counts_schema(),
        )

    def read_bucket_counts(self, interval: Interval, relation: str, entity: str, bucket: str) -> Any:
        """A traffic mart's buckets inside the interval: a pyarrow Table of `bucket_counts_schema()`."""
        start, end = interval.sql_bounds()
        return self._query_arrow(
            f"select {entity}, {bucket}, reading_count, vehicle_count from {relation} "
            f"where {bucket} >= {start} and {bucket} < {end} order by {entity}, {bucket}",
            bucket_counts_schema(),
        )


# --- DuckDB -------------------------------------------------------------------------------


def _httpfs_extension() -> str:
    """Path of the httpfs extension shipped as a wheel: DuckDB's own download would need network."""
    import importlib.resources

    import duckdb

    path = (
        importlib.resources.files("duckdb_extension_httpfs")
        / "extensions"
        / f"v{duckdb.__version__}"
        / "httpfs.duckdb_extension"
    )
    return str(path)


def duckdb_s3_secret_sql(lake: Lake) -> str:
    """`CREATE SECRET` giving DuckDB the lake exactly as the boto3 client sees it."""
    endpoint = urlsplit(lake.endpoint_url)
    options = {
        "type": "s3",
        "region": _quote(lake.region),
        "endpoint": _quote(endpoint.netloc),
        "use_ssl": "true" if endpoint.scheme == "https" else "false",
        # Emulators and IP endpoints cannot serve virtual-hosted buckets; AWS can.
        "url_style": _quote("vhost" if endpoint.hostname and endpoint.hostname.endswith(".amazonaws.com") else "path"),
    }
    if lake.credentials is not None:
        options["key_id"] = _quote(lake.credentials.access_key)
        options["secret"] = _quote(lake.credentials.secret_key)
        if lake.credentials.token:
            options["session_token"] = _quote(lake.credentials.token)
    body = ", ".join(f"{k} {v}" for k, v in options.items())
    return f"create or replace temporary secret citypulse_lake ({body})"


def _duckdb_cast(column: str, sql_type: str) -> str:
    """`column` of a lake file as `sql_type`, in DuckDB.

    The lake's timestamps are UTC instants (Parquet `isAdjustedToUTC`), which DuckDB reads as
    TIMESTAMPTZ; a cast to TIMESTAMP converts each value through the session's time zone, even
    UTC. Rebuilt from its epoch microseconds it is the same value (ms precision), much cheaper:
    3 M readings' dedupe insert 3.1 s -> 2.2 s (docs/performance.md, Batch).
    """
    if sql_type == "timestamp":
        return f"make_timestamp(epoch_us({column}))"
    return f"cast({column} as {sql_type})"


class DuckDBWarehouse(Warehouse):
    engine = "duckdb"
    # DuckDB guarantees a single-table scan's rows in insertion order ("Order Preservation" in
    # its SQL dialect docs), and an `INSERT ... ORDER BY` inserts them in that order. The sorted
    # insert costs little (within the noise at 3 M rows, ~0.7 s at 12 M) against the sort the
    # read no longer does (~0.4 s and 3-4 s) (docs/performance.md, "Batch").
    stores_in_read_order = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def dbt_env(self) -> dict[str, str]:
        return {"CITYPULSE_DUCKDB_PATH": str(self.path)}

    def connect(self) -> Any:
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path))
        # Parquet timestamps are UTC instants; the warehouse stores them as UTC without zone.
        con.execute("set TimeZone = 'UTC'")
        return con

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        con = self.connect()
        try:
            con.execute("begin transaction")
            try:
                yield con
            except BaseException:
                con.execute("rollback")
                raise
            con.execute("commit")
        finally:
            con.close()

    def reclaim(self, tables: list[str]) -> bool:
        # DuckDB reuses freed blocks; a checkpoint writes the deletions to the file.
        con = self.connect()
        try:
            con.execute("checkpoint")
        finally:
            con.close()
        return True

    def _with_s3(self, cur: Any, lake: Lake) -> None:
        cur.execute(f"load {_quote(_httpfs_extension())}")
        cur.execute(duckdb_s3_secret_sql(lake))

    def _stage_files(self, cur: Any, name: str, lake: Lake, keys: list[str], columns: Sequence[Column]) -> None:
        # DuckDB reads Parquet where it lies: the staging relation is a view over the files, so
        # the dedupe insert reads them once instead of after a copy into a staging table
        # (docs/performance.md, Batch). No files: a view with the columns and no rows.
        if keys:
            self._with_s3(cur, lake)
            typed = ", ".join(f"{_duckdb_cast(col, sql_type)} as {col}" for col, sql_type, _ in columns)
            files = ", ".join(_quote(lake.uri(k)) for k in keys)
            source = f"select {typed} from read_parquet([{files}])"
        else:
            source = f"select {', '.join(f'cast(null as {t}) as {col}' for col, t, _ in columns)} where false"
        cur.execute(f"create or replace temporary view {name} as {source}")

    def _stage_csv(self, cur: Any, table: str, lake: Lake, key: str, columns: Sequence[Column]) -> None:
        self._with_s3(cur, lake)
        types = ", ".join(f"{_quote(col)}: {_quote(sql_type)}" for col, sql_type, _ in columns)
        names = _names(columns)
        cur.execute(
            f"insert into {table} ({names}) select {names} from "
            f"read_csv({_quote(lake.uri(key))}, header = true, columns = {{{types}}})"
        )

    def _arrow(self, sql: str) -> Any:
        # DuckDB hands Arrow over natively: fetched through Python tuples, the reconciliation's
        # ~400,000 bucket counts of a city-hour cost ~0.7 s more (docs/performance.md, "Batch").
        with self.transaction() as con:
            return con.execute(sql).to_arrow_table()

    def read_readings(self, interval: Interval) -> Any:
        # With the table's own column types.
        return self._arrow(self.readings_query(interval))

    def _query_arrow(self, sql: str, schema: Any) -> Any:
        return self._arrow(sql).rename_columns(schema.names).cast(schema)


# --- PostgreSQL ---------------------------------------------------------------------------


class PostgresWarehouse(Warehouse):
    engine = "postgres"
    # Blocks another load's writes (and this lock), not the readers. Redshift's LOCK blocks
    # reads too: a daily build reading raw waits out a load.
    lock_raw_sql = f"lock table {RAW_SCHEMA}.readings in share row exclusive mode"

    def __init__(self, host: str, port: int, user: str, password: str, dbname: str) -> None:
        self.params = {"host": host, "port": port, "user": user, "password": password, "dbname": dbname}

    def dbt_env(self) -> dict[str, str]:
        p = self.params
        return {
            "CITYPULSE_PG_HOST": str(p["host"]),
            "CITYPULSE_PG_PORT": str(p["port"]),
            "CITYPULSE_PG_USER": str(p["user"]),
            "CITYPULSE_PG_PASSWORD": str(p["password"]),
            "CITYPULSE_PG_DBNAME": str(p["dbname"]),
        }

    def connect(self) -> Any:
        import psycopg2

        # The application name says which process holds a session (pg_stat_activity): an
        # operator finds the task behind a lock or a long transaction.
        return psycopg2.connect(
            **self.params,
            connect_timeout=10,
            options="-c TimeZone=UTC",
            application_name=f"citypulse_batch pid={os.getpid()}",
        )

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        con = self.connect()
        try:
            # psycopg2's connection context manager commits or rolls back (it does not close).
            with con, con.cursor() as cur:
                yield cur
        finally:
            con.close()

    def reclaim(self, tables: list[str]) -> bool:
        if not tables:
            return False
        con = self.connect()
        try:
            con.autocommit = True  # VACUUM cannot run inside a transaction
            with con.cursor() as cur:
                for table in tables:
                    cur.execute(f"vacuum analyze {table}")
        finally:
            con.close()
        return True

    def read_readings(self, interval: Interval) -> Any:
        """`Warehouse.read_readings` through `COPY ... TO STDOUT` as CSV into a temporary file,
        parsed by Arrow's CSV reader: no Python value per row. A city-hour (3 M rows) in 7 s
        and 440 MB, against 24 s and 1.5 GB through the cursor (`bench.warehouse_read_bench`)."""
        import pyarrow.csv as pacsv

        schema = readings_arrow_schema()
        with tempfile.TemporaryDirectory(prefix="citypulse-readings-") as scratch:
            path = Path(scratch) / "readings.csv"
            with path.open("wb") as out, self.transaction() as cur:
                cur.copy_expert(f"copy ({self.readings_query(interval)}) to stdout with (format csv, header true)", out)
            # From the path, not a Python file object (streaming/parquet.py says why). A null
            # is an empty field: null for the numbers; the text columns are never null.
            return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=schema))

    def _copy_csv(self, cur: Any, table: str, columns: Sequence[Column], data: bytes) -> None:
        cur.copy_expert(f"copy {table} ({_names(columns)}) from stdin with (format csv, header true)", io.BytesIO(data))

    def _stage_parquet(self, cur: Any, table: str, lake: Lake, keys: list[str], columns: Sequence[Column]) -> None:
        import pyarrow.csv as pacsv

        from streaming.parquet import read_parquet

        names = [col for col, _, _ in columns]
        for key in keys:
            data = read_parquet(lake.read(key), columns=names)
            buf = io.BytesIO()
            # Timestamps print as UTC ("...Z"); PostgreSQL drops the zone for `timestamp` columns.
            pacsv.write_csv(data, buf)
            self._copy_csv(cur, table, columns, buf.getvalue())

    def _stage_csv(self, cur: Any, table: str, lake: Lake, key: str, columns: Sequence[Column]) -> None:
        self._copy_csv(cur, table, columns, lake.read(key))


# --- Redshift -----------------------------------------------------------------------------


class RedshiftWarehouse(Warehouse):
    """Redshift through the Amazon provider's hook; the lake is read by COPY with an IAM role.

    The role ARN comes from the connection's extra `copy_iam_role` (the workgroup must have
    it attached); without it COPY uses the namespace's default IAM role (`iam_role default`,
    which the CloudFormation template sets). COPY maps Parquet columns by position, and the
    staging tables share the contract's column order with the lake files.
    """

    engine = "redshift"
    lock_raw_sql = f"lock {RAW_SCHEMA}.readings"
    quote = staticmethod(_redshift_quote)

    def __init__(self, conn_id: str, copy_iam_role: str | None, dbt_params: dict[str, str]) -> None:
        self.conn_id = conn_id
        self.copy_iam_role = copy_iam_role
        self.dbt_params = dbt_params

    @property
    def _iam_role(self) -> str:
        return "iam_role default" if not self.copy_iam_role else f"iam_role {_redshift_quote(self.copy_iam_role)}"

    def dbt_env(self) -> dict[str, str]:
        return {f"CITYPULSE_REDSHIFT_{k.upper()}": v for k, v in self.dbt_params.items()}

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        from airflow.providers.amazon.aws.hooks.redshift_sql import RedshiftSQLHook

        con = RedshiftSQLHook(redshift_conn_id=self.conn_id).get_conn()
        try:
            cur = con.cursor()
            try:
                yield cur
            except BaseException:
                con.rollback()
                raise
            con.commit()
        finally:
            con.close()

    def reclaim(self, tables: list[str]) -> bool:
        # Redshift reclaims in the background too; DELETE ONLY skips the re-sort. Untested here.
        from airflow.providers.amazon.aws.hooks.redshift_sql import RedshiftSQLHook

        if not tables:
            return False
        hook = RedshiftSQLHook(redshift_conn_id=self.conn_id)
        hook.run([f"vacuum delete only {table}" for table in tables], autocommit=True)
        return True

    def _stage_parquet(self, cur: Any, table: str, lake: Lake, keys: list[str], columns: Sequence[Column]) -> None:
        # Exactly the listed files (a prefix would also pick up any stray object, and the list
        # is what the summary counts), in one COPY from a manifest: one COPY per file, as
        # before, ran an hour's ~14,000 processor objects one after another, which Redshift
        # serialises ("much slower"; found by a review). A Parquet manifest must give each
        # file's size: taken from listing the files' partitions.
        sizes: dict[str, int] = {}
        for prefix in sorted({key.rsplit("/", 1)[0] + "/" for key in keys}):
            sizes.update(lake.list_objects(prefix))
        missing = [key for key in keys if key not in sizes]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed lake files are gone, e.g. {lake.uri(missing[0])}")
        partition = PARTITION_RE.search(keys[0])
        manifest = (
            f"{LOAD_MANIFESTS_PREFIX}{partition.group(0) if partition else ''}{table}-{uuid.uuid4().hex}.manifest"
        )
        lake.write_json(
            manifest,
            {
                "entries": [
                    {"url": lake.uri(key), "mandatory": True, "meta": {"content_length": sizes[key]}} for key in keys
                ]
            },
        )
        try:
            cur.execute(
                f"copy {table} from {_redshift_quote(lake.uri(manifest))} {self._iam_role} format as parquet manifest"
            )
        finally:
            lake.delete([manifest])

    def _stage_csv(self, cur: Any, table: str, lake: Lake, key: str, columns: Sequence[Column]) -> None:
        cur.execute(
            f"copy {table} ({_names(columns)}) from {_redshift_quote(lake.uri(key))} "
            f"{self._iam_role} format as csv ignoreheader 1"
        )


# --- selection by connection type -----------------------------------------------------------


def _duckdb(conn: Any) -> Warehouse:
    # `duckdb:///abs/path.duckdb` parses to schema "abs/path.duckdb"; extra {"path": ...} also works.
    path = conn.extra_dejson.get("path") or conn.schema
    if not path:
        raise ValueError(
            f'connection {conn.conn_id!r}: give the DuckDB file as duckdb:///<absolute path> or extra {{"path": ...}}'
        )
    return DuckDBWarehouse(Path("/" + str(path).lstrip("/")))


def _postgres(conn: Any) -> Warehouse:
    return PostgresWarehouse(
        host=conn.host or "127.0.0.1",
        port=int(conn.port or 5432),
        user=conn.login or "postgres",
        password=conn.password or "",
        dbname=conn.schema or "postgres",
    )


def _redshift(conn: Any) -> Warehouse:
    # The connection authenticates with IAM (extra `iam`, `is_serverless`, `serverless_work_group`,
    # as the CloudFormation template writes it); dbt's profile gets the same endpoint and
    # workgroup and authenticates the same way (profiles.yml, `method: iam_role`).
    extra = conn.extra_dejson
    params = {
        "host": conn.host or "",
        "port": str(conn.port or 5439),
        "dbname": conn.schema or "",
        "region": str(extra.get("region") or extra.get("region_name") or ""),
        "is_serverless": str(bool(extra.get("is_serverless", True))),  # "True"/"False": what as_bool reads
        "workgroup": str(extra.get("serverless_work_group") or ""),
    }
    return RedshiftWarehouse(conn.conn_id, extra.get("copy_iam_role"), params)


ADAPTERS: dict[str, Callable[[Any], Warehouse]] = {
    "duckdb": _duckdb,
    "postgres": _postgres,
    "postgresql": _postgres,
    "redshift": _redshift,
}


def warehouse_from_connection(conn: Any) -> Warehouse:
    """The adapter for an Airflow connection (anything with conn_type, host, schema, login, ...)."""
    conn_type = (conn.conn_type or "").lower()
    try:
        factory = ADAPTERS[conn_type]
    except KeyError:
        raise ValueError(
            f"connection {conn.conn_id!r} has type {conn_type!r}; the warehouse needs one of {sorted(ADAPTERS)}"
        ) from None
    return factory(conn)
