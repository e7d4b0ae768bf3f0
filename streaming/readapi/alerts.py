"""The alert log the read API serves: alerts as operators see them, newest first.

The processor publishes alerts on EventBridge; the alert rule fans them out to SNS and to the
SQS alert feed. A queue is not a log (reading consumes it, and each message goes to one
reader), so the API reads a log instead:

* in AWS the alert rule gets one more target, `store_alert_handler` (a small Lambda), which
  writes each alert into a DynamoDB **alerts table** (`pk="feed"`, `sk=<alert time>#<event id>`,
  TTL 7 days). Alert ids are deterministic, and a copy may carry a later time (a silence
  announced again, a severe rule decided on a retry): each alert's first copy also writes a
  marker item (`pk="id#<event id>"`) in the same transaction, on condition that there is none,
  so a copy is dropped as the local log drops it, not stored a second time under a new key.
* locally the dashboard server drains the SQS feed into a `MemoryAlertLog` (one process, one
  reader), through the same `alert_from_event`.

Both logs answer `page(...)` the same way, so the handler does not know which one it reads.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from streaming.readapi.params import format_ts

ALERT_TTL_S = 7 * 24 * 3600
ALERT_STATES = {
    "CongestionDetected": "raised",
    "CongestionCleared": "cleared",
    "SensorSilent": "raised",
    "SensorStuck": "raised",
}


@dataclass(frozen=True, slots=True)
class AlertRecord:
    event_id: str
    detail_type: str
    at_ms: int  # when the condition was established (event time the rule decided)
    zone_id: str | None
    sensor_id: str | None
    detail: dict[str, Any]

    @property
    def sort_key(self) -> str:
        return f"{format_ts(self.at_ms)}#{self.event_id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.detail_type,
            "state": ALERT_STATES.get(self.detail_type, "info"),
            "at": format_ts(self.at_ms),
            "zone_id": self.zone_id,
            "sensor_id": self.sensor_id,
            "detail": self.detail,
        }


def _ms(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(parsed.replace(tzinfo=parsed.tzinfo or UTC).timestamp() * 1000)


def alert_from_event(event: dict[str, Any]) -> AlertRecord | None:
    """An EventBridge event (as the rule delivers it) → an alert record; None if it is not one.

    The alert time comes from the detail, not from the envelope's `time`: a redelivered alert
    then sorts (and, in the table, is stored) exactly where its first copy is."""
    detail = event.get("detail")
    kind = event.get("detail-type")
    if not isinstance(detail, dict) or not isinstance(kind, str):
        return None
    event_id = detail.get("event_id") or event.get("id")
    if not isinstance(event_id, str) or not event_id:
        return None
    if kind == "CongestionCleared":
        at = _ms(detail.get("cleared_at"))
    elif kind == "CongestionDetected":
        at = _ms(detail.get("detected_at"))  # when the rule decided (event time)
        if at is None:  # an event from before `detected_at`: the deciding minute had closed
            at = _ms(detail.get("minute"))
            at = at + 60_000 if at is not None else None
    elif kind == "SensorSilent":
        received = _ms(detail.get("last_received_at"))
        silent_for = detail.get("silent_for_s")
        at = received + int(silent_for) * 1000 if received is not None and isinstance(silent_for, int) else received
    elif kind == "SensorStuck":
        at = _ms(detail.get("received_at"))  # when the reading that completed the run arrived
    else:
        at = None
    at = at if at is not None else _ms(event.get("time"))
    if at is None:
        return None
    zone = detail.get("zone_id")
    sensor = detail.get("sensor_id")
    return AlertRecord(
        event_id=event_id,
        detail_type=kind,
        at_ms=at,
        zone_id=zone if isinstance(zone, str) else None,
        sensor_id=sensor if isinstance(sensor, str) else None,
        detail={k: v for k, v in detail.items() if k != "event_id"},
    )


class AlertLog(Protocol):
    def page(
        self, *, since_ms: int, before_key: str | None, limit: int, detail_type: str | None, zone_id: str | None
    ) -> tuple[list[AlertRecord], str | None]:
        """Alerts at or after `since_ms`, newest first, strictly before `before_key` (a sort key)
        if given; at most `limit`; and the sort key to continue from, or None at the end."""
        ...


def _matches(a: AlertRecord, detail_type: str | None, zone_id: str | None) -> bool:
    return (detail_type is None or a.detail_type == detail_type) and (zone_id is None or a.zone_id == zone_id)


class MemoryAlertLog:
    """The local alert log: the newest `capacity` alerts, deduplicated by event id."""

    def __init__(self, capacity: int = 5000) -> None:
        self._capacity = capacity
        self._by_id: dict[str, AlertRecord] = {}
        self._lock = threading.Lock()

    def add(self, alert: AlertRecord) -> bool:
        """Add an alert; False if it was already there (a redelivered copy)."""
        with self._lock:
            if alert.event_id in self._by_id:
                return False
            self._by_id[alert.event_id] = alert
            if len(self._by_id) > self._capacity:
                oldest = min(self._by_id.values(), key=lambda a: a.sort_key)
                del self._by_id[oldest.event_id]
            return True

    def page(
        self, *, since_ms: int, before_key: str | None, limit: int, detail_type: str | None, zone_id: str | None
    ) -> tuple[list[AlertRecord], str | None]:
        with self._lock:
            alerts = sorted(self._by_id.values(), key=lambda a: a.sort_key, reverse=True)
        chosen = [
            a
            for a in alerts
            if a.at_ms >= since_ms
            and (before_key is None or a.sort_key < before_key)
            and _matches(a, detail_type, zone_id)
        ]
        more = len(chosen) > limit
        chosen = chosen[:limit]
        return chosen, (chosen[-1].sort_key if more else None)


@dataclass
class DynamoAlertLog:
    """The alert log in AWS: the alerts table written by `store_alert_handler`."""

    dynamodb: Any
    table: str

    # Items one request may read (filtered ones included): a filter that matches little over a
    # long `since` ends its page early, with a cursor from where it stopped, instead of
    # reading the whole log within one API call.
    read_budget: int = 1000

    def page(
        self, *, since_ms: int, before_key: str | None, limit: int, detail_type: str | None, zone_id: str | None
    ) -> tuple[list[AlertRecord], str | None]:
        out: list[AlertRecord] = []
        values: dict[str, Any] = {
            ":pk": {"S": "feed"},
            ":lo": {"S": format_ts(since_ms)},
            ":hi": {"S": before_key or "~"},  # '~' sorts after every ISO timestamp
        }
        filters = []
        if detail_type is not None:
            filters.append("detail_type = :type")
            values[":type"] = {"S": detail_type}
        if zone_id is not None:
            filters.append("zone_id = :zone")
            values[":zone"] = {"S": zone_id}
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": values,
            "ScanIndexForward": False,
        }
        if filters:
            kwargs["FilterExpression"] = " AND ".join(filters)
        budget = self.read_budget
        last_read: str | None = None  # the sort key of the last item read, matched or not
        while len(out) <= limit and budget > 0:
            kwargs["Limit"] = min(budget, max(limit + 1, 25))
            resp = self.dynamodb.query(**kwargs)
            budget -= int(resp.get("ScannedCount", kwargs["Limit"]))
            out.extend(a for a in map(_from_item, resp.get("Items", [])) if a.sort_key != before_key)
            start_key = resp.get("LastEvaluatedKey")
            if not start_key:
                last_read = None
                break
            kwargs["ExclusiveStartKey"] = start_key
            last_read = start_key["sk"]["S"]
        if len(out) > limit:
            out = out[:limit]
            return out, out[-1].sort_key
        # Out of budget before the end: the page may be short; the client goes on from there.
        return out, last_read


def _to_item(alert: AlertRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": "feed"},
        "sk": {"S": alert.sort_key},
        "event_id": {"S": alert.event_id},
        "detail_type": {"S": alert.detail_type},
        "at_ms": {"N": str(alert.at_ms)},
        "detail": {"S": orjson.dumps(alert.detail).decode()},
        "expires_at": {"N": str(alert.at_ms // 1000 + ALERT_TTL_S)},
    }
    if alert.zone_id:
        item["zone_id"] = {"S": alert.zone_id}
    if alert.sensor_id:
        item["sensor_id"] = {"S": alert.sensor_id}
    return item


def _from_item(item: dict[str, Any]) -> AlertRecord:
    return AlertRecord(
        event_id=item["event_id"]["S"],
        detail_type=item["detail_type"]["S"],
        at_ms=int(item["at_ms"]["N"]),
        zone_id=item.get("zone_id", {}).get("S"),
        sensor_id=item.get("sensor_id", {}).get("S"),
        detail=orjson.loads(item["detail"]["S"]),
    )


def store_alert(dynamodb: Any, table: str, event: dict[str, Any]) -> AlertRecord | None:
    """Write one EventBridge alert event into the alerts table, once per event id: the feed item
    and its id's marker in one transaction, only if the marker is not there (a copy of an
    alert already stored, however its time reads now, is dropped). The alert, or None when the
    event is not one or was stored already."""
    alert = alert_from_event(event)
    if alert is None:
        return None
    item = _to_item(alert)
    marker = {"pk": {"S": f"id#{alert.event_id}"}, "sk": {"S": "id"}, "expires_at": item["expires_at"]}
    try:
        dynamodb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": table, "Item": marker, "ConditionExpression": "attribute_not_exists(pk)"}},
                {"Put": {"TableName": table, "Item": item}},
            ]
        )
    except dynamodb.exceptions.TransactionCanceledException as exc:
        reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
        if reasons[:1] != ["ConditionalCheckFailed"]:
            raise
        return None
    return alert


_clients: dict[str, Any] = {}


def store_alert_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda target of the alert rule: keep the alert log the read API serves."""
    if "dynamodb" not in _clients:
        import boto3

        _clients["dynamodb"] = boto3.client("dynamodb")
    alert = store_alert(_clients["dynamodb"], os.environ["CITYPULSE_ALERTS_TABLE"], event)
    return {"stored": alert.event_id if alert else None}
