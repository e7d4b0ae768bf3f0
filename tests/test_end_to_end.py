"""The whole platform, as a user runs it: `citypulse demo` at small scale, then `citypulse down`.

Every published reading must be stored or quarantined, none twice — checked against the
processor's counters, the lake's Parquet files and the warehouse — and nothing may be left
running or listening afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local.platform import REPO_ROOT, PlatformInfo

pytestmark = pytest.mark.integration


def _listening_pids() -> dict[int, str]:
    """pid → local address of every listening TCP socket owned by a process we can see."""
    inodes: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    inodes[parts[9]] = parts[1]
    out: dict[int, str] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    out[int(pid_dir.name)] = inodes[target[8:-1]]
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return out


def _is_loopback(hex_addr: str) -> bool:
    host = hex_addr.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian
        return host.endswith("7F")
    return host in ("00000000000000000000000001000000",)  # ::1


def test_demo_accounts_for_every_reading_and_down_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "infra.local.cli", "--state-dir", str(state)]
    try:
        demo = subprocess.run(
            [*cli, "demo", "--sensors", "400", "--duration", "20", "--seed", "11"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        output = demo.stdout + demo.stderr
        assert demo.returncode == 0, output[-6000:]
        info = PlatformInfo.load(state)
        assert info is not None and info.state == "ready"

        # While it runs, everything of ours listens on loopback only.
        ours = set(info.pids.values())
        listening = {pid: addr for pid, addr in _listening_pids().items() if pid in ours}
        assert listening, "the platform's servers should be listening"
        assert all(_is_loopback(a) for a in listening.values()), listening

        counts = {
            k: int(v.replace(",", ""))
            for k, v in re.findall(r"(published|stored|quarantined|duplicates)=([\d,]+)", output)
        }
        assert counts["published"] == counts["stored"] + counts["quarantined"], output[-3000:]
        assert counts["published"] == 60 * 400  # one reading per sensor per simulated minute
        assert counts["quarantined"] > 0 and counts["duplicates"] > 0  # the faults were injected

        # Independently of the processor's counters: the lake and the warehouse.
        lake_rows, quarantine_rows = _lake_counts(info)
        assert lake_rows == counts["stored"]
        assert quarantine_rows == counts["quarantined"]
        assert _warehouse_rows(state) == counts["stored"]
    finally:
        subprocess.run([*cli, "down"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    info = PlatformInfo.load(state)
    assert info is not None and info.state == "stopped"
    left = [name for name in ("supervisor", *info.pids) if info.running(name)]
    assert not left, f"still running after `citypulse down`: {left}"


def _lake_counts(info: PlatformInfo) -> tuple[int, int]:
    """Distinct (sensor_id, seq) in the lake's raw readings, and quarantine rows."""
    import boto3

    from streaming.parquet import read_parquet

    env = {k: v for k, v in info.env.items() if k.startswith("AWS_")}
    session_env = os.environ.copy()
    os.environ.update(env)
    try:
        s3 = boto3.client("s3")
        bucket = info.env["CITYPULSE_LAKE_BUCKET"]
        keys: dict[str, list[str]] = {"raw/readings/": [], "quarantine/": []}
        for prefix, out in keys.items():
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]

        def read(key: str):
            return read_parquet(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

        readings = set()
        for key in keys["raw/readings/"]:
            t = read(key)
            readings.update(zip(t.column("sensor_id").to_pylist(), t.column("seq").to_pylist(), strict=True))
        quarantined = sum(read(key).num_rows for key in keys["quarantine/"])
        return len(readings), quarantined
    finally:
        os.environ.clear()
        os.environ.update(session_env)


def _warehouse_rows(state: Path) -> int:
    import duckdb

    path = next(state.rglob("warehouse.duckdb"))
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("select count(*) from raw.readings").fetchone()[0]
