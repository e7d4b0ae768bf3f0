"""The read API's Lambda handler: API Gateway (REST, proxy integration) → JSON.

Routes (all GET, JSON; lists are paginated with `limit` and an opaque `cursor`):

    /overview                     city-wide congestion levels and sensor health
    /zones                        zones with their current congestion state
    /zones/{zone_id}              one zone
    /zones/{zone_id}/metrics      the zone's minutes (or 5/15-minute buckets) over a time range
    /map                          the zones as GeoJSON squares, coloured by their state
    /sensors                      registry + live values (filter by zone, status)
    /sensors/{sensor_id}          one sensor
    /alerts                       the alert log, newest first (filter by type, zone, since)
    /ingestion                    readings stored per minute, current rate, live-store lag

Every parameter is validated before a store is read (types and ranges by Powertools'
OpenAPI validation, ids with the contract's `is_plain_id`, time ranges, cursors, unknown or
repeated parameters); a bad request gets a 4xx JSON body `{"error": {status, code, message,
parameter}}` naming what to change. Nothing a client sends can produce a 500.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Query
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from streaming.readapi.alerts import AlertLog, DynamoAlertLog
from streaming.readapi.params import (
    MAX_TS_MS,
    MIN_TS_MS,
    MINUTE_MS,
    ApiError,
    bad,
    decode_cursor,
    encode_cursor,
    format_ts,
    parse_time,
    position_int,
    position_str,
    require_id,
)
from streaming.readapi.sources import CITY_WINDOW_MINUTES, LiveSource
from streaming.readapi.views import (
    aggregate_minutes,
    ingestion_view,
    overview_view,
    sensor_view,
    zone_feature,
    zone_half_extent,
    zone_view,
)
from streaming.unprocessed import StoreError

logger = Logger(service="citypulse-readapi")
app = APIGatewayRestResolver(enable_validation=True)

MAX_LIMIT = 500
STEPS = (1, 5, 15)
# Longest range one metrics request may span, per step: a day of minutes, the whole live
# store (7 days, its TTL) of 5- and 15-minute buckets.
MAX_RANGE_MINUTES = {1: 24 * 60, 5: 7 * 24 * 60, 15: 7 * 24 * 60}
DEFAULT_RANGE_MINUTES = 3 * 60
MAX_QUERY_CHARS = 2048
ALERT_TYPES = ("CongestionDetected", "CongestionCleared", "SensorSilent", "SensorStuck")

# The query parameters each route accepts: anything else is a typo the client should hear about.
_PARAMS: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = tuple(
    (re.compile(pattern), frozenset(names))
    for pattern, names in (
        (r"/overview", ()),
        (r"/map", ()),
        (r"/zones", ("limit", "cursor", "level")),
        (r"/zones/[^/]+", ()),
        (r"/zones/[^/]+/metrics", ("from", "to", "step", "limit", "cursor")),
        (r"/sensors", ("zone_id", "status", "limit", "cursor")),
        (r"/sensors/[^/]+", ()),
        (r"/alerts", ("since", "type", "zone_id", "limit", "cursor")),
        (r"/ingestion", ("minutes",)),
    )
)


_ID_IN_PATH = re.compile(r"/(?P<kind>zones|sensors)/(?P<id>[^/]+)(?:/metrics)?")


@dataclass
class Deps:
    """What the routes read from; built from the environment in AWS, injected locally."""

    source: LiveSource
    alerts: AlertLog
    now_ms: Callable[[], int]


_deps: Deps | None = None


def configure(deps: Deps | None) -> None:
    """Set the read API's data sources (the local dashboard server; tests)."""
    global _deps
    _deps = deps


def deps() -> Deps:
    global _deps
    if _deps is None:
        import boto3

        _deps = Deps(
            source=LiveSource.from_env(),
            alerts=DynamoAlertLog(boto3.client("dynamodb"), os.environ["CITYPULSE_ALERTS_TABLE"]),
            now_ms=lambda: int(time.time() * 1000),
        )
    return _deps


# -- errors -------------------------------------------------------------------------------------


def _json_error(err: ApiError) -> Response:
    return Response(err.status, "application/json", body=err.body())


@app.exception_handler(ApiError)
def _api_error(err: ApiError) -> Response:
    return _json_error(err)


@app.exception_handler(RequestValidationError)
def _validation_error(exc: RequestValidationError) -> Response:
    problems = exc.errors()
    first = problems[0] if problems else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path")]
    name = ".".join(loc) or "request"
    value = first.get("input")
    shown = f" (got {str(value)[:40]!r})" if isinstance(value, str | int | float) else ""
    err = bad(name, f"{first.get('msg', 'is invalid')}{shown}")
    return _json_error(err)


@app.exception_handler([ClientError, BotoCoreError, StoreError])  # a list: a tuple registers nothing
def _store_error(exc: Exception) -> Response:
    logger.exception("live store unavailable")
    return _json_error(ApiError(503, "store_unavailable", "the live store did not answer; retry shortly"))


@app.not_found
def _not_found(_: Exception) -> Response:
    return _json_error(ApiError(404, "no_such_route", f"no route {app.current_event.path!r}: see the API's route list"))


def check_query(path: str, multi: dict[str, list[str]] | None, raw_length: int) -> None:
    """Refuse malformed ids in the path and unknown, repeated or oversized query parameters,
    before routing and validation."""
    if raw_length > MAX_QUERY_CHARS:
        raise ApiError(414, "query_too_long", f"the query string is over {MAX_QUERY_CHARS} characters")
    path = path.rstrip("/") or "/"  # the router takes `/zones/` for `/zones`: so must the checks
    ids = _ID_IN_PATH.fullmatch(path)
    if ids:  # checked here, not by the router, so that a malformed id is a 400 and not a 404
        require_id("zone_id" if ids["kind"] == "zones" else "sensor_id", ids["id"])
    allowed = next((names for pattern, names in _PARAMS if pattern.fullmatch(path)), None)
    if allowed is None:
        return  # the router answers 404
    for name, values in (multi or {}).items():
        if name not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise bad(name[:40], f"unknown parameter (this route accepts: {expected})", "unknown_parameter")
        if len(values) > 1:
            raise bad(name, "given more than once", "repeated_parameter")


# -- routes -------------------------------------------------------------------------------------


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size")]
Cursor = Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page")]


def _page(items: list[Any], next_cursor: str | None, **extra: Any) -> dict[str, Any]:
    return {"items": items, "count": len(items), "next_cursor": next_cursor, **extra}


def _zone_views() -> list[dict[str, Any]]:
    d = deps()
    registry = d.source.registry()
    live = d.source.zone_states()
    now = d.now_ms()
    return [
        zone_view(z, live.get(z.zone_id), len(registry.sensors_by_zone.get(z.zone_id, ())), now) for z in registry.zones
    ]


@app.get("/overview")
def get_overview() -> dict[str, Any]:
    return overview_view(_zone_views(), deps().now_ms())


@app.get("/map")
def get_map() -> dict[str, Any]:
    """All zones at once (a city has hundreds, not millions): the map needs every square."""
    registry = deps().source.registry()
    half_lat, half_lon = zone_half_extent(registry.zones)
    features = [zone_feature(v, half_lat, half_lon) for v in _zone_views()]
    return {"type": "FeatureCollection", "features": features}


@app.get("/zones")
def list_zones(
    limit: Limit = 100,
    cursor: Cursor = None,
    level: Annotated[
        Literal["congested", "heavy", "busy", "free", "unknown"] | None, Query(description="only zones at this level")
    ] = None,
) -> dict[str, Any]:
    query = {"level": level}
    after = position_str(decode_cursor(cursor, "zones", query)) if cursor is not None else ""
    views = [v for v in _zone_views() if v["zone_id"] > after and (level is None or v["congestion"]["level"] == level)]
    page = views[:limit]
    more = len(views) > limit
    return _page(page, encode_cursor("zones", query, [page[-1]["zone_id"]]) if more else None)


def _zone_or_404(zone_id: str) -> Any:
    require_id("zone_id", zone_id)
    zone = deps().source.registry().zones_by_id.get(zone_id)
    if zone is None:
        raise ApiError(404, "unknown_zone", f"zone_id: no zone {zone_id!r} in the registry", "zone_id")
    return zone


@app.get("/zones/<zone_id>")
def get_zone(zone_id: str) -> dict[str, Any]:
    zone = _zone_or_404(zone_id)
    d = deps()
    registry = d.source.registry()
    live = d.source.zone_states().get(zone_id)
    return zone_view(zone, live, len(registry.sensors_by_zone.get(zone_id, ())), d.now_ms())


@app.get("/zones/<zone_id>/metrics")
def get_zone_metrics(
    zone_id: str,
    from_: Annotated[str | None, Query(alias="from", max_length=40, description="ISO-8601 or epoch ms")] = None,
    to: Annotated[str | None, Query(max_length=40, description="ISO-8601 or epoch ms (exclusive)")] = None,
    step: Annotated[int, Query(description="bucket minutes: 1, 5 or 15")] = 1,
    limit: Annotated[int, Query(ge=1, le=1440, description="buckets per page")] = 360,
    cursor: Cursor = None,
) -> dict[str, Any]:
    _zone_or_404(zone_id)
    if step not in STEPS:
        raise bad("step", f"{step} is not one of 1, 5, 15 (minutes)")
    # The query as the client sent it; the window the first page resolved travels in the cursor,
    # so a range ending "now" stays the first page's on every later one (and is not checked
    # again against a later now).
    query = {"zone": zone_id, "from": from_, "to": to, "step": step, "limit": limit}
    if cursor is not None:
        position = decode_cursor(cursor, "metrics", query)
        # Bounded as a query's times are: a forged cursor must not reach dates no clock can print.
        end = position_int(position, 1, MIN_TS_MS // MINUTE_MS, MAX_TS_MS // MINUTE_MS)
        # A window is the span asked for, aligned down to the step and its end up to the minute
        # (and "until now" is until the minute after now): up to step + 1 minutes more.
        first = position_int(position, 0, max(0, end - MAX_RANGE_MINUTES[step] - step - 1), end - 1)
    else:
        first, end = _metrics_window(from_, to, step)
    page_end = min(end, first + limit * step)
    rows = deps().source.minute_rows(zone_id, first, page_end - 1)
    more = page_end < end
    return _page(
        aggregate_minutes(rows, step),
        encode_cursor("metrics", query, [page_end, end]) if more else None,
        zone_id=zone_id,
        step_minutes=step,
        window={"from": format_ts(first * MINUTE_MS), "to": format_ts(page_end * MINUTE_MS)},
    )


def _metrics_window(from_: str | None, to: str | None, step: int) -> tuple[int, int]:
    """The first page's buckets [first, end) in epoch minutes: `to` (default: the minute after
    now) and `from` (default: DEFAULT_RANGE_MINUTES before it), aligned to `step` minutes
    since the epoch (UTC), within MAX_RANGE_MINUTES."""
    now_ms = deps().now_ms()
    end_ms = parse_time("to", to) if to is not None else now_ms + MINUTE_MS
    start_ms = parse_time("from", from_) if from_ is not None else end_ms - DEFAULT_RANGE_MINUTES * MINUTE_MS
    if start_ms >= end_ms:
        raise bad("from", f"{format_ts(start_ms)} is not before to={format_ts(end_ms)}")
    first = start_ms // MINUTE_MS
    first -= first % step
    end = -(-end_ms // MINUTE_MS)  # exclusive, rounded up
    # The span asked for (until now, without `to`), not the aligned one: "the last 24 h" at
    # step 1 is 1,442 buckets once aligned, and was refused (found by a review).
    if (end_ms if to is not None else now_ms) - start_ms > MAX_RANGE_MINUTES[step] * MINUTE_MS:
        raise bad(
            "from",
            f"the range {format_ts(start_ms)}..{format_ts(end_ms)} is over {MAX_RANGE_MINUTES[step] // 60} h "
            f"for step={step}: narrow it or use a larger step",
            "range_too_large",
        )
    return first, end


@app.get("/sensors")
def list_sensors(
    zone_id: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Literal["reporting", "silent", "never_seen"] | None, Query()] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> dict[str, Any]:
    d = deps()
    registry = d.source.registry()
    if zone_id is not None:
        _zone_or_404(zone_id)
    query = {"zone_id": zone_id, "status": status}
    after = position_str(decode_cursor(cursor, "sensors", query)) if cursor is not None else ""
    candidates = (
        registry.sensors_by_zone.get(zone_id, ())
        if zone_id is not None
        else sorted(registry.sensors.values(), key=lambda s: s.sensor_id)
    )
    live = d.source.zone_states()
    now = d.now_ms()
    out: list[dict[str, Any]] = []
    more = False
    for sensor in candidates:
        if sensor.sensor_id <= after:
            continue
        zone = live.get(sensor.zone_id)
        view = sensor_view(sensor, zone.state.sensors.get(sensor.sensor_id) if zone else None, now)
        if status is not None and view["status"] != status:
            continue
        if len(out) == limit:
            more = True
            break
        out.append(view)
    return _page(out, encode_cursor("sensors", query, [out[-1]["sensor_id"]]) if more else None)


@app.get("/sensors/<sensor_id>")
def get_sensor(sensor_id: str) -> dict[str, Any]:
    require_id("sensor_id", sensor_id)
    d = deps()
    sensor = d.source.registry().sensors.get(sensor_id)
    if sensor is None:
        raise ApiError(404, "unknown_sensor", f"sensor_id: no sensor {sensor_id!r} in the registry", "sensor_id")
    zone = d.source.zone_states().get(sensor.zone_id)
    return sensor_view(sensor, zone.state.sensors.get(sensor_id) if zone else None, d.now_ms())


@app.get("/alerts")
def list_alerts(
    since: Annotated[str | None, Query(max_length=40, description="ISO-8601 or epoch ms; default 24 h ago")] = None,
    type_: Annotated[Literal[ALERT_TYPES] | None, Query(alias="type")] = None,  # type: ignore[valid-type]
    zone_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> dict[str, Any]:
    d = deps()
    now = d.now_ms()
    since_ms = parse_time("since", since) if since is not None else now - 24 * 3600 * 1000
    if since_ms > now + 3600 * 1000:
        raise bad("since", f"{format_ts(since_ms)} is in the future")
    if zone_id is not None:
        _zone_or_404(zone_id)
    # As sent; the resolved `since` (a default one is "24 h before the first page") travels in the cursor.
    query = {"since": since, "type": type_, "zone_id": zone_id}
    before = None
    if cursor is not None:
        position = decode_cursor(cursor, "alerts", query)
        before, since_ms = position_str(position), position_int(position, 1, MIN_TS_MS, MAX_TS_MS - 1)
        if before <= format_ts(since_ms):  # a page before `since`: none of ours (a store refuses lo > hi)
            raise bad("cursor", "is malformed")
    alerts, next_key = d.alerts.page(
        since_ms=since_ms, before_key=before, limit=limit, detail_type=type_, zone_id=zone_id
    )
    next_cursor = encode_cursor("alerts", query, [next_key, since_ms]) if next_key else None
    return _page([a.to_json() for a in alerts], next_cursor)


@app.get("/ingestion")
def get_ingestion(
    minutes: Annotated[int, Query(ge=1, le=CITY_WINDOW_MINUTES, description="how many recent minutes")] = 60,
) -> dict[str, Any]:
    d = deps()
    now = d.now_ms()
    now_minute = now // MINUTE_MS
    first = now_minute - minutes + 1
    rows = d.source.city_minute_rows(first, now_minute)
    return ingestion_view(rows, d.source.zone_states(), first, now)


# -- entry point --------------------------------------------------------------------------------


@logger.inject_lambda_context(correlation_id_path="requestContext.requestId")
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    multi = event.get("multiValueQueryStringParameters") or {}
    raw_length = sum(len(k) + sum(len(v) for v in vs) + 2 for k, vs in multi.items())
    try:
        check_query(event.get("path") or "", multi, raw_length)
    except ApiError as err:
        return {
            "statusCode": err.status,
            "headers": {"Content-Type": "application/json"},
            "body": _dumps(err.body()),
            "isBase64Encoded": False,
        }
    return app.resolve(event, context)


def _dumps(doc: Any) -> str:
    import orjson

    return orjson.dumps(doc).decode()
