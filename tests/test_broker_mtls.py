"""The private Mosquitto (infra/local/broker.py) with the awsiotsdk gateway (streaming/devices).

Against a real broker: mutual TLS, per-device ACLs, certificate checks, reconnects.
Non-delivery is asserted with barriers (a later message on the same path, or a round trip on
the same connection), never by waiting and seeing nothing.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from awscrt import mqtt
from paho.mqtt.enums import CallbackAPIVersion

from infra.local.broker import TELEMETRY_FILTER, Broker, start_broker
from infra.local.certs import Identity, LocalCA
from streaming.contract import MAX_MQTT_PAYLOAD_BYTES
from streaming.devices.gateway import Gateway, GatewayError, chunk_by_budget, connect_all, telemetry_topic

pytestmark = pytest.mark.integration

TIMEOUT = 15.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    ca = LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))
    ca.device_identity("gw-revoked")
    ca.revoke("gw-revoked")
    return ca


@pytest.fixture(scope="module")
def broker(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with start_broker(tmp_path_factory.mktemp("broker"), ca) as b:
        yield b


def gateway(ca: LocalCA, broker: Broker, gateway_id: str, identity: Identity | None = None) -> Gateway:
    ident = identity or ca.device_identity(gateway_id)
    return Gateway(
        gateway_id,
        endpoint="localhost",
        port=broker.port,
        cert_path=ident.cert_path,
        key_path=ident.key_path,
        ca_path=ca.cert_path,
        reconnect_min_timeout_secs=1,
        reconnect_max_timeout_secs=2,
    )


@dataclass
class Collector:
    """A paho subscriber that records what it receives and lets tests wait for a condition."""

    client: paho.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = TIMEOUT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.messages), timeout), (
                f"condition not met within {timeout}s; got {len(self.messages)} messages"
            )

    def has(self, payload: bytes) -> Callable[[list[tuple[str, bytes]]], bool]:
        return lambda msgs: any(p == payload for _, p in msgs)


def _tls_client(ca: LocalCA, identity: Identity | None, *, ca_path: Path | None = None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe", clean_session=True)
    client.tls_set(
        ca_certs=str(ca_path or ca.cert_path),
        certfile=str(identity.cert_path) if identity else None,
        keyfile=str(identity.key_path) if identity else None,
    )
    return client


@pytest.fixture
def subscriber(ca: LocalCA, broker: Broker) -> Iterator[Collector]:
    client = _tls_client(ca, ca.bridge_identity())
    collector = Collector(client)
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with collector.cond:
            collector.messages.append((msg.topic, msg.payload))
            collector.cond.notify_all()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(TELEMETRY_FILTER, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("localhost", broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(TIMEOUT), "subscriber never got its SUBACK"
        yield collector
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_connect_result(client: paho.Client, port: int) -> str:
    """Try an MQTT connection; returns 'connected' or why it failed (TLS error or CONNACK reason)."""
    outcome: list[str] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(
        "connected" if not reason.is_failure else str(reason)
    )
    client.on_disconnect = lambda _c, _u, _f, reason, _p: outcome.append(f"disconnected: {reason}")
    try:
        client.connect("localhost", port)
    except (ssl.SSLError, OSError) as e:
        return f"tls error: {e}"
    # Driven by hand rather than loop_start(), whose thread would retry the connection.
    deadline = time.monotonic() + TIMEOUT
    while not outcome and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS and not outcome:
            outcome.append("connection lost")
    client.disconnect()
    assert outcome, "no CONNACK and no disconnect"
    return outcome[0]


def test_gateway_publishes_and_the_bridge_identity_receives_exactly_those(
    ca: LocalCA, broker: Broker, subscriber: Collector
) -> None:
    payloads = [f'{{"n":{i},"gateway_id":"gw-00010"}}'.encode() for i in range(200)]
    with gateway(ca, broker, "gw-00010") as gw:
        futures = [gw.publish_telemetry("Z-010", p) for p in payloads]
        stats = gw.flush(TIMEOUT)
        barrier = b"barrier-1"
        gw.publish_telemetry("Z-010", barrier).result(TIMEOUT)

    assert all(f.done() and f.exception() is None for f in futures)
    assert (stats.published, stats.acked, stats.failed) == (200, 200, 0)
    subscriber.wait_for(subscriber.has(barrier))
    got = [p for t, p in subscriber.messages if p != barrier]
    assert {t for t, _ in subscriber.messages} == {telemetry_topic("Z-010", "gw-00010")}
    assert got == payloads  # one publisher at QoS 1: all, once each, in order


def test_a_payload_over_iot_cores_limit_is_refused_before_it_holds_up_the_gateway(
    ca: LocalCA, broker: Broker, subscriber: Collector
) -> None:
    """Sent, it would drop the connection and come back on every reconnect, blocking every
    message queued behind it (found by a review); refused, the next ones go through."""
    with gateway(ca, broker, "gw-00011") as gw:
        with pytest.raises(ValueError, match="over IoT Core's 131,072-byte limit"):
            gw.publish_telemetry("Z-011", b"x" * (MAX_MQTT_PAYLOAD_BYTES + 1))
        gw.publish_telemetry("Z-011", b"y" * MAX_MQTT_PAYLOAD_BYTES).result(TIMEOUT)  # at the limit
        gw.publish_telemetry("Z-011", b"after").result(TIMEOUT)
        stats = gw.flush(TIMEOUT)
    subscriber.wait_for(subscriber.has(b"after"))
    assert (stats.published, stats.acked, stats.interruptions) == (2, 2, 0)


def test_a_device_cannot_publish_as_another(ca: LocalCA, broker: Broker, subscriber: Collector) -> None:
    with gateway(ca, broker, "gw-00020") as gw_a:
        # On someone else's topic: Mosquitto acknowledges QoS 1 but delivers nothing.
        gw_a.publish("citypulse/telemetry/Z-1/gw-00021", b"spoof-topic").result(TIMEOUT)
        gw_a.publish("citypulse/telemetry/Z-1/gw-00021/x", b"spoof-deeper").result(TIMEOUT)
        gw_a.publish("citypulse/other/gw-00020", b"spoof-elsewhere").result(TIMEOUT)
        gw_a.publish_telemetry("Z-1", b"barrier-a").result(TIMEOUT)
    subscriber.wait_for(subscriber.has(b"barrier-a"))

    # With gw-00020's certificate but claiming gw-00021's client id: the broker replaces the
    # client id with the certificate CN, so neither the topic nor gw-00021's session is won.
    with gateway(ca, broker, "gw-00021") as real_b:
        impostor = gateway(ca, broker, "gw-00021", identity=ca.device_identity("gw-00020"))
        impostor.connect(TIMEOUT)
        try:
            impostor.publish_telemetry("Z-1", b"spoof-client-id").result(TIMEOUT)
        finally:
            impostor.disconnect()
        real_b.publish_telemetry("Z-1", b"barrier-b").result(TIMEOUT)
        # A takeover would have closed real_b's socket before the impostor's CONNACK, and so
        # before barrier-b's PUBACK could arrive.
        assert real_b.stats.interruptions == 0
    subscriber.wait_for(subscriber.has(b"barrier-b"))

    payloads = {p for _, p in subscriber.messages}
    assert payloads == {b"barrier-a", b"barrier-b"}


def test_a_device_receives_nothing_it_subscribes_to(ca: LocalCA, broker: Broker, subscriber: Collector) -> None:
    received: list[bytes] = []
    with gateway(ca, broker, "gw-00030") as nosy, gateway(ca, broker, "gw-00031") as other:
        conn: mqtt.Connection = nosy._connection  # the SDK connection, to subscribe as a device would
        sub_future, _ = conn.subscribe(
            TELEMETRY_FILTER, mqtt.QoS.AT_LEAST_ONCE, callback=lambda topic, payload, **_: received.append(payload)
        )
        sub_future.result(TIMEOUT)
        other.publish_telemetry("Z-3", b"private").result(TIMEOUT)
        subscriber.wait_for(subscriber.has(b"private"))
        # The broker fans a message out to all subscribers in one pass, so by now anything for
        # `nosy` is on its socket ahead of this UNSUBACK.
        unsub_future, _ = conn.unsubscribe(TELEMETRY_FILTER)
        unsub_future.result(TIMEOUT)
    assert received == []


def test_a_client_without_a_certificate_cannot_connect(ca: LocalCA, broker: Broker) -> None:
    result = mqtt_connect_result(_tls_client(ca, None), broker.port)
    assert result != "connected"


def test_a_certificate_from_another_ca_cannot_connect(ca: LocalCA, broker: Broker, tmp_path: Path) -> None:
    rogue_ca = LocalCA.load_or_create(tmp_path / "rogue-ca")
    rogue = rogue_ca.device_identity("gw-00040")
    # The rogue client trusts the real broker, so only the broker's check can refuse it.
    assert mqtt_connect_result(_tls_client(ca, rogue), broker.port) != "connected"
    gw = gateway(ca, broker, "gw-00040", identity=rogue)
    with pytest.raises(GatewayError):
        gw.connect(TIMEOUT)


def test_a_revoked_certificate_cannot_connect(ca: LocalCA, broker: Broker) -> None:
    revoked = ca.client_identity("gw-revoked")
    assert revoked.serial in ca.revoked_serials()
    assert mqtt_connect_result(_tls_client(ca, revoked), broker.port) != "connected"
    with pytest.raises(GatewayError):
        gateway(ca, broker, "gw-revoked", identity=revoked).connect(TIMEOUT)
    # A fresh certificate for the same gateway is accepted (the CRL names serials, not names).
    assert mqtt_connect_result(_tls_client(ca, ca.device_identity("gw-revoked", renew=True)), broker.port) == (
        "connected"
    )


def test_gateway_publishes_survive_a_broker_restart(ca: LocalCA, tmp_path: Path) -> None:
    own = start_broker(tmp_path / "broker", ca)
    gw = gateway(ca, own, "gw-00050")
    try:
        gw.connect(TIMEOUT)
        # The in-flight window (100) blocks publishing while the broker is down, so the kill
        # lands with up to 100 publishes unacknowledged; the rest go out after the restart.
        futures = [gw.publish_telemetry("Z-5", f"m{i}".encode()) for i in range(300)]
        own.kill()
        assert gw.wait_online(False, TIMEOUT).interruptions == 1
        own = start_broker(tmp_path / "broker", ca, port=own.port)
        assert gw.wait_online(True, TIMEOUT).resumptions == 1
        futures += [gw.publish_telemetry("Z-5", f"m{i}".encode(), timeout=TIMEOUT) for i in range(300, 350)]
        stats = gw.flush(TIMEOUT * 2)
        assert all(f.exception() is None for f in futures)
        assert (stats.published, stats.acked, stats.failed) == (350, 350, 0)
        assert stats.interruptions >= 1 and stats.resumptions >= 1
    finally:
        gw.disconnect()
        own.stop()


def test_disconnecting_while_the_broker_is_down_fails_every_unacknowledged_publish(ca: LocalCA, tmp_path: Path) -> None:
    """Publishes queued while the broker was down never completed once the gateway disconnected:
    their futures stayed pending for good and the stats counted them neither acked nor failed
    (found by a review). `disconnect` fails them."""
    own = start_broker(tmp_path / "broker", ca)
    gw = gateway(ca, own, "gw-00051")
    try:
        gw.connect(TIMEOUT)
        own.kill()
        gw.wait_online(False, TIMEOUT)
        futures = [gw.publish_telemetry("Z-5", f"m{i}".encode()) for i in range(5)]
        gw.disconnect()
        assert all(f.done() and isinstance(f.exception(), GatewayError) for f in futures)
        stats = gw.stats
        assert (stats.published, stats.acked, stats.failed) == (5, 0, 5)
        assert gw.flush(0).in_flight == 0
    finally:
        own.stop()


def test_the_broker_binds_loopback_only_and_has_no_plain_listener(broker: Broker) -> None:
    config = broker.config_path.read_text()
    listeners = [line for line in config.splitlines() if line.startswith("listener ")]
    assert listeners == [f"listener {broker.port} 127.0.0.1"]
    assert "max_queued_messages 200000" in config
    assert "allow_anonymous false" in config


def test_chunk_by_budget_keeps_each_message_under_its_byte_and_item_limits() -> None:
    readings = [b"x" * n for n in (100, 200, 300, 50, 50, 400, 10)]
    groups = list(chunk_by_budget(readings, max_bytes=700, max_items=3, envelope_bytes=100))
    assert [r for g in groups for r in g] == readings
    for g in groups:
        assert len(g) <= 3
        assert 100 + sum(map(len, g)) + len(g) - 1 <= 700
    with pytest.raises(ValueError):
        list(chunk_by_budget([b"x" * 700], max_bytes=700, envelope_bytes=100))


def test_when_one_gateway_cannot_connect_the_others_are_disconnected(ca: LocalCA, broker: Broker) -> None:
    """A run connects its gateways in parallel; one refused raised before the run's `try`, and
    the others stayed connected (found by a review, with a revoked certificate)."""
    made: dict[str, Gateway] = {}

    def connect(gateway_id: str) -> Gateway:
        if gateway_id == "gw-00062":
            raise GatewayError("gw-00062 could not connect: refused")
        gw = made[gateway_id] = gateway(ca, broker, gateway_id)
        gw.connect(TIMEOUT)
        return gw

    with pytest.raises(GatewayError, match="gw-00062 could not connect"):
        connect_all(["gw-00060", "gw-00062", "gw-00061"], connect)
    assert sorted(made) == ["gw-00060", "gw-00061"]
    for gw in made.values():
        with pytest.raises(GatewayError, match="is closed"):
            gw.publish_telemetry("Z-6", b"x")
