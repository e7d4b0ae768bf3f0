"""Basic Ingest ($aws/rules/<rule>/<topic>) end to end: gateway → Mosquitto ACL → rule bridge → Kinesis.

IoT Core routes a Basic Ingest message straight to the named rule and strips the
``$aws/rules/<rule>/`` prefix before the rule sees the topic; the local broker and bridge
must do the same, and must keep a device to its own topic behind the prefix too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from mqtt_stream import TIMEOUT, StreamReader, connect_gateway, create_stream, offline_bridge, start_bridge

from infra.local.broker import Broker, render_acl, start_broker
from infra.local.certs import LocalCA
from infra.local.emulators import Emulator, kinesis_client
from streaming.devices.topics import basic_ingest_prefix, basic_ingest_topic, telemetry_topic

RULE = "citypulse_local_telemetry"


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
    bridge = offline_bridge(object(), rule_name=RULE)
    assert bridge.topic_filters == ["citypulse/telemetry/+/+", f"$aws/rules/{RULE}/citypulse/telemetry/+/+"]


# -- against a real broker and Kinesis --------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker(tmp_path_factory.mktemp("broker"), ca, basic_ingest_rule=RULE) as b:
        yield b


@pytest.fixture(scope="module")
def kinesis(kinesalite: Emulator) -> Any:
    return kinesis_client(kinesalite.endpoint_url)


@pytest.fixture(scope="module")
def stream(kinesis: Any, ca: LocalCA, broker: Broker) -> Iterator[str]:
    name = "basic-ingest"
    create_stream(kinesis, name, shards=1)
    bridge = start_bridge(kinesis, ca, broker, name, rule_name=RULE)
    try:
        yield name
    finally:
        bridge.stop()


@pytest.mark.integration
def test_basic_ingest_reaches_kinesis_with_the_same_fields_as_the_normal_topic(
    ca: LocalCA, broker: Broker, kinesis: Any, stream: str
) -> None:
    normal = connect_gateway(ca, broker, "gw-101-00")
    direct = connect_gateway(ca, broker, "gw-101-00", basic_ingest_rule=RULE)
    try:
        normal.publish_telemetry("Z-101", b'{"via":"broker"}').result(TIMEOUT)
        direct.publish_telemetry("Z-101", b'{"via":"basic ingest"}').result(TIMEOUT)
    finally:
        normal.disconnect()
        direct.disconnect()
    reader = StreamReader(kinesis, stream)
    reader.wait_for_all({b'{"via":"broker"}', b'{"via":"basic ingest"}'})
    by_payload = reader.by_payload()
    (record_a,) = by_payload[b'{"via":"broker"}']
    (record_b,) = by_payload[b'{"via":"basic ingest"}']
    via_broker, via_basic = orjson.loads(record_a["Data"]), orjson.loads(record_b["Data"])
    assert record_a["PartitionKey"] == record_b["PartitionKey"] == "Z-101"
    assert set(via_basic) == set(via_broker) == {"payload", "zone_id", "gateway_id", "client_id", "received_at"}
    for field in ("zone_id", "gateway_id", "client_id"):
        assert via_basic[field] == via_broker[field], field
    assert via_basic["gateway_id"] == "gw-101-00"


@pytest.mark.integration
def test_a_device_cannot_publish_on_another_devices_basic_ingest_topic(
    ca: LocalCA, broker: Broker, kinesis: Any, stream: str
) -> None:
    gw = connect_gateway(ca, broker, "gw-102-00", basic_ingest_rule=RULE)
    try:
        # Mosquitto acknowledges a QoS 1 publish the ACL refuses, and delivers it to nobody.
        gw.publish(basic_ingest_topic(RULE, "Z-102", "gw-102-01"), b"spoof-other-device").result(TIMEOUT)
        gw.publish(basic_ingest_topic("another_rule", "Z-102", "gw-102-00"), b"spoof-other-rule").result(TIMEOUT)
        gw.publish(f"$aws/rules/{RULE}/citypulse/other/gw-102-00", b"spoof-other-topic").result(TIMEOUT)
        gw.publish_telemetry("Z-102", b"barrier-102").result(TIMEOUT)
    finally:
        gw.disconnect()
    reader = StreamReader(kinesis, stream)
    # One publisher at QoS 1: anything delivered before the barrier is in Kinesis by the time it is.
    seen = reader.wait_for_all({b"barrier-102"})
    assert not {b"spoof-other-device", b"spoof-other-rule", b"spoof-other-topic"} & set(seen)


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
            gw = connect_gateway(ca, plain, "gw-103-00", basic_ingest_rule=RULE)
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
