"""Smoke test of bench/batch_bench.py: a tiny city-hour through the floor and the pipeline, counts reconciled.

The bench itself is not a test (timings belong in docs/performance.md); this runs it at a
few hundred sensors against the session's ministack and checks what it reports: every
reading generated is loaded, checked by the quality gate, counted by the zone mart and by
the floor query, at every scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.batch_bench import MINUTES, run
from infra.local.emulators import Emulator


@pytest.mark.integration
def test_tiny_bench_run_reconciles_its_row_counts(ministack: Emulator, aws_env: dict[str, str], tmp_path: Path) -> None:
    results = run(sensors=120, scales=[1, 2], files=3, work=tmp_path, emulator=ministack)

    assert [r.sensors for r in results] == [120, 240]
    for result in results:
        assert result.readings == result.sensors * MINUTES
        assert result.files == 3 * result.sensors // 120
        assert result.counts == {
            "floor": result.readings,
            "loaded": result.readings,
            "checked": result.readings,
            "zone_mart": result.readings,
        }
        assert result.reconciled
        assert set(result.seconds) == {"floor", "load", "dbt", "contract", "reconcile", "compact"}
        assert result.objects_after_compaction == 1  # the hour's files gathered into one part
