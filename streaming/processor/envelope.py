"""Decode what the ingestion rule put on Kinesis into readings, or say precisely why not.

The IoT topic rule wraps every MQTT message as
`{"payload": base64(message bytes), "zone_id": topic(3), "gateway_id": topic(4),
"client_id": clientid(), "received_at": timestamp()}` so that even a binary or broken
payload reaches the processor and is quarantined with a reason, rather than failing
inside the rule where nobody counts it. The message itself is a gateway batch — v1
(`{"gateway_id", "zone_id", "readings": [...]}`) or v2, columnar (`{"schema_version": 2, ...,
"sensor_id": [...], ...}`, see streaming/contract.py) — or a single reading object.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson
import pybase64

from streaming.contract import (
    EARLIEST_TS,
    GATEWAY_V1,
    GATEWAY_V2,
    LATEST_TS,
    ColumnarReadings,
    ContractError,
    is_plain_id,
    parse_ts_ms,
)

# IoT Core caps a message at 128 KB; a reading is ~200 bytes, so ~650 fit. Anything far
# beyond is not a gateway we built.
MAX_READINGS_PER_MESSAGE = 2_000
MAX_PAYLOAD_BYTES = 256 * 1024


@dataclass(slots=True)
class Envelope:
    """One MQTT message as the rule delivered it, decoded down to the message object.

    Never modified once made; not frozen, since it is made once per record and a frozen
    dataclass takes ~3x as long to construct (~0.4 us against ~0.13)."""

    zone_id: str
    gateway_id: str
    received_at_ms: int
    payload: bytes


# Ids already found plain: a stream carries a few thousand zones and gateways, each in every
# batch, so the regex runs once per id per container instead of twice per record. Bounded, so
# that a flood of distinct forged ids cannot grow it without limit.
_PLAIN_IDS: set[str] = set()
_PLAIN_IDS_MAX = 100_000


def _plain_id(value: Any, name: str) -> str:
    if type(value) is str and value in _PLAIN_IDS:
        return value
    if not is_plain_id(value):
        raise ContractError("bad_envelope", f"envelope {name}={value!r:.40} is not a plain id")
    if len(_PLAIN_IDS) >= _PLAIN_IDS_MAX:
        _PLAIN_IDS.clear()
    _PLAIN_IDS.add(value)
    return value


# The receive times an envelope may carry: the contract's time range. The rule writes the
# broker's clock; anything else (year 10000, 2**63) is not a receive time and once failed the
# batch when the lake wrote it (found by a review), or defeated the future-timestamp check.
RECEIVED_MIN_MS = int(EARLIEST_TS.timestamp() * 1000)
RECEIVED_END_MS = int(LATEST_TS.timestamp() * 1000)


class _RuleEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    """The rule's envelope exactly as the topic rule's SQL projects it, for a typed decode.
    `received_at` is bounded to the contract's time range; one outside goes the untyped way,
    which words the rejection. `payload` is decoded from
    its base64 in the same pass: msgspec takes exactly what `pybase64.b64decode(validate=True)`
    takes (standard alphabet, padded, nothing else; a property test holds them together), and
    a string it refuses goes the untyped way, which words the rejection."""

    payload: bytes
    zone_id: str
    gateway_id: str
    received_at: Annotated[int, msgspec.Meta(ge=RECEIVED_MIN_MS, lt=RECEIVED_END_MS)]
    client_id: str | None = None


_RULE_ENVELOPE = msgspec.json.Decoder(_RuleEnvelope)
# What a typed decode raises on bytes it will not take: msgspec's own errors (ValidationError is
# a DecodeError), and two it lets through from Python: UnicodeDecodeError for invalid UTF-8 in a
# string, RecursionError for nesting deeper than it goes. Any of them must only send the bytes
# the untyped (reference) way, which words the rejection, never fail the batch.
DECLINED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def rule_envelope(payload: bytes, zone_id: str, gateway_id: str, received_at_ms: int) -> bytes:
    """What the topic rule's SQL writes to Kinesis for one MQTT message (for the tools that
    make records without a broker: benchmarks, tests, `citypulse plan`)."""
    return orjson.dumps(
        {
            "payload": pybase64.b64encode(payload).decode(),
            "zone_id": zone_id,
            "gateway_id": gateway_id,
            "client_id": gateway_id,
            "received_at": received_at_ms,
        }
    )


def decode_envelope(data: bytes) -> Envelope:
    """Kinesis record data → Envelope, or ContractError naming what is wrong with the message.

    The rule's envelope is decoded typed (`_RuleEnvelope`: one C pass, no dict, the payload's
    base64 included); anything else — another field, a wrong type, bytes msgspec refuses —
    takes the untyped way, which alone decides and words a rejection. Both check the ids and
    the base64 the same way."""
    try:
        typed = _RULE_ENVELOPE.decode(data)
    except DECLINED:
        return _decode_untyped(data)
    zone_id = _plain_id(typed.zone_id, "zone_id")
    gateway_id = _plain_id(typed.gateway_id, "gateway_id")
    return Envelope(zone_id, gateway_id, typed.received_at, typed.payload)


def _decode_untyped(data: bytes) -> Envelope:
    try:
        env = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ContractError("bad_envelope", f"record is not the rule's JSON envelope: {exc}") from exc
    if not isinstance(env, dict):
        raise ContractError("bad_envelope", "record is not the rule's JSON envelope object")
    zone_id = _plain_id(env.get("zone_id"), "zone_id")
    gateway_id = _plain_id(env.get("gateway_id"), "gateway_id")
    received_at = env.get("received_at")
    if type(received_at) is not int or not RECEIVED_MIN_MS <= received_at < RECEIVED_END_MS:
        raise ContractError(
            "bad_envelope",
            f"envelope received_at={received_at!r:.40} is not epoch ms in {EARLIEST_TS:%Y}-{LATEST_TS:%Y}",
        )
    encoded = env.get("payload")
    if not isinstance(encoded, str):
        raise ContractError("bad_envelope", "envelope has no base64 payload")
    return _envelope(zone_id, gateway_id, received_at, encoded)


def _envelope(zone_id: str, gateway_id: str, received_at: int, encoded: str) -> Envelope:
    """The Envelope of checked fields, its payload's base64 decoded strictly."""
    try:
        payload = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContractError("bad_envelope", f"envelope payload is not base64: {exc}") from exc
    return Envelope(zone_id, gateway_id, received_at, payload)


def is_single_reading(msg: Any) -> bool:
    """Whether a parsed message is one reading rather than a gateway batch: an object with no
    `readings` list that is not a v2 message (columns)."""
    return isinstance(msg, dict) and "readings" not in msg and msg.get("schema_version") != GATEWAY_V2


def parse_readings(env: Envelope) -> tuple[Sequence[Any], int | None]:
    """Parse the message bytes into its raw reading objects (each validated later on its own)
    and the gateway's `sent_at` (epoch ms) when the message is a gateway batch that has one.
    The readings of a v2 message come as `ColumnarReadings` (objects rebuilt on access).

    Raises ContractError for the message as a whole: bad JSON, wrong shape, forged gateway
    id, too large."""
    if len(env.payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("too_large", f"message of {len(env.payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        msg = orjson.loads(env.payload)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects NaN/Infinity literals and invalid UTF-8 here.
        raise ContractError("bad_json", f"message from {env.gateway_id} is not valid JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise ContractError(
            "not_an_object", f"message from {env.gateway_id} is {type(msg).__name__}, not a JSON object"
        )
    if is_single_reading(msg):
        return [msg], None
    version = msg.get("schema_version")
    columnar = "readings" not in msg and version == GATEWAY_V2
    if version != GATEWAY_V1 and not columnar:
        raise ContractError(
            "unsupported_version",
            f"message from {env.gateway_id} has schema_version={version!r:.20}; this processor reads "
            f"{GATEWAY_V1} (readings) and {GATEWAY_V2} (columns)",
        )
    if msg.get("gateway_id") != env.gateway_id:
        raise ContractError(
            "gateway_mismatch",
            f"message claims gateway_id={msg.get('gateway_id')!r:.40} but was published by {env.gateway_id}",
        )
    if msg.get("zone_id") != env.zone_id:
        raise ContractError(
            "zone_mismatch",
            f"message claims zone_id={msg.get('zone_id')!r:.40} but was published on zone topic {env.zone_id}",
        )
    readings = ColumnarReadings(msg, f"message from {env.gateway_id}") if columnar else msg["readings"]
    if not isinstance(readings, list | ColumnarReadings):
        raise ContractError("wrong_type", f"message from {env.gateway_id}: readings is not a list")
    if len(readings) > MAX_READINGS_PER_MESSAGE:
        raise ContractError(
            "too_large",
            f"message from {env.gateway_id} has {len(readings)} readings, more than {MAX_READINGS_PER_MESSAGE}",
        )
    return readings, sent_at_ms(msg.get("sent_at"))


def sent_at_ms(sent_at: Any) -> int | None:
    """A gateway message's `sent_at` as epoch ms; None when absent or not a timestamp (it is
    only used to measure latency: a bad value must not cost the readings)."""
    try:
        return parse_ts_ms(sent_at, "sent_at") if sent_at is not None else None
    except ContractError:
        return None
