"""`citypulse airflow`: the Airflow UI comes up over the local Airflow home, on loopback only."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from infra.local.airflow import serve_ui
from infra.local.emulators import free_port

pytestmark = pytest.mark.integration


def test_the_airflow_ui_serves_on_loopback_and_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = serve_ui({}, tmp_path / "airflow", port=port)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "airflow" / "api-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the Airflow UI did not come up"
                time.sleep(0.5)  # polling a server that is starting
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        ours = [f[1] for f in (line.split() for line in listening) if f[3] == "0A" and f[1].endswith(f":{port:04X}")]
        assert ours and all(addr.startswith("0100007F") for addr in ours), ours
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
