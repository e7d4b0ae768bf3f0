"""The ephemeral-environment teardown (.github/scripts/teardown_ephemeral.py) against ministack.

Two stacks of a small template that retains a versioned bucket, a table, a queue and a KMS
key: citypulse-pr7 (ephemeral) and citypulse-keep7 (not). The teardown must delete the
first stack and everything it retained, and leave the second alone.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".github" / "scripts" / "teardown_ephemeral.py"

TEMPLATE = {
    "Parameters": {"Env": {"Type": "String"}},
    "Resources": {
        "Key": {"Type": "AWS::KMS::Key", "DeletionPolicy": "Retain", "Properties": {"EnableKeyRotation": True}},
        "KeyAlias": {
            "Type": "AWS::KMS::Alias",
            "Properties": {"AliasName": {"Fn::Sub": "alias/citypulse-${Env}-data"}, "TargetKeyId": {"Ref": "Key"}},
        },
        "Bucket": {
            "Type": "AWS::S3::Bucket",
            "DeletionPolicy": "Retain",
            "Properties": {
                "BucketName": {"Fn::Sub": "citypulse-${Env}-lake-000000000000"},
                "VersioningConfiguration": {"Status": "Enabled"},
            },
        },
        "Table": {
            "Type": "AWS::DynamoDB::Table",
            "DeletionPolicy": "Retain",
            "Properties": {
                "TableName": {"Fn::Sub": "citypulse-${Env}-zone-metrics"},
                "BillingMode": "PAY_PER_REQUEST",
                "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            },
        },
        "Queue": {
            "Type": "AWS::SQS::Queue",
            "DeletionPolicy": "Retain",
            "Properties": {"QueueName": {"Fn::Sub": "citypulse-${Env}-processor-dlq"}},
        },
    },
}


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("teardown_ephemeral", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _deploy(cfn: Any, env: str) -> None:
    cfn.create_stack(
        StackName=f"citypulse-{env}",
        TemplateBody=json.dumps(TEMPLATE),
        Parameters=[{"ParameterKey": "Env", "ParameterValue": env}],
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=f"citypulse-{env}", WaiterConfig={"Delay": 1})


def _state(session: boto3.session.Session, env: str) -> dict[str, bool]:
    s3, ddb, sqs, kms = (session.client(s) for s in ("s3", "dynamodb", "sqs", "kms"))
    cfn = session.client("cloudformation")
    live = {s["StackName"] for s in cfn.list_stacks()["StackSummaries"] if s["StackStatus"] != "DELETE_COMPLETE"}
    return {
        "stack": f"citypulse-{env}" in live,
        "bucket": any(b["Name"] == f"citypulse-{env}-lake-000000000000" for b in s3.list_buckets()["Buckets"]),
        "table": f"citypulse-{env}-zone-metrics" in ddb.list_tables()["TableNames"],
        "queue": bool(sqs.list_queues(QueueNamePrefix=f"citypulse-{env}-").get("QueueUrls")),
        "alias": any(a["AliasName"] == f"alias/citypulse-{env}-data" for a in kms.list_aliases()["Aliases"]),
    }


@pytest.mark.integration
def test_teardown_removes_ephemeral_stacks_and_what_they_retained(aws_env: dict[str, str]) -> None:
    script = _load_script()
    session = boto3.session.Session()
    cfn = session.client("cloudformation")
    for env in ("pr7", "keep7"):
        _deploy(cfn, env)
    s3 = session.client("s3")
    for body in (b"v1", b"v2"):  # two versions: a plain delete would leave the bucket non-empty
        s3.put_object(Bucket="citypulse-pr7-lake-000000000000", Key="raw/readings/x.parquet", Body=body)
    key_id = next(
        a["TargetKeyId"]
        for a in session.client("kms").list_aliases()["Aliases"]
        if a["AliasName"] == "alias/citypulse-pr7-data"
    )
    everything = {"stack": True, "bucket": True, "table": True, "queue": True, "alias": True}
    assert _state(session, "pr7") == everything

    # Younger than the age limit: nothing to do.
    assert script.teardown(session, max_age=timedelta(hours=1)).stacks == []
    # A dry run names what it would delete and deletes nothing.
    later = datetime.now(UTC) + timedelta(hours=2)
    dry = script.teardown(session, max_age=timedelta(hours=1), now=later, dry_run=True)
    assert dry.stacks == ["citypulse-pr7"]
    assert {d.split()[0] for d in dry.retained} >= {"s3://citypulse-pr7-lake-000000000000", "dynamodb", "sqs", "kms"}
    assert _state(session, "pr7") == everything

    done = script.teardown(session, max_age=timedelta(hours=1), now=later)
    assert done.stacks == ["citypulse-pr7"]
    assert _state(session, "pr7") == dict.fromkeys(everything, False)
    assert session.client("kms").describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    # The non-ephemeral environment is untouched.
    assert _state(session, "keep7") == everything
    with pytest.raises(ValueError, match="non-ephemeral"):
        script.retained_resources(session, "keep7")
