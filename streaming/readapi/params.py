"""Request parameters of the read API: errors, timestamps and opaque pagination cursors.

Every parameter is checked before any store is touched, and every failure is an `ApiError`
that the handler turns into a 4xx JSON body naming the parameter and what it accepts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from streaming.contract import is_plain_id

MINUTE_MS = 60_000
# The oldest and newest instants a time parameter may name: the live store keeps 7 days, and
# anything far outside that is a typo or a probe, not a question worth a query.
MIN_TS_MS = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)
MAX_TS_MS = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)
_MAX_TIME_TEXT = 40
_MAX_CURSOR_TEXT = 512
_ID_RULE = "a letter or digit, then letters, digits, '_', '.', ':' or '-'; at most 64 characters"


@dataclass
class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable `code`, a message that says what to do."""

    status: int
    code: str
    message: str
    parameter: str | None = None

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.parameter:
            error["parameter"] = self.parameter
        return {"error": error}


def bad(parameter: str, message: str, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, code, f"{parameter}: {message}", parameter)


def _show(value: str, limit: int = 40) -> str:
    """A parameter value safe to echo back: bounded and with control characters escaped."""
    text = value if len(value) <= limit else value[:limit] + "…"
    return repr(text)


def require_id(parameter: str, value: str) -> str:
    if not is_plain_id(value):
        raise bad(parameter, f"{_show(value)} is not an id: {_ID_RULE}")
    return value


def parse_time(parameter: str, value: str) -> int:
    """An instant as epoch milliseconds, from ISO-8601 with a UTC offset (`2026-11-23T18:05:00Z`)
    or from an integer count of epoch milliseconds."""
    if len(value) > _MAX_TIME_TEXT:
        raise bad(parameter, f"{_show(value)} is too long for a timestamp")
    if value.isascii() and value.isdigit():
        ts = int(value)
    else:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise bad(
                parameter, f"{_show(value)} is not an ISO-8601 time like 2026-11-23T18:05:00Z or epoch milliseconds"
            ) from None
        if parsed.tzinfo is None:
            raise bad(parameter, f"{_show(value)} has no UTC offset: add Z (UTC) or +hh:mm")
        ts = int(parsed.timestamp() * 1000)
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise bad(parameter, f"{_show(value)} is outside 2000-01-01..2100-01-01")
    return ts


def format_ts(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


# -- opaque cursors ------------------------------------------------------------------------------
#
# A cursor is base64url(JSON) naming the route, a digest of the query it continues and the
# position to continue from. It is opaque to clients (they send it back unchanged) and checked
# strictly here: a cursor that does not decode, belongs to another route or another query,
# or holds a position of the wrong shape is a 400, never a store call with garbage.


def _query_digest(route: str, query: dict[str, Any]) -> str:
    canonical = orjson.dumps({"route": route, **query}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def encode_cursor(route: str, query: dict[str, Any], position: list[Any]) -> str:
    doc = {"v": 1, "r": route, "q": _query_digest(route, query), "p": position}
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def decode_cursor(value: str, route: str, query: dict[str, Any]) -> list[Any]:
    """The position a cursor continues from; ApiError if it is not one of ours for this query."""
    if not value or len(value) > _MAX_CURSOR_TEXT or not value.isascii():
        raise bad("cursor", "is not a cursor returned by this API (send `next_cursor` back unchanged)")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise bad("cursor", "is not a cursor returned by this API (send `next_cursor` back unchanged)") from None
    if not isinstance(doc, dict) or doc.get("v") != 1 or not isinstance(doc.get("p"), list):
        raise bad("cursor", "is not a cursor returned by this API (send `next_cursor` back unchanged)")
    if doc.get("r") != route or doc.get("q") != _query_digest(route, query):
        raise bad("cursor", "belongs to a different query: repeat the query's other parameters unchanged")
    return doc["p"]


def position_str(position: list[Any], index: int = 0) -> str:
    if len(position) <= index or not isinstance(position[index], str) or len(position[index]) > 200:
        raise bad("cursor", "is malformed")
    return position[index]


def position_int(position: list[Any], index: int = 0, low: int = 0, high: int = 2**53) -> int:
    value = position[index] if len(position) > index else None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad("cursor", "is malformed")
    return value
