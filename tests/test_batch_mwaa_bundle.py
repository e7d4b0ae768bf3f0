"""`make mwaa-bundle`: the zip holds what MWAA needs, and the DAGs import from it alone.

Unit test (no servers): builds the bundle into a temp dir, unpacks it, and parses both DAG
files in a fresh interpreter whose sys.path has only the unpacked `dags/` (as on MWAA,
plus the installed libraries), then checks every citypulse module came from the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from infra.mwaa.bundle import build

_PROBE = r"""
import json, runpy, sys
dags = sys.argv[1]
found = {}
for name in ("citypulse_hourly", "citypulse_daily"):
    namespace = runpy.run_path(f"{dags}/{name}.py")
    found[name] = sorted(v.dag_id for v in namespace.values() if type(v).__name__ == "DAG")
from citypulse_batch.dbt_build import find_project_dir
import citypulse_batch, expectations.readings, streaming.contract
print(json.dumps({"dags": found, "project": str(find_project_dir()),
                  "modules": [citypulse_batch.__file__, expectations.readings.__file__, streaming.contract.__file__]}))
"""


def test_bundle_has_the_dags_their_packages_dbt_project_requirements_and_startup(tmp_path: Path) -> None:
    bundle = build(tmp_path / "mwaa-bundle.zip")
    with zipfile.ZipFile(bundle) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unpacked")
    for required in (
        "dags/citypulse_hourly.py",
        "dags/citypulse_daily.py",
        "dags/citypulse_batch/steps.py",
        "dags/streaming/contract.py",
        "dags/expectations/runner.py",
        "dags/dbt_project/dbt_project.yml",
        "dags/dbt_project/profiles.yml",
        "dags/dbt_project/snapshots/registry_sensors_snapshot.yml",
        "dags/dbt_project/models/marts/fct_congestion_episodes.sql",
        "requirements.txt",
        "startup.sh",
    ):
        assert required in names, required
    assert not [n for n in names if "__pycache__" in n or "/target/" in n or n.endswith(".duckdb")]
    assert not [n for n in names if n.startswith("dags/streaming/processor")]
    assert "--constraint" in (tmp_path / "unpacked" / "requirements.txt").read_text()
    # The same sources give the same bytes (fixed entry times), so a deploy can compare hashes.
    assert build(tmp_path / "again.zip").read_bytes() == bundle.read_bytes()


def test_dags_import_from_the_unpacked_bundle_with_only_dags_on_the_path(tmp_path: Path) -> None:
    with zipfile.ZipFile(build(tmp_path / "mwaa-bundle.zip")) as archive:
        archive.extractall(tmp_path / "unpacked")
    dags = tmp_path / "unpacked" / "dags"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CITYPULSE", "PYTHON"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False", PYTHONPATH=str(dags))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(dags)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["dags"] == {"citypulse_hourly": ["citypulse_hourly"], "citypulse_daily": ["citypulse_daily"]}
    assert probe["project"] == str(dags / "dbt_project")
    assert all(module.startswith(str(dags)) for module in probe["modules"]), probe["modules"]


def test_startup_script_is_valid_posix_sh_and_exports_the_dbt_executable() -> None:
    script = Path(__file__).resolve().parents[1] / "infra" / "mwaa" / "startup.sh"
    checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # ShellCheck reads it as `sh` too: tests/test_shell_scripts.py.
    # The variable the dbt step reads (settings: dbt_executable) is the one the script exports.
    assert 'export CITYPULSE_DBT_EXECUTABLE="$DBT_VENV/bin/dbt"' in script.read_text()
