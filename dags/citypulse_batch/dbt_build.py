"""Build the warehouse marts for one interval: `dbt build` through dbt's programmatic runner.

Place in the flow: fourth step of the hourly DAG, after the raw load and before the quality
checkpoint. It runs the affected models and their tests (`--select source:lake+ ...`) with
the interval in `CITYPULSE_INTERVAL_START`/`_END`, so incremental marts replace exactly the
interval's buckets.

Parsing the project is a third of a small build. dbt skips it when the previous build's
`partial_parse.msgpack` is at hand and nothing it hashed has changed: the project's files,
the profile, and `--vars`. That is why the interval travels in the environment (read at run
time by the one macro that needs it, `interval_bounds`) and not in `--vars`, which change
every hour; and why a build keeps that file in a cache directory per project and target on
the worker (`parse_cache_dir`), copied in before dbt runs and replaced atomically after.

Why `dbtRunner` in one task rather than astronomer-cosmos: Cosmos renders one Airflow task
per model, which means parsing the dbt project (or a manifest) every time the scheduler
parses the DAG file; our DAG must parse instantly with no I/O, and on MWAA dbt may live in its
own virtualenv. One task calling `dbtRunner` keeps the DAG parse free of dbt, keeps the
model graph in dbt (which already orders and skips), and still reports per-node results
(counted in the summary and the run report). The price is coarser retries: a retry rebuilds
the whole selection, which the interval-scoped incremental models make idempotent.

Where dbt cannot share the workers' packages (MWAA's constraints), `infra/mwaa/startup.sh`
builds it a virtualenv and exports `CITYPULSE_DBT_EXECUTABLE`; the same command line then
runs that executable in a subprocess. Either way the counts come from dbt's own
`run_results.json`, so both modes report alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from citypulse_batch.lake import Interval

_MAX_FAILURES = 10
# dbt's parsed project, as it writes it into the target path (and reads it back from there).
PARTIAL_PARSE_FILE = "partial_parse.msgpack"
# The interval a build covers, read by the `interval_bounds` macro; empty: no interval.
INTERVAL_ENV = ("CITYPULSE_INTERVAL_START", "CITYPULSE_INTERVAL_END")


@dataclass(slots=True)
class DbtSummary:
    """What `dbt build` did, counted per node type; small enough for XCom and the run report."""

    success: bool
    target: str
    select: str
    models_passed: int = 0
    models_failed: int = 0
    models_skipped: int = 0
    tests_passed: int = 0
    tests_warned: int = 0
    tests_failed: int = 0
    tests_skipped: int = 0
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_project_dir(configured: str = "") -> Path:
    """The dbt project: the configured directory, else `dbt_project/` next to the DAGs folder
    (MWAA: deployed inside dags/) or at the repository root (local)."""
    if configured:
        candidates = [Path(configured)]
    else:
        package = Path(__file__).resolve().parent  # dags/citypulse_batch
        candidates = [package.parent / "dbt_project", package.parent.parent / "dbt_project"]
    for candidate in candidates:
        if (candidate / "dbt_project.yml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no dbt project (dbt_project.yml) in {', '.join(map(str, candidates))}; set CITYPULSE_DBT_PROJECT_DIR"
    )


@contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    # dbt's profile reads env_var() from this process's environment; restore it afterwards
    # because `airflow dags test` runs every task in one process.
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_args(
    project_dir: Path,
    target: str,
    select: str,
    work_dir: Path,
    exclude: str = "",
    command: str = "build",
) -> list[str]:
    """The `dbt build` (or another command's) command line, without the leading `dbt`.

    An empty `select` adds no `--select` (for `compile --inline`, which refuses one)."""
    args = [
        command,
        "--project-dir",
        str(project_dir),
        "--profiles-dir",
        str(project_dir),
        "--target",
        target,
        # The project directory may be read-only (MWAA syncs it from S3): artefacts go elsewhere.
        "--target-path",
        str(work_dir / "target"),
        "--log-path",
        str(work_dir / "logs"),
        "--no-use-colors",
    ]
    if select.strip():
        args += ["--select", *select.split()]
    if exclude.strip():
        args += ["--exclude", *exclude.split()]
    return args


def interval_env(interval: Interval | None) -> dict[str, str]:
    """The environment that tells dbt the interval; both empty for none (so no stale value leaks in)."""
    if interval is None:
        return dict.fromkeys(INTERVAL_ENV, "")
    start, end = (moment.strftime("%Y-%m-%d %H:%M:%S") for moment in (interval.start, interval.end))
    return dict(zip(INTERVAL_ENV, (start, end), strict=True))


def parse_cache_dir(project_dir: Path, target: str) -> Path:
    """Where builds of this project and target keep dbt's parsed project on this machine.

    Under the system temp directory: an MWAA worker keeps it between the tasks it runs, and
    losing it costs one full parse. dbt itself rejects a stale file (its own checksums).
    """
    key = hashlib.sha256(f"{Path(project_dir).resolve()}\0{target}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"citypulse-dbt-parse-{key}"


def _restore_parse(cache_dir: Path, target_path: Path) -> None:
    kept = cache_dir / PARTIAL_PARSE_FILE
    if kept.is_file():
        target_path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, target_path / PARTIAL_PARSE_FILE)


def _keep_parse(target_path: Path, cache_dir: Path) -> None:
    # Builds may run side by side (hourly and daily DAGs): each replaces the file whole.
    written = target_path / PARTIAL_PARSE_FILE
    if not written.is_file():
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    staged = cache_dir / f".{PARTIAL_PARSE_FILE}.{uuid.uuid4().hex}"
    shutil.copyfile(written, staged)
    os.replace(staged, cache_dir / PARTIAL_PARSE_FILE)


def _invoke(args: list[str], env: Mapping[str, str], executable: str) -> tuple[bool, str | None]:
    """Run dbt with `args`: in this process (dbtRunner), or `executable` in a subprocess.

    Returns (success, error): success as dbt reports it; error when dbt could not run the
    command at all (an exception; in a subprocess exit code 2, with the output's tail).
    """
    if not executable:
        from dbt.cli.main import dbtRunner

        with _environment(env):
            result = dbtRunner().invoke(args)
        error = None if result.exception is None else f"{type(result.exception).__name__}: {result.exception}"
        return bool(result.success), error
    done = subprocess.run([executable, *args], env={**os.environ, **env}, capture_output=True, text=True, check=False)
    # dbt's exit codes: 0 success, 1 nodes failed (counted from run_results.json), 2 error.
    if done.returncode in (0, 1):
        return done.returncode == 0, None
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-_MAX_FAILURES:])
    return False, f"{executable} exited with {done.returncode}: {tail}"


def count_results(summary: DbtSummary, run_results: Path) -> None:
    """Count dbt's `run_results.json` (written by both modes) into the summary, per node type and status."""
    if not run_results.is_file():
        return
    for node_result in json.loads(run_results.read_text()).get("results", ()):
        unique_id = str(node_result["unique_id"])
        kind = unique_id.split(".", 1)[0]
        status = str(node_result["status"])
        if kind in ("model", "snapshot"):
            if status == "success":
                summary.models_passed += 1
            elif status == "skipped":
                summary.models_skipped += 1
            else:
                summary.models_failed += 1
        elif kind in ("test", "unit_test"):
            if status == "pass":
                summary.tests_passed += 1
            elif status == "warn":
                summary.tests_warned += 1
            elif status == "skipped":
                summary.tests_skipped += 1
            else:
                summary.tests_failed += 1
        if status in ("error", "fail") and len(summary.failures) < _MAX_FAILURES:
            message = (node_result.get("message") or "").strip().splitlines()
            summary.failures.append(f"{unique_id}: {status}" + (f" - {message[0]}" if message else ""))


def run_dbt_build(
    project_dir: Path,
    target: str,
    interval: Interval | None,
    env: Mapping[str, str],
    select: str = "source:lake+ source:registry+",
    exclude: str = "",
    executable: str = "",
    parse_cache: Path | None = None,
) -> DbtSummary:
    """Run `dbt build` and count what passed; never raises for failed nodes.

    `executable`: a dbt executable (MWAA: the startup script's virtualenv,
    `CITYPULSE_DBT_EXECUTABLE`) run as a subprocess; empty runs dbt in this process.
    `parse_cache`: a directory to keep dbt's parsed project in between builds
    (`parse_cache_dir`); None parses afresh.
    """
    started = time.monotonic()
    summary = DbtSummary(success=False, target=target, select=select)
    with tempfile.TemporaryDirectory(prefix="citypulse-dbt-") as work:
        args = build_args(project_dir, target, select, Path(work), exclude)
        target_path = Path(work) / "target"
        if parse_cache is not None:
            _restore_parse(parse_cache, target_path)
        success, summary.error = _invoke(args, {**env, **interval_env(interval)}, executable)
        if parse_cache is not None:
            _keep_parse(target_path, parse_cache)
        count_results(summary, target_path / "run_results.json")
    summary.seconds = round(time.monotonic() - started, 2)
    summary.success = success and summary.error is None
    return summary


def generate_docs(
    project_dir: Path, target: str, env: Mapping[str, str], out_dir: Path, executable: str = ""
) -> dict[str, Any]:
    """`dbt docs generate --static` for the whole project into `out_dir` (replaced whole).

    The static page (`static_index.html`, also copied to `index.html`) embeds the manifest
    and catalog, so it opens from a file or any static host (S3, the demo's docs folder)
    without `dbt docs serve`. Written to a fresh directory first, then swapped in.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dbt-docs-", dir=out_dir.parent))
    with tempfile.TemporaryDirectory(prefix="citypulse-dbt-") as work:
        args = build_args(project_dir, target, "fqn:*", Path(work), command="docs")
        args[1:1] = ["generate", "--static"]
        args[args.index("--target-path") + 1] = str(staging)
        success, error = _invoke(args, {**env, **interval_env(None)}, executable)
    if not success:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"dbt docs generate failed: {error}")
    shutil.copyfile(staging / "static_index.html", staging / "index.html")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return {"path": str(out_dir), "index": str(out_dir / "index.html"), "seconds": round(time.monotonic() - started, 2)}
