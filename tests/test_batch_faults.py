"""Batch-path faults (issue #8): a load task killed mid-transaction and retried, and the interval
run again, leave the warehouse exactly as one clean run does.

Integration test through the real `citypulse_hourly` DAG (`airflow dags test`, ministack S3,
Glue and EventBridge) on the local PostgreSQL server, where a second session can hold the
load still in the middle of its transaction:

1. a clean run of the fixture interval - every table of raw, marts and snapshots is recorded;
2. a stray row is put into the interval of `raw.readings` (the next load must delete it);
3. another session locks `raw.quarantine_counts`, and the interval runs again: the load has
   deleted and re-inserted the interval's readings and waits on the lock, uncommitted. The
   test finds the task's process from the session's `application_name` and `kill -9`s it;
4. the lock is released, PostgreSQL aborts the dead session's transaction: the stray row is
   still there, nothing of the killed load is visible;
5. the retry (the interval run again) succeeds, and every table equals the clean run's, row
   for row.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from batch_lake import (
    INTERVAL_START,
    PG,
    FixtureLake,
    ministack_env,
    postgres_database,
    s3_client,
    unique_name,
    write_fixture_lake,
)

from infra.local.airflow import AirflowRunError, HourlyRun, run_hourly
from infra.local.emulators import Emulator

pytestmark = pytest.mark.integration

DEADLINE_S = 300


def _connect(dbname: str) -> Any:
    return psycopg2.connect(dbname=dbname, connect_timeout=5, **PG)


def _snapshot(dbname: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every base table of raw, marts and snapshots, all rows in a stable order."""
    con = _connect(dbname)
    try:
        with con.cursor() as cur:
            cur.execute(
                "select table_schema || '.' || table_name from information_schema.tables "
                "where table_type = 'BASE TABLE' and table_schema in ('raw', 'marts', 'snapshots') order by 1"
            )
            tables = [name for (name,) in cur.fetchall()]
            out = {}
            for table in tables:
                cur.execute(f"select * from {table}")
                out[table] = sorted(cur.fetchall(), key=repr)
        return out
    finally:
        con.close()


def _wait_for(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)  # polling another process's progress, with a deadline
    raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")


@pytest.fixture(scope="module")
def setup(ministack: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str, Path]]:
    base = ministack_env(ministack)
    lake: FixtureLake = write_fixture_lake(s3_client(base), unique_name("lake-faults"))
    with postgres_database("citypulse_faults") as dbname:
        env = {
            **base,
            "CITYPULSE_LAKE_BUCKET": lake.bucket,
            "CITYPULSE_GLUE_CRAWLER": unique_name("crawler-faults"),
            "AIRFLOW_CONN_CITYPULSE_WAREHOUSE": json.dumps(
                {"conn_type": "postgres", "host": PG["host"], "port": PG["port"], "login": PG["user"], "schema": dbname}
            ),
        }
        yield env, dbname, tmp_path_factory.mktemp("faults") / "airflow"


def _explain(run: HourlyRun) -> str:
    return f"{run.state} {run.task_states}\n{run.log_tail()}"


def test_load_killed_mid_transaction_and_retried_leaves_the_warehouse_of_one_clean_run(setup) -> None:
    env, dbname, home = setup
    clean_run = run_hourly(INTERVAL_START, env, home)
    assert clean_run.succeeded, _explain(clean_run)
    clean = _snapshot(dbname)
    assert clean["raw.readings"] and clean["marts.fct_zone_traffic_15min"] and clean["marts.dim_sensors"]

    con = _connect(dbname)
    try:
        with con, con.cursor() as cur:
            cur.execute(
                "insert into raw.readings select sensor_id, zone_id, ts, 999999 as seq, vehicle_count, avg_speed_kmh, "
                "occupancy_pct, congestion_index, lane, gateway_id, received_at, processed_at "
                "from raw.readings order by sensor_id, seq limit 1"
            )
    finally:
        con.close()
    with_stray = _snapshot(dbname)
    assert len(with_stray["raw.readings"]) == len(clean["raw.readings"]) + 1

    blocker = _connect(dbname)
    # pg_stat_activity is a snapshot per transaction: watch from outside the lock's transaction.
    watcher = _connect(dbname)
    watcher.autocommit = True
    outcome: dict[str, Any] = {}

    def second_run() -> None:
        try:
            outcome["run"] = run_hourly(INTERVAL_START, env, home)
        except AirflowRunError as exc:  # killed before Airflow recorded anything useful
            outcome["error"] = exc

    try:
        with blocker.cursor() as cur:
            cur.execute("lock table raw.quarantine_counts in access exclusive mode")
        thread = threading.Thread(target=second_run)
        thread.start()

        def waiting_load() -> tuple[int, str] | None:
            with watcher.cursor() as cur:
                cur.execute(
                    "select pid, application_name from pg_stat_activity where datname = %s "
                    "and wait_event_type = 'Lock' and query like 'delete from raw.quarantine_counts%%'",
                    (dbname,),
                )
                row = cur.fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        backend, application = _wait_for(waiting_load, "the load to wait on the quarantine_counts lock")
        match = re.fullmatch(r"citypulse_batch pid=(\d+)", application)
        assert match, application
        task_pid = int(match[1])
        os.killpg(os.getpgid(task_pid), signal.SIGKILL)
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive()
    finally:
        blocker.rollback()  # releases the lock: the dead session's transaction goes on, then aborts

    def gone() -> bool:
        with watcher.cursor() as cur:
            cur.execute("select count(*) from pg_stat_activity where pid = %s", (backend,))
            return cur.fetchone()[0] == 0

    try:
        _wait_for(gone, "PostgreSQL to end the killed load's session")
    finally:
        blocker.close()
        watcher.close()
    killed = outcome.get("run")
    assert "error" in outcome or (killed is not None and not killed.succeeded)
    # Nothing of the killed load is visible: its delete died with its transaction.
    assert _snapshot(dbname) == with_stray

    retry = run_hourly(INTERVAL_START, env, home)
    assert retry.succeeded, _explain(retry)
    assert retry.task_states["load_warehouse"] == "success"
    after = _snapshot(dbname)
    assert after.keys() == clean.keys()
    for table, rows in clean.items():
        assert after[table] == rows, table
