"""Build the Lambda deployment package: streaming/ plus its runtime dependencies, as one zip.

Place in the flow: deploy.yml runs this before uploading the zip to the artifacts bucket
(infra/cloudformation/github-oidc.yaml) under a content-addressed key; the stack's
ProcessorCodeKey parameter then names it, for the processor and the synthetic-traffic
generator alike. The local platform packages streaming/ alone (infra/local/provision.py):
its handler runs in the project's own environment.

The dependency versions are the lock file's (uv export), installed as the manylinux wheels
Lambda's python3.12 runtime (Amazon Linux 2023, glibc 2.34, x86_64) loads; python3.11 on
Lambda is Amazon Linux 2 (glibc 2.26), too old for the locked pyarrow's manylinux_2_28
wheels. The zip is deterministic (sorted entries, fixed timestamps), so the same sources and
lock give the same key.

    python .github/scripts/package_lambda.py dist/processor.zip   # prints the zip's sha256
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the handlers import at run time (boto3 is in the Lambda runtime).
RUNTIME_PACKAGES = (
    "orjson",
    "msgspec",
    "numpy",
    "pybase64",
    "pyarrow",
    "zstandard",
    "aws-lambda-powertools",
    "jmespath",
    "typing-extensions",
)
SOURCES = ("streaming",)
# Parts of the runtime packages that no handler loads, left out of the zip (Lambda allows 250 MB
# unzipped, and pyarrow alone installs 171 MB): Arrow Flight (RPC; nothing else links it), the
# C++ headers, Cython sources and pyarrow's own tests. Substrait stays: pyarrow's core links it.
# tests/test_iac.py imports the pruned pyarrow and round-trips Parquet with it.
PRUNE = (
    "pyarrow/include/*",
    "pyarrow/includes/*",
    "pyarrow/tests/*",
    "pyarrow/libarrow_flight.so*",
    "pyarrow/libarrow_python_flight.so*",
    "pyarrow/_flight.*.so",
    "pyarrow/_pyarrow_cpp_tests*",
    "pyarrow/*.pyx",
    "pyarrow/*.pxd",
)


def locked_requirements(uv: str) -> list[str]:
    """The lock file's pins of the runtime packages."""
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wanted = {name: None for name in RUNTIME_PACKAGES}
    pins = [line.split(";")[0].strip() for line in exported.splitlines() if re.match(r"^[A-Za-z0-9_.-]+==", line)]
    chosen = [pin for pin in pins if pin.split("==")[0].lower() in wanted]
    missing = set(RUNTIME_PACKAGES) - {pin.split("==")[0].lower() for pin in chosen}
    if missing:
        raise SystemExit(f"not in uv.lock: {sorted(missing)}")
    return chosen


def install(requirements: list[str], target: Path) -> None:
    # fmt: off
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
            "--implementation", "cp", "--python-version", "3.12",
            "--target", str(target), *requirements,
        ],
        check=True,
    )
    # fmt: on


def pruned(relative: str) -> bool:
    """Whether a file, by its path inside the installed packages, is one `PRUNE` leaves out."""
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in PRUNE)


def prune(root: Path) -> None:
    """Delete the `PRUNE` files under `root`, an installation directory."""
    for path in list(root.rglob("*")):
        if path.is_file() and pruned(path.relative_to(root).as_posix()):
            path.unlink()


def write_zip(roots: list[tuple[Path, Path]], out: Path) -> str:
    """Zip every file under each (directory, archive prefix base) deterministically; return its sha256."""
    entries: list[tuple[str, Path]] = []
    for directory, base in roots:
        for path in directory.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}:
                entries.append((path.relative_to(base).as_posix(), path))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if path.stat().st_mode & 0o111 else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--uv", default=str(REPO_ROOT / ".cache" / "uv" / "bin" / "uv"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deps = Path(tmp) / "deps"
        install(locked_requirements(args.uv if Path(args.uv).exists() else shutil.which("uv") or "uv"), deps)
        prune(deps)
        digest = write_zip([(deps, deps), *((REPO_ROOT / s, REPO_ROOT) for s in SOURCES)], args.out)
    print(digest)


if __name__ == "__main__":
    main()
