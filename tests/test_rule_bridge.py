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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from infra.local.broker import DEFAULT_MAX_INFLIGHT_MESSAGES, Broker, start_broker
from infra.local.certs import LocalCA
from infra.local.rule_bridge import (
    MessageContext,
    PartitionKeyTemplate,
    RuleBridge,
    RuleEvaluationError,
    UnsupportedRuleSql,
    _Pending,
    main,
    parse_rule_sql,
)
from streaming.devices.gateway import Gateway

PROJECT_SQL = (
    "SELECT encode(*, 'base64') AS payload, topic(3) AS zone_id, topic(4) AS gateway_id, "
    "clientid() AS client_id, timestamp() AS received_at FROM 'citypulse/telemetry/+/+'"
)
PROJECT_KEY = "${topic(3)}"
CTX = MessageContext(topic="citypulse/telemetry/Z-012/gw-00012", client_id="gw-00012", received_at_ms=1_795_000_000_123)
TIMEOUT = 30.0
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


@pytest.mark.parametrize("template", ["${timestamp()}", "${topic(3)", "${payload.x}", "", "${topic(0)}"])
def test_unsupported_partition_key_templates_are_refused(template: str) -> None:
    with pytest.raises(UnsupportedRuleSql):
        PartitionKeyTemplate.parse(template)


def _bridge(kinesis: Any, sql: str = PROJECT_SQL, key: str = PROJECT_KEY, **kw: Any) -> RuleBridge:
    return RuleBridge(
        sql=sql,
        partition_key=key,
        stream_name="s",
        broker_host="localhost",
        broker_port=1,
        ca_path="ca",
        cert_path="c",
        key_path="k",
        kinesis_client=kinesis,
        **kw,
    )


def test_unsupported_rule_fails_at_construction_and_the_cli_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnsupportedRuleSql):
        _bridge(object(), sql=PROJECT_SQL + " WHERE 1 = 1")
    with pytest.raises(UnsupportedRuleSql):
        _bridge(object(), key="${timestamp()}")
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
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def broker(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker(tmp_path_factory.mktemp("broker"), ca) as b:
        yield b


@pytest.fixture(scope="module")
def kinesalite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from infra.local.emulators import start_kinesalite

    emulator = start_kinesalite(tmp_path_factory.mktemp("kinesalite"))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def kinesis(kinesalite: Any) -> Any:
    from infra.local.emulators import kinesis_client

    return kinesis_client(kinesalite.endpoint_url)


def create_stream(kinesis: Any, name: str, shards: int = 2) -> None:
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    deadline = time.monotonic() + TIMEOUT
    while kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        assert time.monotonic() < deadline, f"stream {name} never became ACTIVE"


class StreamReader:
    """Reads every shard of a stream from the start, accumulating records across calls."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        self.records: list[dict[str, Any]] = []
        shards = kinesis.list_shards(StreamName=stream)["Shards"]
        self.iterators = {
            s["ShardId"]: kinesis.get_shard_iterator(
                StreamName=stream, ShardId=s["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            for s in shards
        }

    def poll(self) -> int:
        for shard, it in self.iterators.items():
            resp = self.kinesis.get_records(ShardIterator=it, Limit=10_000)
            self.iterators[shard] = resp["NextShardIterator"]
            self.records += resp["Records"]
        return len(self.records)

    def payloads(self) -> Counter[bytes]:
        return Counter(base64.b64decode(orjson.loads(r["Data"])["payload"]) for r in self.records)

    def wait_for_all(self, expected: set[bytes]) -> Counter[bytes]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.poll()
            seen = self.payloads()
            if expected <= set(seen):
                return seen
            assert time.monotonic() < deadline, f"{len(expected - set(seen))} of {len(expected)} never arrived"


def gateways(ca: LocalCA, broker: Broker, n: int) -> list[Gateway]:
    out = []
    for i in range(n):
        ident = ca.device_identity(f"gw-{i + 1:05d}")
        gw = Gateway(
            ident.name,
            endpoint="localhost",
            port=broker.port,
            cert_path=ident.cert_path,
            key_path=ident.key_path,
            ca_path=ca.cert_path,
        )
        gw.connect(TIMEOUT)
        out.append(gw)
    return out


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
    ident = ca.bridge_identity()
    bridge = RuleBridge(
        sql=PROJECT_SQL,
        partition_key=PROJECT_KEY,
        stream_name="telemetry-a",
        broker_host="localhost",
        broker_port=broker.port,
        ca_path=ca.cert_path,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        kinesis_client=kinesis,
    )
    bridge.start()
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
    ident = ca.bridge_identity()
    bridge = RuleBridge(
        sql=PROJECT_SQL,
        partition_key=PROJECT_KEY,
        stream_name="telemetry-quiet",
        broker_host="localhost",
        broker_port=broker.port,
        ca_path=ca.cert_path,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        kinesis_client=kinesis,
    )
    bridge.start()
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
        sent = publish_round(gws, "before", 500)
        # Killed while it still has messages to forward: some are in Kinesis but unacknowledged.
        first.wait_event(lambda e: e["event"] == "stats" and e["forwarded"] >= 200)
        first.kill()
        sent |= publish_round(gws, "while-down", 250)  # queued by the broker for the bridge's session
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
    # Only what the killed bridge had forwarded but not yet acknowledged comes back: at most
    # the broker's outgoing in-flight window.
    assert duplicates <= DEFAULT_MAX_INFLIGHT_MESSAGES


@pytest.mark.integration
def test_nothing_is_lost_across_a_broker_restart(ca: LocalCA, kinesis: Any, tmp_path: Path) -> None:
    create_stream(kinesis, "telemetry-c", shards=1)
    own = start_broker(tmp_path / "broker", ca, persistence=True)
    ident = ca.bridge_identity()
    bridge = RuleBridge(
        sql=PROJECT_SQL,
        partition_key=PROJECT_KEY,
        stream_name="telemetry-c",
        broker_host="localhost",
        broker_port=own.port,
        ca_path=ca.cert_path,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        kinesis_client=kinesis,
    )
    bridge.start()
    gws = gateways(ca, own, 2)
    try:
        sent = publish_round(gws, "before", 500)
        # A graceful restart saves the bridge's session, so messages that gateways resend or
        # publish before the bridge reconnects are queued for it rather than dropped.
        own.stop()
        own = start_broker(tmp_path / "broker", ca, port=own.port, persistence=True)
        sent |= publish_round(gws, "after", 500)
        for gw in gws:
            gw.flush(TIMEOUT)
        seen = StreamReader(kinesis, "telemetry-c").wait_for_all(sent)
    finally:
        for gw in gws:
            gw.disconnect()
        bridge.stop()
        own.stop()
    assert set(seen) == sent
    assert sum(seen.values()) - len(seen) <= DEFAULT_MAX_INFLIGHT_MESSAGES
