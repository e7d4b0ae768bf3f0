"""`citypulse airflow`: the Airflow UI comes up over the local Airflow home, on loopback only,
and answers only who logs in (a page the browser shows may reach loopback: DNS rebinding)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.local.airflow import UI_USER, serve_ui, ui_password
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
        # Without a login, the API refuses: also a request naming another host, as a page of
        # another site whose name resolves to loopback would send.
        for host in (f"127.0.0.1:{port}", f"rebind.example:{port}"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/dags", headers={"Host": host})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401, host
        wrong = {"username": UI_USER, "password": "not-the-password"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(_post_json(f"http://127.0.0.1:{port}/auth/token", wrong), timeout=10)
        assert refused.value.code == 401
        # The password `citypulse airflow` prints logs in; the token reads the DAGs.
        login = {"username": UI_USER, "password": ui_password(tmp_path / "airflow")}
        with urllib.request.urlopen(_post_json(f"http://127.0.0.1:{port}/auth/token", login), timeout=10) as r:
            token = json.loads(r.read())["access_token"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and "dags" in json.loads(r.read())
        assert (tmp_path / "airflow" / "ui-passwords.json").stat().st_mode & 0o077 == 0
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        ours = [f[1] for f in (line.split() for line in listening) if f[3] == "0A" and f[1].endswith(f":{port:04X}")]
        assert ours and all(addr.startswith("0100007F") for addr in ours), ours
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _post_json(url: str, body: dict[str, str]) -> urllib.request.Request:
    return urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )


def test_the_ui_password_is_made_once_per_airflow_home(tmp_path: Path) -> None:
    first = ui_password(tmp_path / "a")
    assert ui_password(tmp_path / "a") == first and len(first) >= 20
    assert ui_password(tmp_path / "b") != first
