"""Provision the local platform from the project's own CloudFormation template.

Place in the flow: after the emulators start (infra/local/emulators.py) and before anything
publishes. The root template (infra/cloudformation/iot-analytics-system.yaml) is deployed
through ministack's CloudFormation API with the same CreateStack/UpdateStack calls a real
deploy makes. What ministack cannot do for us gets a *stand-in*, declared in one table,
:data:`STAND_INS`:

* ``also``: the resource is deployed to ministack (so names, ARNs and policies resolve as in
  AWS) and something local does its work: Kinesis streams are created on kinesalite too,
  the IoT topic rule is run by the local rule bridge.
* ``instead``: the resource is taken out of what ministack deploys. Either the report carries
  its resolved properties for the local replacement (the Lambda event-source mapping -> the
  local poller), or the table says what covers it locally (Redshift Serverless -> the
  DuckDB/PostgreSQL warehouse, MWAA -> local Airflow, ...) or why nothing needs to.

The table is keyed by resource type, or by logical id where one resource of a type is
replaced and others of that type are not (the synthetic-traffic Lambda is, the processor
Lambda is not).

References from deployed resources to a removed one: a stand-in that declares
``placeholders=True`` lets them be resolved to placeholder names and ARNs
(``local-stand-in-<LogicalId>``, ``arn:<partition>:local-stand-in:<region>:<account>:<LogicalId>/<attribute>``),
so an IAM policy naming the Redshift workgroup still deploys; the report lists which
resources carry placeholders. Otherwise such a reference fails loudly before deploying.

A resource type that neither ministack's CloudFormation nor the table handles fails the
provisioning before anything is deployed, naming the resources. After deploying, every
resource the template should have created is checked in the stack *and* in its service's
own API, so a silently skipped resource cannot pass.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
from botocore.client import BaseClient
from cfnlint.decode import decode

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "infra" / "cloudformation" / "iot-analytics-system.yaml"

# AWS scales an ON_DEMAND stream by itself; kinesalite needs a number. Four shards keep
# per-zone ordering observable (several zones share a shard) at a local producer's pace.
LOCAL_ON_DEMAND_SHARDS = 4

# Outputs this module adds to the deployed copy of the template so that ministack's own
# CloudFormation engine resolves intrinsics and conditions for us; filtered from the report.
_PROBE_PREFIX = "LocalProvision"

_CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"]
_POLL_SECONDS = 0.1
# CloudFormation's quota for an inline TemplateBody (ministack enforces it too); larger
# templates go through S3 and TemplateURL, as `aws cloudformation deploy --s3-bucket` does.
TEMPLATE_BODY_LIMIT = 51_200


@dataclass(frozen=True)
class StandIn:
    """How the local platform covers a resource ministack cannot fully run."""

    mode: Literal["also", "instead"]
    by: str
    why: str
    # "instead" only: references from deployed resources resolve to placeholders (else: fail).
    placeholders: bool = False
    # "instead" only: resolve the resource's properties through ministack for the stand-in.
    resolve: bool = False


_NO_REDSHIFT = "ministack has no Redshift; the same dbt models run on the local warehouse"
_NO_QUICKSIGHT = "ministack has no QuickSight"
_LOOPBACK = "everything binds loopback locally: there is no network to segment"
_NO_EGRESS = "no egress locally, everything binds loopback; ministack has no NAT gateways"
_UNMETERED = "ministack does not meter or throttle a table's capacity: there is nothing to scale"

STAND_INS: Mapping[str, StandIn] = {
    "AWS::Kinesis::Stream": StandIn(
        "also",
        "kinesalite stream of the same name and ARN",
        "ministack's Kinesis keeps positions as list indexes (consumers silently skip records past "
        "retention) and slows as shards fill; all Kinesis traffic goes to kinesalite",
    ),
    "AWS::Kinesis::StreamConsumer": StandIn(
        "instead",
        "infra/local/poller.py reading its stream back to back, as records pushed to a consumer invoke",
        "kinesalite has no enhanced fan-out (RegisterStreamConsumer, SubscribeToShard)",
        placeholders=True,
        resolve=True,
    ),
    "AWS::Lambda::EventSourceMapping": StandIn(
        "instead",
        "infra/local/poller.py (local event-source poller on kinesalite)",
        "ministack would poll its own, unused Kinesis stream",
        placeholders=True,  # the redrive role's grant to pause it, its id's output
        resolve=True,
    ),
    "AWS::IoT::TopicRule": StandIn(
        "also",
        "infra/local/rule_bridge.py (MQTT -> Kinesis)",
        "ministack stores the rule and accepts its Kinesis action but never runs it",
    ),
    "AWS::RedshiftServerless::Namespace": StandIn(
        "instead", "the local DuckDB/PostgreSQL warehouse", _NO_REDSHIFT, placeholders=True
    ),
    "AWS::RedshiftServerless::Workgroup": StandIn(
        "instead", "the local DuckDB/PostgreSQL warehouse", _NO_REDSHIFT, placeholders=True
    ),
    "AWS::MWAA::Environment": StandIn(
        "instead",
        "local Airflow running the same dags/ (infra/local/airflow.py)",
        "ministack has no MWAA runtime",
        placeholders=True,
    ),
    "AWS::QuickSight::DataSource": StandIn(
        "instead", "the local dashboard (issue 6)", _NO_QUICKSIGHT, placeholders=True
    ),
    "AWS::QuickSight::DataSet": StandIn("instead", "the local dashboard (issue 6)", _NO_QUICKSIGHT, placeholders=True),
    "AWS::QuickSight::Dashboard": StandIn(
        "instead", "the local dashboard (issue 6)", _NO_QUICKSIGHT, placeholders=True
    ),
    "AWS::QuickSight::Analysis": StandIn(
        "instead", "the notebooks on the local warehouse (notebooks/)", _NO_QUICKSIGHT, placeholders=True
    ),
    "AWS::QuickSight::Template": StandIn("instead", "no stand-in needed", _NO_QUICKSIGHT, placeholders=True),
    "AWS::QuickSight::VPCConnection": StandIn("instead", "no stand-in needed", _LOOPBACK, placeholders=True),
    "AWS::Events::Connection": StandIn(
        "instead",
        "the alert feed queue (alerts stay local)",
        "no outbound network locally: Slack is never called; ministack has no API destinations",
        placeholders=True,
    ),
    "AWS::Events::ApiDestination": StandIn(
        "instead",
        "the alert feed queue (alerts stay local)",
        "no outbound network locally: Slack is never called; ministack has no API destinations",
        placeholders=True,
    ),
    # The rule whose only target is the Slack API destination.
    "SlackAlertRule": StandIn(
        "instead",
        "the alert feed queue (alerts stay local)",
        "its only target, the Slack API destination, is not deployed locally",
        placeholders=True,
    ),
    "AWS::Athena::NamedQuery": StandIn(
        "instead",
        "DuckDB over the local lake (the same SQL, read_parquet instead of the catalog)",
        "ministack's CloudFormation has no Athena named queries",
        placeholders=True,
    ),
    "AWS::Glue::SecurityConfiguration": StandIn(
        "instead",
        "no stand-in needed: the local crawler writes no logs or bookmarks to encrypt",
        "ministack's CloudFormation has no Glue security configurations",
        placeholders=True,
    ),
    "AWS::EC2::SecurityGroupIngress": StandIn("instead", "no stand-in needed", _LOOPBACK, placeholders=True),
    # TableCapacityMode PROVISIONED: the tables are created provisioned; nothing scales them locally.
    "AWS::ApplicationAutoScaling::ScalableTarget": StandIn("instead", "no stand-in needed", _UNMETERED),
    "AWS::ApplicationAutoScaling::ScalingPolicy": StandIn("instead", "no stand-in needed", _UNMETERED),
    # A metric-math alarm over the tables' throttle events.
    "ProcessorTablesThrottledAlarm": StandIn(
        "instead",
        "no stand-in needed",
        "ministack's CloudFormation refuses metric-math alarms, and nothing throttles a local table",
        placeholders=True,  # the operations dashboard's alarm widget
    ),
    # The NAT path to the internet (EgressMode nat): nothing local talks beyond loopback.
    "AWS::EC2::EIP": StandIn("instead", "no stand-in needed", _NO_EGRESS, placeholders=True),
    "AWS::EC2::NatGateway": StandIn("instead", "no stand-in needed", _NO_EGRESS, placeholders=True),
    "PrivateNatRoute": StandIn("instead", "no stand-in needed", _NO_EGRESS, placeholders=True),
    "AWS::EC2::SecurityGroupEgress": StandIn("instead", "no stand-in needed", _LOOPBACK, placeholders=True),
    # github-oidc.yaml (CI's deploy identity) is never provisioned locally; declared so the
    # table covers every type in infra/cloudformation/.
    "AWS::IAM::OIDCProvider": StandIn(
        "instead", "no stand-in needed", "no CI deploys into the local platform: it needs no federation"
    ),
    # Filters the task log group that MWAA creates; locally the DAG's task states are reported directly.
    "DagTaskFailuresMetricFilter": StandIn(
        "instead",
        "local Airflow's task states (printed in the citypulse demo summary)",
        "the log group it filters is created by MWAA, which does not run locally",
    ),
    # The synthetic-traffic generator (a scheduled Lambda) is played locally by the simulator.
    "SyntheticTrafficFunction": StandIn(
        "instead",
        "the local simulator (citypulse demo, streaming/devices/simulator.py)",
        "the simulator publishes the same gateway messages over MQTT with mutual TLS",
        placeholders=True,
    ),
    "SyntheticTrafficSchedule": StandIn(
        "instead",
        "the local simulator (citypulse demo, streaming/devices/simulator.py)",
        "the simulator paces itself; ministack would invoke a function that is not deployed",
        placeholders=True,
    ),
    "SyntheticTrafficInvokePermission": StandIn(
        "instead",
        "the local simulator (citypulse demo, streaming/devices/simulator.py)",
        "grants the schedule a function that is not deployed locally",
        placeholders=True,
    ),
    # The read API's alert log: in AWS a function on the alert rule keeps it in a table; locally
    # the dashboard server drains the rule's SQS feed into its own. ministack's EventBridge
    # would run the function in the emulator on every alert, beside the feed.
    "AlertStoreFunction": StandIn(
        "instead",
        "the dashboard server's alert log, drained from the alert feed queue (infra/local/dashboard_server.py)",
        "ministack's EventBridge would run a second alert log inside the emulator on every alert",
        placeholders=True,
    ),
    "AlertStoreInvokePermission": StandIn(
        "instead",
        "the dashboard server's alert log, drained from the alert feed queue (infra/local/dashboard_server.py)",
        "grants the alert rule a function that is not deployed locally",
        placeholders=True,
    ),
    # The sweeper's function is deployed (config + code); its schedule is kept by the platform.
    "SweeperSchedule": StandIn(
        "instead",
        "infra/local/schedule.py (the platform invokes the same handler at the same rate)",
        "ministack's EventBridge would run a second sweeper inside the emulator",
        placeholders=True,
    ),
    "SweeperInvokePermission": StandIn(
        "instead",
        "infra/local/schedule.py (the platform invokes the same handler at the same rate)",
        "grants a schedule that is not deployed locally",
        placeholders=True,
    ),
}


def stand_in_for(logical_id: str, resource_type: str) -> StandIn | None:
    """The stand-in for a resource: by its logical id first, else by its type."""
    return STAND_INS.get(logical_id) or STAND_INS.get(resource_type)


class ProvisionError(RuntimeError):
    """The template cannot be provisioned locally, or provisioning did not produce what it declares."""


@dataclass(frozen=True)
class StreamSpec:
    """A Kinesis stream as created on kinesalite."""

    logical_id: str
    name: str
    arn: str
    shard_count: int
    stream_mode: str
    retention_hours: int


@dataclass(frozen=True)
class TopicRuleSpec:
    """What the rule bridge must honour, read back from the deployed rule."""

    logical_id: str
    name: str
    sql: str
    sql_version: str
    stream_name: str
    partition_key: str  # an IoT substitution template, e.g. "${topic(3)}"
    disabled: bool
    error_action: dict[str, Any] | None


@dataclass(frozen=True)
class EventSourceMappingSpec:
    """An event-source mapping with its intrinsics resolved, for the local poller."""

    logical_id: str
    function_name: str
    event_source_arn: str
    stream_name: str
    # The enhanced fan-out consumer the mapping reads through (records pushed as they arrive);
    # None: the stream itself, a shared-throughput consumer read once a second.
    consumer: str | None
    starting_position: str
    batch_size: int
    maximum_batching_window_s: int
    function_response_types: tuple[str, ...]
    bisect_batch_on_function_error: bool
    maximum_retry_attempts: int | None
    on_failure_destination: str | None
    properties: dict[str, Any]


@dataclass(frozen=True)
class ResourceLine:
    logical_id: str
    resource_type: str
    physical_id: str | None
    where: str


@dataclass
class ProvisionReport:
    """What was provisioned where, and the names the local platform needs."""

    stack_name: str
    action: Literal["created", "updated", "unchanged", "recreated"]
    seconds: float
    resources: list[ResourceLine]
    outputs: dict[str, str]
    streams: list[StreamSpec] = field(default_factory=list)
    topic_rules: list[TopicRuleSpec] = field(default_factory=list)
    event_source_mappings: list[EventSourceMappingSpec] = field(default_factory=list)
    # Function name -> the environment variables the template gives it (as ministack holds them).
    function_env: dict[str, dict[str, str]] = field(default_factory=dict)
    code_location: tuple[str, str] | None = None

    @property
    def topic_rule(self) -> TopicRuleSpec:
        """The template's one topic rule (the rule bridge runs exactly one)."""
        if len(self.topic_rules) != 1:
            raise ProvisionError(f"expected one IoT topic rule, the template has {len(self.topic_rules)}")
        return self.topic_rules[0]

    @property
    def processor_env(self) -> dict[str, str]:
        """Environment of the function the event-source mapping invokes: what the handler gets in AWS."""
        if len(self.event_source_mappings) != 1:
            count = len(self.event_source_mappings)
            raise ProvisionError(f"expected one event-source mapping, the template has {count}")
        return dict(self.function_env[self.event_source_mappings[0].function_name])

    def render(self) -> str:
        """One line per resource: logical id, type, where it lives."""
        lines = [f"stack {self.stack_name}: {self.action} in {self.seconds:.1f} s"]
        if self.code_location:
            lines.append(f"  processor code: s3://{self.code_location[0]}/{self.code_location[1]}")
        id_width = max((len(r.logical_id) for r in self.resources), default=0)
        type_width = max((len(r.resource_type) for r in self.resources), default=0)
        for r in self.resources:
            lines.append(f"  {r.logical_id:<{id_width}}  {r.resource_type:<{type_width}}  {r.where}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Template handling
# ---------------------------------------------------------------------------


def load_template(template_path: Path) -> dict[str, Any]:
    """Parse a CloudFormation YAML/JSON template (short-form tags included) with cfn-lint's decoder."""
    template, matches = decode(str(template_path))
    if matches or template is None:
        problems = "; ".join(str(m) for m in matches) or "empty template"
        raise ProvisionError(f"cannot parse {template_path}: {problems}")
    # cfn-lint returns str/dict subclasses that remember line numbers; plain JSON types from here on.
    return json.loads(json.dumps(template))


def _is_intrinsic(node: Any) -> bool:
    if not isinstance(node, dict) or len(node) != 1:
        return False
    key = next(iter(node))
    return key in ("Ref", "Condition") or key.startswith("Fn::")


_SUB_VAR = re.compile(r"\$\{(?!!)([^}]+)\}")


def _references(node: Any) -> Iterator[str]:
    """Logical ids and parameter names a template fragment refers to (Ref, GetAtt, Sub)."""
    if isinstance(node, list):
        for item in node:
            yield from _references(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                yield value
            elif key == "Fn::GetAtt":
                target = value[0] if isinstance(value, list) else str(value).split(".", 1)[0]
                if isinstance(target, str):
                    yield target
            elif key == "Fn::Sub":
                text, variables = (value[0], value[1]) if isinstance(value, list) else (value, {})
                for name in _SUB_VAR.findall(text if isinstance(text, str) else ""):
                    name = name.split(".", 1)[0]
                    if name not in variables:
                        yield name
                yield from _references(variables)
            else:
                yield from _references(value)


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Scalar and intrinsic leaves of a properties tree, with their paths."""
    if _is_intrinsic(node):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield path, node


def _set_path(tree: Any, path: tuple[str | int, ...], value: Any) -> None:
    for step in path[:-1]:
        tree = tree[step]
    tree[path[-1]] = value


def _delete_path(tree: Any, path: tuple[str | int, ...]) -> None:
    for step in path[:-1]:
        tree = tree[step]
    del tree[path[-1]]


@dataclass
class _Plan:
    deployed: dict[str, Any]  # the template ministack receives
    removed: dict[str, dict[str, Any]]  # "instead" stand-ins: logical id -> resource
    # output key -> (logical id, property path) for intrinsic leaves of removed resources
    leaf_probes: dict[str, tuple[str, tuple[str | int, ...]]]
    # output key -> condition name
    condition_probes: dict[str, str]
    # deployed resource or output -> the removed resources its placeholders stand for
    placeholders: dict[str, list[str]] = field(default_factory=dict)


def placeholder_ref(logical_id: str) -> str:
    """What a Ref to a removed stand-in resolves to locally."""
    return f"local-stand-in-{logical_id}"


def placeholder_att(logical_id: str, attribute: str) -> str:
    """What a GetAtt of a removed stand-in resolves to locally (a Fn::Sub template: an ARN-shaped string)."""
    return f"arn:${{AWS::Partition}}:local-stand-in:${{AWS::Region}}:${{AWS::AccountId}}:{logical_id}/{attribute}"


def placeholder_target(arn: str) -> tuple[str, str] | None:
    """The (logical id, attribute) a resolved `placeholder_att` stands for; None for any other ARN."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[2] != "local-stand-in":
        return None
    logical_id, _, attribute = parts[5].partition("/")
    return logical_id, attribute


def _with_placeholders(node: Any, removed: set[str]) -> Any:
    """``node`` with every Ref/GetAtt/Sub reference to a removed resource replaced by its placeholder."""
    if isinstance(node, list):
        return [_with_placeholders(item, removed) for item in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        key, value = next(iter(node.items()))
        if key == "Ref" and value in removed:
            return placeholder_ref(value)
        if key == "Fn::GetAtt":
            target, attribute = value if isinstance(value, list) else str(value).split(".", 1)
            if target in removed:
                return {"Fn::Sub": placeholder_att(target, attribute)}
        if key == "Fn::Sub":
            text, variables = (value[0], value[1]) if isinstance(value, list) else (value, {})

            def swap(match: re.Match[str]) -> str:
                name = match.group(1)
                if name in variables:
                    return match.group(0)
                target, _, attribute = name.partition(".")
                if target not in removed:
                    return match.group(0)
                return placeholder_att(target, attribute) if attribute else placeholder_ref(target)

            text = _SUB_VAR.sub(swap, text) if isinstance(text, str) else text
            variables = _with_placeholders(variables, removed)
            return {"Fn::Sub": [text, variables] if variables else text}
    return {key: _with_placeholders(value, removed) for key, value in node.items()}


def _plan(template: dict[str, Any]) -> _Plan:
    """Split the template into what ministack deploys and what the stand-ins replace."""
    deployed = copy.deepcopy(template)
    resources: dict[str, Any] = deployed.get("Resources") or {}
    removed: dict[str, dict[str, Any]] = {}
    for lid, res in resources.items():
        stand_in = stand_in_for(lid, res.get("Type", ""))
        if stand_in and stand_in.mode == "instead":
            removed[lid] = res
    for lid in removed:
        del resources[lid]
    replaceable = {lid for lid, res in removed.items() if stand_in_for(lid, res["Type"]).placeholders}  # type: ignore[union-attr]

    # A kept resource or output that needs a removed one: placeholders where the stand-in
    # allows them, else it cannot be deployed honestly.
    needing: list[str] = []
    placeholders: dict[str, list[str]] = {}
    for section in ("Resources", "Outputs"):
        entries: dict[str, Any] = deployed.get(section) or {}
        for lid, body in entries.items():
            if section == "Resources":
                depends = body.get("DependsOn", [])
                depends = [depends] if isinstance(depends, str) else depends
                kept = [d for d in depends if d not in removed]
                if len(kept) != len(depends):
                    # Ordering against a resource that is not deployed is moot.
                    if kept:
                        body["DependsOn"] = kept
                    else:
                        body.pop("DependsOn")
            hit = sorted(set(_references(body)) & removed.keys())
            if not hit:
                continue
            refused = [h for h in hit if h not in replaceable]
            if refused:
                needing.append(f"{section[:-1].lower()} {lid} -> {', '.join(refused)}")
                continue
            entries[lid] = _with_placeholders(body, set(hit))
            placeholders[lid] = hit
    if needing:
        raise ProvisionError(
            "resources replaced by local stand-ins are referenced by what ministack must deploy: " + "; ".join(needing)
        )

    outputs: dict[str, Any] = deployed.setdefault("Outputs", {})
    clash = [k for k in outputs if k.startswith(_PROBE_PREFIX)]
    if clash:
        raise ProvisionError(f"output names reserved for local provisioning: {clash}")

    # Let ministack's engine resolve the removed resources' intrinsics for us, as outputs
    # (only for the stand-ins that run the resource's configuration locally).
    leaf_probes: dict[str, tuple[str, tuple[str | int, ...]]] = {}
    for lid, res in removed.items():
        if not stand_in_for(lid, res["Type"]).resolve:  # type: ignore[union-attr]
            continue
        for path, value in _leaves(res.get("Properties") or {}):
            if not _is_intrinsic(value):
                continue
            hit = set(_references(value)) & removed.keys()
            if hit - replaceable:
                continue
            # A reference to another stand-in resolves to its placeholder (the event-source
            # mapping's EventSourceArn naming a stood-in stream consumer, say).
            value = _with_placeholders(value, hit) if hit else value
            key = f"{_PROBE_PREFIX}Leaf{len(leaf_probes)}"
            outputs[key] = {"Value": value}
            if res.get("Condition"):
                outputs[key]["Condition"] = res["Condition"]
            leaf_probes[key] = (lid, path)

    # ... and which conditions hold, so we know which resources must exist afterwards.
    condition_probes: dict[str, str] = {}
    used = {res["Condition"] for res in resources.values() if res.get("Condition")}
    used |= {res["Condition"] for res in removed.values() if res.get("Condition")}
    for name in sorted(used):
        key = f"{_PROBE_PREFIX}Condition{len(condition_probes)}"
        outputs[key] = {"Condition": name, "Value": "true"}
        condition_probes[key] = name
    if not outputs:
        del deployed["Outputs"]
    return _Plan(deployed, removed, leaf_probes, condition_probes, placeholders)


# ---------------------------------------------------------------------------
# AWS clients from an explicit environment mapping (no os.environ mutation)
# ---------------------------------------------------------------------------


class _Clients:
    def __init__(self, aws_env: Mapping[str, str]) -> None:
        self._env = aws_env
        self._session = boto3.session.Session(
            aws_access_key_id=aws_env.get("AWS_ACCESS_KEY_ID", "test"),
            aws_secret_access_key=aws_env.get("AWS_SECRET_ACCESS_KEY", "test"),
            region_name=aws_env.get("AWS_DEFAULT_REGION") or aws_env.get("AWS_REGION") or "us-east-1",
        )
        self._models = botocore.session.get_session()
        self._cache: dict[tuple[str, str], BaseClient] = {}

    def endpoint(self, service: str) -> str:
        service_id = self._models.get_service_model(service).service_id
        var = "AWS_ENDPOINT_URL_" + str(service_id).replace(" ", "_").upper()
        url = self._env.get(var) or self._env.get("AWS_ENDPOINT_URL")
        if not url:
            # Never fall through to the real AWS from a local provisioning run.
            raise ProvisionError(f"no local endpoint for {service}: set {var} or AWS_ENDPOINT_URL")
        return url

    def __call__(self, service: str, endpoint_url: str | None = None) -> Any:
        """A client for ``service``, at ``endpoint_url`` if given, else where the env routes it."""
        url = endpoint_url or self.endpoint(service)
        if (service, url) not in self._cache:
            self._cache[service, url] = self._session.client(
                service,
                endpoint_url=url,
                config=botocore.config.Config(
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"max_attempts": 3, "mode": "standard"},
                ),
            )
        return self._cache[service, url]


# ---------------------------------------------------------------------------
# Deploy
# ---------------------------------------------------------------------------


def _check_support(clients: _Clients, plan: _Plan, source: dict[str, str]) -> None:
    """Fail before deploying if ministack's CloudFormation does not know a resource type."""
    resources = plan.deployed.get("Resources") or {}
    foreign = sorted(
        f"{lid} ({res.get('Type')})"
        for lid, res in resources.items()
        if not str(res.get("Type", "")).startswith(("AWS::", "Custom::"))
    )
    if foreign:
        raise ProvisionError(f"resource types unknown to CloudFormation: {', '.join(foreign)}")
    try:
        clients("cloudformation").validate_template(**source)
    except botocore.exceptions.ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", str(exc))
        match = re.search(r"Unrecognized resource types: \[([^\]]*)\]", message)
        if not match:
            raise ProvisionError(f"ministack rejected the template: {message}") from exc
        types = {t.strip() for t in match.group(1).split(",")}
        named = sorted(f"{lid} ({res['Type']})" for lid, res in resources.items() if res.get("Type") in types)
        raise ProvisionError(
            "cannot provision locally: neither ministack's CloudFormation nor a stand-in in "
            f"infra/local/provision.py handles {', '.join(named)}"
        ) from exc


def _stack_status(cfn: Any, stack_name: str) -> dict[str, Any] | None:
    try:
        stacks = cfn.describe_stacks(StackName=stack_name)["Stacks"]
    except botocore.exceptions.ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    return stacks[0] if stacks else None


def _wait_stack(cfn: Any, stack_name: str, timeout: float) -> dict[str, Any]:
    """Poll until the stack leaves its *_IN_PROGRESS state (faster than the boto3 waiter's 5 s steps)."""
    deadline = time.monotonic() + timeout
    while True:
        stack = _stack_status(cfn, stack_name)
        if stack is None:
            return {"StackStatus": "DELETE_COMPLETE"}
        if not stack["StackStatus"].endswith("_IN_PROGRESS"):
            return stack
        if time.monotonic() > deadline:
            raise ProvisionError(f"stack {stack_name} still {stack['StackStatus']} after {timeout:.0f} s")
        time.sleep(_POLL_SECONDS)


def _failure_reasons(cfn: Any, stack_name: str) -> str:
    try:
        events = cfn.describe_stack_events(StackName=stack_name)["StackEvents"]
    except botocore.exceptions.ClientError:
        return "(no stack events)"
    reasons = [
        f"{e['LogicalResourceId']} ({e.get('ResourceType')}): {e.get('ResourceStatusReason', '')}"
        for e in events
        if e.get("ResourceStatus", "").endswith("FAILED") and e.get("ResourceStatusReason")
    ]
    return "; ".join(dict.fromkeys(reasons)) or "(no failure reason recorded)"


def _deploy(
    clients: _Clients, stack_name: str, source: dict[str, str], parameters: list[dict[str, str]], timeout: float
) -> Literal["created", "updated", "unchanged", "recreated"]:
    cfn = clients("cloudformation")
    existing = _stack_status(cfn, stack_name)
    recreated = False
    if existing is not None and existing["StackStatus"] == "ROLLBACK_COMPLETE":
        # A failed first create leaves a stack that can only be deleted (as in AWS).
        cfn.delete_stack(StackName=stack_name)
        _wait_stack(cfn, stack_name, timeout)
        existing, recreated = None, True
    if existing is not None and existing["StackStatus"].endswith("_IN_PROGRESS"):
        existing = _wait_stack(cfn, stack_name, timeout)

    if existing is None:
        cfn.create_stack(StackName=stack_name, Parameters=parameters, Capabilities=_CAPABILITIES, **source)
        final = _wait_stack(cfn, stack_name, timeout)
        if final["StackStatus"] != "CREATE_COMPLETE":
            raise ProvisionError(
                f"stack {stack_name} ended {final['StackStatus']}: {_failure_reasons(cfn, stack_name)}"
            )
        return "recreated" if recreated else "created"

    try:
        cfn.update_stack(StackName=stack_name, Parameters=parameters, Capabilities=_CAPABILITIES, **source)
    except botocore.exceptions.ClientError as exc:
        if "No updates are to be performed" in str(exc):
            return "unchanged"
        raise ProvisionError(f"update of stack {stack_name} refused: {exc}") from exc
    final = _wait_stack(cfn, stack_name, timeout)
    if final["StackStatus"] != "UPDATE_COMPLETE":
        raise ProvisionError(f"stack {stack_name} ended {final['StackStatus']}: {_failure_reasons(cfn, stack_name)}")
    return "updated"


# ---------------------------------------------------------------------------
# Verification: the stack says COMPLETE *and* the service has the resource
# ---------------------------------------------------------------------------


def _exists_checks(clients: _Clients) -> dict[str, Callable[[str], object]]:
    """Per type, a read in the resource's own service API that fails if the resource is missing."""
    return {
        "AWS::KMS::Key": lambda pid: clients("kms").describe_key(KeyId=pid),
        "AWS::KMS::Alias": lambda pid: _require(
            any(a["AliasName"] == pid for a in clients("kms").list_aliases()["Aliases"]), pid
        ),
        "AWS::S3::Bucket": lambda pid: clients("s3").head_bucket(Bucket=pid),
        "AWS::S3::BucketPolicy": lambda pid: None,  # checked through its bucket below
        # The stack's copy, in ministack; the kinesalite twin is made and checked afterwards.
        "AWS::Kinesis::Stream": lambda pid: clients(
            "kinesis", clients.endpoint("cloudformation")
        ).describe_stream_summary(StreamName=pid),
        "AWS::DynamoDB::Table": lambda pid: clients("dynamodb").describe_table(TableName=pid),
        "AWS::Logs::LogGroup": lambda pid: _require(
            any(
                g["logGroupName"] == pid
                for g in clients("logs").describe_log_groups(logGroupNamePrefix=pid)["logGroups"]
            ),
            pid,
        ),
        "AWS::SQS::Queue": lambda pid: clients("sqs").get_queue_attributes(QueueUrl=pid),
        "AWS::IAM::Role": lambda pid: clients("iam").get_role(RoleName=pid),
        "AWS::Lambda::Function": lambda pid: clients("lambda").get_function(FunctionName=pid),
        "AWS::Events::EventBus": lambda pid: clients("events").describe_event_bus(Name=pid),
        "AWS::SNS::Topic": lambda pid: clients("sns").get_topic_attributes(TopicArn=pid),
        "AWS::IoT::ThingType": lambda pid: clients("iot").describe_thing_type(thingTypeName=pid),
        "AWS::IoT::Policy": lambda pid: clients("iot").get_policy(policyName=pid),
        "AWS::IoT::TopicRule": lambda pid: clients("iot").get_topic_rule(ruleName=pid),
        "AWS::Glue::Database": lambda pid: clients("glue").get_database(Name=pid),
        "AWS::Glue::Crawler": lambda pid: clients("glue").get_crawler(Name=pid),
        "AWS::Events::Rule": lambda pid: _require(_rule_exists(clients("events"), pid), pid),
        "AWS::EC2::VPC": lambda pid: clients("ec2").describe_vpcs(VpcIds=[pid]),
        "AWS::EC2::Subnet": lambda pid: clients("ec2").describe_subnets(SubnetIds=[pid]),
        "AWS::EC2::SecurityGroup": lambda pid: _require(
            bool(clients("ec2").describe_security_groups(GroupIds=[pid])["SecurityGroups"]), pid
        ),
        "AWS::EC2::RouteTable": lambda pid: clients("ec2").describe_route_tables(RouteTableIds=[pid]),
        "AWS::EC2::VPCEndpoint": lambda pid: _require(
            bool(clients("ec2").describe_vpc_endpoints(VpcEndpointIds=[pid])["VpcEndpoints"]), pid
        ),
        "AWS::Athena::WorkGroup": lambda pid: clients("athena").get_work_group(WorkGroup=pid),
        "AWS::CloudWatch::Alarm": lambda pid: _require(
            bool(clients("cloudwatch").describe_alarms(AlarmNames=[pid])["MetricAlarms"]), pid
        ),
        "AWS::CloudWatch::Dashboard": lambda pid: clients("cloudwatch").get_dashboard(DashboardName=pid),
        "AWS::SSM::Parameter": lambda pid: clients("ssm").get_parameter(Name=pid),
    }


def _rule_exists(events: Any, name: str) -> bool:
    """Whether an EventBridge rule of that name (or ``bus|name`` id) exists on any bus."""
    name = name.rsplit("|", 1)[-1]
    for bus in events.list_event_buses()["EventBuses"]:
        try:
            events.describe_rule(Name=name, EventBusName=bus["Name"])
            return True
        except events.exceptions.ResourceNotFoundException:
            continue
    return False


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise LookupError(what)


def _verify(clients: _Clients, stack_name: str, plan: _Plan, true_conditions: set[str]) -> dict[str, dict[str, Any]]:
    """Every resource the deployed template should create is COMPLETE in the stack and present in its service."""
    cfn = clients("cloudformation")
    listed = {r["LogicalResourceId"]: r for r in cfn.describe_stack_resources(StackName=stack_name)["StackResources"]}
    problems: list[str] = []
    # A bucket policy is only real if the bucket answers for it.
    s3_policies = {
        lid: res for lid, res in plan.deployed["Resources"].items() if res["Type"] == "AWS::S3::BucketPolicy"
    }
    checks = _exists_checks(clients)
    for lid, res in plan.deployed["Resources"].items():
        condition = res.get("Condition")
        if condition and condition not in true_conditions:
            if lid in listed:
                problems.append(f"{lid}: created although condition {condition} is false")
            continue
        row = listed.get(lid)
        if row is None:
            problems.append(f"{lid} ({res['Type']}): missing from the stack")
            continue
        if row["ResourceStatus"] not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
            problems.append(f"{lid} ({res['Type']}): {row['ResourceStatus']} {row.get('ResourceStatusReason', '')}")
            continue
        check = checks.get(res["Type"])
        if check is None:
            continue
        try:
            check(row["PhysicalResourceId"])
        except (botocore.exceptions.ClientError, LookupError) as exc:
            problems.append(
                f"{lid} ({res['Type']}): stack says {row['ResourceStatus']} but the service has no "
                f"{row['PhysicalResourceId']!r} ({exc})"
            )
    for lid in s3_policies:
        row = listed.get(lid)
        if row is None:
            continue
        bucket_ref = plan.deployed["Resources"][lid]["Properties"].get("Bucket")
        bucket_lid = bucket_ref.get("Ref") if isinstance(bucket_ref, dict) else None
        bucket = listed[bucket_lid]["PhysicalResourceId"] if bucket_lid in listed else bucket_ref
        try:
            clients("s3").get_bucket_policy(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            problems.append(f"{lid} (AWS::S3::BucketPolicy): bucket {bucket} has no policy ({exc})")
    extra = sorted(set(listed) - set(plan.deployed["Resources"]))
    problems += [f"{lid}: in the stack but not in the template" for lid in extra]
    if problems:
        raise ProvisionError("provisioned stack does not match the template:\n  " + "\n  ".join(problems))
    return listed


# ---------------------------------------------------------------------------
# Stand-ins
# ---------------------------------------------------------------------------


def _kinesalite_stream(clients: _Clients, ministack_url: str, lid: str, physical_id: str) -> StreamSpec:
    """Create (or check) the kinesalite twin of a stream ministack holds, with the template's settings."""
    ministack_kinesis = clients("kinesis", ministack_url)
    summary = ministack_kinesis.describe_stream_summary(StreamName=physical_id)["StreamDescriptionSummary"]
    mode = summary.get("StreamModeDetails", {}).get("StreamMode", "PROVISIONED")
    shards = LOCAL_ON_DEMAND_SHARDS if mode == "ON_DEMAND" else int(summary["OpenShardCount"])
    retention = int(summary.get("RetentionPeriodHours", 24))
    kinesis = clients("kinesis")
    try:
        current = kinesis.describe_stream_summary(StreamName=physical_id)["StreamDescriptionSummary"]
    except kinesis.exceptions.ResourceNotFoundException:
        kinesis.create_stream(StreamName=physical_id, ShardCount=shards)
        current = _wait_stream_active(kinesis, physical_id)
    if int(current["OpenShardCount"]) != shards:
        # kinesalite has no UpdateShardCount; resharding a local stream means starting it afresh.
        raise ProvisionError(
            f"kinesalite stream {physical_id} has {current['OpenShardCount']} shards, the template wants "
            f"{shards}: delete the local state directory's kinesis/ to recreate it"
        )
    if int(current["RetentionPeriodHours"]) < retention:
        kinesis.increase_stream_retention_period(StreamName=physical_id, RetentionPeriodHours=retention)
    if current["StreamARN"] != summary["StreamARN"]:
        raise ProvisionError(f"kinesalite ARN {current['StreamARN']} differs from the stack's {summary['StreamARN']}")
    return StreamSpec(lid, physical_id, current["StreamARN"], shards, mode, retention)


def _wait_stream_active(kinesis: Any, name: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        if summary["StreamStatus"] == "ACTIVE":
            return dict(summary)
        if time.monotonic() > deadline:
            raise ProvisionError(f"kinesalite stream {name} still {summary['StreamStatus']} after {timeout:.0f} s")
        time.sleep(_POLL_SECONDS)


def _topic_rule(clients: _Clients, lid: str, physical_id: str) -> TopicRuleSpec:
    rule = clients("iot").get_topic_rule(ruleName=physical_id)["rule"]
    kinesis_actions = [a["kinesis"] for a in rule.get("actions", []) if "kinesis" in a]
    if len(kinesis_actions) != 1:
        raise ProvisionError(
            f"topic rule {physical_id}: the local rule bridge runs exactly one Kinesis action, "
            f"the rule has {len(kinesis_actions)} (actions: {[next(iter(a)) for a in rule.get('actions', [])]})"
        )
    action = kinesis_actions[0]
    return TopicRuleSpec(
        logical_id=lid,
        name=physical_id,
        sql=rule["sql"],
        sql_version=rule.get("awsIotSqlVersion", "2015-10-08"),
        stream_name=action["streamName"],
        partition_key=action.get("partitionKey", "${newuuid()}"),
        disabled=bool(rule.get("ruleDisabled", False)),
        error_action=rule.get("errorAction"),
    )


def _event_source_mapping(
    lid: str, properties: dict[str, Any], consumers: Mapping[str, dict[str, Any]]
) -> EventSourceMappingSpec:
    """`properties` resolved; `consumers`: the stood-in stream consumers' resolved properties by logical id."""
    unresolved = [".".join(map(str, p)) for p, v in _leaves(properties) if _is_intrinsic(v)]
    if unresolved:
        raise ProvisionError(f"{lid}: could not resolve {', '.join(unresolved)}")
    arn = str(properties["EventSourceArn"])
    consumer = None
    if (target := placeholder_target(arn)) is not None:
        # A consumer's ARN (its placeholder): the poller reads the consumer's stream.
        stood_in, attribute = target
        if attribute != "ConsumerARN" or stood_in not in consumers:
            raise ProvisionError(f"{lid}: the local poller reads Kinesis streams and their consumers only, not {arn}")
        consumer = str(consumers[stood_in]["ConsumerName"])
        arn = str(consumers[stood_in]["StreamARN"])
    if ":kinesis:" not in arn:
        raise ProvisionError(f"{lid}: the local poller reads Kinesis streams only, not {arn}")
    on_failure = properties.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")
    retries = properties.get("MaximumRetryAttempts")
    return EventSourceMappingSpec(
        logical_id=lid,
        function_name=str(properties["FunctionName"]),
        event_source_arn=arn,
        stream_name=arn.rsplit("/", 1)[-1],
        consumer=consumer,
        starting_position=str(properties.get("StartingPosition", "LATEST")),
        batch_size=int(properties.get("BatchSize", 100)),
        maximum_batching_window_s=int(properties.get("MaximumBatchingWindowInSeconds", 0)),
        function_response_types=tuple(properties.get("FunctionResponseTypes", ())),
        bisect_batch_on_function_error=_truthy(properties.get("BisectBatchOnFunctionError", False)),
        maximum_retry_attempts=None if retries is None else int(retries),
        on_failure_destination=None if on_failure is None else str(on_failure),
        properties=properties,
    )


def _function_env(clients: _Clients, lid: str, name: str) -> dict[str, str]:
    config = clients("lambda").get_function_configuration(FunctionName=name)
    # ministack creates a function whose S3 code object is missing, without code; AWS would refuse.
    if int(config.get("CodeSize", 0)) <= 0:
        raise ProvisionError(f"{lid}: ministack holds no code for function {name} (code object missing?)")
    return dict(config.get("Environment", {}).get("Variables", {}))


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


# ---------------------------------------------------------------------------
# Processor code package
# ---------------------------------------------------------------------------


def package_code(root: Path, packages: tuple[str, ...] = ("streaming",)) -> bytes:
    """A deterministic zip of the given top-level packages (same sources -> same bytes -> same key)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for package in packages:
            for path in sorted((root / package).rglob("*")):
                if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}:
                    continue
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def _put_artifact(clients: _Clients, env_name: str, prefix: str, suffix: str, data: bytes) -> tuple[str, str]:
    """Store a deploy artifact where CI would: an artifacts bucket outside the stack, content-addressed."""
    account = clients("sts").get_caller_identity()["Account"]
    bucket = f"citypulse-{env_name}-artifacts-{account}"
    key = f"{prefix}/{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
    s3 = clients("s3")
    try:
        s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        s3.create_bucket(Bucket=bucket)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return bucket, key


def _template_source(clients: _Clients, env_name: str, template: dict[str, Any]) -> dict[str, str]:
    body = json.dumps(template, sort_keys=True, separators=(",", ":"))
    if len(body.encode()) <= TEMPLATE_BODY_LIMIT:
        return {"TemplateBody": body}
    bucket, key = _put_artifact(clients, env_name, "templates", ".json", body.encode())
    return {"TemplateURL": f"{clients.endpoint('s3')}/{bucket}/{key}"}


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def provision(
    template_path: Path,
    env_name: str,
    aws_env: Mapping[str, str],
    *,
    parameters: Mapping[str, str] | None = None,
    stack_name: str | None = None,
    code_root: Path = REPO_ROOT,
    timeout: float = 120.0,
) -> ProvisionReport:
    """Deploy ``template_path`` to ministack's CloudFormation and bring up the local stand-ins.

    ``aws_env`` routes the calls (see :func:`infra.local.emulators.aws_env`): CloudFormation and
    every other service to ministack, Kinesis to kinesalite.
    If the template takes ``ProcessorCodeBucket``/``ProcessorCodeKey`` and ``parameters`` does
    not set them, the processor package (``streaming/`` under ``code_root``) is uploaded to a
    local artifacts bucket first, as a CI deploy would. Idempotent: a second run with the
    same inputs updates nothing.
    """
    started = time.monotonic()
    template = load_template(Path(template_path))
    stack_name = stack_name or f"citypulse-{env_name}"
    clients = _Clients(aws_env)
    # The stack's own copy of a stream lives in ministack, whatever AWS_ENDPOINT_URL_KINESIS says.
    ministack_url = clients.endpoint("cloudformation")

    plan = _plan(template)
    source = _template_source(clients, env_name, plan.deployed)
    _check_support(clients, plan, source)

    declared = template.get("Parameters") or {}
    values: dict[str, str] = {}
    if "EnvName" in declared:
        values["EnvName"] = env_name
    values.update(parameters or {})
    code_location: tuple[str, str] | None = None
    if {"ProcessorCodeBucket", "ProcessorCodeKey"} <= declared.keys() and not (
        {"ProcessorCodeBucket", "ProcessorCodeKey"} & values.keys()
    ):
        code_location = _put_artifact(clients, env_name, "processor", ".zip", package_code(code_root))
        values["ProcessorCodeBucket"], values["ProcessorCodeKey"] = code_location
    unknown = sorted(values.keys() - declared.keys())
    if unknown:
        raise ProvisionError(f"parameters not declared by {template_path}: {unknown}")
    stack_parameters = [{"ParameterKey": k, "ParameterValue": v} for k, v in sorted(values.items())]

    action = _deploy(clients, stack_name, source, stack_parameters, timeout)

    stack = _stack_status(clients("cloudformation"), stack_name) or {}
    raw_outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    true_conditions = {name for key, name in plan.condition_probes.items() if key in raw_outputs}
    listed = _verify(clients, stack_name, plan, true_conditions)

    report = ProvisionReport(
        stack_name=stack_name,
        action=action,
        seconds=0.0,
        resources=[],
        outputs={k: v for k, v in raw_outputs.items() if not k.startswith(_PROBE_PREFIX)},
        code_location=code_location,
    )

    # Resolved properties of the removed resources, reassembled from the probe outputs.
    resolved = {lid: copy.deepcopy(res.get("Properties") or {}) for lid, res in plan.removed.items()}
    # Reversed, so deleting a list item does not shift the paths still to visit.
    for key, (lid, path) in reversed(plan.leaf_probes.items()):
        if key in raw_outputs:
            _set_path(resolved[lid], path, raw_outputs[key])
        elif not plan.removed[lid].get("Condition") or plan.removed[lid]["Condition"] in true_conditions:
            _delete_path(resolved[lid], path)  # Fn::If -> AWS::NoValue

    for lid, res in template.get("Resources", {}).items():
        rtype = res.get("Type", "")
        stand_in = stand_in_for(lid, rtype)
        condition = res.get("Condition")
        if condition and condition not in true_conditions:
            where = f"not created (condition {condition} is false)"
            if stand_in is not None and stand_in.mode == "instead":
                where += f"; stand-in: {stand_in.by}"
            report.resources.append(ResourceLine(lid, rtype, None, where))
            continue
        physical = listed[lid]["PhysicalResourceId"] if lid in listed else None
        if stand_in is None:
            where = "ministack"
            if rtype == "AWS::Lambda::Function":
                report.function_env[str(physical)] = _function_env(clients, lid, str(physical))
                where = "ministack (config + code); invoked locally by the stand-in of its trigger"
            if lid in plan.placeholders:
                where += f" (placeholders for stand-ins: {', '.join(plan.placeholders[lid])})"
            report.resources.append(ResourceLine(lid, rtype, physical, where))
            continue
        if rtype == "AWS::Kinesis::Stream":
            spec = _kinesalite_stream(clients, ministack_url, lid, str(physical))
            report.streams.append(spec)
            detail = (
                f"ON_DEMAND -> {spec.shard_count} shards locally"
                if spec.stream_mode == "ON_DEMAND"
                else f"{spec.shard_count} shards"
            )
            where = f"ministack (declared) + {stand_in.by} ({detail}): {stand_in.why}"
        elif rtype == "AWS::IoT::TopicRule":
            report.topic_rules.append(_topic_rule(clients, lid, str(physical)))
            where = f"ministack (declared) + {stand_in.by}: {stand_in.why}"
        elif rtype == "AWS::Lambda::EventSourceMapping":
            consumers = {
                other: resolved[other]
                for other, body in plan.removed.items()
                if body.get("Type") == "AWS::Kinesis::StreamConsumer"
            }
            report.event_source_mappings.append(_event_source_mapping(lid, resolved[lid], consumers))
            where = f"not deployed; stand-in: {stand_in.by} ({stand_in.why})"
        elif stand_in.by.startswith("no stand-in needed"):
            where = f"not deployed; {stand_in.by}: {stand_in.why}"
        else:
            where = f"not deployed; stand-in: {stand_in.by} ({stand_in.why})"
        report.resources.append(ResourceLine(lid, rtype, physical, where))

    report.seconds = time.monotonic() - started
    return report
