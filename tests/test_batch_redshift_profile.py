"""The dbt profile's redshift target authenticates like the Airflow connection: IAM, same workgroup.

Unit tests: the connection exactly as the CloudFormation template stores it (SSM parameter
`citypulse_warehouse`) goes through the warehouse adapter, whose `dbt_env()` feeds
`dbt_project/profiles.yml`; dbt's own profile renderer and the dbt-redshift credentials class
then parse the redshift target. Nothing connects (no Redshift here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from citypulse_batch.dbt_build import find_project_dir
from citypulse_batch.warehouse import RedshiftWarehouse, warehouse_from_connection

WORKGROUP = "citypulse-prod"
HOST = f"{WORKGROUP}.123456789012.eu-west-1.redshift-serverless.amazonaws.com"
# The template's value, with its !Sub placeholders filled in.
CONNECTION = {
    "conn_type": "redshift",
    "host": HOST,
    "port": 5439,
    "schema": "citypulse",
    "extra": {"iam": True, "is_serverless": True, "serverless_work_group": WORKGROUP},
}


def _render(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    from dbt.config.profile import Profile
    from dbt.config.renderer import ProfileRenderer
    from dbt_common.context import set_invocation_context

    for name in [n for n in os.environ if n.startswith("CITYPULSE_REDSHIFT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    set_invocation_context(dict(os.environ))  # what dbt's CLI does before rendering env_var()
    raw = yaml.safe_load((find_project_dir() / "profiles.yml").read_text())
    target, rendered = Profile.render_profile(raw["citypulse"], "citypulse", "redshift", ProfileRenderer({}))
    # dbt's own parse of the rendered target into the adapter's credentials (validated).
    return Profile._credentials_from_profile(rendered, "citypulse", target)


def test_redshift_target_uses_iam_on_the_connections_serverless_workgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import Connection

    conn = Connection(conn_id="citypulse_warehouse", **{**CONNECTION, "extra": json.dumps(CONNECTION["extra"])})
    warehouse = warehouse_from_connection(conn)
    assert isinstance(warehouse, RedshiftWarehouse) and warehouse.dbt_target == "redshift"

    credentials = _render(monkeypatch, warehouse.dbt_env())

    assert type(credentials).__name__ == "RedshiftCredentials"
    assert str(credentials.method) in ("iam_role", "RedshiftConnectionMethod.IAM_ROLE")
    assert (credentials.host, credentials.port, credentials.database) == (HOST, 5439, "citypulse")
    assert (credentials.is_serverless, credentials.serverless_work_group) == (True, WORKGROUP)
    assert credentials.region == "eu-west-1"
    # No secret: IAM hands out temporary credentials at connect time.
    assert credentials.user is None and credentials.password is None
    assert credentials.schema == "analytics"


def test_without_copy_role_the_load_copies_with_the_namespaces_default_role() -> None:
    from airflow.sdk import Connection

    conn = Connection(conn_id="w", **{**CONNECTION, "extra": json.dumps(CONNECTION["extra"])})
    default = warehouse_from_connection(conn)
    assert isinstance(default, RedshiftWarehouse) and default._iam_role == "iam_role default"
    extra = {**CONNECTION["extra"], "copy_iam_role": "arn:aws:iam::123456789012:role/copy"}
    named = warehouse_from_connection(Connection(conn_id="w", **{**CONNECTION, "extra": json.dumps(extra)}))
    assert isinstance(named, RedshiftWarehouse)
    assert named._iam_role == "iam_role 'arn:aws:iam::123456789012:role/copy'"


def test_profile_has_no_password_field_for_redshift() -> None:
    raw = yaml.safe_load(Path(find_project_dir() / "profiles.yml").read_text())
    redshift = raw["citypulse"]["outputs"]["redshift"]
    assert "password" not in redshift and "user" not in redshift


def test_a_value_in_a_redshift_literal_cannot_end_it_early() -> None:
    """Redshift reads a backslash in a string literal as an escape: a role name or lake key
    ending in one, then a quote, would end the literal and run the rest as SQL (found by a
    security review; DuckDB's and PostgreSQL's literals take the backslash as itself)."""
    from airflow.sdk import Connection

    extra = {**CONNECTION["extra"], "copy_iam_role": "arn:aws:iam::1:role/x\\'; drop table raw.readings; --"}
    named = warehouse_from_connection(Connection(conn_id="w", **{**CONNECTION, "extra": json.dumps(extra)}))
    assert isinstance(named, RedshiftWarehouse)
    assert named._iam_role == "iam_role 'arn:aws:iam::1:role/x\\\\''; drop table raw.readings; --'"
