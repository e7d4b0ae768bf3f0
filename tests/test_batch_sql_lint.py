"""The dbt models pass sqlfluff (Redshift dialect, jinja templater with dbt builtins), offline.

Unit test, no servers: sqlfluff renders each model with `dbt_project/.sqlfluff` (the
project's macros, lint-only stand-ins for the interval macros and dbt's cross-database
macros) and must report no violation and no templating or parsing failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dbt_models_are_sqlfluff_clean_in_the_redshift_dialect() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlfluff",
            "lint",
            "dbt_project/models",
            "dbt_project/tests",
            "--format",
            "json",
            "--processes",
            "2",
            "--disable-progress-bar",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    files = json.loads(done.stdout)
    assert len(files) >= 15, done.stderr[-2000:]
    problems = [
        f"{f['filepath']}:{v['start_line_no']} {v['code']} {v['description']}" for f in files for v in f["violations"]
    ]
    assert problems == []
    assert done.returncode == 0, done.stderr[-2000:]
