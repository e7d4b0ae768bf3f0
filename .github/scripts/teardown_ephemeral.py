"""Tear down ephemeral (pull-request) environments: their stacks and the data the stacks retain.

Place in the flow: teardown.yml runs this on a schedule (and when a pull request closes)
with the GitHub deploy role (infra/cloudformation/github-oidc.yaml), whose permissions
reach only stacks and resources named ``citypulse-pr<N>``. A stack of
iot-analytics-system.yaml keeps its data on deletion (DeletionPolicy Retain on buckets,
tables, the DLQ, the KMS key and the Redshift namespace), which is right for dev, staging
and prod and wrong for a preview: after deleting the stack this removes what it retained.

    python .github/scripts/teardown_ephemeral.py [--max-age-hours 24] [--only pr42] [--dry-run]

Only environments named ``pr`` + digits are ever touched.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.exceptions

EPHEMERAL = re.compile(r"^citypulse-(pr[0-9]+)$")
LIVE_STATUSES = [
    "CREATE_COMPLETE", "CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "UPDATE_COMPLETE",
    "UPDATE_ROLLBACK_COMPLETE", "UPDATE_ROLLBACK_FAILED", "DELETE_FAILED", "IMPORT_COMPLETE",
]  # fmt: skip


@dataclass
class Teardown:
    """What was (or, in a dry run, would be) removed."""

    stacks: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)


def expired_environments(cfn: Any, now: datetime, max_age: timedelta, only: str | None = None) -> list[str]:
    """Ephemeral environments whose stack was last touched more than ``max_age`` ago."""
    envs = []
    for page in cfn.get_paginator("list_stacks").paginate(StackStatusFilter=LIVE_STATUSES):
        for stack in page["StackSummaries"]:
            match = EPHEMERAL.match(stack["StackName"])
            if not match or (only and match.group(1) != only):
                continue
            touched = stack.get("LastUpdatedTime") or stack["CreationTime"]
            if now - touched >= max_age:
                envs.append(match.group(1))
    return sorted(set(envs))


def _empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        doomed = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        for start in range(0, len(doomed), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed[start : start + 1000], "Quiet": True})
    # Unversioned leftovers (an emulator may list them only here).
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def retained_resources(session: boto3.session.Session, env: str) -> list[tuple[str, Callable[[], object]]]:
    """(description, delete action) for what a deleted stack of ``env`` left behind."""
    if not re.fullmatch(r"pr[0-9]+", env):
        raise ValueError(f"refusing to touch non-ephemeral environment {env!r}")
    prefix = f"citypulse-{env}-"
    s3 = session.client("s3")
    dynamodb = session.client("dynamodb")
    sqs = session.client("sqs")
    kms = session.client("kms")
    actions: list[tuple[str, Callable[[], object]]] = []
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        if name.startswith(prefix):
            actions.append((f"s3://{name}", lambda name=name: _empty_and_delete_bucket(s3, name)))
    for page in dynamodb.get_paginator("list_tables").paginate():
        for table in page["TableNames"]:
            if table.startswith(prefix):
                actions.append((f"dynamodb table {table}", lambda table=table: dynamodb.delete_table(TableName=table)))
    for url in sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", []):
        actions.append((f"sqs queue {url}", lambda url=url: sqs.delete_queue(QueueUrl=url)))
    for alias in kms.list_aliases().get("Aliases", []):
        if alias["AliasName"].startswith(f"alias/{prefix}") and alias.get("TargetKeyId"):
            key = alias["TargetKeyId"]

            def retire(alias_name: str = alias["AliasName"], key: str = key) -> None:
                # The stack's deletion may have taken the alias (it is not retained); the key stays ours.
                with contextlib.suppress(kms.exceptions.NotFoundException):
                    kms.delete_alias(AliasName=alias_name)
                kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)

            actions.append((f"kms key {key} ({alias['AliasName']})", retire))
    namespace = f"citypulse-{env}"
    try:
        redshift = session.client("redshift-serverless")
        redshift.get_namespace(namespaceName=namespace)
        actions.append((f"redshift namespace {namespace}", lambda: redshift.delete_namespace(namespaceName=namespace)))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        pass  # no namespace (or no Redshift Serverless where this runs): nothing to remove
    return actions


def teardown(
    session: boto3.session.Session,
    *,
    max_age: timedelta,
    only: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> Teardown:
    cfn = session.client("cloudformation")
    done = Teardown()
    for env in expired_environments(cfn, now or datetime.now(UTC), max_age, only):
        stack = f"citypulse-{env}"
        done.stacks.append(stack)
        # Found before the stack goes: deleting it removes the alias that names the retained key.
        leftovers = retained_resources(session, env)
        if not dry_run:
            cfn.delete_stack(StackName=stack)
            loopback = any(host in cfn.meta.endpoint_url for host in ("localhost", "127.0.0.1"))
            cfn.get_waiter("stack_delete_complete").wait(StackName=stack, WaiterConfig={"Delay": 1 if loopback else 15})
        for description, delete in leftovers:
            done.retained.append(description)
            if not dry_run:
                delete()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-age-hours", type=float, default=24.0)
    parser.add_argument("--only", help="one environment, e.g. pr42 (when its pull request closes)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.only and not re.fullmatch(r"pr[0-9]+", args.only):
        parser.error(f"--only must name an ephemeral environment (pr<N>), not {args.only!r}")
    done = teardown(
        boto3.session.Session(), max_age=timedelta(hours=args.max_age_hours), only=args.only, dry_run=args.dry_run
    )
    verb = "would delete" if args.dry_run else "deleted"
    for stack in done.stacks:
        print(f"{verb} stack {stack}")
    for item in done.retained:
        print(f"{verb} retained {item}")
    if not done.stacks:
        print("no ephemeral environment to tear down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
