"""Tests of infra/local/provision.py and the root CloudFormation template.

The template is provisioned on a fresh ministack + kinesalite (module-scoped, not the
session's emulators, so the stack's state is this module's alone).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from infra.local.emulators import Emulator, aws_env, kinesis_client, start_kinesalite, start_ministack
from infra.local.provision import (
    DEFAULT_TEMPLATE,
    ProvisionError,
    ProvisionReport,
    load_template,
    placeholder_att,
    placeholder_target,
    provision,
    stand_in_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Conditions the default (local) parameters leave off.
OFF_BY_DEFAULT = {"HasAlertEmail", "HasSlack", "QuickSightOn", "SyntheticOn", "HasInterfaceEndpoints", "FanOut"}

EXPECTED_SQL = (
    "SELECT encode(*, 'base64') AS payload, topic(3) AS zone_id, topic(4) AS gateway_id, "
    "clientid() AS client_id, timestamp() AS received_at FROM 'citypulse/telemetry/+/+'"
)


def test_cfn_lint_clean() -> None:
    templates = sorted(str(p) for p in (REPO_ROOT / "infra" / "cloudformation").glob("*.yaml"))
    assert templates
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    result = subprocess.run([str(cfn_lint), *templates], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_resolved_placeholder_names_its_stand_in_and_attribute() -> None:
    resolved = (
        placeholder_att("ProcessorFanOutConsumer", "ConsumerARN")
        .replace("${AWS::Partition}", "aws")
        .replace("${AWS::Region}", "us-east-1")
        .replace("${AWS::AccountId}", "000000000000")
    )
    assert placeholder_target(resolved) == ("ProcessorFanOutConsumer", "ConsumerARN")
    assert placeholder_target("arn:aws:kinesis:us-east-1:000000000000:stream/citypulse-local-telemetry") is None


@pytest.fixture(scope="module")
def local_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, Emulator, dict[str, str]]]:
    state = tmp_path_factory.mktemp("provision-state")
    ministack = start_ministack(state)
    try:
        kinesis = start_kinesalite(state)
    except BaseException:
        ministack.stop()
        raise
    try:
        yield ministack, kinesis, aws_env(ministack, kinesis)
    finally:
        kinesis.stop()
        ministack.stop()


@pytest.fixture(scope="module")
def code_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in processor package, so concurrent edits to streaming/ cannot change the stack between runs."""
    root = tmp_path_factory.mktemp("code")
    handler = root / "streaming" / "processor"
    handler.mkdir(parents=True)
    (root / "streaming" / "__init__.py").write_text("")
    (handler / "__init__.py").write_text("")
    (handler / "handler.py").write_text("def handler(event, context):\n    return {'batchItemFailures': []}\n")
    return root


@pytest.fixture(scope="module")
def first_report(local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path) -> ProvisionReport:
    return provision(DEFAULT_TEMPLATE, "local", local_aws[2], code_root=code_root)


def _client(env: dict[str, str], service: str, endpoint: str | None = None) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint or env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.mark.integration
def test_provision_creates_every_resource_of_the_template(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]]
) -> None:
    report = first_report
    assert report.action == "created"

    template = load_template(DEFAULT_TEMPLATE)
    where = {line.logical_id: line.where for line in report.resources}
    assert set(where) == set(template["Resources"])
    for lid, resource in template["Resources"].items():
        stand_in = stand_in_for(lid, resource["Type"])
        if resource.get("Condition") in OFF_BY_DEFAULT:
            assert where[lid].startswith(f"not created (condition {resource['Condition']} is false)"), where[lid]
        elif stand_in is not None:
            assert stand_in.by in where[lid], where[lid]
        else:
            assert where[lid].startswith("ministack"), (lid, where[lid])
    # The pieces the issue names, and what stands in for them.
    assert "DuckDB/PostgreSQL warehouse" in where["RedshiftWorkgroup"]
    assert "local Airflow" in where["MwaaEnvironment"]
    assert "citypulse demo" in where["SyntheticTrafficFunction"]
    assert "local dashboard" in where["ZoneTrafficDataSet"]
    assert where["Vpc"] == where["S3GatewayEndpoint"] == where["AthenaWorkGroup"] == "ministack"
    assert "loopback" in where["MwaaSecurityGroupSelfIngress"]

    rendered = report.render()
    for lid in template["Resources"]:
        assert lid in rendered
    assert "kinesalite" in where["TelemetryStream"]
    assert "poller.py" in where["ProcessorEventSourceMapping"]
    assert "rule_bridge.py" in where["TelemetryTopicRule"]

    outputs = report.outputs
    assert outputs["LakeBucketName"] == "citypulse-local-lake-000000000000"
    assert outputs["TelemetryStreamName"] == "citypulse-local-telemetry"
    assert not any(key.startswith("LocalProvision") for key in outputs)
    assert report.processor_env == {
        "CITYPULSE_LAKE_BUCKET": "citypulse-local-lake-000000000000",
        "CITYPULSE_ZONE_METRICS_TABLE": "citypulse-local-zone-metrics",
        "CITYPULSE_PROCESSOR_STATE_TABLE": "citypulse-local-processor-state",
        "CITYPULSE_EVENT_BUS": "citypulse-local-alerts",
        "CITYPULSE_REGISTRY_KEY": "registry/sensor_registry.csv",
        "CITYPULSE_ENV_NAME": "local",  # the processor's metrics carry their environment
    }


@pytest.mark.integration
def test_the_stand_in_report_matches_the_stack(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]]
) -> None:
    """Every line says where a resource lives; the stack must agree, resource by resource."""
    env = local_aws[2]
    stack = _client(env, "cloudformation").describe_stack_resources(StackName=first_report.stack_name)
    in_stack = {r["LogicalResourceId"]: r["ResourceStatus"] for r in stack["StackResources"]}
    deployed = {line.logical_id for line in first_report.resources if line.where.startswith("ministack")}
    assert deployed == set(in_stack)
    assert set(in_stack.values()) == {"CREATE_COMPLETE"}
    for line in first_report.resources:
        if line.where.startswith("not deployed;"):
            stand_in = stand_in_for(line.logical_id, line.resource_type)
            assert stand_in is not None and stand_in.mode == "instead", line
        elif line.where.startswith("not created"):
            assert line.physical_id is None, line
        else:
            assert line.where.startswith("ministack"), line
    stood_in = [x for x in first_report.resources if x.where.startswith("not deployed;")]
    not_created = [x for x in first_report.resources if x.where.startswith("not created")]
    assert len(deployed) + len(stood_in) + len(not_created) == len(load_template(DEFAULT_TEMPLATE)["Resources"])
    assert len(deployed) >= 60 and len(stood_in) >= 10


@pytest.mark.integration
def test_every_optional_feature_provisions_with_placeholders_for_the_stand_ins(
    local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path
) -> None:
    env = local_aws[2]
    report = provision(
        DEFAULT_TEMPLATE,
        "full",
        env,
        code_root=code_root,
        parameters={
            "AlertEmail": "ops@example.com",
            "QuickSightEnabled": "true",
            "QuickSightPrincipalArn": "arn:aws:quicksight:us-east-1:000000000000:group/default/analysts",
            "SyntheticTraffic": "enabled",
            "SlackTokenSecretArn": "arn:aws:secretsmanager:us-east-1:000000000000:secret:slack-AbCdEf",
            "SlackChannelId": "C0123456789",
            "EgressMode": "endpoints",
            "TableCapacityMode": "PROVISIONED",
            "ProcessorStreamConsumer": "ENHANCED_FAN_OUT",
            "ProcessorBatchingWindow": "0",
        },
    )
    where = {line.logical_id: line.where for line in report.resources}
    resources = load_template(DEFAULT_TEMPLATE)["Resources"]
    off = {lid for lid, w in where.items() if w.startswith("not created")}
    assert off == {lid for lid, res in resources.items() if res.get("Condition") == "HasNat"}
    assert where["SsmEndpoint"] == where["EndpointSecurityGroup"] == "ministack"
    for lid in ("SlackConnection", "SlackAlertRule", "QuickSightDataSource", "SyntheticTrafficFunction"):
        assert where[lid].startswith("not deployed; stand-in:"), (lid, where[lid])
    for lid in ("QuickSightReaderSecret", "SyntheticTrafficRole", "OpsEmailSubscription"):
        assert where[lid] == "ministack", (lid, where[lid])
    assert where["SlackInvokeRole"] == "ministack (placeholders for stand-ins: SlackDestination)"
    # The processor reads through its enhanced fan-out consumer: locally the poller reads the
    # consumer's stream with nothing between batches, and the role names the consumer.
    assert where["ProcessorFanOutConsumer"].startswith("not deployed; stand-in: infra/local/poller.py")
    assert where["ProcessorRole"] == "ministack (placeholders for stand-ins: ProcessorFanOutConsumer)"
    (esm,) = report.event_source_mappings
    assert (esm.consumer, esm.stream_name, esm.maximum_batching_window_s) == (
        "citypulse-full-processor",
        "citypulse-full-telemetry",
        0,
    )
    role = _client(env, "iam").get_role_policy(RoleName="citypulse-full-processor", PolicyName="processor")
    assert "arn:aws:local-stand-in:us-east-1:000000000000:ProcessorFanOutConsumer/ConsumerARN" in json.dumps(
        role["PolicyDocument"]
    )
    # The processor's tables are created provisioned at the template's ceilings; their auto
    # scaling is AWS's alone (ministack meters nothing).
    ddb = _client(env, "dynamodb")
    parameters = load_template(DEFAULT_TEMPLATE)["Parameters"]
    for table, prefix in (("processor-state", "StateTable"), ("zone-metrics", "MetricsTable")):
        described = ddb.describe_table(TableName=f"citypulse-full-{table}")["Table"]
        throughput = described["ProvisionedThroughput"]
        # (ministack echoes the parameters' strings where DynamoDB answers numbers)
        assert (int(throughput["ReadCapacityUnits"]), int(throughput["WriteCapacityUnits"])) == (
            parameters[f"{prefix}ReadCapacity"]["Default"],
            parameters[f"{prefix}WriteCapacity"]["Default"],
        )
        assert described.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED") == "PROVISIONED"
    scaling = [lid for lid, res in resources.items() if res["Type"].startswith("AWS::ApplicationAutoScaling::")]
    assert len(scaling) == 8
    assert all(where[lid].startswith("not deployed; no stand-in needed: ministack does not meter") for lid in scaling)
    # The placeholder really reached ministack: the MWAA role names the warehouse's stand-in ARN.
    policy = _client(env, "iam").get_role_policy(RoleName="citypulse-full-mwaa", PolicyName="citypulse-tasks")
    assert "arn:aws:local-stand-in:us-east-1:000000000000:RedshiftWorkgroup/Workgroup.WorkgroupArn" in json.dumps(
        policy["PolicyDocument"]
    )
    assert report.outputs["RedshiftWorkgroupName"] == "local-stand-in-RedshiftWorkgroup"


@pytest.mark.integration
def test_stand_ins_are_described_for_the_local_platform(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]]
) -> None:
    _, kinesis, env = local_aws
    report = first_report

    rule = report.topic_rule
    assert rule.name == "citypulse_local_telemetry"
    assert rule.sql == EXPECTED_SQL
    assert rule.sql_version == "2016-03-23"
    assert rule.partition_key == "${topic(3)}"
    assert rule.stream_name == "citypulse-local-telemetry"
    # The rule bridge writes what the rule cannot act on where the template's error action does.
    from infra.local.platform import _error_action_args

    bucket_arg, bucket, key_arg, key = _error_action_args(rule.error_action)
    assert (bucket_arg, key_arg) == ("--error-bucket", "--error-key")
    assert bucket.startswith("citypulse-local-lake") and key.startswith("ingest-errors/${parse_time(")

    (stream,) = report.streams
    assert (stream.name, stream.shard_count, stream.stream_mode) == ("citypulse-local-telemetry", 4, "ON_DEMAND")
    assert stream.arn == report.outputs["TelemetryStreamArn"]
    summary = kinesis_client(kinesis.endpoint_url).describe_stream_summary(StreamName=stream.name)
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 4
    assert summary["StreamDescriptionSummary"]["StreamARN"] == stream.arn

    (esm,) = report.event_source_mappings
    assert esm.function_name == "citypulse-local-processor"
    assert esm.event_source_arn == stream.arn
    assert esm.stream_name == stream.name
    assert esm.consumer is None  # the stream itself, read once a second (ProcessorStreamConsumer's default)
    assert (esm.batch_size, esm.maximum_batching_window_s, esm.starting_position) == (10000, 1, "TRIM_HORIZON")
    assert esm.function_response_types == ("ReportBatchItemFailures",)
    assert esm.bisect_batch_on_function_error is True
    assert esm.on_failure_destination == "arn:aws:sqs:us-east-1:000000000000:citypulse-local-processor-dlq"

    # The mapping is the poller's job: ministack must not run one against its own stream.
    lam = _client(env, "lambda")
    assert lam.list_event_source_mappings()["EventSourceMappings"] == []
    # The function is real in ministack, code included, as a deploy from an artifacts bucket makes it.
    function = lam.get_function(FunctionName="citypulse-local-processor")
    assert function["Configuration"]["CodeSize"] > 0
    assert function["Configuration"]["Handler"] == "streaming.processor.handler.handler"


@pytest.mark.integration
def test_reprovisioning_is_idempotent(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path
) -> None:
    env = local_aws[2]
    again = provision(DEFAULT_TEMPLATE, "local", env, code_root=code_root)
    assert again.action == "unchanged"
    assert again.outputs == first_report.outputs
    assert again.streams == first_report.streams
    assert again.topic_rule == first_report.topic_rule
    assert again.event_source_mappings == first_report.event_source_mappings


@pytest.mark.integration
def test_reprovisioning_with_a_changed_parameter_updates(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path
) -> None:
    env = local_aws[2]
    updated = provision(
        DEFAULT_TEMPLATE, "local", env, code_root=code_root, parameters={"AlertEmail": "ops@example.com"}
    )
    assert updated.action == "updated"
    where = {line.logical_id: line.where for line in updated.resources}
    assert where["AlertEmailSubscription"] == "ministack"
    subscriptions = _client(env, "sns").list_subscriptions_by_topic(TopicArn=updated.outputs["AlertTopicArn"])
    assert [s["Endpoint"] for s in subscriptions["Subscriptions"]] == ["ops@example.com"]


@pytest.mark.integration
def test_unsupported_resource_type_fails_before_deploying(
    local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path
) -> None:
    env = local_aws[2]
    with pytest.raises(ProvisionError, match=r"ReadingsKeyspace \(AWS::Cassandra::Keyspace\)"):
        provision(FIXTURES / "unsupported-resource.yaml", "unsupported", env, code_root=code_root)
    # Nothing was deployed: no stack, not even the supported queue.
    stacks = _client(env, "cloudformation").list_stacks()["StackSummaries"]
    assert not [s for s in stacks if s["StackName"] == "citypulse-unsupported"]
    queues = _client(env, "sqs").list_queues(QueueNamePrefix="citypulse-unsupported")
    assert not queues.get("QueueUrls")


@pytest.mark.integration
def test_resource_needing_a_removed_stand_in_fails_loudly(
    local_aws: tuple[Emulator, Emulator, dict[str, str]], code_root: Path, tmp_path: Path
) -> None:
    # A stand-in without placeholders: auto scaling, which nothing local does.
    template = tmp_path / "needs-scaling.yaml"
    template.write_text(
        "Resources:\n"
        "  Queue:\n"
        "    Type: AWS::SQS::Queue\n"
        "  Scaling:\n"
        "    Type: AWS::ApplicationAutoScaling::ScalableTarget\n"
        "    Properties:\n"
        "      MinCapacity: 1\n"
        "      MaxCapacity: 2\n"
        "      ResourceId: table/t\n"
        "      ScalableDimension: dynamodb:table:ReadCapacityUnits\n"
        "      ServiceNamespace: dynamodb\n"
        "Outputs:\n"
        "  ScalingId:\n"
        "    Value: !Ref Scaling\n"
    )
    with pytest.raises(ProvisionError, match=r"output ScalingId -> Scaling"):
        provision(template, "needsscaling", local_aws[2], code_root=code_root)


@pytest.mark.integration
def test_template_over_the_inline_limit_goes_through_s3(
    local_aws: tuple[Emulator, Emulator, dict[str, str]],
    code_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import infra.local.provision as provision_module

    # The root template will outgrow CloudFormation's 51,200-byte TemplateBody quota.
    monkeypatch.setattr(provision_module, "TEMPLATE_BODY_LIMIT", 100)
    template = tmp_path / "big.yaml"
    template.write_text(
        "Parameters:\n  EnvName:\n    Type: String\nResources:\n  Queue:\n    Type: AWS::SQS::Queue\n"
        "    Properties:\n      QueueName: !Sub citypulse-${EnvName}-big-template\n"
    )
    env = local_aws[2]
    report = provision(template, "bigtemplate", env, code_root=code_root)
    assert report.action == "created"
    keys = _client(env, "s3").list_objects_v2(Bucket="citypulse-bigtemplate-artifacts-000000000000")["Contents"]
    assert [k["Key"] for k in keys if k["Key"].startswith("templates/")]
