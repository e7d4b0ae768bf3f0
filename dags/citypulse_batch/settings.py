"""Where the batch path finds its configuration: Airflow Variables first, then environment.

Place in the flow: every hourly task reads its bucket, bus, crawler and dbt settings through
`setting()`, at run time (templates and task bodies), never while the DAG file is parsed.
On MWAA the values are Airflow Variables (`citypulse_<name>`); locally the same names come
from `CITYPULSE_<NAME>` environment variables. Local and AWS differ only here and in the
Airflow connections below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Airflow connections: the endpoints and secrets live there, not in code.
AWS_CONN_ID = "aws_default"
WAREHOUSE_CONN_ID = "citypulse_warehouse"


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str | None
    description: str

    @property
    def variable(self) -> str:
        return f"citypulse_{self.name}"

    @property
    def env(self) -> str:
        return f"CITYPULSE_{self.name.upper()}"


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("lake_bucket", None, "S3 bucket of the lake (raw/, quarantine/, registry/, reports/)."),
        Setting("event_bus", "default", "EventBridge bus for HourlyLoadCompleted / PipelineFailed."),
        Setting("glue_database", "citypulse_lake", "Glue database the lake crawler writes tables to."),
        Setting("glue_crawler", "citypulse-lake-raw", "Name of the crawler over raw/readings/."),
        Setting("glue_crawler_role", None, "IAM role ARN the crawler runs as."),
        Setting("quicksight_dataset_ids", "", "Comma-separated QuickSight dataset ids to refresh."),
        Setting("dbt_target", "", "dbt target; empty: the warehouse connection's type."),
        Setting("dbt_project_dir", "", "dbt project directory; empty: found next to the DAGs."),
        Setting("dbt_executable", "", "dbt executable run as a subprocess (MWAA's dbt venv); empty: dbt in-process."),
        Setting("dbt_select", "source:lake+ source:registry+", "dbt selection the hourly build runs."),
        Setting("dbt_exclude", "tag:daily", "dbt exclusion of the hourly build (the daily DAG builds tag:daily)."),
        Setting("dbt_daily_select", "tag:daily", "dbt selection the daily build runs for the whole day."),
        Setting(
            "late_lookback_hours",
            "6",
            "Hours before its own that an hourly run loads again when objects reached them after their load.",
        ),
        Setting("retention_days", "400", "Days of lake readings/quarantine and warehouse rows the daily DAG keeps."),
        Setting("docs_dir", "", "Where the daily DAG writes dbt docs and GX data docs; empty: the lake's docs/."),
    )
}


class MissingSettingError(LookupError):
    """A setting without default that is neither an Airflow Variable nor an environment variable."""


def setting(name: str) -> str:
    """The value of a citypulse setting: Variable `citypulse_<name>`, else env `CITYPULSE_<NAME>`."""
    spec = SETTINGS[name]
    value = _variable(spec.variable)
    if not value:
        value = os.environ.get(spec.env) or spec.default
    if value is None:
        raise MissingSettingError(
            f"setting {name!r} is not configured: set Airflow Variable {spec.variable!r} "
            f"or environment variable {spec.env} ({spec.description})"
        )
    return value


def setting_list(name: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped (an empty setting is an empty list)."""
    return [item.strip() for item in setting(name).split(",") if item.strip()]


def _variable(key: str) -> str | None:
    # Imported here: the Task SDK is only needed when a task actually runs.
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return None if value is None else str(value)
