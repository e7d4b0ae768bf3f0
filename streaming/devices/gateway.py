"""A roadside gateway's MQTT client: the first hop of the streaming flow.

Flow: **gateway** ──MQTT 3.1.1 + mutual TLS, QoS 1──▶ IoT Core (AWS) or the local Mosquitto
(infra/local/broker.py) ──topic rule──▶ Kinesis ──▶ streaming/processor.

Built on awsiotsdk/awscrt, the SDK real devices use, so the same code talks to
``<account>-ats.iot.<region>.amazonaws.com:8883`` with a certificate from
``CreateKeysAndCertificate`` and to ``localhost:<port>`` with one from the local CA.

With ``basic_ingest_rule`` the gateway publishes on the Basic Ingest form of its topic,
``$aws/rules/<rule>/citypulse/telemetry/<zone>/<gateway>``: IoT Core hands such a message to
that rule directly (no message-broker charge) and the rule sees the topic without the prefix.

Payloads are opaque bytes here: the message envelope (schema version, readings) belongs to
the data contract (streaming/contract.py) and whoever builds messages from it.
``chunk_by_budget`` only helps keep each message under a byte budget.

Delivery: QoS 1 with a persistent session (``clean_session=False``). awscrt keeps every
unacknowledged publish across connection interruptions and resends it on resume, so a
publish future resolves only when the broker has acknowledged it. With a clean session
awscrt cancels those instead (``AWS_ERROR_MQTT_CANCELLED_FOR_CLEAN_SESSION``); the gateway
then resubmits them itself once the connection resumes.

Offline buffering: while the broker is unreachable, publishes are held by awscrt (and the
resubmit queue) and sent when the connection resumes, oldest first. The buffer is bounded by
``max_in_flight`` messages (default 100, ~3,200 readings at 32 per message; with one message
per minute that is over an hour of a gateway's traffic). Beyond it ``publish`` blocks (back-
pressure on the caller, nothing dropped); given a ``timeout`` it raises ``TimeoutError`` and
counts the message in ``GatewayStats.refused``: the caller still holds it and decides (retry,
spill to disk), never a silent loss.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awscrt import mqtt
from awscrt.exceptions import AwsCrtError
from awsiot import mqtt_connection_builder

from streaming.contract import MAX_MQTT_PAYLOAD_BYTES
from streaming.devices.topics import basic_ingest_topic, telemetry_topic

# Basic Ingest: IoT Core hands a message on $aws/rules/<rule>/<topic> straight to that rule,
# skipping the message broker and its per-message charge; the rule sees <topic>.
# IoT Core's limit is 128 KiB a payload (MAX_MQTT_PAYLOAD_BYTES); the default budget leaves headroom.
DEFAULT_MAX_MESSAGE_BYTES = 100_000
DEFAULT_MAX_IN_FLIGHT = 100

# How awscrt fails QoS 1 publishes that a clean-session reconnect (or an offline publish)
# discards: "the connection went away before the PUBACK", not "the broker refused".
_RESUBMIT_ERRORS = frozenset({"AWS_ERROR_MQTT_CANCELLED_FOR_CLEAN_SESSION"})


class GatewayError(RuntimeError):
    """The gateway could not connect, or was used after it was closed."""


@dataclass(frozen=True)
class GatewayStats:
    """Counters since the gateway was created."""

    published: int
    acked: int
    failed: int
    resubmitted: int
    interruptions: int
    resumptions: int
    refused: int = 0  # publishes refused because the offline buffer (in-flight window) stayed full

    @property
    def in_flight(self) -> int:
        return self.published - self.acked - self.failed


def chunk_by_budget(
    encoded_readings: Iterable[bytes],
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_items: int = 500,
    envelope_bytes: int = 256,
) -> Iterator[list[bytes]]:
    """Group already-encoded readings so each group fits one message.

    A group's size is counted as ``envelope_bytes`` (the message's fixed fields) plus the
    readings joined by commas, i.e. what a JSON array of them costs. A single reading too
    large for an empty message raises ``ValueError`` rather than producing an oversized one.
    """
    if max_items < 1 or max_bytes <= envelope_bytes:
        raise ValueError("max_items must be >= 1 and max_bytes larger than envelope_bytes")
    group: list[bytes] = []
    size = envelope_bytes
    for item in encoded_readings:
        cost = len(item) + (1 if group else 0)
        if group and (size + cost > max_bytes or len(group) >= max_items):
            yield group
            group, size, cost = [], envelope_bytes, len(item)
        if size + cost > max_bytes:
            raise ValueError(f"a reading of {len(item)} bytes cannot fit a {max_bytes}-byte message")
        group.append(item)
        size += cost
    if group:
        yield group


class Gateway:
    """One gateway's MQTT connection: QoS 1 publishes with a bounded in-flight window.

    Thread-safe: ``publish`` may be called from several threads. Use as a context manager,
    or ``connect()`` … ``flush()`` … ``disconnect()``.
    """

    def __init__(
        self,
        gateway_id: str,
        *,
        endpoint: str,
        port: int,
        cert_path: Path | str,
        key_path: Path | str,
        ca_path: Path | str | None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        keep_alive_secs: int = 60,
        clean_session: bool = False,
        reconnect_min_timeout_secs: int = 1,
        reconnect_max_timeout_secs: int = 30,
        basic_ingest_rule: str | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if basic_ingest_rule is not None:
            basic_ingest_topic(basic_ingest_rule, "z", gateway_id)  # fail now on a bad rule name
        self.gateway_id = gateway_id
        self.basic_ingest_rule = basic_ingest_rule
        self.endpoint = endpoint
        self.port = port
        self._window = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._online = False
        self._closing = False
        self._pending_resubmit: deque[tuple[str, bytes, Future[None]]] = deque()
        self._unsettled: set[Future[None]] = set()  # published, neither acknowledged nor failed
        self._published = self._acked = self._failed = self._resubmitted = self._refused = 0
        self._interruptions = self._resumptions = 0
        self._connection = mqtt_connection_builder.mtls_from_path(
            endpoint=endpoint,
            # Always explicit: without it the SDK picks 443 with AWS-only ALPN.
            port=port,
            cert_filepath=str(cert_path),
            pri_key_filepath=str(key_path),
            ca_filepath=str(ca_path) if ca_path is not None else None,
            client_id=gateway_id,
            clean_session=clean_session,
            keep_alive_secs=keep_alive_secs,
            reconnect_min_timeout_secs=reconnect_min_timeout_secs,
            reconnect_max_timeout_secs=reconnect_max_timeout_secs,
            # Otherwise the SDK appends its metrics to the MQTT username.
            enable_metrics_collection=False,
            on_connection_interrupted=self._on_interrupted,
            on_connection_resumed=self._on_resumed,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> bool:
        """Connect; returns whether the broker still had this gateway's session."""
        try:
            result: dict[str, Any] = self._connection.connect().result(timeout)
        except Exception as e:
            raise GatewayError(f"{self.gateway_id} could not connect to {self.endpoint}:{self.port}: {e}") from e
        with self._settled:
            self._online = True
            self._settled.notify_all()
        self._drain_resubmits()
        return bool(result.get("session_present", False))

    def disconnect(self, timeout: float = 10.0) -> None:
        """Disconnect now; publishes not yet acknowledged fail. Call ``flush()`` first to avoid that.

        Every one fails, including those the SDK still held in its offline queue, which it
        never completes once disconnected: their futures stayed pending for good, counted
        neither acked nor failed (found by a review)."""
        with self._lock:
            self._closing = True
            self._online = False
            pending = list(self._pending_resubmit)
            self._pending_resubmit.clear()
        for _topic, _payload, fut in pending:
            self._settle(fut, GatewayError("gateway disconnected before the message was resubmitted"))
        try:
            self._connection.disconnect().result(timeout)
        finally:
            with self._lock:
                left = list(self._unsettled)
            for fut in left:
                self._settle(fut, GatewayError("gateway disconnected before the broker acknowledged the message"))

    def __enter__(self) -> Gateway:
        self.connect()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.disconnect()

    # -- publishing -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, timeout: float | None = None) -> Future[None]:
        """Publish at QoS 1; the future resolves when the broker acknowledges (PUBACK).

        Blocks while ``max_in_flight`` messages await their PUBACK (up to ``timeout`` s, then
        ``TimeoutError``), which keeps a fast producer from queueing unbounded memory in the SDK.
        """
        if self._closing:
            raise GatewayError(f"{self.gateway_id} is closed")
        if len(payload) > MAX_MQTT_PAYLOAD_BYTES:
            # IoT Core would drop the connection on it, and the persistent session would send it
            # again on every reconnect, holding up everything queued behind it: refused here.
            raise ValueError(
                f"{self.gateway_id}: a {len(payload):,}-byte payload is over IoT Core's "
                f"{MAX_MQTT_PAYLOAD_BYTES:,}-byte limit: split the readings into more messages"
            )
        if not self._window.acquire(timeout=timeout):
            with self._lock:
                self._refused += 1
            raise TimeoutError(f"{self.gateway_id}: in-flight window still full after {timeout}s")
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._published += 1
            self._unsettled.add(future)
        self._submit(topic, bytes(payload), future)
        return future

    def publish_telemetry(self, zone_id: str, payload: bytes, timeout: float | None = None) -> Future[None]:
        """Publish on this gateway's telemetry topic for ``zone_id`` (its Basic Ingest form if configured)."""
        if self.basic_ingest_rule is not None:
            return self.publish(basic_ingest_topic(self.basic_ingest_rule, zone_id, self.gateway_id), payload, timeout)
        return self.publish(telemetry_topic(zone_id, self.gateway_id), payload, timeout)

    def flush(self, timeout: float | None = 60.0) -> GatewayStats:
        """Wait until every publish so far is acknowledged or failed; ``TimeoutError`` if not in time."""
        with self._settled:
            if not self._settled.wait_for(lambda: self._published == self._acked + self._failed, timeout):
                raise TimeoutError(
                    f"{self.gateway_id}: {self._published - self._acked - self._failed} messages "
                    f"still unacknowledged after {timeout}s"
                )
        return self.stats

    def wait_online(self, online: bool, timeout: float | None = 30.0) -> GatewayStats:
        """Wait until the connection is (``online=True``) or is no longer (``False``) up.

        Once the gateway has seen its connection drop, every PUBACK the broker sent before it went
        away has been settled (the socket is read in order), so ``stats.in_flight`` is then exactly
        what the offline buffer holds. ``TimeoutError`` if the state is not reached in time.
        """
        with self._settled:
            if not self._settled.wait_for(lambda: self._online == online, timeout):
                raise TimeoutError(f"{self.gateway_id}: still {'offline' if online else 'online'} after {timeout}s")
        return self.stats

    @property
    def stats(self) -> GatewayStats:
        with self._lock:
            return GatewayStats(
                published=self._published,
                acked=self._acked,
                failed=self._failed,
                resubmitted=self._resubmitted,
                interruptions=self._interruptions,
                resumptions=self._resumptions,
                refused=self._refused,
            )

    # -- internals --------------------------------------------------------------------------

    def _submit(self, topic: str, payload: bytes, future: Future[None]) -> None:
        try:
            crt_future, _packet_id = self._connection.publish(topic, payload, mqtt.QoS.AT_LEAST_ONCE)
        except Exception as e:
            self._settle(future, e)
            return
        crt_future.add_done_callback(lambda f: self._on_publish_done(f, topic, payload, future))

    def _on_publish_done(self, crt_future: Future[Any], topic: str, payload: bytes, future: Future[None]) -> None:
        exc = crt_future.exception()
        if exc is None:
            self._settle(future, None)
            return
        if isinstance(exc, AwsCrtError) and exc.name in _RESUBMIT_ERRORS:
            with self._lock:
                if not self._closing:
                    self._resubmitted += 1
                    self._pending_resubmit.append((topic, payload, future))
                    online = self._online
                else:
                    online = None
            if online is None:
                self._settle(future, exc)
            elif online:
                # Cancelled after the resume callback already ran: nothing else will drain it.
                self._drain_resubmits()
            return
        self._settle(future, exc)

    def _settle(self, future: Future[None], exc: BaseException | None) -> None:
        """Resolve a publish once: an SDK callback after `disconnect` failed it is ignored."""
        with self._settled:
            if future not in self._unsettled:
                return
            self._unsettled.discard(future)
            if exc is None:
                self._acked += 1
            else:
                self._failed += 1
            self._settled.notify_all()
        self._window.release()
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    def _drain_resubmits(self) -> None:
        while True:
            with self._lock:
                if not self._online or not self._pending_resubmit:
                    return
                topic, payload, future = self._pending_resubmit.popleft()
            self._submit(topic, payload, future)

    def _on_interrupted(self, connection: mqtt.Connection, error: AwsCrtError, **kwargs: Any) -> None:
        with self._settled:
            self._online = False
            self._interruptions += 1
            self._settled.notify_all()

    def _on_resumed(
        self, connection: mqtt.Connection, return_code: mqtt.ConnectReturnCode, session_present: bool, **kwargs: Any
    ) -> None:
        with self._settled:
            self._resumptions += 1
            self._online = return_code == mqtt.ConnectReturnCode.ACCEPTED
            self._settled.notify_all()
        self._drain_resubmits()


def connect_all(gateway_ids: Iterable[str], connect: Callable[[str], Gateway], workers: int = 32) -> dict[str, Gateway]:
    """`connect(gateway_id)` for each id, in parallel (TLS handshakes dominate start-up with
    hundreds of devices); gateway id -> connected Gateway. If any fails, the ones that did
    connect are disconnected before the error is raised: they stayed connected otherwise, the
    run raising before its `try` (found by a review)."""
    ids = list(gateway_ids)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {gateway_id: pool.submit(connect, gateway_id) for gateway_id in ids}
        wait(futures.values())
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for future in futures.values():
            if future.exception() is None:
                with contextlib.suppress(Exception):  # the first failure is the one to raise
                    future.result().disconnect()
        raise failed[0]
    return {gateway_id: future.result() for gateway_id, future in futures.items()}
