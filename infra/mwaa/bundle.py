"""Build `dist/mwaa-bundle.zip`: what an MWAA environment's S3 bucket needs for the citypulse DAGs.

Place in the flow: deployment of the batch path. MWAA syncs `dags/` from S3 onto every
worker's sys.path and installs `requirements.txt` and runs `startup.sh` from their own S3
keys. The bundle holds exactly that layout:

    dags/citypulse_hourly.py, dags/citypulse_daily.py, dags/citypulse_batch/   the DAGs
    dags/streaming/ (contract, registry), dags/expectations/   what the tasks import
    dags/dbt_project/                      models, macros, snapshots, profiles (no target/)
    requirements.txt, startup.sh           MWAA's requirements and startup script

Run: `python -m infra.mwaa.bundle [out.zip]` (the Makefile's `mwaa-bundle` target).
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "dist" / "mwaa-bundle.zip"
# Entries are written with a fixed time, so the same sources give the same zip.
_EPOCH = (2026, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", "target", "logs", "dbt_packages", ".pytest_cache", "sqlfluff_libs"}
_SKIP_SUFFIXES = {".pyc", ".duckdb", ".log"}


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not _SKIP_DIRS & set(path.relative_to(root).parts) and path.suffix not in _SKIP_SUFFIXES:
            if path.name in (".user.yml", ".sqlfluff"):
                continue
            yield path


def entries() -> list[tuple[str, Path]]:
    """(name in the zip, source file), in order."""
    out: list[tuple[str, Path]] = []
    for path in sorted((REPO / "dags").glob("*.py")):
        out.append((f"dags/{path.name}", path))
    # The batch path needs only the contract and the registry of `streaming` (not the devices,
    # the processor or the read API).
    for module in ("__init__.py", "contract.py", "registry.py"):
        out.append((f"dags/streaming/{module}", REPO / "streaming" / module))
    for package in ("dags/citypulse_batch", "expectations", "dbt_project"):
        root = REPO / package
        name = Path(package).name
        out.extend((f"dags/{name}/{p.relative_to(root).as_posix()}", p) for p in _files(root))
    out.append(("requirements.txt", REPO / "dags" / "requirements.txt"))
    out.append(("startup.sh", REPO / "infra" / "mwaa" / "startup.sh"))
    return out


def build(out: Path = DEFAULT_OUT) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, path in entries():
            info = zipfile.ZipInfo(name, _EPOCH)
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            bundle.writestr(info, path.read_bytes())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the MWAA bundle of the citypulse DAGs.")
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help=f"the zip (default {DEFAULT_OUT})")
    print(build(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
