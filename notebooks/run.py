"""Run the four studies against a warehouse with papermill: executed notebooks and PNGs in one directory.

    python -m notebooks.run --warehouse PATH_OR_URL [--start 2026-03-01] [--end 2026-03-04] --out DIR
    python -m notebooks.run --demo --out DIR     # build a small demo warehouse first (DIR/demo.duckdb)

The kernel is this interpreter (the project's venv): a kernelspec `citypulse-venv` pointing at
`sys.executable` is written under DIR/.jupyter and put first on JUPYTER_PATH for this process,
so nothing is registered in the user's home and a clean clone works in CI. Each notebook runs
with `notebooks/` as working directory (it imports `warehouse.py` from there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
NOTEBOOKS = ("peak_hours", "speed_flow", "hot_spots", "coverage")
KERNEL_NAME = "citypulse-venv"


def ensure_kernel(out: Path) -> str:
    """A kernelspec for this interpreter under `out`, first on JUPYTER_PATH; returns its name."""
    spec_dir = out / ".jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "citypulse (project venv)",
        "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    paths = [str(out / ".jupyter"), *filter(None, os.environ.get("JUPYTER_PATH", "").split(os.pathsep))]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    return KERNEL_NAME


def run_all(
    warehouse: str,
    out: Path,
    start: str = "",
    end: str = "",
    notebooks: tuple[str, ...] = NOTEBOOKS,
    timeout: int = 600,
) -> dict[str, float]:
    """Execute each notebook into `out`; returns seconds per notebook. Raises on a failing cell."""
    import papermill

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel(out)
    target = str(Path(warehouse).resolve()) if "://" not in warehouse else warehouse
    seconds = {}
    for name in notebooks:
        started = time.monotonic()
        papermill.execute_notebook(
            str(NOTEBOOK_DIR / f"{name}.ipynb"),
            str(out / f"{name}.ipynb"),
            parameters={"warehouse": target, "start": start, "end": end, "output_dir": str(out)},
            kernel_name=kernel,
            cwd=str(NOTEBOOK_DIR),
            execution_timeout=timeout,
            progress_bar=False,
        )
        seconds[name] = round(time.monotonic() - started, 1)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the citypulse studies (papermill).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--warehouse", help="DuckDB file, postgresql://... or redshift://... URL")
    source.add_argument("--demo", action="store_true", help="build a small demo warehouse in OUT first")
    parser.add_argument("--start", default="", help="UTC date/datetime, inclusive ('' = all)")
    parser.add_argument("--end", default="", help="UTC date/datetime, exclusive ('' = all)")
    parser.add_argument("--out", type=Path, required=True, help="directory for executed notebooks and figures")
    parser.add_argument("--only", nargs="*", choices=NOTEBOOKS, default=list(NOTEBOOKS))
    args = parser.parse_args(argv)
    warehouse = args.warehouse
    if args.demo:
        from notebooks.demo_warehouse import DEFAULT_START, build_in_subprocess

        args.out.mkdir(parents=True, exist_ok=True)
        warehouse = str(args.out / "demo.duckdb")
        started = time.monotonic()
        build_in_subprocess(Path(warehouse))
        print(
            f"demo warehouse {warehouse} (3 days from {DEFAULT_START:%Y-%m-%d}) in {time.monotonic() - started:.0f} s"
        )
    seconds = run_all(warehouse, args.out, args.start, args.end, tuple(args.only))
    for name, took in seconds.items():
        print(f"{name:<11} {took:>6.1f} s  {args.out / (name + '.ipynb')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
