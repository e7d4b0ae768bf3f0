"""Great Expectations data docs: the stored validation results of the hourly gates as a static site.

Place in the flow: the daily DAG's `data_docs` task gathers the day's validation results
(which the hourly `quality_check` and `reconcile_marts` tasks stored in the lake, see
`citypulse_batch.steps.gx_results`) into a GX file data context's validation results store
and renders them with GX's own site builder: an `index.html` listing every validation (suite,
run = interval start, verdict) and one page per result with each expectation's observed
values. Like dbt's static docs it opens from a file or any static host.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

SITE = "citypulse"


def build_data_docs(validations: Path, out_dir: Path, context_root: Path) -> dict[str, Any]:
    """Render the validation results under `validations` (GX store layout) into `out_dir` (replaced whole).

    `context_root`: an empty scratch directory for the file data context. The site is built in
    a fresh directory next to `out_dir`, then swapped in, so a reader never sees half a site.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    started = time.monotonic()
    context = gx.get_context(mode="file", project_root_dir=str(context_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    store = Path(context.root_directory) / "uncommitted" / "validations"
    if validations.is_dir():
        shutil.copytree(validations, store, dirs_exist_ok=True)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gx-docs-", dir=out_dir.parent))
    context.add_data_docs_site(
        SITE,
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(staging)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    try:
        context.build_data_docs(site_names=[SITE])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    pages = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / "validations").rglob("*.html"))
    return {
        "path": str(out_dir),
        "index": str(out_dir / "index.html"),
        "validation_pages": len(pages),
        "seconds": round(time.monotonic() - started, 2),
    }
