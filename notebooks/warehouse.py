"""One small connection helper for the studies: the same marts, DuckDB locally, PostgreSQL or Redshift.

Place in the flow: the notebooks (and analysts) read the marts `marts.fct_*` / `marts.dim_*`
that dbt builds on every engine under the same schema name. `connect(target)` takes

* a DuckDB file path (or `duckdb:///path`) - the local warehouse, opened read-only;
* `postgresql://user@host:5432/dbname` - the local PostgreSQL option (psycopg2);
* `redshift://user@host:5439/dbname` - Redshift Serverless or a cluster. Redshift
  speaks the PostgreSQL wire protocol: `redshift_connector` is used when it is installed
  (dbt-redshift brings it), else psycopg2 with `sslmode=require`. The user needs SELECT on
  schema `marts` and network access to the workgroup endpoint (VPN/bastion, security group
  on 5439). Query parameters of the URL (`?sslmode=verify-full`) are passed to the driver.

Passwords come from the `PGPASSWORD` environment variable (or a secrets manager that sets
it), never from a URL typed into a command or committed to a notebook.

`Warehouse.query(sql)` returns a pandas DataFrame with numeric (DECIMAL) columns as floats.
Dates in the notebooks go into SQL through `Warehouse.time_range()`, which formats parsed
datetimes as literals (portable across the three engines, and nothing user-typed reaches SQL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pandas as pd

POSTGRES_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg2"}
REDSHIFT_SCHEMES = {"redshift", "redshift+psycopg2", "redshift+redshift_connector"}


@dataclass
class Warehouse:
    """A DB-API connection to one engine and what the notebooks need on top of it."""

    engine: str  # duckdb | postgres | redshift
    connection: Any
    target: str  # what was connected to, without password

    def query(self, sql: str) -> pd.DataFrame:
        cur = self.connection.cursor()
        try:
            cur.execute(sql)
            columns = [d[0] for d in cur.description]
            rows = cur.fetchall()
        finally:
            cur.close()
        frame = pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns)
        for name in frame.columns:
            values = frame[name].dropna()
            if len(values) and all(isinstance(v, Decimal) for v in values):
                frame[name] = frame[name].astype(float)
        return frame

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def time_range(column: str, start: str | date | None, end: str | date | None) -> str:
        """SQL predicate `start <= column < end` (either bound may be empty = open)."""
        parts = []
        for op, bound in ((">=", start), ("<", end)):
            moment = parse_moment(bound)
            if moment is not None:
                parts.append(f"{column} {op} cast('{moment:%Y-%m-%d %H:%M:%S}' as timestamp)")
        return " and ".join(parts) or "1 = 1"


def parse_moment(value: str | date | None) -> datetime | None:
    """An ISO date or datetime (naive = UTC, as the warehouse stores it); '' / None = unbounded."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def connect(target: str | Path) -> Warehouse:
    """Open the warehouse at `target`: a DuckDB path, or a postgresql:// / redshift:// URL."""
    text = str(target)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("", "file", "duckdb") or len(scheme) == 1:  # one letter: a Windows drive
        return _duckdb(Path(unquote(parts.path)) if scheme in ("file", "duckdb") else Path(text))
    if scheme in POSTGRES_SCHEMES | REDSHIFT_SCHEMES:
        params = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or (5439 if scheme in REDSHIFT_SCHEMES else 5432),
            "user": unquote(parts.username or ""),
            "password": unquote(parts.password) if parts.password else os.environ.get("PGPASSWORD", ""),
            "dbname": unquote(parts.path.lstrip("/")) or ("dev" if scheme in REDSHIFT_SCHEMES else "postgres"),
        }
        options = dict(parse_qsl(parts.query))
        shown = f"{scheme}://{params['user']}@{params['host']}:{params['port']}/{params['dbname']}"
        if scheme in REDSHIFT_SCHEMES:
            return _redshift(params, options, shown, prefer_psycopg2=scheme == "redshift+psycopg2")
        return _postgres(params, options, shown)
    raise ValueError(f"unsupported warehouse {text!r}: a DuckDB file path, postgresql://... or redshift://...")


def _duckdb(path: Path) -> Warehouse:
    import duckdb

    if not path.is_file():
        raise FileNotFoundError(f"no DuckDB warehouse at {path}")
    con = duckdb.connect(str(path), read_only=True)
    con.execute("set TimeZone = 'UTC'")
    return Warehouse("duckdb", con, str(path))


def _postgres(params: dict[str, Any], options: dict[str, str], shown: str, engine: str = "postgres") -> Warehouse:
    import psycopg2

    con = psycopg2.connect(connect_timeout=10, **params, **options)
    con.autocommit = True  # read-only studies: no transaction held open between cells
    return Warehouse(engine, con, shown)


def _redshift(params: dict[str, Any], options: dict[str, str], shown: str, prefer_psycopg2: bool) -> Warehouse:
    try:
        if prefer_psycopg2:
            raise ImportError
        import redshift_connector
    except ImportError:
        return _postgres(params, {"sslmode": "require", **options}, shown, engine="redshift")
    con = redshift_connector.connect(
        host=params["host"],
        port=int(params["port"]),
        user=params["user"],
        password=params["password"],
        database=params["dbname"],
        ssl=options.pop("ssl", "true").lower() != "false",
        **options,
    )
    con.autocommit = True
    return Warehouse("redshift", con, shown)
