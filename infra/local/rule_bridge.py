"""The local stand-in for the IoT topic rule that forwards gateway messages to Kinesis.

Flow: gateways ──MQTT+mTLS──▶ Mosquitto (infra/local/broker.py) ──▶ **rule bridge**
──PutRecords──▶ Kinesis ──▶ streaming/processor. In AWS, IoT Core's rules engine does this
job with the rule defined in the CloudFormation template; here the same rule SQL and
partition-key template are evaluated by a small evaluator that knows exactly the subset we
use and refuses anything else at startup (``UnsupportedRuleSql``) rather than guessing::

    SELECT <item>[, <item>...] FROM '<topic filter>'
    item := *                         -- the payload's JSON fields (alone: the raw payload)
          | encode(*, 'base64') AS x  -- the raw payload bytes, base64
          | topic(n) AS x | topic() AS x
          | clientid() AS x
          | timestamp() AS x          -- ms since epoch when the bridge received the message

    partition key template: literal text and ${topic(n)}, ${topic()}, ${clientid()}, ${newuuid()}

Basic Ingest: given the rule's name, the bridge also reads
``$aws/rules/<rule name>/<the rule's topic filter>`` and, as IoT Core does, strips the
``$aws/rules/<rule name>/`` prefix before the rule sees the topic, so ``topic(n)``, the
partition key and the record are the same as for the ordinary topic.

Known difference from IoT Core: MQTT does not tell a subscriber who published, so
``clientid()`` is the topic's last level. The broker makes that exact for our topics: the
client id is forced to the certificate CN (``use_username_as_clientid``) and the ACL lets a
client publish only on topics ending in that CN.

Delivery: the bridge subscribes at QoS 1 with a persistent session and acknowledges a message
to the broker only after Kinesis has accepted its record, so a crash makes the broker
redeliver (at least once: duplicates are possible, loss is not; the processor deduplicates).
Kinesis' endpoint comes from the environment (``AWS_ENDPOINT_URL_KINESIS``), as for every
boto3 client in the project.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from streaming.contract import MAX_MQTT_PAYLOAD_BYTES
from streaming.devices.topics import basic_ingest_prefix

log = logging.getLogger(__name__)

BRIDGE_CLIENT_ID = "citypulse-rule-bridge"
# Kinesis PutRecords limits.
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
MAX_PARTITION_KEY_CHARS = 256
DEFAULT_LINGER_S = 0.05
# Two PutRecords in flight overlap our request encoding with the server's work (+~40 %
# against kinesalite on 2 cores); more only adds contention.
DEFAULT_CONCURRENCY = 2
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


class UnsupportedRuleSql(ValueError):
    """The rule SQL or partition-key template uses something this evaluator does not implement."""


class RuleEvaluationError(ValueError):
    """One message cannot be evaluated by the rule (IoT Core would send it to the error action)."""


# -- the SQL subset ---------------------------------------------------------------------------

ItemKind = Literal["star", "encode_star", "topic", "clientid", "timestamp"]


@dataclass(frozen=True)
class SelectItem:
    """One projection of the SELECT list; ``level`` is topic(n)'s n (None for topic())."""

    kind: ItemKind
    alias: str | None = None
    level: int | None = None


@dataclass(frozen=True)
class MessageContext:
    """What the rules engine knows about a message besides its payload."""

    topic: str
    client_id: str
    received_at_ms: int


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[(),*]))"
)
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _tokenize(sql: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(sql):
        if sql[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(sql, pos)
        if not m:
            raise UnsupportedRuleSql(f"unexpected text at position {pos}: {sql[pos : pos + 20]!r}")
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.tokens = _tokenize(sql)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise UnsupportedRuleSql(f"unexpected end of rule SQL: {self.sql!r}")
        self.i += 1
        return tok

    def expect(self, kind: str, value: str | None = None) -> str:
        tok_kind, tok_value = self.next()
        if tok_kind != kind or (value is not None and tok_value.lower() != value.lower()):
            want = value if value is not None else kind
            raise UnsupportedRuleSql(f"expected {want!r}, found {tok_value!r} in {self.sql!r}")
        return tok_value

    def at_keyword(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "ident" and tok[1].lower() == word.lower()


def _string_literal(token: str) -> str:
    return token[1:-1].replace("''", "'")


def _validate_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    for n, level in enumerate(levels):
        if ("#" in level and (level != "#" or n != len(levels) - 1)) or ("+" in level and level != "+"):
            raise UnsupportedRuleSql(f"invalid MQTT topic filter {topic_filter!r}")
    if not topic_filter or topic_filter.startswith("$"):
        raise UnsupportedRuleSql(f"unsupported topic filter {topic_filter!r}")


@dataclass(frozen=True)
class RuleSql:
    """A parsed rule: the projection and the topic filter it reads from."""

    items: tuple[SelectItem, ...]
    topic_filter: str
    sql: str = field(compare=False)

    def matches(self, topic: str) -> bool:
        return paho.topic_matches_sub(self.topic_filter, topic)

    def evaluate(self, payload: bytes, ctx: MessageContext) -> bytes:
        """The record the rule's Kinesis action writes for this message."""
        if len(self.items) == 1 and self.items[0].kind == "star":
            # IoT Core passes a bare `SELECT *` through untouched, binary payloads included.
            return payload
        out: dict[str, Any] = {}
        for item in self.items:
            if item.kind == "star":
                try:
                    doc = orjson.loads(payload)
                except orjson.JSONDecodeError as e:
                    raise RuleEvaluationError(f"SELECT * with other items needs a JSON payload: {e}") from e
                if not isinstance(doc, dict):
                    raise RuleEvaluationError("SELECT * with other items needs a JSON object payload")
                out.update(doc)
                continue
            assert item.alias is not None
            if item.kind == "encode_star":
                out[item.alias] = base64.b64encode(payload).decode("ascii")
            elif item.kind == "topic":
                value = _topic_level(ctx.topic, item.level)
                # IoT SQL yields Undefined for a missing level, and Undefined keys are left out.
                if value is not None:
                    out[item.alias] = value
            elif item.kind == "clientid":
                out[item.alias] = ctx.client_id
            elif item.kind == "timestamp":
                out[item.alias] = ctx.received_at_ms
        return orjson.dumps(out)


def _topic_level(topic: str, level: int | None) -> str | None:
    if level is None:
        return topic
    levels = topic.split("/")
    return levels[level - 1] if level <= len(levels) else None


def parse_rule_sql(sql: str) -> RuleSql:
    """Parse the supported IoT SQL subset; raises ``UnsupportedRuleSql`` for anything else."""
    p = _Parser(sql)
    p.expect("ident", "SELECT")
    items: list[SelectItem] = []
    while True:
        items.append(_parse_item(p))
        tok = p.peek()
        if tok == ("punct", ","):
            p.next()
            continue
        break
    p.expect("ident", "FROM")
    topic_filter = _string_literal(p.expect("string"))
    trailing = p.peek()
    if trailing is not None:
        raise UnsupportedRuleSql(f"unsupported clause after FROM: {trailing[1]!r} in {sql!r}")
    _validate_filter(topic_filter)
    aliases = [i.alias for i in items if i.alias is not None]
    if len(aliases) != len(set(aliases)):
        raise UnsupportedRuleSql(f"duplicate alias in {sql!r}")
    if sum(i.kind == "star" for i in items) > 1:
        raise UnsupportedRuleSql(f"'*' selected twice in {sql!r}")
    return RuleSql(items=tuple(items), topic_filter=topic_filter, sql=sql)


def _parse_item(p: _Parser) -> SelectItem:
    kind, value = p.next()
    if (kind, value) == ("punct", "*"):
        if p.at_keyword("AS"):
            raise UnsupportedRuleSql("'* AS alias' is not supported")
        return SelectItem("star")
    if kind != "ident":
        raise UnsupportedRuleSql(f"unsupported select item {value!r} in {p.sql!r}")
    name = value.lower()
    if p.peek() != ("punct", "("):
        raise UnsupportedRuleSql(f"unsupported select item {value!r} (only *, encode, topic, clientid, timestamp)")
    p.next()
    item: SelectItem
    if name == "encode":
        p.expect("punct", "*")
        p.expect("punct", ",")
        encoding = _string_literal(p.expect("string"))
        if encoding != "base64":
            raise UnsupportedRuleSql(f"encode(*, {encoding!r}) is not supported (only 'base64')")
        p.expect("punct", ")")
        item = SelectItem("encode_star")
    elif name == "topic":
        level: int | None = None
        if p.peek() != ("punct", ")"):
            level = int(p.expect("number"))
            if level < 1:
                raise UnsupportedRuleSql("topic(n) levels start at 1")
        p.expect("punct", ")")
        item = SelectItem("topic", level=level)
    elif name == "clientid":
        p.expect("punct", ")")
        item = SelectItem("clientid")
    elif name == "timestamp":
        p.expect("punct", ")")
        item = SelectItem("timestamp")
    else:
        raise UnsupportedRuleSql(f"unsupported function {value}() in {p.sql!r}")
    if not p.at_keyword("AS"):
        raise UnsupportedRuleSql(f"{value}(...) needs 'AS <name>' (IoT's default names are not reproduced)")
    p.next()
    alias = p.expect("ident")
    if not _ALIAS_RE.match(alias):
        raise UnsupportedRuleSql(f"unsupported alias {alias!r}")
    return SelectItem(item.kind, alias=alias, level=item.level)


# -- partition key template ---------------------------------------------------------------------

_SUBST_RE = re.compile(r"\$\{([^}]*)\}")
_TOPIC_FN_RE = re.compile(r"^topic\((\d*)\)$")
# `parse_time("yyyy-MM-dd", timestamp(), "UTC")`: the receive time in a Java date pattern.
_PARSE_TIME_RE = re.compile(r'^parse_time\(\s*"([^"]+)"\s*,\s*timestamp\(\)\s*,\s*"UTC"\s*\)$')
# The Java date pattern letters the error action's key uses, as strftime directives.
_JAVA_DATE = (("yyyy", "%Y"), ("MM", "%m"), ("dd", "%d"), ("HH", "%H"), ("mm", "%M"), ("ss", "%S"))


def _java_date_format(pattern: str) -> str:
    for java, directive in _JAVA_DATE:
        pattern = pattern.replace(java, directive)
    if re.search(r"[A-Za-z]", re.sub(r"%[YmdHMS]", "", pattern)):
        raise UnsupportedRuleSql(f"unsupported date pattern in parse_time: {pattern!r}")
    return pattern


@dataclass(frozen=True)
class PartitionKeyTemplate:
    """A Kinesis action ``partitionKey`` with ``${...}`` substitution templates."""

    template: str
    _parts: tuple[Callable[[MessageContext], str | None], ...] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, template: str) -> PartitionKeyTemplate:
        parts: list[Callable[[MessageContext], str | None]] = []
        pos = 0
        for m in _SUBST_RE.finditer(template):
            literal = template[pos : m.start()]
            if literal:
                parts.append(lambda _ctx, lit=literal: lit)
            expr = m.group(1).strip()
            topic_m = _TOPIC_FN_RE.match(expr)
            if topic_m:
                level = int(topic_m.group(1)) if topic_m.group(1) else None
                if level is not None and level < 1:
                    raise UnsupportedRuleSql("topic(n) levels start at 1")
                parts.append(lambda ctx, lv=level: _topic_level(ctx.topic, lv))
            elif expr == "clientid()":
                parts.append(lambda ctx: ctx.client_id)
            elif expr == "newuuid()":
                parts.append(lambda _ctx: str(uuid.uuid4()))
            elif expr == "timestamp()":
                parts.append(lambda ctx: str(ctx.received_at_ms))
            elif time_m := _PARSE_TIME_RE.match(expr):
                fmt = _java_date_format(time_m.group(1))
                parts.append(lambda ctx, f=fmt: datetime.fromtimestamp(ctx.received_at_ms / 1000, UTC).strftime(f))
            else:
                raise UnsupportedRuleSql(f"unsupported substitution ${{{expr}}} in partition key {template!r}")
            pos = m.end()
        tail = template[pos:]
        if "${" in tail:
            raise UnsupportedRuleSql(f"unterminated substitution in partition key {template!r}")
        if tail:
            parts.append(lambda _ctx, lit=tail: lit)
        if not parts:
            raise UnsupportedRuleSql("empty partition key template")
        return cls(template=template, _parts=tuple(parts))

    def expand(self, ctx: MessageContext) -> str:
        """The template with its substitutions for this message (an S3 key, say)."""
        values = [part(ctx) for part in self._parts]
        if any(v is None for v in values):
            raise RuleEvaluationError(f"template {self.template!r} is undefined for topic {ctx.topic!r}")
        return "".join(v for v in values if v is not None)

    def render(self, ctx: MessageContext) -> str:
        """The partition key for this message, checked as Kinesis checks one."""
        key = self.expand(ctx)
        if not key or len(key) > MAX_PARTITION_KEY_CHARS:
            raise RuleEvaluationError(f"partition key {key!r} must be 1-{MAX_PARTITION_KEY_CHARS} characters")
        return key


@dataclass(frozen=True)
class S3ErrorAction:
    """The rule's S3 error action: for each message the rule could not act on, the document IoT
    Core writes (`ruleName`, `topic`, `clientId`, `base64OriginalPayload`, `failures`) under
    the action's key template (`ingest-errors/${parse_time(...)}/${newuuid()}.json`)."""

    rule_name: str
    bucket: str
    key: PartitionKeyTemplate
    s3: Any

    def write(self, payload: bytes, ctx: MessageContext, error: str, failed_resource: str) -> str:
        key = self.key.expand(ctx)
        document = {
            "ruleName": self.rule_name,
            "topic": ctx.topic,
            "clientId": ctx.client_id,
            "base64OriginalPayload": base64.b64encode(payload).decode(),
            "failures": [{"failedAction": "KinesisAction", "failedResource": failed_resource, "errorMessage": error}],
        }
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=orjson.dumps(document), ContentType="application/json")
        return key


def client_id_from_topic(topic: str) -> str:
    """The publisher's client id, which the broker's ACL pins to the topic's last level."""
    return topic.rsplit("/", 1)[-1]


# -- the bridge ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeStats:
    """Counters since the bridge was created."""

    received: int
    forwarded: int
    retried: int
    acked: int
    rule_errors: int
    redelivered: int
    put_calls: int
    pending: int


@dataclass
class _Pending:
    mid: int
    generation: int
    data: bytes
    partition_key: str
    ackable: bool = True


class RuleBridge:
    """Subscribes to the rule's topic filter and forwards each message's rule output to Kinesis."""

    def __init__(
        self,
        *,
        sql: str,
        partition_key: str,
        stream_name: str,
        broker_host: str,
        broker_port: int,
        ca_path: Path | str,
        cert_path: Path | str,
        key_path: Path | str,
        kinesis_client: Any | None = None,
        linger_s: float = DEFAULT_LINGER_S,
        max_batch_records: int = MAX_BATCH_RECORDS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        keepalive_s: int = 30,
        rule_name: str | None = None,
        error_bucket: str | None = None,
        error_key: str | None = None,
        s3_client: Any | None = None,
    ) -> None:
        # Parsed first so a rule we cannot evaluate fails before anything connects.
        self.rule = parse_rule_sql(sql)
        self.partition_key = PartitionKeyTemplate.parse(partition_key)
        # With the rule's name, its Basic Ingest topics are read too.
        try:
            self.basic_ingest_prefix = basic_ingest_prefix(rule_name) if rule_name is not None else None
        except ValueError as exc:
            raise UnsupportedRuleSql(str(exc)) from exc
        self.topic_filters = [self.rule.topic_filter]
        if self.basic_ingest_prefix is not None:
            self.topic_filters.append(self.basic_ingest_prefix + self.rule.topic_filter)
        self.stream_name = stream_name
        # The rule's error action, if it has one: messages the rule cannot act on are written
        # there, as IoT Core does, rather than only counted.
        self.error_action: S3ErrorAction | None = None
        if error_bucket and error_key:
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3")
            self.error_action = S3ErrorAction(
                rule_name or "rule", error_bucket, PartitionKeyTemplate.parse(error_key), s3_client
            )
        self.broker_host = broker_host
        self.broker_port = broker_port
        self._ca_path, self._cert_path, self._key_path = ca_path, cert_path, key_path
        self._linger_s = linger_s
        self._max_records = min(max_batch_records, MAX_BATCH_RECORDS)
        self._max_bytes = min(max_batch_bytes, MAX_BATCH_BYTES)
        self._keepalive_s = keepalive_s
        if kinesis_client is None:
            import boto3
            from botocore.config import Config

            # Retries of partially failed batches are ours (per entry); botocore retries only
            # whole-call transport errors, briefly.
            kinesis_client = boto3.client(
                "kinesis",
                config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30),
            )
        self._kinesis = kinesis_client

        self._cond = threading.Condition()
        self._buffer: deque[_Pending] = deque()
        self._buffer_bytes = 0
        self._first_buffered_at = 0.0
        # Records taken from the buffer and not yet settled, and the batches they are in.
        self._in_progress = 0
        self._batches_in_flight = 0
        self._concurrency = max(1, concurrency)
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="rule-bridge-put")
        self._ack_lock = threading.Lock()
        self._ack_order: deque[tuple[list[_Pending], Future[bool]]] = deque()
        self._generation = 0
        self._accepting = True
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._connect_error: str | None = None
        self._flusher: threading.Thread | None = None
        self._received = self._forwarded = self._retried = self._acked = 0
        self._rule_errors = self._redelivered = self._put_calls = 0

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=BRIDGE_CLIENT_ID,
            # Persistent session: messages that arrive while the bridge is down are queued by
            # the broker, and unacknowledged ones are redelivered.
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Connect, subscribe and start forwarding; returns once the subscription is acknowledged."""
        self._flusher = threading.Thread(target=self._flush_loop, name="rule-bridge-flusher", daemon=True)
        self._flusher.start()
        self._client.tls_set(ca_certs=str(self._ca_path), certfile=str(self._cert_path), keyfile=str(self._key_path))
        self._client.connect(self.broker_host, self.broker_port, keepalive=self._keepalive_s)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self._abort()
            raise TimeoutError(
                f"rule bridge not subscribed to {self.topic_filters!r} on "
                f"{self.broker_host}:{self.broker_port} within {timeout}s ({self._connect_error or 'no CONNACK'})"
            )
        log.info("rule bridge forwarding %r to Kinesis stream %s", self.topic_filters, self.stream_name)

    def stop(self, timeout: float = 15.0) -> BridgeStats:
        """Forward and acknowledge what is buffered, then disconnect.

        Messages arriving meanwhile are left unacknowledged, so the broker keeps them for
        the next session. If Kinesis does not take the buffer within ``timeout`` s, the rest
        stays unacknowledged too (redelivered later, not lost).
        """
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(
                lambda: not self._buffer and not self._in_progress, max(0.0, deadline - time.monotonic())
            )
        self._abort()
        return self.stats

    def _abort(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        if self._flusher is not None:
            self._flusher.join(5.0)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RuleBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> BridgeStats:
        with self._cond:
            return BridgeStats(
                received=self._received,
                forwarded=self._forwarded,
                retried=self._retried,
                acked=self._acked,
                rule_errors=self._rule_errors,
                redelivered=self._redelivered,
                put_calls=self._put_calls,
                pending=len(self._buffer) + self._in_progress,
            )

    # -- MQTT callbacks (paho's network thread) -------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            log.error("rule bridge connection refused: %s", reason)
            return
        with self._cond:
            # Message ids restart per connection: acknowledging an id received on an earlier
            # connection could acknowledge a different message on this one.
            self._generation += 1
        # Subscribing again on every connect keeps the bridge working after a broker restart
        # that lost its session (persistence off).
        client.subscribe([(f, 1) for f in self.topic_filters])

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._connect_error = f"subscription refused: {reasons}"
            log.error("rule bridge subscription to %r refused: %s", self.topic_filters, reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._stop.is_set():
            log.warning("rule bridge disconnected (%s); reconnecting", reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        received_at_ms = time.time_ns() // 1_000_000
        with self._cond:
            if not self._accepting:
                # Left unacknowledged on purpose: the broker redelivers it to the next session.
                return
            generation = self._generation
            self._received += 1
            if msg.dup:
                self._redelivered += 1
        topic = msg.topic
        if self.basic_ingest_prefix is not None and topic.startswith(self.basic_ingest_prefix):
            # IoT Core strips the Basic Ingest prefix: the rule sees the topic behind it.
            topic = topic[len(self.basic_ingest_prefix) :]
        ctx = MessageContext(topic=topic, client_id=client_id_from_topic(topic), received_at_ms=received_at_ms)
        try:
            if len(msg.payload) > MAX_MQTT_PAYLOAD_BYTES:
                # IoT Core refuses such a publish; Mosquitto's limit counts the whole packet.
                raise RuleEvaluationError(f"a {len(msg.payload)}-byte payload is over IoT Core's 128 KiB")
            if not self.rule.matches(topic):
                raise RuleEvaluationError(f"topic {msg.topic!r} does not match {self.rule.topic_filter!r}")
            data = self.rule.evaluate(msg.payload, ctx)
            key = self.partition_key.render(ctx)
            if len(data) + len(key.encode()) > MAX_RECORD_BYTES:
                raise RuleEvaluationError(f"record of {len(data)} bytes exceeds Kinesis' 1 MiB limit")
        except RuleEvaluationError as e:
            # Retrying cannot fix it: handed to the rule's error action, acknowledged and
            # counted, as IoT Core does, rather than redelivered forever.
            log.error("rule failed for message on %r: %s", msg.topic, e)
            if self.error_action is not None:
                try:
                    written = self.error_action.write(msg.payload, ctx, str(e), self.stream_name)
                    log.info("error action wrote s3://%s/%s", self.error_action.bucket, written)
                except Exception:  # IoT Core logs a failed error action; the message is not retried
                    log.exception("the rule's error action failed for the message on %r", msg.topic)
            with self._cond:
                self._rule_errors += 1
            client.ack(msg.mid, msg.qos)
            return
        entry = _Pending(mid=msg.mid, generation=generation, data=data, partition_key=key, ackable=msg.qos > 0)
        with self._cond:
            first = not self._buffer
            if first:
                self._first_buffered_at = time.monotonic()
            self._buffer.append(entry)
            self._buffer_bytes += len(data) + len(key)
            # Wake the flusher on the first entry too: it waits without a timeout while the
            # buffer is empty, so without this the tail of a burst would linger until the next one.
            if first or len(self._buffer) >= self._max_records or self._buffer_bytes >= self._max_bytes:
                self._cond.notify_all()

    # -- forwarding (flusher thread) ------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            with self._cond:
                self._cond.wait_for(lambda: self._batches_in_flight < self._concurrency or self._stop.is_set())
                if self._stop.is_set():
                    return
                self._batches_in_flight += 1
            future = self._pool.submit(self._forward, batch)
            with self._ack_lock:
                self._ack_order.append((batch, future))
            future.add_done_callback(self._settle_done_batches)

    def _next_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._stop.is_set():
                if self._buffer:
                    full = len(self._buffer) >= self._max_records or self._buffer_bytes >= self._max_bytes
                    wait = self._first_buffered_at + self._linger_s - time.monotonic()
                    if full or wait <= 0 or not self._accepting:
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            if self._stop.is_set():
                return []
            batch: list[_Pending] = []
            size = 0
            while self._buffer and len(batch) < self._max_records:
                cost = len(self._buffer[0].data) + len(self._buffer[0].partition_key)
                if batch and size + cost > self._max_bytes:
                    break
                batch.append(self._buffer.popleft())
                size += cost
            self._buffer_bytes -= size
            self._in_progress += len(batch)
            if self._buffer:
                self._first_buffered_at = time.monotonic()
            return batch

    def _forward(self, batch: list[_Pending]) -> bool:
        """Put the batch to Kinesis, retrying only failed entries, until all are in (True) or stop (False)."""
        todo = batch
        attempt = 0
        while todo:
            if self._stop.is_set():
                return False
            records = [{"Data": e.data, "PartitionKey": e.partition_key} for e in todo]
            try:
                resp = self._kinesis.put_records(StreamName=self.stream_name, Records=records)
            except Exception as e:
                log.warning("PutRecords of %d records failed (%s); retrying", len(todo), e)
                failed = todo
            else:
                failed = [entry for entry, result in zip(todo, resp["Records"], strict=True) if "ErrorCode" in result]
                if failed:
                    codes = {r.get("ErrorCode") for r in resp["Records"] if "ErrorCode" in r}
                    log.info("%d of %d records not accepted (%s); retrying those", len(failed), len(todo), codes)
            with self._cond:
                self._put_calls += 1
                self._forwarded += len(todo) - len(failed)
                if failed and not self._stop.is_set():
                    self._retried += len(failed)
            if failed:
                attempt += 1
                # Full jitter, so many failed entries do not retry in lockstep.
                delay = random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt))
                if self._stop.wait(delay):
                    return False
            todo = failed
        return True

    def _settle_done_batches(self, _done: Future[bool]) -> None:
        # Batches complete in any order but are acknowledged in the order their messages
        # arrived (MQTT 3.1.1 section 4.6 asks this of QoS 1 receivers).
        with self._ack_lock:
            while self._ack_order and self._ack_order[0][1].done():
                batch, future = self._ack_order.popleft()
                try:
                    forwarded = future.result()
                except Exception:
                    log.exception("forwarding a batch of %d records failed", len(batch))
                    forwarded = False
                self._ack(batch, forwarded)

    def _ack(self, batch: list[_Pending], forwarded: bool) -> None:
        acked = 0
        # A batch not fully in Kinesis (stopped mid-retry) is left unacknowledged: the broker
        # redelivers it to the next session.
        if forwarded and not self._stop.is_set():
            with self._cond:
                generation = self._generation
            for entry in batch:
                # An entry from an earlier connection is left for the broker to redeliver.
                if (
                    entry.ackable
                    and entry.generation == generation
                    and self._client.ack(entry.mid, 1) == MQTTErrorCode.MQTT_ERR_SUCCESS
                ):
                    acked += 1
        with self._cond:
            self._acked += acked
            self._in_progress -= len(batch)
            self._batches_in_flight -= 1
            self._cond.notify_all()


# -- CLI ---------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m infra.local.rule_bridge",
        description="Forward MQTT messages to Kinesis the way an IoT topic rule's Kinesis action does.",
    )
    ap.add_argument("--sql", required=True, help="the rule's IoT SQL (supported subset only)")
    ap.add_argument("--partition-key", required=True, help="e.g. '${topic(3)}'")
    ap.add_argument("--stream", required=True, help="Kinesis stream name")
    ap.add_argument("--rule-name", help="the rule's name: also read its Basic Ingest topics ($aws/rules/<name>/...)")
    ap.add_argument("--error-bucket", help="the rule's S3 error action: its bucket")
    ap.add_argument("--error-key", help="... and its key template, e.g. 'ingest-errors/${newuuid()}.json'")
    ap.add_argument("--broker-host", default="localhost")
    ap.add_argument("--broker-port", type=int, required=True)
    ap.add_argument("--ca", required=True, type=Path)
    ap.add_argument("--cert", required=True, type=Path)
    ap.add_argument("--key", required=True, type=Path)
    ap.add_argument("--linger-ms", type=float, default=DEFAULT_LINGER_S * 1000)
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="PutRecords calls in flight")
    ap.add_argument("--stats-interval", type=float, default=0.0, help="print stats JSON every N s (0: off)")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def _emit(event: str, **fields: Any) -> None:
    # One JSON object per line on stdout: what a supervising process reads.
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        bridge = RuleBridge(
            sql=args.sql,
            partition_key=args.partition_key,
            stream_name=args.stream,
            broker_host=args.broker_host,
            broker_port=args.broker_port,
            ca_path=args.ca,
            cert_path=args.cert,
            key_path=args.key,
            linger_s=args.linger_ms / 1000,
            concurrency=args.concurrency,
            rule_name=args.rule_name,
            error_bucket=args.error_bucket,
            error_key=args.error_key,
        )
    except UnsupportedRuleSql as e:
        print(f"rule_bridge: unsupported rule: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        bridge.start()
    except (TimeoutError, OSError) as e:
        print(f"rule_bridge: cannot start: {e}", file=sys.stderr)
        return 1
    _emit("ready", topic_filter=bridge.rule.topic_filter, topic_filters=bridge.topic_filters, stream=args.stream)
    interval = args.stats_interval if args.stats_interval > 0 else None
    while not stop.wait(interval):
        _emit("stats", **dataclasses.asdict(bridge.stats))
    stats = bridge.stop()
    _emit("stopped", **dataclasses.asdict(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
