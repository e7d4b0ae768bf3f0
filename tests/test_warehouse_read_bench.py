"""Smoke test of bench/warehouse_read_bench.py: a small hour read back from PostgreSQL both ways.

The timings belong in docs/performance.md; this runs the bench on 2,500 rows and checks what
it reports: both ways, every row read by each (the bench asserts the counts), and the scratch
database gone afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from bench.warehouse_read_bench import DBNAME, PG

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_the_read_bench_reads_every_row_both_ways_and_drops_its_database() -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    out = subprocess.run(
        [sys.executable, "-m", "bench.warehouse_read_bench", "--rows", "2500", "--repeat", "1"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout

    assert "2,500 rows" in out
    ways = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert ways == ["way", "COPY", "cursor"]
    with closing(psycopg2.connect(dbname="postgres", **PG)) as admin, admin.cursor() as cur:
        cur.execute("select count(*) from pg_database where datname = %s", (DBNAME,))
        assert cur.fetchone() == (0,)
