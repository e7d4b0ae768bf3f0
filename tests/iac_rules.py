"""The project's own rules for its CloudFormation templates, as a checker the IaC tests run.

Place in the flow: CI (``make test``) runs tests/test_iac.py, which applies these rules to every
template in infra/cloudformation/ and to a deliberately bad fixture (to prove the rules bite).
cfn-lint and checkov check what the tools know; these are the rules DESIGN.md §8 adds:

* **No wildcard action in an Allow statement** of any policy document (inline, managed,
  trust, bucket, key, topic, queue, IoT policies): neither ``*`` nor ``service:*`` nor a
  partial ``service:Get*``. ``NotAction``/``NotResource`` with Allow are refused too. Deny
  statements may use wildcards: a wider Deny only takes away (``s3:*`` in a TLS-only policy).
* **A wildcard resource needs its reason next to it**: ``Resource: "*"``, an ARN whose
  service, region or account is ``*``, or "every resource of a type" (``key/*``) must have a
  YAML comment ``# wildcard-resource: <reason>`` inside its statement.
* **No Allow to everyone**: ``Principal: "*"`` only in Deny statements.
* **Every store is encrypted with a KMS key**: S3 buckets, DynamoDB tables, Kinesis streams,
  SNS topics, SQS queues, Redshift namespaces, log groups, Athena workgroups, secrets, MWAA,
  Lambda environments. The one exception S3 forces (server access logs deliver only to
  SSE-S3 buckets) must be declared in the bucket's ``Metadata.citypulse.encryption-exception``.
* **Buckets**: public access blocked, a TLS-only bucket policy, and access logging unless the
  bucket is itself an access-log destination. KMS keys rotate.
* **checkov skips carry a reason** (``Metadata.checkov.skip[].comment``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfnlint.decode import decode

WILDCARD_MARKER = "# wildcard-resource:"
_SUB_VAR = re.compile(r"\$\{[^}]*\}")
# "every resource of a type": key/*, network-interface/*, event-source-mapping:*
_TYPE_WILDCARD = re.compile(r"^[A-Za-z-]+[/:]\*$")


@dataclass(frozen=True, order=True)
class Violation:
    """One broken rule: where (template, logical id, line) and what."""

    template: str
    logical_id: str
    rule: str
    detail: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.template}:{self.line} {self.logical_id}: [{self.rule}] {self.detail}"


@dataclass
class Template:
    """A parsed template with its raw lines (comments are not in the parsed tree)."""

    path: Path
    tree: dict[str, Any]
    lines: list[str]

    @classmethod
    def load(cls, path: Path) -> Template:
        tree, matches = decode(str(path))
        if matches or tree is None:
            raise ValueError(f"cannot parse {path}: {'; '.join(str(m) for m in matches)}")
        return cls(path, tree, path.read_text().splitlines())

    @property
    def resources(self) -> dict[str, Any]:
        return dict(self.tree.get("Resources") or {})


def _line(node: Any) -> int:
    mark = getattr(node, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 0


def _span(node: Any) -> tuple[int, int]:
    start = getattr(node, "start_mark", None)
    end = getattr(node, "end_mark", None)
    if start is None or end is None:
        return (0, -1)
    return (int(start.line), int(end.line))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str | None:
    """The literal text of a value: a string, or the template of a Fn::Sub; None for other intrinsics."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1 and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        text = sub[0] if isinstance(sub, list) else sub
        return text if isinstance(text, str) else None
    return None


def _branches(node: Any) -> Iterator[Any]:
    """A node, or both branches of a Fn::If (recursively)."""
    if isinstance(node, dict) and len(node) == 1 and "Fn::If" in node:
        for branch in node["Fn::If"][1:]:
            yield from _branches(branch)
    else:
        yield node


def policy_statements(node: Any) -> Iterator[dict[str, Any]]:
    """Every statement of every policy document under ``node`` (any dict with a Statement list)."""
    if isinstance(node, list):
        for item in node:
            yield from policy_statements(item)
    elif isinstance(node, dict):
        statements = node.get("Statement")
        if isinstance(statements, list):
            for item in statements:
                for statement in _branches(item):
                    if isinstance(statement, dict) and "Effect" in statement:
                        yield statement
        for key, value in node.items():
            if key != "Statement":
                yield from policy_statements(value)


def is_wildcard_action(action: str) -> bool:
    return "*" in action


def is_wildcard_resource(resource: str) -> bool:
    """``*``, an ARN with ``*`` for service, region or account, or every resource of a type."""
    text = _SUB_VAR.sub("X", resource)
    if text.strip() == "*":
        return True
    if not text.startswith("arn:"):
        return False
    parts = text.split(":", 5)
    if len(parts) < 6:
        return "*" in text
    _, _, service, region, account, rest = parts
    if "*" in service or "*" in region or "*" in account or rest == "*":
        return True
    # In S3 the resource part is a bucket name: "bucket/*" is the objects of one bucket.
    return service != "s3" and bool(_TYPE_WILDCARD.match(rest))


def _justified(template: Template, statement: Any) -> bool:
    first, last = _span(statement)
    window = template.lines[max(0, first - 1) : last + 1]
    for line in window:
        _, marker, reason = line.partition(WILDCARD_MARKER)
        if marker and len(reason.strip()) >= 10:
            return True
    return False


def check_policies(template: Template) -> list[Violation]:
    """The IAM rules over every policy document of the template."""
    out: list[Violation] = []
    name = template.path.name
    for lid, resource in template.resources.items():
        for statement in policy_statements(resource.get("Properties") or {}):
            line = _line(statement)
            if statement.get("Effect") != "Allow":
                continue
            for key in ("NotAction", "NotResource"):
                if key in statement:
                    out.append(Violation(name, lid, "allow-not", f"Allow with {key}", line))
            for action in _as_list(statement.get("Action", [])):
                text = _text(action)
                if text is not None and is_wildcard_action(text):
                    out.append(Violation(name, lid, "wildcard-action", f"Allow {text}", line))
            principal = statement.get("Principal")
            if principal == "*" or (isinstance(principal, dict) and "*" in _as_list(principal.get("AWS", []))):
                out.append(Violation(name, lid, "allow-everyone", "Allow to Principal *", line))
            wild = [
                text
                for resource_ in _as_list(statement.get("Resource", []))
                if (text := _text(resource_)) is not None and is_wildcard_resource(text)
            ]
            if wild and not _justified(template, statement):
                out.append(
                    Violation(name, lid, "unjustified-wildcard-resource", f"{wild} without {WILDCARD_MARKER}", line)
                )
    return out


def _has(props: dict[str, Any], *path: str) -> Any:
    node: Any = props
    for step in path:
        if not isinstance(node, dict) or step not in node:
            return None
        node = node[step]
    return node


def _bucket_kms(props: dict[str, Any]) -> bool:
    rules = _has(props, "BucketEncryption", "ServerSideEncryptionConfiguration") or []
    for rule in rules:
        default = rule.get("ServerSideEncryptionByDefault") or {}
        if str(default.get("SSEAlgorithm", "")).startswith("aws:kms") and default.get("KMSMasterKeyID"):
            return True
    return False


def _encrypted(rtype: str, props: dict[str, Any]) -> bool | None:
    """Whether a store is encrypted with a KMS key; None for types that are not stores."""
    if rtype == "AWS::S3::Bucket":
        return _bucket_kms(props)
    if rtype == "AWS::DynamoDB::Table":
        sse = props.get("SSESpecification") or {}
        return sse.get("SSEEnabled") is True and sse.get("SSEType") == "KMS" and bool(sse.get("KMSMasterKeyId"))
    if rtype == "AWS::Kinesis::Stream":
        enc = props.get("StreamEncryption") or {}
        return enc.get("EncryptionType") == "KMS" and bool(enc.get("KeyId"))
    if rtype in ("AWS::SNS::Topic", "AWS::SQS::Queue"):
        return bool(props.get("KmsMasterKeyId"))
    if rtype == "AWS::RedshiftServerless::Namespace":
        return bool(props.get("KmsKeyId"))
    if rtype == "AWS::Logs::LogGroup":
        return bool(props.get("KmsKeyId"))
    if rtype == "AWS::Athena::WorkGroup":
        enc = _has(props, "WorkGroupConfiguration", "ResultConfiguration", "EncryptionConfiguration") or {}
        return enc.get("EncryptionOption") in ("SSE_KMS", "CSE_KMS") and bool(enc.get("KmsKey"))
    if rtype == "AWS::SecretsManager::Secret":
        return bool(props.get("KmsKeyId"))
    if rtype == "AWS::MWAA::Environment":
        return bool(props.get("KmsKey"))
    if rtype == "AWS::Lambda::Function":
        return bool(props.get("KmsKeyArn")) or not props.get("Environment")
    return None


def _refs_to(node: Any, target: str) -> bool:
    if isinstance(node, dict):
        if node.get("Ref") == target:
            return True
        return any(_refs_to(v, target) for v in node.values())
    if isinstance(node, list):
        return any(_refs_to(v, target) for v in node)
    return False


def check_encryption_and_buckets(template: Template) -> list[Violation]:
    """KMS on every store; bucket hygiene; key rotation; reasons on checkov skips."""
    out: list[Violation] = []
    name = template.path.name
    resources = template.resources
    log_destinations = {
        _has(res.get("Properties") or {}, "LoggingConfiguration", "DestinationBucketName", "Ref")
        for res in resources.values()
        if res.get("Type") == "AWS::S3::Bucket"
    }
    bucket_policies = [res for res in resources.values() if res.get("Type") == "AWS::S3::BucketPolicy"]
    for lid, res in resources.items():
        rtype = res.get("Type", "")
        props = res.get("Properties") or {}
        line = _line(res)
        exception = _has(res.get("Metadata") or {}, "citypulse", "encryption-exception")
        encrypted = _encrypted(rtype, props)
        if encrypted is False and not (rtype == "AWS::S3::Bucket" and exception and len(str(exception)) > 20):
            out.append(Violation(name, lid, "not-kms-encrypted", f"{rtype} without a KMS key", line))
        if rtype == "AWS::KMS::Key" and props.get("EnableKeyRotation") is not True:
            out.append(Violation(name, lid, "key-rotation", "KMS key without rotation", line))
        if rtype == "AWS::S3::Bucket":
            block = props.get("PublicAccessBlockConfiguration") or {}
            flags = ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
            if not all(block.get(flag) is True for flag in flags):
                out.append(Violation(name, lid, "public-access", "public access not fully blocked", line))
            if not props.get("LoggingConfiguration") and lid not in log_destinations:
                out.append(Violation(name, lid, "access-logging", "no server access logging", line))
            tls_only = any(
                _refs_to(policy.get("Properties", {}).get("Bucket"), lid)
                and any(
                    st.get("Effect") == "Deny" and "aws:SecureTransport" in str(st.get("Condition", ""))
                    for st in policy_statements(policy.get("Properties", {}).get("PolicyDocument", {}))
                )
                for policy in bucket_policies
            )
            if not tls_only:
                out.append(Violation(name, lid, "tls-only", "no bucket policy denying insecure transport", line))
        for skip in _as_list(_has(res.get("Metadata") or {}, "checkov", "skip") or []):
            if not isinstance(skip, dict) or not skip.get("id") or len(str(skip.get("comment", "")).strip()) < 15:
                out.append(Violation(name, lid, "checkov-skip-reason", f"checkov skip without a reason: {skip}", line))
    return out


def check(path: Path) -> list[Violation]:
    """Every rule over one template, sorted."""
    template = Template.load(path)
    return sorted(check_policies(template) + check_encryption_and_buckets(template))
