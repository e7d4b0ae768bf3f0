"""The local IoT rule bridge (infra/local/rule_bridge.py): its SQL subset, and broker → Kinesis delivery."""

from __future__ import annotations

import base64
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from batch_lake import ministack_env, s3_client
from mqtt_stream import PROJECT_KEY, PROJECT_SQL, TIMEOUT, StreamReader, connect_gateway, create_stream, start_bridge
from mqtt_stream import offline_bridge as _bridge

from infra.local.broker import Broker, start_broker
from infra.local.certs import LocalCA
from infra.local.emulators import Emulator, kinesis_client
from infra.local.rule_bridge import (
    MessageContext,
    PartitionKeyTemplate,
    RuleEvaluationError,
    UnsupportedRuleSql,
    _Pending,
    main,
    parse_rule_sql,
)
from streaming.devices.gateway import Gateway

CTX = MessageContext(topic="citypulse/telemetry/Z-012/gw-00012", client_id="gw-00012", received_at_ms=1_795_000_000_123)
REPO = Path(__file__).resolve().parents[1]


# -- the SQL evaluator -------------------------------------------------------------------------


def test_project_rule_projects_every_field_in_order() -> None:
    rule = parse_rule_sql(PROJECT_SQL)
    assert rule.topic_filter == "citypulse/telemetry/+/+"
    payload = b'{"schema_version":1,"gateway_id":"gw-00012","readings":[]}'
    out = orjson.loads(rule.evaluate(payload, CTX))
    assert list(out) == ["payload", "zone_id", "gateway_id", "client_id", "received_at"]
    assert base64.b64decode(out["payload"]) == payload
    assert out["zone_id"] == "Z-012"
    assert out["gateway_id"] == "gw-00012"
    assert out["client_id"] == "gw-00012"
    assert out["received_at"] == CTX.received_at_ms


def test_binary_and_non_json_payloads_are_still_forwarded_base64() -> None:
    rule = parse_rule_sql(PROJECT_SQL)
    for payload in (b"\x00\xff\xfe not json", b"{truncated", b"", "ünïcode".encode("latin-1")):
        out = orjson.loads(rule.evaluate(payload, CTX))
        assert base64.b64decode(out["payload"]) == payload


def test_keywords_are_case_insensitive_and_topic_without_level_is_the_whole_topic() -> None:
    rule = parse_rule_sql("select topic() as t, TOPIC(9) As missing from 'citypulse/#'")
    # A level beyond the topic is Undefined in IoT SQL, and Undefined keys are omitted.
    assert orjson.loads(rule.evaluate(b"x", CTX)) == {"t": CTX.topic}
    assert rule.matches("citypulse/telemetry/a/b") and not rule.matches("other/telemetry")


def test_bare_star_passes_the_payload_through_untouched() -> None:
    rule = parse_rule_sql("SELECT * FROM 'citypulse/telemetry/+/+'")
    assert rule.evaluate(b"\x00binary", CTX) == b"\x00binary"


def test_star_with_other_items_merges_a_json_object_and_rejects_anything_else() -> None:
    rule = parse_rule_sql("SELECT *, topic(3) AS zone FROM 'citypulse/telemetry/+/+'")
    assert orjson.loads(rule.evaluate(b'{"a":1}', CTX)) == {"a": 1, "zone": "Z-012"}
    for bad in (b"not json", b"[1,2]"):
        with pytest.raises(RuleEvaluationError):
            rule.evaluate(bad, CTX)


@pytest.mark.parametrize(
    "sql",
    [
        PROJECT_SQL + " WHERE topic(3) = 'Z-1'",
        "SELECT payload.readings AS r FROM 'a/b'",
        "SELECT newuuid() AS id FROM 'a/b'",
        "SELECT encode(*, 'hex') AS p FROM 'a/b'",
        "SELECT encode(payload, 'base64') AS p FROM 'a/b'",
        "SELECT topic(0) AS t FROM 'a/b'",
        "SELECT topic(3) FROM 'a/b'",
        "SELECT * AS everything FROM 'a/b'",
        "SELECT *, * FROM 'a/b'",
        "SELECT topic(1) AS x, clientid() AS x FROM 'a/b'",
        "SELECT * FROM a/b",
        "SELECT * FROM 'a/#/b'",
        "SELECT * FROM 'a/b+'",
        "SELECT * FROM '$aws/rules/r'",
        "SELECT * FROM 'a/b'; DROP TABLE x",
        "SELECT clientid() AS c, timestamp() AS t",
        "SELECT 1 AS one FROM 'a/b'",
        "",
    ],
)
def test_unsupported_sql_is_refused(sql: str) -> None:
    with pytest.raises(UnsupportedRuleSql):
        parse_rule_sql(sql)


def test_partition_key_templates() -> None:
    assert PartitionKeyTemplate.parse("${topic(3)}").render(CTX) == "Z-012"
    assert PartitionKeyTemplate.parse("${clientid()}").render(CTX) == "gw-00012"
    assert PartitionKeyTemplate.parse("zone-${topic(3)}/${topic(4)}!").render(CTX) == "zone-Z-012/gw-00012!"
    uuids = {PartitionKeyTemplate.parse("${newuuid()}").render(CTX) for _ in range(3)}
    assert len(uuids) == 3 and all(uuid.UUID(u) for u in uuids)
    with pytest.raises(RuleEvaluationError):
        PartitionKeyTemplate.parse("${topic(7)}").render(CTX)


@pytest.mark.parametrize("template", ["${sourceip()}", "${topic(3)", "${payload.x}", "", "${topic(0)}"])
def test_unsupported_partition_key_templates_are_refused(template: str) -> None:
    with pytest.raises(UnsupportedRuleSql):
        PartitionKeyTemplate.parse(template)


def test_unsupported_rule_fails_at_construction_and_the_cli_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnsupportedRuleSql):
        _bridge(object(), sql=PROJECT_SQL + " WHERE 1 = 1")
    with pytest.raises(UnsupportedRuleSql):
        _bridge(object(), key="${sourceip()}")
    argv = ["--sql", "SELECT x FROM 'a'", "--partition-key", "k", "--stream", "s"]
    argv += ["--broker-port", "1", "--ca", "a", "--cert", "b", "--key", "c"]
    assert main(argv) == 2
    assert "unsupported rule" in capsys.readouterr().err


class FlakyKinesis:
    """Rejects chosen entries on the first call, as Kinesis does when a shard is throttled."""

    def __init__(self, fail_first: set[bytes]) -> None:
        self.fail_first = fail_first
        self.calls: list[list[bytes]] = []

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        data = [r["Data"] for r in Records]
        self.calls.append(data)
        out = []
        for d in data:
            if len(self.calls) == 1 and d in self.fail_first:
                out.append({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"})
            else:
                out.append({"SequenceNumber": "1", "ShardId": "shardId-000000000000"})
        return {"FailedRecordCount": sum("ErrorCode" in r for r in out), "Records": out}


def test_only_failed_entries_are_retried() -> None:
    kinesis = FlakyKinesis({b"1", b"3"})
    bridge = _bridge(kinesis)
    batch = [_Pending(mid=i, generation=1, data=str(i).encode(), partition_key="k") for i in range(5)]
    bridge._forward(batch)
    assert kinesis.calls == [[b"0", b"1", b"2", b"3", b"4"], [b"1", b"3"]]
    stats = bridge.stats
    assert (stats.forwarded, stats.retried, stats.put_calls) == (5, 2, 2)


# -- broker → bridge → Kinesis ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kinesis(kinesalite: Emulator) -> Any:
    return kinesis_client(kinesalite.endpoint_url)


def gateways(ca: LocalCA, broker: Broker, n: int) -> list[Gateway]:
    return [connect_gateway(ca, broker, f"gw-{i + 1:05d}") for i in range(n)]


def zone_of(gateway_id: str) -> str:
    return f"Z-{int(gateway_id[3:]) % 2}"


def publish_round(gws: list[Gateway], tag: str, per_gateway: int) -> set[bytes]:
    sent = set()
    for i in range(per_gateway):
        for gw in gws:
            payload = orjson.dumps({"gateway_id": gw.gateway_id, "tag": tag, "n": i})
            gw.publish_telemetry(zone_of(gw.gateway_id), payload)
            sent.add(payload)
    return sent


@pytest.mark.integration
def test_every_message_reaches_kinesis_once_with_the_rule_fields(ca: LocalCA, broker: Broker, kinesis: Any) -> None:
    create_stream(kinesis, "telemetry-a")
    bridge = start_bridge(kinesis, ca, broker, "telemetry-a")
    started_ms = time.time_ns() // 1_000_000
    gws = gateways(ca, broker, 3)
    try:
        sent = publish_round(gws, "a", 300)
        binary = b"\x00\x01 not json \xff"
        gws[0].publish_telemetry(zone_of(gws[0].gateway_id), binary)
        sent.add(binary)
        for gw in gws:
            gw.flush(TIMEOUT)
        reader = StreamReader(kinesis, "telemetry-a")
        seen = reader.wait_for_all(sent)
    finally:
        for gw in gws:
            gw.disconnect()
        stats = bridge.stop()

    assert seen == Counter(sent), "every message exactly once"
    assert (stats.received, stats.forwarded, stats.acked, stats.rule_errors) == (len(sent),) * 3 + (0,)
    for record in reader.records:
        out = orjson.loads(record["Data"])
        assert set(out) == {"payload", "zone_id", "gateway_id", "client_id", "received_at"}
        assert out["client_id"] == out["gateway_id"]
        assert out["zone_id"] == zone_of(out["gateway_id"]) == record["PartitionKey"]
        assert started_ms <= out["received_at"] <= time.time_ns() // 1_000_000
        payload = base64.b64decode(out["payload"])
        if payload != binary:
            assert orjson.loads(payload)["gateway_id"] == out["gateway_id"]


@pytest.mark.integration
def test_a_lone_message_after_a_quiet_spell_is_forwarded_without_further_traffic(
    ca: LocalCA, broker: Broker, kinesis: Any
) -> None:
    """The tail of a burst must not wait for the next burst to push it out."""
    create_stream(kinesis, "telemetry-quiet")
    bridge = start_bridge(kinesis, ca, broker, "telemetry-quiet")
    (gw,) = gateways(ca, broker, 1)
    try:
        reader = StreamReader(kinesis, "telemetry-quiet")
        for tag in ("first", "second"):  # the second arrives when the bridge's buffer is idle
            payload = orjson.dumps({"tag": tag})
            gw.publish_telemetry(zone_of(gw.gateway_id), payload)
            gw.flush(TIMEOUT)
            assert reader.wait_for_all({payload})[payload] == 1
    finally:
        gw.disconnect()
        bridge.stop()


class BridgeProcess:
    """The bridge as the platform runs it: ``python -m infra.local.rule_bridge``."""

    def __init__(self, broker: Broker, ca: LocalCA, kinesalite: Any, stream: str) -> None:
        ident = ca.bridge_identity()
        env = dict(os.environ)
        env.update(
            AWS_ENDPOINT_URL_KINESIS=kinesalite.endpoint_url,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
        )
        # Argument list, not a shell: the SQL's quotes and ${...} pass through untouched.
        argv = [sys.executable, "-m", "infra.local.rule_bridge", "--sql", PROJECT_SQL]
        argv += ["--partition-key", PROJECT_KEY, "--stream", stream, "--broker-host", "localhost"]
        argv += ["--broker-port", str(broker.port), "--ca", str(ca.cert_path)]
        argv += ["--cert", str(ident.cert_path), "--key", str(ident.key_path), "--stats-interval", "0.05"]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_event(lambda e: e["event"] == "ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(orjson.loads(line))
        self.events.put({"event": "eof"})

    def wait_event(self, predicate: Any) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event["event"] == "eof":
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"bridge exited ({self.proc.wait()}): {stderr}")
            if predicate(event):
                return event

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(TIMEOUT)

    def terminate(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        stopped = self.wait_event(lambda e: e["event"] == "stopped")
        assert self.proc.wait(TIMEOUT) == 0
        return stopped


@pytest.mark.integration
def test_nothing_is_lost_when_the_bridge_is_killed_mid_stream(
    ca: LocalCA, broker: Broker, kinesis: Any, kinesalite: Any
) -> None:
    create_stream(kinesis, "telemetry-b")
    gws = gateways(ca, broker, 4)
    first = BridgeProcess(broker, ca, kinesalite, "telemetry-b")
    second: BridgeProcess | None = None
    try:
        before = publish_round(gws, "before", 500)
        # Killed while it still has messages to forward: some are in Kinesis but unacknowledged.
        first.wait_event(lambda e: e["event"] == "stats" and e["forwarded"] >= 200)
        first.kill()
        sent = before | publish_round(gws, "while-down", 250)  # queued by the broker for the bridge's session
        for gw in gws:
            gw.flush(TIMEOUT)
        second = BridgeProcess(broker, ca, kinesalite, "telemetry-b")
        sent |= publish_round(gws, "after", 250)
        for gw in gws:
            gw.flush(TIMEOUT)
        seen = StreamReader(kinesis, "telemetry-b").wait_for_all(sent)
        stopped = second.terminate()
    finally:
        for gw in gws:
            gw.disconnect()
        for proc in (first, second):
            if proc is not None and proc.proc.poll() is None:
                proc.kill()

    duplicates = sum(seen.values()) - len(seen)
    assert set(seen) == sent, "none lost, nothing invented"
    assert stopped["pending"] == 0
    # Redelivery after the kill may duplicate (at least once); the processor deduplicates.
    print(f"\n{len(sent)} messages, {duplicates} duplicates after kill -9, second bridge {stopped}")
    assert_only_redelivered_duplicates(seen, before)


def assert_only_redelivered_duplicates(seen: Counter[bytes], before: set[bytes]) -> None:
    """Only what the broker handed the bridge before the interruption may reach Kinesis twice.

    How many of those come back is not a bound worth asserting: acknowledgements still in the
    killed bridge's socket never reach the broker, and a PutRecords retried after a lost response
    lands whole again. CI once counted 1,497 duplicates beside a 1,000-message in-flight window.
    A message published after the interruption is never in flight twice, so a duplicate of one
    is the bridge's own bug.
    """
    duplicated = {payload for payload, n in seen.items() if n > 1}
    assert duplicated <= before, f"{len(duplicated - before)} messages published after the interruption duplicated"


@pytest.mark.integration
def test_nothing_is_lost_across_a_broker_restart(ca: LocalCA, kinesis: Any, tmp_path: Path) -> None:
    create_stream(kinesis, "telemetry-c", shards=1)
    own = start_broker(tmp_path / "broker", ca, persistence=True)
    bridge = start_bridge(kinesis, ca, own, "telemetry-c")
    gws = gateways(ca, own, 2)
    try:
        before = publish_round(gws, "before", 500)
        # A graceful restart saves the bridge's session, so messages that gateways resend or
        # publish before the bridge reconnects are queued for it rather than dropped.
        own.stop()
        own = start_broker(tmp_path / "broker", ca, port=own.port, persistence=True)
        sent = before | publish_round(gws, "after", 500)
        for gw in gws:
            gw.flush(TIMEOUT)
        seen = StreamReader(kinesis, "telemetry-c").wait_for_all(sent)
    finally:
        for gw in gws:
            gw.disconnect()
        bridge.stop()
        own.stop()
    assert set(seen) == sent
    assert_only_redelivered_duplicates(seen, before)


def test_key_templates_render_the_receive_day_as_the_error_actions_key_does() -> None:
    key = PartitionKeyTemplate.parse('ingest-errors/${parse_time("yyyy-MM-dd", timestamp(), "UTC")}/${newuuid()}.json')
    day, name = key.expand(CTX).split("/")[1:]
    assert day == "2026-11-18" and name.endswith(".json") and len(name) == len(str(uuid.uuid4())) + 5
    assert PartitionKeyTemplate.parse("${timestamp()}").expand(CTX) == str(CTX.received_at_ms)
    with pytest.raises(UnsupportedRuleSql):
        PartitionKeyTemplate.parse('${parse_time("yyyy-MM-dd EEE", timestamp(), "UTC")}')


@pytest.mark.integration
def test_a_message_the_rule_cannot_act_on_goes_to_its_s3_error_action(
    ca: LocalCA, broker: Broker, kinesis: Any, ministack: Emulator
) -> None:
    """As the template's ErrorAction: an empty zone level (no partition key) and a payload over
    IoT Core's limit are written to the lake's ingest-errors/ with the original payload, not
    only counted (found by a review)."""
    s3 = s3_client(ministack_env(ministack))
    bucket = f"errors-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    create_stream(kinesis, "telemetry-errors")
    key = 'ingest-errors/${parse_time("yyyy-MM-dd", timestamp(), "UTC")}/${newuuid()}.json'
    bridge = start_bridge(kinesis, ca, broker, "telemetry-errors", error_bucket=bucket, error_key=key, s3_client=s3)
    gw = connect_gateway(ca, broker, "gw-00040")
    try:
        gw.publish("citypulse/telemetry//gw-00040", b'{"no":"zone"}').result(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not s3.list_objects_v2(Bucket=bucket).get("KeyCount"):
            assert time.monotonic() < deadline, "no error document"
            time.sleep(0.05)  # polling the bucket for the bridge's write
    finally:
        gw.disconnect()
        stats = bridge.stop()

    (obj,) = s3.list_objects_v2(Bucket=bucket)["Contents"]
    document = orjson.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    assert obj["Key"].startswith("ingest-errors/20") and stats.rule_errors == 1
    assert base64.b64decode(document["base64OriginalPayload"]) == b'{"no":"zone"}'
    assert (document["topic"], document["clientId"]) == ("citypulse/telemetry//gw-00040", "gw-00040")
    assert "partition key" in document["failures"][0]["errorMessage"]
