"""Security properties checked without servers: the IoT device policy of the CloudFormation
template, evaluated for two gateways, and no secret in the repository's tracked files.

The broker-side twins (no certificate, another CA, a revoked certificate, publishing on or
subscribing to another device's topic) run against a real Mosquitto in test_broker_mtls.py;
logs are scanned for key material after a platform run in test_platform_reliability.py.
"""

from __future__ import annotations

import re
import subprocess
from fnmatch import fnmatchcase
from functools import cache
from typing import Any

import pytest

from infra.local.platform import REPO_ROOT, TEMPLATE
from infra.local.provision import load_template

ACCOUNT, REGION, ENV = "123456789012", "eu-west-1", "prod"
ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}"
RULE = f"citypulse_{ENV}_telemetry"


def _sub(value: Any) -> str:
    """Resolve `Fn::Sub` with the pseudo parameters and EnvName; `${!x}` is the literal `${x}`."""
    text = value["Fn::Sub"] if isinstance(value, dict) else value
    assert isinstance(text, str), value
    known = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "EnvName": ENV}
    text = re.sub(r"\$\{(?!!)([^}]+)\}", lambda m: known[m.group(1)], text)
    return text.replace("${!", "${")


@cache
def _template() -> dict[str, Any]:
    return load_template(TEMPLATE)


def _device_policy() -> list[dict[str, Any]]:
    resources = _template()["Resources"]
    (policy,) = [r for r in resources.values() if r["Type"] == "AWS::IoT::Policy"]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    out = []
    for s in statements:
        res = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        out.append({**s, "Resource": [_sub(r) for r in res], "Action": actions})
    return out


def allowed(policy: list[dict[str, Any]], action: str, resource: str, thing: str, *, attached: bool = True) -> bool:
    """IoT Core's evaluation, for the features this policy uses: an explicit Deny wins, else
    some Allow must match. Policy variables are substituted with the connection's thing name;
    `*` and `?` in a resource are wildcards (`*` crosses `/`, as in IoT Core)."""
    context = {"iot:Connection.Thing.ThingName": thing, "iot:Connection.Thing.IsAttached": str(attached).lower()}

    def matches(statement: dict[str, Any]) -> bool:
        if not any(fnmatchcase(action, a) for a in statement["Action"]):
            return False
        for op, conds in statement.get("Condition", {}).items():
            assert op in ("Bool", "StringEquals"), f"evaluator does not know condition {op}"
            if any(context.get(k) != str(v).lower() for k, v in conds.items()):
                return False
        for pattern in statement["Resource"]:
            pattern = re.sub(r"\$\{([^}]+)\}", lambda m: context[m.group(1)], pattern)
            # fnmatch's [..] classes are not IoT wildcards: escape them.
            if fnmatchcase(resource, pattern.replace("[", "[[]")):
                return True
        return False

    if any(s["Effect"] == "Deny" and matches(s) for s in policy):
        return False
    return any(s["Effect"] == "Allow" and matches(s) for s in policy)


A, B = "gw-017-00", "gw-018-00"


def topic(t: str) -> str:
    return f"{ARN}:topic/{t}"


def test_a_gateway_connects_only_as_itself_and_only_when_attached() -> None:
    policy = _device_policy()
    assert allowed(policy, "iot:Connect", f"{ARN}:client/{A}", A)
    assert not allowed(policy, "iot:Connect", f"{ARN}:client/{B}", A)
    assert not allowed(policy, "iot:Connect", f"{ARN}:client/{A}", A, attached=False)
    assert not allowed(policy, "iot:Connect", f"arn:aws:iot:us-east-1:{ACCOUNT}:client/{A}", A)


@pytest.mark.parametrize("prefix", ["", f"$aws/rules/{RULE}/"], ids=["direct", "basic-ingest"])
def test_a_gateway_publishes_on_its_own_topic_and_not_on_another_gateways(prefix: str) -> None:
    policy = _device_policy()
    assert allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/telemetry/Z-017/{A}"), A)
    assert allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/telemetry/Z-018/{B}"), B)
    assert not allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/telemetry/Z-018/{B}"), A)
    assert not allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/telemetry/Z-017/{A}"), B)
    assert not allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/telemetry/Z-017/{A}x"), A)
    assert not allowed(policy, "iot:Publish", topic(f"{prefix}citypulse/alerts/{A}"), A)


def test_another_rule_cannot_be_reached_through_basic_ingest() -> None:
    policy = _device_policy()
    assert not allowed(policy, "iot:Publish", topic(f"$aws/rules/other_rule/citypulse/telemetry/Z-017/{A}"), A)


def test_a_gateway_cannot_subscribe_to_or_receive_anything() -> None:
    """Devices only send: no Subscribe or Receive is allowed, so no gateway reads another's data."""
    policy = _device_policy()
    for action in ("iot:Subscribe", "iot:Receive"):
        kind = "topicfilter" if action == "iot:Subscribe" else "topic"
        for t in (f"citypulse/telemetry/Z-018/{B}", "citypulse/telemetry/#", f"citypulse/telemetry/Z-017/{A}"):
            assert not allowed(policy, action, f"{ARN}:{kind}/{t}", A), (action, t)
    assert not allowed(policy, "iot:UpdateThingShadow", f"{ARN}:thing/{A}", A)


def test_a_deeper_topic_ending_in_the_own_name_is_allowed_but_never_reaches_the_rule() -> None:
    """IoT's `*` crosses levels, so A may publish `citypulse/telemetry/Z/<B>/<A>`; the rule reads
    only `citypulse/telemetry/+/+` (where level 4 is the publisher), so such a message goes
    nowhere. Pinned here so that widening the rule's filter fails a test."""
    policy = _device_policy()
    assert allowed(policy, "iot:Publish", topic(f"citypulse/telemetry/Z-018/{B}/{A}"), A)
    resources = _template()["Resources"]
    (rule,) = [r for r in resources.values() if r["Type"] == "AWS::IoT::TopicRule"]
    sql = rule["Properties"]["TopicRulePayload"]["Sql"]
    assert re.search(r"FROM\s+'citypulse/telemetry/\+/\+'", sql), sql


# --- no secret in the repository -----------------------------------------------------------------

# The local emulators' credentials, `test`/`test`, are allowed everywhere (any AWS SDK accepts
# them against an emulator; AWS rejects them); any other credential in a URL only where named.
ALLOWED_URL_CREDENTIALS = {"test:test"}
ALLOWED_URL_CREDENTIALS_IN = {("tests/test_batch_load.py", "u:p")}  # a parser test's placeholder

SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_?secret_?access_?key\s*[:=]\s*[\"']?(?!test\b)[A-Za-z0-9/+]{40}\b"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Slack webhook": re.compile(r"hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"),
    "bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-_.=]{30,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
}
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://([^/\s:@'\"]+):([^/\s@'\"]+)@")


def scan(text: str, path: str = "") -> list[str]:
    found = [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    for m in URL_CREDENTIALS.finditer(text):
        user, password = m.groups()
        pair = f"{user}:{password}"
        if pair in ALLOWED_URL_CREDENTIALS or (path, pair) in ALLOWED_URL_CREDENTIALS_IN:
            continue
        if not password.startswith(("{", "$", "<", "%")):
            found.append(f"password in URL ({user}:…)")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    fake = {
        "-----BEGIN EC " + "PRIVATE KEY-----": "private key",  # split, or this file would hold one
        "key = AKIA" + "ABCDEFGHIJKLMNOP": "AWS access key id",
        "ASIA" + "ABCDEFGHIJKLMNOP": "AWS access key id",
        "aws_secret_access_key = " + "a" * 40: "AWS secret access key",
        "ghp_" + "a" * 36: "GitHub token",
        "xoxb-" + "1234567890-abc": "Slack token",
        "postgresql://citypulse:" + "hunter2@localhost/db": "password in URL (citypulse:…)",
    }
    for text, name in fake.items():
        assert name in scan(text), text
    assert scan("http://test:test@127.0.0.1:4566") == []
    assert scan("postgresql://{user}:{password}@{host}") == []
    assert scan("AWS_SECRET_ACCESS_KEY=test") == []


def test_no_secret_in_tracked_files() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    findings = {}
    scanned = 0
    for name in filter(None, files):
        path = REPO_ROOT / name.decode()
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        scanned += 1
        if hits := scan(data.decode("utf-8", errors="replace"), name.decode()):
            findings[name.decode()] = hits
    assert scanned > 50
    assert not findings, findings
