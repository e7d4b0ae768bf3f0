"""The local CLI refuses what it cannot do before it starts or deletes anything, and says why
(exit 2, `citypulse: ...` or argparse's own message), instead of a traceback. Found by a review
of the command line; `plan`'s own refusals are in tests/test_capacity.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.local import dashboard_server
from infra.local.cli import main


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--from", "2026-11-23 18h", "--to", "2026-11-23T19:00"], "is not an ISO 8601 time"),
        (["--from", "2026-03-02T11:00", "--to", "2026-03-02T09:00"], "is not before --to 2026-03-02T09:00Z"),
    ],
)
def test_backfill_refuses_times_it_cannot_take(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert says in _refused(["--state-dir", str(tmp_path), "backfill", *argv], capsys)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--rate", "0"], "less than one sensor"),
        (["--rate", "0.4"], "less than one sensor"),
        (["--rate", "10", "--duration", "0"], "--duration 0 must be above 0"),
        (["--rate", "10", "--warmup", "-1"], "--warmup -1 at least 0"),
    ],
)
def test_load_refuses_a_run_it_cannot_make_before_it_starts_anything(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "kept").write_text("a previous run's state")
    assert says in _refused(["--state-dir", str(state), "load", *argv], capsys)
    assert [p.name for p in state.iterdir()] == ["kept"]  # nothing started, nothing wiped


def test_the_dashboard_says_the_platform_is_down_before_it_installs_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installs: list[object] = []
    monkeypatch.setattr(dashboard_server, "ensure_assets", installs.append)
    assert "the local platform is not running" in _refused(["--state-dir", str(tmp_path), "dashboard"], capsys)
    assert installs == []
