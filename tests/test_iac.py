"""Infrastructure as code: the project's IAM and encryption rules, checkov, and the workflows.

The rules (tests/iac_rules.py) run over every template in infra/cloudformation/ and over a
fixture that breaks each of them, so a rule that stopped biting would fail here too. checkov
runs from its own tool environment (`make tools`, .cache/checkov-venv): it conflicts with
Airflow 3, so it cannot live in the project's environment; a missing tool env fails the test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from iac_rules import Template, check

from infra.local.provision import STAND_INS

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO_ROOT / "infra" / "cloudformation").glob("*.yaml"))
MAIN_TEMPLATE = REPO_ROOT / "infra" / "cloudformation" / "iot-analytics-system.yaml"
BAD_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "iac-wildcard.yaml"
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
CHECKOV = REPO_ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"


def test_there_are_templates_and_workflows() -> None:
    assert {p.name for p in TEMPLATES} >= {"iot-analytics-system.yaml", "github-oidc.yaml"}
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "deploy.yml", "deploy-env.yml", "teardown.yml"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_templates_follow_the_iam_and_encryption_rules(template: Path) -> None:
    violations = check(template)
    assert violations == [], "\n".join(map(str, violations))


def test_the_rules_catch_every_violation_of_the_bad_fixture() -> None:
    found = {(v.logical_id, v.rule) for v in check(BAD_FIXTURE)}
    assert found == {
        ("Key", "key-rotation"),
        ("Key", "wildcard-action"),
        ("WildcardActionRole", "wildcard-action"),
        ("UnjustifiedResourcePolicy", "unjustified-wildcard-resource"),
        ("PublicTopicPolicy", "allow-everyone"),
        ("PlainTopic", "not-kms-encrypted"),
        ("PlainQueue", "not-kms-encrypted"),
        ("PlainBucket", "not-kms-encrypted"),
        ("PlainBucket", "public-access"),
        ("PlainBucket", "access-logging"),
        ("PlainBucket", "tls-only"),
        ("PlainTable", "not-kms-encrypted"),
        ("PlainStream", "not-kms-encrypted"),
        ("PlainLogGroup", "not-kms-encrypted"),
        ("SkippedWithoutReason", "checkov-skip-reason"),
    }
    details = [v.detail for v in check(BAD_FIXTURE) if v.rule == "wildcard-action"]
    assert sorted(details) == ["Allow kms:*", "Allow s3:*", "Allow sqs:Get*"]
    # A justified "*" (JustifiedRole) and a wildcard Deny are not violations.
    assert not [v for v in check(BAD_FIXTURE) if v.logical_id == "JustifiedRole"]


@pytest.mark.parametrize(
    ("needle", "replacement", "logical_id", "rule"),
    [
        (
            "                Action: kinesis:PutRecord\n",
            "                Action: kinesis:*\n",
            "TelemetryRuleRole",
            "wildcard-action",
        ),
        (
            "                  - dynamodb:BatchWriteItem\n",
            "                  - dynamodb:Batch*\n",
            "ProcessorRole",
            "wildcard-action",
        ),
        (
            "                # wildcard-resource: EC2 Describe* actions support no resource-level permissions.\n"
            '                Resource: "*"\n',
            '                Resource: "*"\n',
            "ProcessorRole",
            "unjustified-wildcard-resource",
        ),
        (
            "                Resource: !Sub ${LakeBucket.Arn}/ingest-errors/*\n",
            '                Resource: "*"\n',
            "TelemetryRuleRole",
            "unjustified-wildcard-resource",
        ),
        ("      KmsMasterKeyId: !Ref DataKey\n", "\n", "ProcessorDeadLetterQueue", "not-kms-encrypted"),
    ],
    ids=["service-wildcard", "partial-wildcard", "comment-removed", "new-star-resource", "queue-unencrypted"],
)
def test_a_violation_introduced_into_the_real_template_fails(
    tmp_path: Path, needle: str, replacement: str, logical_id: str, rule: str
) -> None:
    text = MAIN_TEMPLATE.read_text()
    assert needle in text, needle
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(needle, replacement, 1))
    assert (logical_id, rule) in {(v.logical_id, v.rule) for v in check(broken)}


# ---------------------------------------------------------------------------
# checkov, from its own tool environment
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_results() -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.fail(f"checkov tool environment missing ({CHECKOV}): run `make tools`")
    # Offline and loopback only: no Prisma Cloud downloads, and any stray HTTP goes nowhere.
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = subprocess.run(
        [
            str(CHECKOV),
            "--skip-download",
            "--framework",
            "cloudformation",
            "github_actions",
            "-d",
            str(REPO_ROOT / "infra" / "cloudformation"),
            "-d",
            str(REPO_ROOT / ".github"),
            "-d",
            str(BAD_FIXTURE.parent),  # (checkov ignores -f when -d is given)
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    # One JSON document per scanned root and framework, printed one after the other.
    reports: list[dict[str, Any]] = []
    decoder, text, at = json.JSONDecoder(), result.stdout, 0
    while at < len(text.rstrip()):
        document, end = decoder.raw_decode(text, at)
        reports += document if isinstance(document, list) else [document]
        at = end + len(text[end:]) - len(text[end:].lstrip())
    merged: dict[str, Any] = {"passed": [], "failed": [], "skipped": [], "types": set()}
    for report in reports:
        merged["types"].add(report.get("check_type"))
        for key in ("passed", "failed", "skipped"):
            merged[key] += report.get("results", {}).get(f"{key}_checks", [])
    return merged


def _in(check_result: dict[str, Any], path: Path) -> bool:
    return str(check_result.get("file_abs_path", "")).endswith(str(path.relative_to(REPO_ROOT)))


def test_checkov_passes_on_the_templates_and_workflows(checkov_results: dict[str, Any]) -> None:
    assert {"cloudformation", "github_actions"} <= checkov_results["types"]
    fixtures = BAD_FIXTURE.parent.relative_to(REPO_ROOT)
    ours = [c for c in checkov_results["failed"] if str(fixtures) not in str(c.get("file_abs_path"))]
    assert ours == [], "\n".join(f"{c['check_id']} {c['resource']} {c['file_path']}" for c in ours)
    passed_main = [c for c in checkov_results["passed"] if _in(c, MAIN_TEMPLATE)]
    assert len(passed_main) > 150  # it really scanned the root template
    assert any(".github" in str(c.get("file_abs_path")) for c in checkov_results["passed"])


def test_every_checkov_skip_is_declared_with_its_reason(checkov_results: dict[str, Any]) -> None:
    fixtures = str(BAD_FIXTURE.parent.relative_to(REPO_ROOT))
    skipped = {
        (c["check_id"], c["resource"].split(".")[-1])
        for c in checkov_results["skipped"]
        if fixtures not in str(c.get("file_abs_path"))
    }
    assert skipped == {
        ("CKV_AWS_18", "AccessLogsBucket"),
        ("CKV_AWS_18", "ArtifactsAccessLogsBucket"),
        ("CKV_AWS_116", "ProcessorFunction"),
        ("CKV_AWS_116", "SyntheticTrafficFunction"),
        ("CKV_AWS_117", "SyntheticTrafficFunction"),
        ("CKV_AWS_116", "SweeperFunction"),
        ("CKV_AWS_117", "SweeperFunction"),
        ("CKV_AWS_116", "AlertStoreFunction"),
        ("CKV_AWS_117", "AlertStoreFunction"),
        ("CKV_AWS_116", "ReadApiFunction"),
        ("CKV_AWS_117", "ReadApiFunction"),
        ("CKV_AWS_120", "ReadApiStage"),
    }
    declared = set()
    for template in TEMPLATES:
        for lid, res in Template.load(template).resources.items():
            for skip in (res.get("Metadata") or {}).get("checkov", {}).get("skip", []):
                assert len(skip.get("comment", "")) > 15, (lid, skip)
                declared.add((skip["id"], lid))
    assert declared == skipped  # no stale skip sits unused in a template


def test_checkov_finds_the_bad_fixture_bad(checkov_results: dict[str, Any]) -> None:
    failed = {(c["check_id"], c["resource"].split(".")[-1]) for c in checkov_results["failed"] if _in(c, BAD_FIXTURE)}
    assert ("CKV_AWS_7", "Key") in failed  # rotation
    assert ("CKV_AWS_26", "PlainTopic") in failed  # SNS encryption


# ---------------------------------------------------------------------------
# What the local platform must cover, and what the templates must agree with
# ---------------------------------------------------------------------------


def _ministack_cloudformation_types() -> set[str]:
    """The resource types ministack's CloudFormation provisions (the keys of its handler table).

    Read from the source: importing the module loads every emulated service (~10 s).
    """
    import ministack

    source = Path(ministack.__file__).parent / "services" / "cloudformation" / "provisioners.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_RESOURCE_HANDLERS" for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("ministack's _RESOURCE_HANDLERS table not found")


def test_every_resource_type_is_deployable_locally_or_has_a_stand_in() -> None:
    _RESOURCE_HANDLERS = _ministack_cloudformation_types()
    assert {"AWS::S3::Bucket", "AWS::EC2::VPC", "AWS::Athena::WorkGroup"} <= _RESOURCE_HANDLERS

    uncovered = []
    for template in TEMPLATES:
        for lid, res in Template.load(template).resources.items():
            rtype = res["Type"]
            if rtype not in _RESOURCE_HANDLERS and rtype not in STAND_INS and lid not in STAND_INS:
                uncovered.append(f"{template.name}: {lid} ({rtype})")
    assert uncovered == []
    # ... and the table names nothing ministack's CloudFormation already runs, but for the
    # "also" stand-ins, the resources it replaces on purpose, and the VPC rule resources.
    for key, stand_in in STAND_INS.items():
        if "::" in key and stand_in.mode == "instead" and key in _RESOURCE_HANDLERS:
            assert key == "AWS::Lambda::EventSourceMapping", key


# ---------------------------------------------------------------------------
# GitHub workflows (actionlint cannot be installed offline: structure is checked here)
# ---------------------------------------------------------------------------


def _workflow(name: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_well_formed(workflow: Path) -> None:
    data = _workflow(workflow.name)
    assert data.get("name") and data.get("on") and data.get("jobs")
    # Least privilege for the GITHUB_TOKEN: declared at the top, read-only by default.
    assert data.get("permissions") == {"contents": "read"}, workflow.name
    for job_id, job in data["jobs"].items():
        if "uses" in job:
            # A call of one of this repository's reusable workflows.
            assert job["uses"].startswith("./.github/workflows/"), job["uses"]
            assert (REPO_ROOT / job["uses"]).exists(), job["uses"]
            assert "steps" not in job and "runs-on" not in job
            continue
        assert job.get("runs-on") == "ubuntu-24.04", (workflow.name, job_id)
        assert job.get("timeout-minutes"), (workflow.name, job_id)
        assert job.get("steps"), (workflow.name, job_id)
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), (workflow.name, job_id, step)
            if "uses" in step:
                # Third-party code pinned to a full commit (tags can be moved).
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
            if "run" in step:
                # Event fields and inputs reach a shell only through env variables, never spliced in.
                assert "${{ github.event" not in step["run"], (workflow.name, step.get("name"))
                assert "${{ inputs." not in step["run"], (workflow.name, step.get("name"))


def test_ci_runs_what_dot_ci_run_runs() -> None:
    ci = _workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    steps = ci["jobs"]["test"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "mosquitto" in runs and "bash .ci/run" in runs
    uses = " ".join(s.get("uses", "") for s in steps)
    assert "actions/setup-python" in uses and "actions/setup-node" in uses
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


def test_deploy_assumes_the_oidc_role_per_environment() -> None:
    deploy = _workflow("deploy.yml")
    callers = {job_id: job for job_id, job in deploy["jobs"].items()}
    assert set(callers) == {"dev", "staging", "prod", "preview"}
    for job_id, job in callers.items():
        assert job["uses"] == "./.github/workflows/deploy-env.yml", job_id
        assert job["permissions"] == {"contents": "read", "id-token": "write"}, job_id
    assert callers["staging"]["needs"] == "dev"
    # The called job runs in a GitHub environment: its protection rules gate the credentials.
    (job,) = _workflow("deploy-env.yml")["jobs"].values()
    assert job["environment"] == "${{ inputs.environment }}"
    assert job["permissions"]["id-token"] == "write"
    text = (REPO_ROOT / ".github" / "workflows" / "deploy-env.yml").read_text()
    for needle in ("configure-aws-credentials", "deploy.sh", "smoke.sh", "package_lambda.py", "ship_mwaa_bundle.sh"):
        assert needle in text, needle
    script = (REPO_ROOT / ".github" / "scripts" / "deploy.sh").read_text()
    for needle in ("create-change-set", "execute-change-set", "citypulse-cloudformation-exec"):
        assert needle in script, needle
    teardown = _workflow("teardown.yml")
    assert "schedule" in teardown["on"] and teardown["jobs"]["teardown"]["environment"] == "ephemeral"
    # The OIDC trust in the IaC names the same role the workflows assume, for this repository's environments.
    oidc = (REPO_ROOT / "infra" / "cloudformation" / "github-oidc.yaml").read_text()
    assert "RoleName: citypulse-github-deploy" in oidc and "RoleName: citypulse-github-deploy-prod" in oidc
    assert "token.actions.githubusercontent.com:sub: !Sub repo:${GitHubRepository}:environment:*" in oidc


def test_shell_scripts_parse() -> None:
    for script in sorted((REPO_ROOT / ".github" / "scripts").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, (script.name, result.stderr)


def test_the_lambda_package_holds_every_declared_dependency_its_handlers_import() -> None:
    """The deploy zip gets `package_lambda.RUNTIME_PACKAGES` and nothing else but the runtime's
    own boto3. Each project dependency the template's handlers import at run time (a clean
    interpreter importing each `Handler:` module) must be in that list: a processor module that
    starts importing a new package fails here, not in the deployed Lambda."""
    handlers = sorted({h.rsplit(".", 1)[0] for h in re.findall(r"Handler: ([\w.]+)", MAIN_TEMPLATE.read_text())})
    assert "streaming.processor.handler" in handlers
    probe = (
        "import importlib, importlib.metadata as md, json, sys\n"
        "for m in sys.argv[1:]: importlib.import_module(m)\n"
        "dists = md.packages_distributions()\n"
        "print(json.dumps(sorted({d for n in list(sys.modules) for d in dists.get(n.split('.')[0], [])})))\n"
    )
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    out = subprocess.run([sys.executable, "-c", probe, *handlers], capture_output=True, text=True, env=env, check=True)

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) for d in project}
    imported = {norm(d) for d in json.loads(out.stdout)} & declared
    packaged = {norm(p) for p in _package_lambda().RUNTIME_PACKAGES}
    assert "orjson" in imported  # the probe saw the processor's own imports
    assert imported - {"boto3"} <= packaged, sorted(imported - {"boto3"} - packaged)


def _package_lambda() -> Any:
    spec = importlib.util.spec_from_file_location(
        "package_lambda", REPO_ROOT / ".github" / "scripts" / "package_lambda.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Lambda's limit on a function's unzipped code, layers included.
LAMBDA_UNZIPPED_LIMIT = 262_144_000


def test_the_lambda_package_fits_lambdas_unzipped_size_limit() -> None:
    """What `package_lambda.py` zips — the runtime packages, installed, less what it prunes, and
    streaming/ — must fit the 250 MB that Lambda allows unzipped. Measured on this
    environment's installs of the same locked versions (2026-12-05: 233.6 MB before pruning,
    of which pyarrow 171 MB and numpy 57 MB; ~192 MB after); a new dependency that would break
    the deploy fails here first."""
    package = _package_lambda()
    size = 0
    for name in package.RUNTIME_PACKAGES:
        for f in importlib.metadata.distribution(name).files or []:
            path = Path(f.locate())
            if "__pycache__" not in path.parts and path.is_file() and not package.pruned(f.as_posix()):
                size += path.stat().st_size
    size += sum(p.stat().st_size for p in (REPO_ROOT / "streaming").rglob("*.py"))
    assert 100_000_000 < size < LAMBDA_UNZIPPED_LIMIT, f"{size:,} bytes"


def test_pyarrow_pruned_as_the_lambda_package_prunes_it_still_writes_the_lake(tmp_path: Path) -> None:
    """`package_lambda.prune` removes Arrow Flight, headers, Cython sources and tests from
    pyarrow. A copy of this environment's pyarrow, pruned the same way and first on the path,
    must still import what the processor imports and round-trip a zstd Parquet file."""
    package = _package_lambda()
    installed = Path(importlib.util.find_spec("pyarrow").origin).parent
    shutil.copytree(installed, tmp_path / "pyarrow", ignore=shutil.ignore_patterns("__pycache__"))
    before = sum(1 for p in (tmp_path / "pyarrow").rglob("*") if p.is_file())
    package.prune(tmp_path)
    after = sum(1 for p in (tmp_path / "pyarrow").rglob("*") if p.is_file())
    assert not list((tmp_path / "pyarrow").glob("libarrow_flight.so*")) and after < before
    probe = (
        "import io, sys, pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq\n"
        "import streaming.processor.store, streaming.processor.handler\n"
        "from streaming.parquet import read_parquet\n"
        "assert pa.__file__.startswith(sys.argv[1])\n"
        "t = pa.table({'n': [1, 2, 3], 's': ['a', 'b', None]}); b = io.BytesIO()\n"
        "pq.write_table(t, b, compression='zstd')\n"
        "assert read_parquet(b.getvalue()).equals(t) and pc.sum(t['n']).as_py() == 6\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}", "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=env, check=True, capture_output=True, text=True)


def test_metric_math_alarms_count_a_period_without_data_as_zero() -> None:
    # Event metrics such as DynamoDB's throttle events are reported only when events happen, and
    # "+" of metric-math series yields a point only where every series has one: each metric an
    # alarm's expression adds must be FILLed, or one table throttling alone would never alarm.
    from infra.local.provision import load_template

    alarms = {
        lid: res["Properties"]["Metrics"]
        for lid, res in load_template(MAIN_TEMPLATE)["Resources"].items()
        if res["Type"] == "AWS::CloudWatch::Alarm" and "Metrics" in res["Properties"]
    }
    assert "ProcessorTablesThrottledAlarm" in alarms
    for lid, metrics in alarms.items():
        (expression,) = [m["Expression"] for m in metrics if "Expression" in m]
        for metric in (m for m in metrics if "MetricStat" in m):
            assert f"FILL({metric['Id']}, 0)" in expression, (lid, metric["Id"], expression)


def _statements(resources: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """A role's inline policy statements (those under a condition's `!If` left out)."""
    return [
        statement
        for policy in resources[role]["Properties"]["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        if "Effect" in statement
    ]


def _grants(resources: dict[str, Any], role: str) -> dict[str, set[str]]:
    """Each action of a role's inline statements → the resources it names (as sorted JSON)."""
    out: dict[str, set[str]] = {}
    for statement in _statements(resources, role):
        targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            out.setdefault(action, set()).update(json.dumps(t, sort_keys=True) for t in targets)
    return out


def test_the_airflow_tasks_may_write_every_lake_prefix_the_batch_steps_write() -> None:
    # The hourly and daily tasks write reports, GX results, compacted parts and their manifests,
    # docs; compaction and retention delete raw objects. A prefix missing here is an AccessDenied
    # on MWAA only: the local platform does not enforce IAM.
    from citypulse_batch import lake
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]
    (statement,) = [
        s for s in _statements(resources, "MwaaExecutionRole") if s.get("Sid") == "ReadCompactAndRetireLake"
    ]
    granted = {resource["Fn::Sub"] for resource in statement["Resource"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= set(statement["Action"])
    prefixes = [
        lake.READINGS_PREFIX,
        lake.QUARANTINE_PREFIX,
        lake.REPORTS_PREFIX,
        lake.GX_RESULTS_PREFIX,
        lake.COMPACTION_PREFIX,
        lake.LEDGER_PREFIX,
        lake.LOAD_MANIFESTS_PREFIX,
        "docs/",
    ]
    for prefix in prefixes:
        assert f"${{LakeBucket.Arn}}/{prefix.split('/')[0]}/*" in granted, prefix
    # The registry is the processor's: the load reads it, nothing in the DAGs may change it.
    registry = f"${{LakeBucket.Arn}}/{lake.SENSOR_REGISTRY_KEY.split('/')[0]}/*"
    assert registry not in granted
    readable = [s for s in _statements(resources, "MwaaExecutionRole") if s.get("Sid") == "ReadRegistry"]
    assert [(s["Action"], s["Resource"]) for s in readable] == [("s3:GetObject", {"Fn::Sub": registry})]


def test_the_dags_crawler_settings_are_the_templates() -> None:
    # The hourly DAG creates or updates the crawler with its own copy of the settings, and
    # GlueCrawlerUpdateOperator rewrites every one that differs: a setting only the template
    # has would be dropped by the first run.
    from citypulse_batch.steps import crawler_config
    from infra.local.provision import load_template

    crawler = load_template(MAIN_TEMPLATE)["Resources"]["RawReadingsCrawler"]["Properties"]
    dag = crawler_config()
    assert json.loads(dag["Configuration"]) == json.loads(crawler["Configuration"])
    for setting in ("RecrawlPolicy", "SchemaChangePolicy"):
        assert dag[setting] == crawler[setting], setting
    ((target,),) = (dag["Targets"]["S3Targets"],)
    assert target["Path"].endswith("/raw/readings/")
    assert crawler["Targets"]["S3Targets"][0]["Path"] == {"Fn::Sub": "s3://${LakeBucket}/raw/readings/"}


def test_redshift_serverless_gets_subnets_in_three_availability_zones() -> None:
    """Redshift Serverless refuses a workgroup without subnets in three AZs (AWS: "at least three
    subnets, and they must span across three Availability Zones"); the stack gave it two, which
    no local run could show (found by a review)."""
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]
    subnets = resources["RedshiftWorkgroup"]["Properties"]["SubnetIds"]
    zones = set()
    for ref in subnets:
        zone = resources[ref["Ref"]]["Properties"]["AvailabilityZone"]
        assert zone["Fn::Select"][1] == {"Fn::GetAZs": ""}, ref
        zones.add(zone["Fn::Select"][0])
    assert len(subnets) == len(zones) >= 3
    # ... and no two subnets of the VPC share an address block.
    blocks = [r["Properties"]["CidrBlock"] for r in resources.values() if r["Type"] == "AWS::EC2::Subnet"]
    assert len({json.dumps(b, sort_keys=True) for b in blocks}) == len(blocks)


def _allow_statements(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(resource, statement) of every Allow statement in a template's policies."""
    if isinstance(node, dict):
        if isinstance(node.get("Statement"), list):
            for statement in node["Statement"]:
                if statement.get("Effect") == "Allow":
                    yield where, statement
        for key, value in node.items():
            yield from _allow_statements(value, where or key)
    elif isinstance(node, list):
        for value in node:
            yield from _allow_statements(value, where)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_action_is_granted_on_resources_it_cannot_apply_to(template: Path) -> None:
    """An action with no resource type (CreateEventSourceMapping, glue:CreateCrawler, ...) is
    authorised against "*": granted only on ARNs it never applies, so the stack's create failed
    in AWS while every local check passed (found by a review). cfn-lint's table of IAM actions
    (the service authorization reference) says which have a resource type."""
    import cfnlint

    from infra.local.provision import load_template

    table = json.loads((Path(cfnlint.__file__).parent / "data/AdditionalSpecs/Policies.json").read_text())
    wrong = []
    for resource, statement in _allow_statements(load_template(template).get("Resources", {})):
        if statement.get("Resource") in ("*", ["*"]):
            continue
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            service, name = action.split(":")
            if "*" in name:
                continue
            known = table[service]["Actions"].get(name.lower())
            assert known is not None, f"{resource} {statement.get('Sid')}: unknown action {action}"
            if not known.get("Resources"):
                wrong.append(f"{resource} {statement.get('Sid')}: {action}")
    assert wrong == []


def test_the_engineer_may_encrypt_with_the_key_of_the_artifacts_bucket() -> None:
    """The artifacts bucket (bootstrap stack) is encrypted with its own key: the engineer role's
    grant on the stack's DataKey alone left it unable to upload a package (found by a review)."""
    from infra.local.provision import load_template

    bootstrap = load_template(REPO_ROOT / "infra" / "cloudformation" / "github-oidc.yaml")["Resources"]
    bucket_key = bootstrap["ArtifactsBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    key_name = bucket_key["ServerSideEncryptionByDefault"]["KMSMasterKeyID"]["Fn::GetAtt"][0]
    (alias,) = (
        r["Properties"]["AliasName"]
        for r in bootstrap.values()
        if r["Type"] == "AWS::KMS::Alias" and r["Properties"]["TargetKeyId"] == {"Ref": key_name}
    )
    engineer = load_template(MAIN_TEMPLATE)["Resources"]["EngineerRole"]
    aliases = [
        s.get("Condition", {}).get("ForAnyValue:StringEquals", {}).get("kms:ResourceAliases")
        for _, s in _allow_statements(engineer)
        if "kms:GenerateDataKey" in s["Action"]
    ]
    assert alias in aliases


def _dynamodb_calls(source: str) -> set[str]:
    """The DynamoDB actions a module's client calls need: `.update_item(`, a "scan" paginator, or
    an operation named for `streaming.unprocessed` to send until processed ("batch_get_item")."""
    operations = (
        "batch_get_item|batch_write_item|get_item|put_item|update_item|delete_item|query|scan|transact_write_items"
    )
    methods = re.findall(rf"\.({operations})\(", source)
    methods += re.findall(rf'(?:get_paginator\(|until_processed, )"({operations})"', source)
    return {"dynamodb:" + "".join(w.title() for w in m.split("_")) for m in methods}


def test_the_processor_and_sweeper_roles_grant_exactly_the_dynamodb_calls_their_code_makes() -> None:
    # Found by a review: the processor's role carried six DynamoDB actions its code never calls.
    # `scan_zone_states` is the operators' tools' (audit, demo), run with their own roles.
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]
    processor_dir = REPO_ROOT / "streaming" / "processor"
    store = (processor_dir / "store.py").read_text()
    tools_only = re.search(r"    def scan_zone_states\(.*?\n\n\n", store, re.S)
    assert tools_only is not None
    store = store.replace(tools_only.group(0), "")
    code = {
        "ProcessorRole": _dynamodb_calls(store + (processor_dir / "handler.py").read_text()),
        "SweeperRole": _dynamodb_calls((processor_dir / "sweeper.py").read_text()),
    }
    assert code == {
        "ProcessorRole": {"dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"},
        "SweeperRole": {"dynamodb:Scan", "dynamodb:UpdateItem"},
    }
    for role, calls in code.items():
        assert {action for action in _grants(resources, role) if action.startswith("dynamodb:")} == calls, role


def test_the_read_api_and_alert_store_functions_get_what_their_code_reads_and_calls() -> None:
    # Neither runs in AWS form locally (the dashboard server calls the handler in-process), so
    # their configuration is checked against the code: every environment variable it reads,
    # and an IAM grant for every AWS call it makes, on the right table.
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]
    source = {p.name: p.read_text() for p in (REPO_ROOT / "streaming" / "readapi").glob("*.py")}
    read_env = set(re.findall(r"os\.environ(?:\[|\.get\()\"(CITYPULSE_[A-Z_]+)\"", source["sources.py"]))
    read_env |= set(re.findall(r"os\.environ\[\"(CITYPULSE_[A-Z_]+)\"\]", source["handler.py"]))
    assert read_env >= {"CITYPULSE_PROCESSOR_STATE_TABLE", "CITYPULSE_ALERTS_TABLE"}
    for lid, env in (("ReadApiFunction", read_env), ("AlertStoreFunction", {"CITYPULSE_ALERTS_TABLE"})):
        assert env <= set(resources[lid]["Properties"]["Environment"]["Variables"]), lid

    def table(lid: str) -> str:
        return json.dumps({"Fn::GetAtt": [lid, "Arn"]}, sort_keys=True)

    reads = _grants(resources, "ReadApiRole")
    assert "batch_get_item" in source["sources.py"] and table("ProcessorStateTable") in reads["dynamodb:BatchGetItem"]
    assert 'get_paginator("query")' in source["sources.py"] and table("ZoneMetricsTable") in reads["dynamodb:Query"]
    assert ".query(" in source["alerts.py"] and table("AlertsTable") in reads["dynamodb:Query"]
    assert ".get_object(" in source["sources.py"] and "s3:GetObject" in reads
    assert not {
        a for a in reads if a.startswith("dynamodb:") and not a.startswith(("dynamodb:BatchGet", "dynamodb:Query"))
    }
    # The store writes an alert and its id's marker in one transaction of two Puts: PutItem each.
    assert ".transact_write_items(" in source["alerts.py"] and '{"Put": {"TableName": table' in source["alerts.py"]
    assert table("AlertsTable") in _grants(resources, "AlertStoreRole")["dynamodb:PutItem"]
    # The alert rule feeds the store, and the operators may call the API.
    targets = {t["Id"]: t for t in resources["AlertRule"]["Properties"]["Targets"]}
    assert targets["alert-log"]["Arn"] == {"Fn::GetAtt": ["AlertStoreFunction", "Arn"]}
    operator = _grants(resources, "OperatorRole")
    assert operator["execute-api:Invoke"]
    assert resources["ReadApiProxyMethod"]["Properties"]["AuthorizationType"] == "AWS_IAM"


def test_the_redrive_role_may_do_what_the_processor_does_and_work_its_queue() -> None:
    # The redrive runs the processor's code from a person's session: every data grant the
    # processor has (not its logs or network interfaces), and the on-failure queue's messages.
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]

    processor, redrive = (
        {s["Sid"]: s for s in _statements(resources, role)} for role in ("ProcessorRole", "RedriveRole")
    )
    for sid in ("ReadTelemetryStream", "UseDataKey", "WriteState", "WriteLake", "ReadRegistry", "PublishAlerts"):
        assert redrive[sid] == processor[sid], sid
    queue = redrive["WorkTheOnFailureQueue"]
    assert queue["Resource"] == processor["OnFailureDestination"]["Resource"]
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"} <= set(queue["Action"])
    trust = resources["RedriveRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Condition"] == {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
    # The redrive pauses the live trigger first (docs/reliability.md), found by a review: no
    # role of the stack could, so a redrive ran beside it.
    pause = redrive["PauseTheProcessorTrigger"]
    assert set(pause["Action"]) == {"lambda:GetEventSourceMapping", "lambda:UpdateEventSourceMapping"}
    assert pause["Resource"]["Fn::Sub"].endswith(":event-source-mapping:${ProcessorEventSourceMapping}")
    outputs = load_template(MAIN_TEMPLATE)["Outputs"]
    assert outputs["ProcessorEventSourceMappingId"]["Value"] == {"Ref": "ProcessorEventSourceMapping"}
    assert redrive["ReadProcessorSettings"]["Resource"] == {"Fn::GetAtt": ["ProcessorFunction", "Arn"]}
    # The sweeper too: with no commits it would judge every sensor silent (found by a review).
    sweeper = redrive["PauseTheSweeper"]
    assert sweeper["Resource"] == {"Fn::GetAtt": ["SweeperSchedule", "Arn"]}
    assert set(sweeper["Action"]) == {"events:DisableRule", "events:EnableRule"}


def test_every_alarm_is_on_the_dashboard_and_every_citypulse_metric_is_one_the_code_emits() -> None:
    # Found by a review: the dashboard's alarm widget left alarms out, and no alarm or widget
    # watched the sweeper's metrics or the processor's reported batch failures.
    from infra.local.provision import load_template

    resources = load_template(MAIN_TEMPLATE)["Resources"]
    alarms = {lid for lid, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    body, names = resources["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    dashboard = json.loads(re.sub(r"\$\{([A-Za-z:]+)\}", r"\1", body))
    (widget,) = [w for w in dashboard["widgets"] if w["type"] == "alarm"]
    shown = {names[ref]["Fn::GetAtt"][0] for ref in widget["properties"]["alarms"]}
    assert shown == alarms
    emitted = set()
    for path in (REPO_ROOT / "streaming").rglob("*.py"):
        emitted |= set(re.findall(r'add_metric\(\s*name="(\w+)"', path.read_text()))
    emitted |= set(re.findall(r'\("\w+", "(\w+)"\)', (REPO_ROOT / "streaming/processor/handler.py").read_text()))
    watched = {
        m[1]
        for w in dashboard["widgets"]
        if w["type"] == "metric"
        for m in w["properties"]["metrics"]
        if m[0] == "citypulse"
    }
    watched |= {
        r["Properties"]["MetricName"]
        for r in resources.values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == "citypulse"
    }
    assert watched <= emitted, watched - emitted
    assert {"BatchFailures", "SilentSensorsSwept", "DarkZonesCleared", "SweepProcessingLag"} <= watched
    # Environments may share an account: every citypulse metric shown or alarmed on is this
    # environment's (found by a review: prod's alarm fired on dev's failures).
    for widget in dashboard["widgets"]:
        for metric in widget["properties"].get("metrics", []):
            if metric[0] == "citypulse":
                assert metric[4:6] == ["environment", "EnvName"], metric
    for r in resources.values():
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == "citypulse":
            assert {"Name": "environment", "Value": {"Ref": "EnvName"}} in r["Properties"]["Dimensions"]
    for function in ("ProcessorFunction", "SweeperFunction"):
        variables = resources[function]["Properties"]["Environment"]["Variables"]
        assert variables["CITYPULSE_ENV_NAME"] == {"Ref": "EnvName"}, function
    for module in ("handler.py", "sweeper.py"):
        code = (REPO_ROOT / "streaming" / "processor" / module).read_text()
        assert 'set_default_dimensions(environment=os.environ.get("CITYPULSE_ENV_NAME"' in code, module


def test_the_stream_lag_alarm_reads_a_metric_both_kinds_of_trigger_report() -> None:
    # Found by a review: the stream's GetRecords.IteratorAgeMilliseconds has no data when the
    # trigger reads through an enhanced fan-out consumer (SubscribeToShard): the alarm was blind.
    from infra.local.provision import load_template

    alarm = load_template(MAIN_TEMPLATE)["Resources"]["StreamIteratorAgeAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", "IteratorAge")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "ProcessorFunction"}}]


def test_the_dag_failure_metric_counts_the_line_the_failure_callback_logs() -> None:
    # Found by a review: the filter matched Airflow 2's "Marking task as FAILED", which Airflow 3
    # logs in the scheduler's log group, not the task log group: the alarm could never fire.
    from citypulse_batch.events import FAILURE_LOG_LINE
    from infra.local.provision import load_template

    metric_filter = load_template(MAIN_TEMPLATE)["Resources"]["DagTaskFailuresMetricFilter"]["Properties"]
    assert metric_filter["FilterPattern"] == f'"{FAILURE_LOG_LINE}"'


def test_only_prods_own_jobs_may_change_the_prod_stack() -> None:
    # Found by a security review: one deploy role trusted every environment's jobs, a labelled
    # pull request's preview (which runs its own branch's scripts) included, and could change
    # citypulse-prod: prod's required reviewers could be stepped around.
    from infra.local.provision import load_template

    resources = load_template(REPO_ROOT / "infra" / "cloudformation" / "github-oidc.yaml")["Resources"]
    sub = "token.actions.githubusercontent.com:sub"
    prod_jobs = {"Fn::Sub": "repo:${GitHubRepository}:environment:prod"}

    def trust(role: str) -> dict[str, Any]:
        (statement,) = resources[role]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        return statement["Condition"]

    assert trust("GitHubDeployRole")["StringNotEquals"][sub] == prod_jobs
    assert trust("GitHubProdDeployRole")["StringEquals"][sub] == prod_jobs
    prod_stack = "arn:${AWS::Partition}:cloudformation:${AWS::Region}:${AWS::AccountId}:stack/citypulse-prod/*"
    (deny,) = [s for s in _statements(resources, "GitHubDeployRole") if s["Effect"] == "Deny"]
    assert {"Fn::Sub": prod_stack} in deny["Resource"] and "cloudformation:*" in deny["Action"]
    for action, targets in _grants(resources, "GitHubProdDeployRole").items():
        for text in targets:
            assert "citypulse-prod" in text or "smoke" in text, (action, text)
    # What both do whatever their environment is one managed policy, tied to no stack.
    common = resources["GitHubDeployCommon"]["Properties"]["PolicyDocument"]["Statement"]
    assert not [s for s in common if "stack/" in json.dumps(s.get("Resource"))]
    for role in ("GitHubDeployRole", "GitHubProdDeployRole"):
        assert resources[role]["Properties"]["ManagedPolicyArns"] == [{"Ref": "GitHubDeployCommon"}]
