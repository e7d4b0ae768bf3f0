"""Basic Ingest ($aws/rules/<rule>/<topic>) end to end: gateway → Mosquitto ACL → rule bridge → Kinesis.

IoT Core routes a Basic Ingest message straight to the named rule and strips the
``$aws/rules/<rule>/`` prefix before the rule sees the topic; the local broker and bridge
must do the same, and must keep a device to its own topic behind the prefix too.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from infra.local.broker import Broker, render_acl, start_broker
from infra.local.certs import LocalCA
from infra.local.rule_bridge import RuleBridge
from streaming.devices.gateway import Gateway
from streaming.devices.topics import basic_ingest_prefix, basic_ingest_topic, telemetry_topic

RULE = "citypulse_local_telemetry"
SQL = (
    "SELECT encode(*, 'base64') AS payload, topic(3) AS zone_id, topic(4) AS gateway_id, "
    "clientid() AS client_id, timestamp() AS received_at FROM 'citypulse/telemetry/+/+'"
)
KEY = "${topic(3)}"
TIMEOUT = 30.0


def test_the_basic_ingest_topic_is_the_telemetry_topic_behind_the_rule_prefix() -> None:
    assert basic_ingest_topic(RULE, "Z-001", "gw-001-00") == f"$aws/rules/{RULE}/citypulse/telemetry/Z-001/gw-001-00"
    assert basic_ingest_topic(RULE, "Z-1", "gw-1").removeprefix(basic_ingest_prefix(RULE)) == telemetry_topic(
        "Z-1", "gw-1"
    )
    for bad in ("has-dash", "a/b", "", "+", "#"):
        with pytest.raises(ValueError):
            basic_ingest_topic(bad, "Z-1", "gw-1")
        with pytest.raises(ValueError):
            basic_ingest_prefix(bad)


def test_the_acl_admits_basic_ingest_only_for_the_named_rule_and_the_devices_own_id() -> None:
    assert "$aws" not in render_acl()
    acl = render_acl(RULE)
    assert f"pattern write $aws/rules/{RULE}/citypulse/telemetry/+/%u" in acl.splitlines()
    assert f"topic read $aws/rules/{RULE}/citypulse/telemetry/#" in acl.splitlines()
    with pytest.raises(ValueError, match="invalid IoT rule name"):
        render_acl("rule/with/levels")


def test_the_rule_sees_the_topic_without_the_prefix() -> None:
    bridge = RuleBridge(
        sql=SQL,
        partition_key=KEY,
        stream_name="s",
        broker_host="localhost",
        broker_port=1,
        ca_path="ca",
        cert_path="c",
        key_path="k",
        kinesis_client=object(),
        rule_name=RULE,
    )
    assert bridge.topic_filters == ["citypulse/telemetry/+/+", f"$aws/rules/{RULE}/citypulse/telemetry/+/+"]


# -- against a real broker and Kinesis --------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def broker(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker(tmp_path_factory.mktemp("broker"), ca, basic_ingest_rule=RULE) as b:
        yield b


@pytest.fixture(scope="module")
def kinesis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from infra.local.emulators import kinesis_client, start_kinesalite

    emulator = start_kinesalite(tmp_path_factory.mktemp("kinesalite"))
    try:
        yield kinesis_client(emulator.endpoint_url)
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def stream(kinesis: Any, ca: LocalCA, broker: Broker) -> Iterator[str]:
    name = "basic-ingest"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    deadline = time.monotonic() + TIMEOUT
    while kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        assert time.monotonic() < deadline
    ident = ca.bridge_identity()
    bridge = RuleBridge(
        sql=SQL,
        partition_key=KEY,
        stream_name=name,
        broker_host="localhost",
        broker_port=broker.port,
        ca_path=ca.cert_path,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        kinesis_client=kinesis,
        rule_name=RULE,
    )
    bridge.start()
    try:
        yield name
    finally:
        bridge.stop()


class Records:
    """Every record of a one-shard stream, read from the start; waits by polling Kinesis."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
        self.it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
            "ShardIterator"
        ]
        self.by_payload: dict[bytes, list[tuple[dict[str, Any], str]]] = {}

    def wait_for(self, payload: bytes) -> list[tuple[dict[str, Any], str]]:
        deadline = time.monotonic() + TIMEOUT
        while payload not in self.by_payload:
            assert time.monotonic() < deadline, f"{payload!r} never reached Kinesis"
            resp = self.kinesis.get_records(ShardIterator=self.it, Limit=1000)
            self.it = resp["NextShardIterator"]
            for rec in resp["Records"]:
                out = orjson.loads(rec["Data"])
                self.by_payload.setdefault(base64.b64decode(out["payload"]), []).append((out, rec["PartitionKey"]))
        return self.by_payload[payload]


def _gateway(ca: LocalCA, broker: Broker, gateway_id: str, rule: str | None) -> Gateway:
    ident = ca.device_identity(gateway_id)
    gw = Gateway(
        gateway_id,
        endpoint="localhost",
        port=broker.port,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        ca_path=ca.cert_path,
        basic_ingest_rule=rule,
    )
    gw.connect(TIMEOUT)
    return gw


@pytest.mark.integration
def test_basic_ingest_reaches_kinesis_with_the_same_fields_as_the_normal_topic(
    ca: LocalCA, broker: Broker, kinesis: Any, stream: str
) -> None:
    normal = _gateway(ca, broker, "gw-101-00", None)
    direct = _gateway(ca, broker, "gw-101-00", RULE)
    try:
        normal.publish_telemetry("Z-101", b'{"via":"broker"}').result(TIMEOUT)
        direct.publish_telemetry("Z-101", b'{"via":"basic ingest"}').result(TIMEOUT)
    finally:
        normal.disconnect()
        direct.disconnect()
    records = Records(kinesis, stream)
    ((via_broker, key_a),) = records.wait_for(b'{"via":"broker"}')
    ((via_basic, key_b),) = records.wait_for(b'{"via":"basic ingest"}')
    assert key_a == key_b == "Z-101"
    assert set(via_basic) == set(via_broker) == {"payload", "zone_id", "gateway_id", "client_id", "received_at"}
    for field in ("zone_id", "gateway_id", "client_id"):
        assert via_basic[field] == via_broker[field], field
    assert via_basic["gateway_id"] == "gw-101-00"


@pytest.mark.integration
def test_a_device_cannot_publish_on_another_devices_basic_ingest_topic(
    ca: LocalCA, broker: Broker, kinesis: Any, stream: str
) -> None:
    gw = _gateway(ca, broker, "gw-102-00", RULE)
    try:
        # Mosquitto acknowledges a QoS 1 publish the ACL refuses, and delivers it to nobody.
        gw.publish(basic_ingest_topic(RULE, "Z-102", "gw-102-01"), b"spoof-other-device").result(TIMEOUT)
        gw.publish(basic_ingest_topic("another_rule", "Z-102", "gw-102-00"), b"spoof-other-rule").result(TIMEOUT)
        gw.publish(f"$aws/rules/{RULE}/citypulse/other/gw-102-00", b"spoof-other-topic").result(TIMEOUT)
        gw.publish_telemetry("Z-102", b"barrier-102").result(TIMEOUT)
    finally:
        gw.disconnect()
    records = Records(kinesis, stream)
    # One publisher at QoS 1: anything delivered before the barrier is in Kinesis by the time it is.
    records.wait_for(b"barrier-102")
    assert not {b"spoof-other-device", b"spoof-other-rule", b"spoof-other-topic"} & set(records.by_payload)


@pytest.mark.integration
def test_a_broker_without_the_rule_name_admits_no_basic_ingest(ca: LocalCA, tmp_path: Any) -> None:
    """Basic Ingest is opt-in: the default ACL is the plain telemetry pattern only."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    with start_broker(tmp_path / "plain", ca) as plain:
        got: list[bytes] = []
        done = threading.Event()
        sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe")
        ident = ca.bridge_identity()
        sub.tls_set(ca_certs=str(ca.cert_path), certfile=str(ident.cert_path), keyfile=str(ident.key_path))
        subscribed = threading.Event()
        sub.on_connect = lambda c, *_: c.subscribe([("citypulse/telemetry/#", 1), ("$aws/rules/#", 1)])
        sub.on_subscribe = lambda *_: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            got.append(msg.payload)
            if msg.payload == b"barrier":
                done.set()

        sub.on_message = on_message
        sub.connect("localhost", plain.port)
        sub.loop_start()
        try:
            assert subscribed.wait(TIMEOUT)
            gw = _gateway(ca, plain, "gw-103-00", RULE)
            try:
                gw.publish_telemetry("Z-103", b"basic").result(TIMEOUT)
                gw.publish(telemetry_topic("Z-103", "gw-103-00"), b"barrier").result(TIMEOUT)
            finally:
                gw.disconnect()
            assert done.wait(TIMEOUT)
        finally:
            sub.disconnect()
            sub.loop_stop()
    assert got == [b"barrier"]
