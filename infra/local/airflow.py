"""Run the real `citypulse_hourly` DAG locally, for one interval, with `airflow dags test`.

Place in the flow: the local platform's CLI calls `run_hourly` once the streaming path has
landed an hour of readings in the (emulated) S3 lake. Airflow runs the same DAG file as
MWAA; only configuration differs: a SQLite metadata DB under `airflow_home`, connections
from `AIRFLOW_CONN_*` variables (DuckDB warehouse, `aws_default` reaching the emulators via
the `AWS_ENDPOINT_URL_*` variables in `env`), settings from `CITYPULSE_*` variables.

`airflow dags test` runs every task in one process, no scheduler or executor; the metadata
DB is migrated once per `airflow_home` (cached by a marker file, ~11 s). The run's output
goes to a log file; task states are read back from the metadata DB, and the run report
from the lake, so the summary is the same one AWS runs produce.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
DAG_ID = "citypulse_hourly"
DAILY_DAG_ID = "citypulse_daily"
# Locally the crawler's role is never assumed (the emulator does not check it), but the
# Glue API requires one.
LOCAL_CRAWLER_ROLE = "arn:aws:iam::000000000000:role/citypulse-glue-crawler"

_MIGRATED_MARKER = ".citypulse-db-migrated"
_TAIL_LINES = 60

log = logging.getLogger(__name__)


class AirflowRunError(RuntimeError):
    """Airflow could not run the DAG at all (no DAG run recorded); the message has the log tail."""


@dataclass(frozen=True, kw_only=True)
class DagRun:
    """One local `airflow dags test` run: its DAG run and task states, log, duration and exit code."""

    run_id: str
    state: str
    task_states: dict[str, str]
    log_path: Path
    seconds: float
    returncode: int

    @property
    def succeeded(self) -> bool:
        return self.state == "success"

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        return _tail(self.log_path, lines)


@dataclass(frozen=True, kw_only=True)
class HourlyRun(DagRun):
    """One local run of `citypulse_hourly`: its DAG run state, task states and run report."""

    interval_start: datetime
    interval_end: datetime
    report: dict[str, Any] | None


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def airflow_environment(env: Mapping[str, str], airflow_home: Path) -> dict[str, str]:
    """The environment of the Airflow subprocesses: this process's, minus any Airflow
    configuration it carries, plus `env`, plus the local Airflow settings."""
    airflow_home = Path(airflow_home).resolve()
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_")) and k != "AIRFLOW_HOME"
    }
    merged = {**base, **env}
    region = merged.get("AWS_DEFAULT_REGION") or merged.get("AWS_REGION") or "us-east-1"
    duckdb_path = merged.get("CITYPULSE_DUCKDB_PATH") or str(airflow_home / "warehouse.duckdb")
    merged.setdefault("CITYPULSE_DUCKDB_PATH", duckdb_path)
    merged.setdefault("CITYPULSE_GLUE_CRAWLER_ROLE", LOCAL_CRAWLER_ROLE)
    # Connections as JSON: unambiguous for a file path, and no URI escaping of extras.
    merged.setdefault(
        "AIRFLOW_CONN_CITYPULSE_WAREHOUSE", json.dumps({"conn_type": "duckdb", "extra": {"path": duckdb_path}})
    )
    merged.setdefault("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", "extra": {"region_name": region}}))
    python_path = [str(REPO_ROOT), str(DAGS_FOLDER)]
    if merged.get("PYTHONPATH"):
        python_path.append(merged["PYTHONPATH"])
    merged.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
            "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "False",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
            "PYTHONPATH": os.pathsep.join(python_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return merged


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_logged(argv: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start an Airflow command in its own session (stopped by group), its output appended to `log_path`."""
    with log_path.open("ab") as out:
        return subprocess.Popen(
            argv,
            env=dict(env),
            cwd=env["AIRFLOW_HOME"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _run_logged(argv: list[str], env: Mapping[str, str], log_path: Path, timeout: float) -> int:
    """Run a command with its output in `log_path`; kill its whole session on timeout."""
    log_path.write_text(f"$ {' '.join(argv)}\n")
    process = _start_logged(argv, env, log_path)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    except BaseException:
        # Interrupted (Ctrl-C): leave no Airflow process behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def ensure_metadata_db(
    airflow_home: Path, env: Mapping[str, str] | None = None, *, seed_from: Path | None = None, timeout: float = 300
) -> None:
    """`airflow db migrate` once per airflow_home and Airflow version (a marker file caches it).

    `seed_from`: another airflow_home already migrated by this Airflow version; its database
    (best right after its own migration, before it holds runs) is copied instead of migrating
    again, which saves the ~11 s migration.
    """
    airflow_home = Path(airflow_home).resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    stamp = importlib.metadata.version("apache-airflow")
    marker = airflow_home / _MIGRATED_MARKER
    with _locked(airflow_home / ".citypulse-db.lock"):
        if (airflow_home / "airflow.db").exists() and marker.exists() and marker.read_text() == stamp:
            return
        if seed_from is not None:
            seed = Path(seed_from).resolve()
            if (seed / _MIGRATED_MARKER).exists() and (seed / _MIGRATED_MARKER).read_text() == stamp:
                with _locked(seed / ".citypulse-db.lock"):
                    shutil.copyfile(seed / "airflow.db", airflow_home / "airflow.db")
                marker.write_text(stamp)
                return
        full_env = airflow_environment(env or {}, airflow_home)
        log_path = airflow_home / "db-migrate.log"
        code = _run_logged([sys.executable, "-m", "airflow", "db", "migrate"], full_env, log_path, timeout)
        if code != 0:
            raise AirflowRunError(f"airflow db migrate failed (exit {code}); {log_path}:\n{_tail(log_path)}")
        marker.write_text(stamp)


def _parse_db_time(value: Any) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def read_run_states(
    airflow_home: Path, interval_start: datetime, dag_id: str = DAG_ID
) -> tuple[str, str, dict[str, str]] | None:
    """(run_id, DAG run state, task states) of the latest run of the interval, from the metadata DB.

    Mapped task instances are keyed `task_id[map_index]`; None if there is no such run.
    """
    db = Path(airflow_home).resolve() / "airflow.db"
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        runs = con.execute(
            "select run_id, state, data_interval_start from dag_run where dag_id = ? order by id desc", (dag_id,)
        ).fetchall()
        match = next((r for r in runs if _parse_db_time(r[2]) == interval_start), None)
        if match is None:
            return None
        run_id, state, _ = match
        rows = con.execute(
            "select task_id, map_index, state from task_instance "
            "where dag_id = ? and run_id = ? order by task_id, map_index",
            (dag_id, run_id),
        ).fetchall()
    finally:
        con.close()
    tasks = {
        (task_id if map_index < 0 else f"{task_id}[{map_index}]"): state or "none" for task_id, map_index, state in rows
    }
    return str(run_id), str(state), tasks


def read_report(env: Mapping[str, str], interval_start: datetime) -> dict[str, Any] | None:
    """The run report the DAG wrote to the lake for this interval (None if it wrote none)."""
    import boto3

    from citypulse_batch.lake import Interval, Lake, report_key

    bucket = env.get("CITYPULSE_LAKE_BUCKET")
    if not bucket:
        return None
    client = boto3.client(
        "s3",
        endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
    )
    return Lake(bucket, client).read_json(report_key(Interval.hour(interval_start)))


def _dags_test(
    dag_id: str,
    interval_start: datetime,
    interval_end: datetime,
    label: str,
    log_name: str,
    full_env: Mapping[str, str],
    airflow_home: Path,
    timeout: float,
) -> dict[str, Any]:
    """Run `airflow dags test` for `dag_id`'s interval [start, end): the DagRun fields of the run it recorded.

    `label` names the interval in errors; the output goes to `<airflow_home>/runs/<log_name>`.
    """
    runs_dir = airflow_home / "runs"
    runs_dir.mkdir(exist_ok=True)
    log_path = runs_dir / log_name
    # For a data-interval timetable `dags test` infers the interval that ENDS at the given
    # date ("the last complete period"), so pass the end to run [start, end).
    argv = [sys.executable, "-m", "airflow", "dags", "test", dag_id, interval_end.isoformat()]
    started = time.monotonic()
    try:
        code = _run_logged(argv, full_env, log_path, timeout)
    except subprocess.TimeoutExpired:
        raise AirflowRunError(
            f"`airflow dags test {dag_id}` for {label} did not finish within "
            f"{timeout:.0f} s (killed); {log_path}:\n{_tail(log_path)}"
        ) from None
    seconds = round(time.monotonic() - started, 1)
    found = read_run_states(airflow_home, interval_start, dag_id)
    if found is None:
        raise AirflowRunError(
            f"`airflow dags test` (exit {code}) recorded no run of {dag_id} for {label}; {log_path}:\n{_tail(log_path)}"
        )
    run_id, state, tasks = found
    return {
        "run_id": run_id,
        "state": state,
        "task_states": tasks,
        "log_path": log_path,
        "seconds": seconds,
        "returncode": code,
    }


def run_hourly(
    interval_start: datetime, env: Mapping[str, str], airflow_home: Path, *, timeout: float = 900
) -> HourlyRun:
    """Run `citypulse_hourly` for the hour starting at `interval_start` (UTC) and report on it.

    `env` carries the emulator endpoints and credentials (`AWS_*`), `CITYPULSE_LAKE_BUCKET`
    and the other `CITYPULSE_*` settings, and optionally `AIRFLOW_CONN_*` / `AIRFLOW_VAR_*`
    overrides. A failed DAG run is returned, not raised (its task states say what failed;
    the log tail is logged); AirflowRunError means Airflow recorded no run at all.
    """
    if interval_start.tzinfo is None:
        raise ValueError("interval_start must be timezone-aware (UTC)")
    interval_start = interval_start.astimezone(UTC)
    interval_end = interval_start + timedelta(hours=1)
    airflow_home = Path(airflow_home).resolve()
    ensure_metadata_db(airflow_home, env)
    full_env = airflow_environment(env, airflow_home)

    dag_run = _dags_test(
        DAG_ID,
        interval_start,
        interval_end,
        interval_start.isoformat(),
        f"{DAG_ID}-{interval_start:%Y%m%dT%H%M}.log",
        full_env,
        airflow_home,
        timeout,
    )
    run = HourlyRun(
        interval_start=interval_start,
        interval_end=interval_end,
        report=read_report(full_env, interval_start),
        **dag_run,
    )
    if not run.succeeded:
        failed = sorted(t for t, s in run.task_states.items() if s in ("failed", "upstream_failed"))
        log.warning(
            "%s %s: DAG run %s (%s); log %s, tail:\n%s",
            DAG_ID,
            interval_start.isoformat(),
            run.state,
            ", ".join(failed),
            run.log_path,
            run.log_tail(),
        )
    return run


@dataclass(frozen=True, kw_only=True)
class DailyRun(DagRun):
    """One local run of `citypulse_daily`: states, per-task summaries and where the docs landed."""

    day: date
    summaries: dict[str, Any]
    dbt_docs: Path
    data_docs: Path


def read_summaries(airflow_home: Path, dag_id: str, run_id: str) -> dict[str, Any]:
    """task_id -> the `summary` XCom each task pushed (steps' JSON summaries)."""
    db = Path(airflow_home).resolve() / "airflow.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            "select task_id, value from xcom where dag_id = ? and run_id = ? and key = 'summary'", (dag_id, run_id)
        ).fetchall()
    finally:
        con.close()
    out: dict[str, Any] = {}
    for task_id, value in rows:
        raw = value.decode() if isinstance(value, bytes) else value
        try:
            out[task_id] = json.loads(raw)
        except (TypeError, ValueError):
            out[task_id] = raw
    return out


def run_daily(day: date, env: Mapping[str, str], airflow_home: Path, *, timeout: float = 900) -> DailyRun:
    """Run `citypulse_daily` for the UTC day `day`: daily marts, retention, dbt docs, data docs.

    The docs land in `CITYPULSE_DOCS_DIR` (from `env`), by default `<airflow_home>/../docs`:
    dbt's static site at `<docs>/dbt/index.html`, Great Expectations' data docs at
    `<docs>/gx/index.html`. A failed run is returned, not raised.
    """
    airflow_home = Path(airflow_home).resolve()
    docs = Path(env.get("CITYPULSE_DOCS_DIR") or airflow_home.parent / "docs")
    env = {**env, "CITYPULSE_DOCS_DIR": str(docs)}
    ensure_metadata_db(airflow_home, env)
    full_env = airflow_environment(env, airflow_home)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    # As for the hourly DAG: the interval [start, start + 1 day).
    dag_run = _dags_test(
        DAILY_DAG_ID,
        start,
        start + timedelta(days=1),
        str(day),
        f"{DAILY_DAG_ID}-{day:%Y%m%d}.log",
        full_env,
        airflow_home,
        timeout,
    )
    run = DailyRun(
        day=day,
        summaries=read_summaries(airflow_home, DAILY_DAG_ID, dag_run["run_id"]),
        dbt_docs=docs / "dbt" / "index.html",
        data_docs=docs / "gx" / "index.html",
        **dag_run,
    )
    if not run.succeeded:
        log.warning("%s %s: DAG run %s; log %s, tail:\n%s", DAILY_DAG_ID, day, run.state, run.log_path, run.log_tail())
    return run


@dataclass(frozen=True)
class BackfillRun:
    """An Airflow backfill of `citypulse_hourly`: the state of each interval's DAG run."""

    start: datetime
    end: datetime
    run_states: dict[datetime, str]
    log_dir: Path
    seconds: float

    @property
    def succeeded(self) -> bool:
        expected = (self.end - self.start) // timedelta(hours=1)
        return len(self.run_states) == expected and set(self.run_states.values()) == {"success"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _backfill_runs(airflow_home: Path, dag_id: str) -> dict[datetime, str]:
    """data_interval_start -> state of the DAG runs Airflow's backfill created."""
    db = Path(airflow_home).resolve() / "airflow.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            "select data_interval_start, state from dag_run where dag_id = ? and run_type = 'backfill'", (dag_id,)
        ).fetchall()
    finally:
        con.close()
    return {moment: str(state) for value, state in rows if (moment := _parse_db_time(value)) is not None}


def _stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    # SIGTERM first (the scheduler may take a while, see FIELD-NOTES), then SIGKILL the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_backfill(
    start: datetime, end: datetime, env: Mapping[str, str], airflow_home: Path, *, timeout: float = 1800
) -> BackfillRun:
    """Backfill `citypulse_hourly` over the hours of [start, end) with Airflow's own backfill.

    `airflow backfill create` records one backfill DAG run per interval (already completed
    intervals are run again: `--reprocess-behavior completed`); a scheduler with the
    LocalExecutor (job schedule off, so only the backfill runs) runs them one at a time, the
    DAG unpaused (the scheduler skips paused DAGs), its tasks reaching
    the metadata DB through an API server's execution API. Both run only for the backfill, on
    loopback ports picked here, and are stopped when every run is finished or `timeout` passes.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware (UTC)")
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    airflow_home = Path(airflow_home).resolve()
    ensure_metadata_db(airflow_home, env)
    port = _free_port()
    full_env = airflow_environment(env, airflow_home)
    full_env.update(
        {
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            # Scheduler and API server must share it: the executor's task tokens are checked there.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            # One task at a time: the local DuckDB warehouse has a single writer.
            "AIRFLOW__CORE__PARALLELISM": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # The scheduler runs the backfill's runs only: no scheduled run of "now" is created
            # although the DAG must be unpaused (the scheduler skips runs of paused DAGs).
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        }
    )
    log_dir = airflow_home / "runs" / f"backfill-{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    airflow = [sys.executable, "-m", "airflow"]
    for name, argv in (
        ("reserialize", [*airflow, "dags", "reserialize"]),
        ("unpause", [*airflow, "dags", "unpause", DAG_ID]),
        (
            "create",
            [
                *airflow,
                "backfill",
                "create",
                "--dag-id",
                DAG_ID,
                # Logical dates of a data-interval timetable are the interval starts (inclusive).
                "--from-date",
                start.isoformat(),
                "--to-date",
                (end - timedelta(hours=1)).isoformat(),
                "--reprocess-behavior",
                "completed",
                # One run at a time, as the DAG's own max_active_runs (the backfill has its own).
                "--max-active-runs",
                "1",
            ],
        ),
    ):
        code = _run_logged(argv, full_env, log_dir / f"{name}.log", timeout)
        if code != 0:
            raise AirflowRunError(
                f"airflow {name} failed (exit {code}); {log_dir / f'{name}.log'}:\n{_tail(log_dir / f'{name}.log')}"
            )

    processes: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        api_server = [*airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)]
        processes.append(_start_logged(api_server, full_env, log_dir / "api-server.log"))
        # Tasks report to the execution API from their first moment: the scheduler starts when it answers.
        while not _listening(port):
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise AirflowRunError(f"the API server did not start; {log_dir / 'api-server.log'}")
            time.sleep(0.5)  # polling a port another process opens
        # No log server: with the LocalExecutor it would listen on every interface, and the API
        # server reads the task logs from the shared log folder anyway (found by a security review).
        scheduler = [*airflow, "scheduler", "--skip-serve-logs"]
        processes.append(_start_logged(scheduler, full_env, log_dir / "scheduler.log"))
        expected = (end - start) // timedelta(hours=1)
        while True:
            states = _backfill_runs(airflow_home, DAG_ID)
            if len(states) >= expected and all(s in ("success", "failed") for s in states.values()):
                break
            dead = [p for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AirflowRunError(
                    f"backfill {start.isoformat()}..{end.isoformat()} did not finish "
                    f"({'a process exited' if dead else f'within {timeout:.0f} s'}): runs {states}; logs in {log_dir}"
                )
            time.sleep(2.0)  # polling the scheduler's progress in the metadata DB
    finally:
        for process in reversed(processes):
            _stop(process)
    return BackfillRun(start, end, states, log_dir, round(time.monotonic() - started, 1))


UI_USER = "admin"


def ui_password(airflow_home: Path) -> str:
    """The local Airflow UI's password for `UI_USER`: made once per Airflow home, kept in
    `<airflow_home>/ui-passwords.json` (mode 0600), the simple auth manager's passwords file."""
    path = Path(airflow_home) / "ui-passwords.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({UI_USER: secrets.token_urlsafe(18)}, out)
    return str(json.loads(path.read_text())[UI_USER])


def serve_ui(env: Mapping[str, str], airflow_home: Path, port: int = 8080) -> subprocess.Popen[bytes]:
    """Start the Airflow UI (`airflow api-server`) on 127.0.0.1:`port` over this airflow_home.

    Returns the process (its own session: stop it with `os.killpg(proc.pid, SIGTERM)`); output
    goes to `<airflow_home>/api-server.log`. It shows the DAG runs `run_hourly`/`run_daily`
    recorded; it does not start a scheduler. Airflow 3's UI login is the simple auth manager,
    one admin, `UI_USER` with `ui_password`: on loopback too, since a web page the browser
    shows may reach loopback (DNS rebinding) and must not find an open admin there.
    """
    airflow_home = Path(airflow_home).resolve()
    ensure_metadata_db(airflow_home, env)
    ui_password(airflow_home)
    full_env = airflow_environment(env, airflow_home)
    full_env.update(
        {
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{UI_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "ui-passwords.json"),
        }
    )
    return _start_logged(
        [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)],
        full_env,
        airflow_home / "api-server.log",
    )
