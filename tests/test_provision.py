"""Tests of infra/local/provision.py and the root CloudFormation template.

The template is provisioned on a fresh ministack + kinesalite (module-scoped, not the
session's emulators, so the stack's state is this module's alone).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from infra.local.emulators import Emulator, aws_env, kinesis_client, start_kinesalite, start_ministack
from infra.local.provision import DEFAULT_TEMPLATE, STAND_INS, ProvisionError, ProvisionReport, provision

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

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
def test_provision_creates_every_resource_in_seconds(
    first_report: ProvisionReport, local_aws: tuple[Emulator, Emulator, dict[str, str]]
) -> None:
    report = first_report
    assert report.action == "created"
    assert report.seconds < 20, report.render()

    from infra.local.provision import load_template

    template = load_template(DEFAULT_TEMPLATE)
    where = {line.logical_id: line.where for line in report.resources}
    assert set(where) == set(template["Resources"])
    for lid, resource in template["Resources"].items():
        if lid == "AlertEmailSubscription":
            assert where[lid].startswith("not created (condition HasAlertEmail"), where[lid]
        elif resource["Type"] in STAND_INS:
            assert STAND_INS[resource["Type"]].by in where[lid], where[lid]
        else:
            assert where[lid].startswith("ministack"), (lid, where[lid])

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
        "CITYPULSE_SENSOR_STATE_TABLE": "citypulse-local-sensor-state",
        "CITYPULSE_ZONE_METRICS_TABLE": "citypulse-local-zone-metrics",
        "CITYPULSE_PROCESSOR_STATE_TABLE": "citypulse-local-processor-state",
        "CITYPULSE_EVENT_BUS": "citypulse-local-alerts",
        "CITYPULSE_REGISTRY_KEY": "registry/sensor_registry.csv",
    }


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
    template = tmp_path / "needs-esm.yaml"
    template.write_text(
        "Resources:\n"
        "  Queue:\n"
        "    Type: AWS::SQS::Queue\n"
        "  Mapping:\n"
        "    Type: AWS::Lambda::EventSourceMapping\n"
        "    Properties:\n"
        "      FunctionName: f\n"
        "      EventSourceArn: !GetAtt Queue.Arn\n"
        "Outputs:\n"
        "  MappingId:\n"
        "    Value: !Ref Mapping\n"
    )
    with pytest.raises(ProvisionError, match=r"output MappingId -> Mapping"):
        provision(template, "needsesm", local_aws[2], code_root=code_root)


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
