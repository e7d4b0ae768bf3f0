"""Unit tests of the read API's pure parts: parameters, cursors, aggregation, the alert log."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import orjson
import pytest

from infra.local.dashboard_server import local_api
from streaming.contract import parse_ts_ms
from streaming.processor.state import SensorState, ZoneState
from streaming.readapi.alerts import MemoryAlertLog, alert_from_event
from streaming.readapi.handler import Deps, check_query, configure
from streaming.readapi.params import ApiError, decode_cursor, encode_cursor, format_ts, parse_time
from streaming.readapi.sources import Registry
from streaming.readapi.views import (
    LiveZone,
    MinuteRow,
    aggregate_minutes,
    congestion_level,
    overview_view,
    parse_zones,
    sensor_view,
    zone_view,
)
from streaming.registry import generate_city, zones_csv
from streaming.unprocessed import StoreError


def test_times_parse_from_iso_with_offset_or_epoch_ms() -> None:
    assert parse_time("from", "2026-11-23T18:05:00Z") == parse_time("from", "1795457100000")
    assert parse_time("from", "2026-11-23T19:05:00+01:00") == 1795457100000


@pytest.mark.parametrize(
    "value", ["2026-11-23T18:05:00", "yesterday", "1" * 41, "-5", "99999999999999", "\uff11\uff12\uff13"]
)  # full-width digits
def test_bad_times_are_400_naming_the_parameter(value: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_time("since", value)
    assert err.value.status == 400 and err.value.parameter == "since"


def test_a_cursor_round_trips_only_for_its_own_query() -> None:
    cursor = encode_cursor("zones", {"level": None}, ["Z-004"])
    assert decode_cursor(cursor, "zones", {"level": None}) == ["Z-004"]
    for route, query in (("zones", {"level": "free"}), ("sensors", {"level": None})):
        with pytest.raises(ApiError):
            decode_cursor(cursor, route, query)
    for garbage in ("", "!!", "e30", "A" * 600, cursor[:-3]):
        with pytest.raises(ApiError):
            decode_cursor(garbage, "zones", {"level": None})


def test_aggregation_averages_from_sums_not_from_averages() -> None:
    columns = ("readings", "vehicles", "speed_sum", "speed_n", "occupancy_sum", "occupancy_n", "congestion_sum")
    rows = [
        MinuteRow(minute, **dict(zip(columns, values, strict=True)))
        for minute, *values in (
            (10, 10, 100, 500.0, 10, 100.0, 10, 1.0),
            (11, 30, 300, 300.0, 30, 300.0, 30, 27.0),
            (15, 5, 5, 0.0, 0, 0.0, 0, 0.5),
        )
    ]
    five = aggregate_minutes(rows, 5)
    assert [r["minutes_with_data"] for r in five] == [2, 1]
    assert five[0]["avg_speed_kmh"] == 20.0  # 800 / 40, not mean(50, 10) = 30
    assert five[0]["avg_congestion_index"] == 0.7
    assert five[1]["avg_speed_kmh"] is None  # count-only detectors: no speed, not zero


def test_levels_follow_the_detector_thresholds() -> None:
    assert congestion_level(True, 0.1) == "congested"
    assert [congestion_level(False, i) for i in (None, 0.2, 0.5, 0.8)] == ["unknown", "free", "busy", "heavy"]


def test_alert_log_dedupes_redelivered_alerts_and_pages_newest_first() -> None:
    log = MemoryAlertLog()
    events = [
        {
            "detail-type": "CongestionDetected",
            "detail": {
                "event_id": f"CongestionDetected/Z-{i}/x",
                "zone_id": f"Z-{i}",
                "minute": f"2026-11-23T18:0{i}:00.000Z",
            },
        }
        for i in range(5)
    ]
    for e in events + events[:2]:  # a replay sends two again
        alert = alert_from_event(e)
        assert alert is not None
        log.add(alert)
    page1, key = log.page(since_ms=0, before_key=None, limit=3, detail_type=None, zone_id=None)
    page2, end = log.page(since_ms=0, before_key=key, limit=3, detail_type=None, zone_id=None)
    assert [a.zone_id for a in page1 + page2] == ["Z-4", "Z-3", "Z-2", "Z-1", "Z-0"] and end is None


def test_a_congestion_alert_is_placed_when_its_rule_decided() -> None:
    detail = {"event_id": "CongestionDetected/Z-1/x", "zone_id": "Z-1", "minute": "2026-11-23T18:04:00.000Z"}
    severe = {**detail, "rule": "severe", "detected_at": "2026-11-23T18:04:07.250Z"}
    older = alert_from_event({"detail-type": "CongestionDetected", "detail": detail})
    now = alert_from_event({"detail-type": "CongestionDetected", "detail": severe})
    assert older is not None and now is not None
    assert older.at_ms == parse_ts_ms("2026-11-23T18:05:00.000Z")  # without detected_at: the minute's close
    assert now.at_ms == parse_ts_ms("2026-11-23T18:04:07.250Z")


@pytest.mark.parametrize(
    ("path", "query", "code"),
    [
        ("/zones", {"limit": ["1", "2"]}, "repeated_parameter"),
        ("/zones", {"drop": ["1"]}, "unknown_parameter"),
        ("/zones/Z 1", {}, "invalid_parameter"),
        ("/sensors/S-1\x00", {}, "invalid_parameter"),
        # Found by a review: the router takes a trailing slash, the checks did not.
        ("/zones/", {"levle": ["congested"]}, "unknown_parameter"),
        ("/zones/Z-000/metrics/", {"fromm": ["x"]}, "unknown_parameter"),
        ("/alerts/", {"since": ["1", "2"]}, "repeated_parameter"),
    ],
)
def test_query_precheck_refuses_before_routing(path: str, query: dict[str, list[str]], code: str) -> None:
    with pytest.raises(ApiError) as err:
        check_query(path, query, 10)
    assert err.value.code == code


CITY = generate_city(sensors=8, zones=1, seed=2)


def _live_zone() -> tuple[list, LiveZone]:
    city = CITY
    now = 1_795_000_000_000
    state = ZoneState(city.zones[0].zone_id)
    state.watermark_ms = now
    a, b, c = (s.sensor_id for s in city.sensors[:3])
    state.sensors = {
        a: SensorState(hwm=20, last_ts_ms=now, last_received_ms=now, vehicle_count=7, repeat_run=12, stuck=True),
        b: SensorState(hwm=20, last_ts_ms=now, last_received_ms=now, vehicle_count=3, repeat_run=1, duplicates=2),
        c: SensorState(hwm=4, last_ts_ms=now, last_received_ms=now - 600_000, silent=True, late=1),
    }
    return city.sensors, LiveZone(state, now)


def test_stuck_sensors_are_counted_per_zone_and_city_wide() -> None:
    sensors, live = _live_zone()
    view = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)
    assert view["sensors"] == {"registered": 8, "reporting": 2, "silent": 1, "never_seen": 5, "stuck": 1}
    empty = zone_view(CITY.zones[0], None, len(sensors), live.updated_at_ms)
    overview = overview_view([view, view, empty], live.updated_at_ms)
    assert overview["sensors"]["stuck"] == 2 and overview["sensors"]["registered"] == 24


def test_a_silent_sensor_is_not_counted_stuck_too() -> None:
    """Found by a review: a stuck sensor keeps its flag until another count arrives, so one
    whose gateway died was counted silent and stuck for ever."""
    sensors, live = _live_zone()
    silent = next(s for s in live.state.sensors.values() if s.silent)
    silent.stuck = True
    view = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)
    assert (view["sensors"]["silent"], view["sensors"]["stuck"]) == (1, 1)


def test_a_sensor_whose_clock_runs_ahead_does_not_set_its_zones_level() -> None:
    """Found by a review: the newest open minute stood for the zone, and a sensor up to five
    minutes ahead (the processor's future bound) owns it: one at 0.9 among 99 at 0.2 showed the
    zone "heavy". The current minute is the watermark's (or the newest open one before it)."""
    sensors, live = _live_zone()
    minute = live.state.watermark_ms // 60_000
    live.state.open_minutes = {minute: [99, 99 * 0.2], minute + 4: [1, 0.9]}
    view = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)["congestion"]
    assert (view["level"], view["current_index"]) == ("free", 0.2)
    live.state.open_minutes = {minute - 1: [3, 2.7], minute + 4: [1, 0.1]}  # nothing yet this minute
    view = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)["congestion"]
    assert (view["level"], view["current_index"]) == ("heavy", 0.9)
    live.state.open_minutes = {minute + 4: [1, 0.9]}
    view = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)["congestion"]
    assert (view["level"], view["current_index"]) == ("unknown", None)


def _ingestion(minutes_with_data: list[int], now_minute: int, last_commit_minute: int | None = None) -> dict:
    """`/ingestion`'s current rate over one zone's minutes, its last commit at the newest (or
    at `last_commit_minute`)."""
    from streaming.readapi.views import ingestion_view

    rows = {"Z-1": [MinuteRow(m, 600, 0, 0.0, 0, 0.0, 0, 0.0) for m in minutes_with_data]}
    committed = max(minutes_with_data, default=now_minute) if last_commit_minute is None else last_commit_minute
    live = {"Z-1": LiveZone(ZoneState("Z-1"), committed * 60_000 + 20_000)}
    return ingestion_view(rows, live, now_minute - 60, now_minute * 60_000 + 30_000)["current"]


def test_the_current_ingestion_rate_is_the_last_complete_minutes_and_none_once_stopped() -> None:
    """Found by a review: "current" was the second-newest minute with data, so a stream stopped
    half an hour ago still showed its last rate (and a gap, an older minute's)."""
    now = 29_500_000
    live = _ingestion(list(range(now - 60, now + 1)), now)  # the minute now still filling
    assert live == {"minute": format_ts((now - 1) * 60_000), "readings_per_s": 10.0}
    behind = _ingestion(list(range(now - 60, now)), now)  # read a little behind now
    assert behind == {"minute": format_ts((now - 2) * 60_000), "readings_per_s": 10.0}
    gap = _ingestion([now - 5, now], now)  # no readings the minute before: none is the rate
    assert gap == {"minute": format_ts((now - 1) * 60_000), "readings_per_s": 0.0}
    # A backlog is not a stop while the processor commits (found by the diff's review: event
    # times 2 minutes behind read as 0/s).
    backlog = _ingestion(list(range(now - 60, now - 20)), now, last_commit_minute=now)
    assert backlog == {"minute": format_ts((now - 22) * 60_000), "readings_per_s": 10.0}
    stopped = _ingestion(list(range(now - 60, now - 30)), now)
    assert stopped == {"minute": format_ts((now - 1) * 60_000), "readings_per_s": 0.0}
    assert _ingestion([], now) == {"minute": None, "readings_per_s": 0.0}


def test_a_zone_gone_dark_shows_no_current_index() -> None:
    """Found by a review: a zone whose sensors all went silent showed its last open minute's
    index as the current one ("heavy" at 0.95) after its episode had ended for silence."""
    sensors, live = _live_zone()
    live.state.open_minutes = {29_916_666: [3, 2.85]}
    lit = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)["congestion"]
    assert (lit["level"], lit["current_index"]) == ("heavy", 0.95)
    for s in live.state.sensors.values():
        s.silent = True
    dark = zone_view(CITY.zones[0], live, len(sensors), live.updated_at_ms)
    assert (dark["congestion"]["level"], dark["congestion"]["current_index"]) == ("unknown", None)
    assert dark["sensors"]["reporting"] == 0


def test_a_sensor_shows_its_run_and_its_own_duplicates_and_late() -> None:
    sensors, live = _live_zone()
    stuck = sensor_view(sensors[0], live.state.sensors[sensors[0].sensor_id], live.updated_at_ms)["live"]
    assert (stuck["stuck"], stuck["repeat_run"], stuck["vehicle_count"]) == (True, 12, 7)
    other = sensor_view(sensors[1], live.state.sensors[sensors[1].sensor_id], live.updated_at_ms)["live"]
    assert (other["stuck"], other["duplicates"], other["late"]) == (False, 2, 0)


def test_a_sensor_stuck_alert_is_logged_at_its_receive_time() -> None:
    event = {
        "detail-type": "SensorStuck",
        "time": "2026-11-23T20:00:00Z",
        "detail": {
            "event_id": "SensorStuck/S-000001/2026-11-23T18:09:00.000Z",
            "sensor_id": "S-000001",
            "zone_id": "Z-000",
            "vehicle_count": 7,
            "repeat_run": 10,
            "detected_at": "2026-11-23T18:09:00.000Z",
            "received_at": "2026-11-23T18:09:01.500Z",
        },
    }
    alert = alert_from_event(event)
    assert alert is not None and alert.sensor_id == "S-000001" and alert.zone_id == "Z-000"
    assert alert.at_ms == parse_time("at", "2026-11-23T18:09:01.500Z")
    assert alert.to_json()["state"] == "raised"


class _Source:
    """The live source at the unit boundary: the registry, no zone state, empty minutes
    (tests/test_dashboard.py runs the real one over the local platform)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.windows: list[tuple[int, int]] = []

    def registry(self) -> Registry:
        return Registry.build(CITY.zones, {s.sensor_id: s for s in CITY.sensors})

    def zone_states(self) -> dict[str, LiveZone]:
        if self.error is not None:
            raise self.error
        return {}

    def minute_rows(self, zone_id: str, first: int, last: int) -> list[MinuteRow]:
        self.windows.append((first, last))
        return []


def _get(path: str) -> tuple[int, dict]:
    status, body, _ = local_api(path, {})
    return status, orjson.loads(body)


@pytest.fixture
def clock() -> Iterator[list[int]]:
    """The read API over `_Source` and an alert log, at a time the test moves."""
    now = [parse_ts_ms("2026-11-23T18:05:59.000Z")]
    log = MemoryAlertLog()
    for i in range(5):
        detail = {
            "event_id": f"CongestionDetected/Z-{i}/x",
            "zone_id": CITY.zones[0].zone_id,
            "minute": f"2026-11-23T18:0{i}:00.000Z",
        }
        log.add(alert_from_event({"detail-type": "CongestionDetected", "detail": detail}))
    configure(Deps(_Source(), log, lambda: now[0]))
    yield now
    configure(None)


def test_alert_pages_with_the_default_since_follow_their_cursor_as_time_passes(clock: list[int]) -> None:
    status, first = _get("/api/alerts?limit=2")
    clock[0] += 5_000
    pages = [first]
    while pages[-1]["next_cursor"]:
        status, page = _get(f"/api/alerts?limit=2&cursor={pages[-1]['next_cursor']}")
        assert status == 200, page
        pages.append(page)
    ids = [a["event_id"] for p in pages for a in p["items"]]
    assert ids == [f"CongestionDetected/Z-{i}/x" for i in (4, 3, 2, 1, 0)]
    # The cursor still belongs to its query: another filter is refused.
    status, other = _get(f"/api/alerts?limit=2&type=SensorStuck&cursor={first['next_cursor']}")
    assert (status, other["error"]["code"]) == (400, "invalid_parameter")


def test_metric_pages_with_the_default_range_follow_their_cursor_across_a_minute(clock: list[int]) -> None:
    zone = CITY.zones[0].zone_id
    status, first = _get(f"/api/zones/{zone}/metrics?limit=100")
    assert status == 200, first
    clock[0] += 2_000  # the next minute: the default range's end moved, the pages must not
    pages = [first]
    while pages[-1]["next_cursor"]:
        status, page = _get(f"/api/zones/{zone}/metrics?limit=100&cursor={pages[-1]['next_cursor']}")
        assert status == 200, page
        pages.append(page)
    windows = [(p["window"]["from"], p["window"]["to"]) for p in pages]
    assert windows[0][0] == "2026-11-23T15:06:00.000Z" and windows[-1][1] == "2026-11-23T18:07:00.000Z"
    assert all(a[1] == b[0] for a, b in pairwise(windows)) and len(windows) == 2


@pytest.mark.parametrize(("step", "hours"), [(1, 24), (5, 168), (15, 168)])
def test_the_longest_range_of_a_step_is_served_and_a_minute_more_is_not(
    clock: list[int], step: int, hours: int
) -> None:
    """Found by a review: the span was judged once aligned to the step and rounded up to the
    minute, so "the last 24 h" at step 1 and "the last 7 days" at steps 5 and 15 were refused."""
    zone = CITY.zones[0].zone_id
    since = format_ts(clock[0] - hours * 3_600_000)
    for query in (f"from={since}", f"from={since}&to={format_ts(clock[0])}"):  # until now, or until `to`
        status, page = _get(f"/api/zones/{zone}/metrics?step={step}&limit=1440&{query}")
        assert status == 200, (query, page)
        # ... a page at a time: the cursor's bounds are the window's, not the span's (found by
        # the diff's review: the first page's cursor was refused as malformed).
        status, page = _get(f"/api/zones/{zone}/metrics?step={step}&limit=1&{query}")
        status, page = _get(f"/api/zones/{zone}/metrics?step={step}&limit=1&{query}&cursor={page['next_cursor']}")
        assert status == 200, (query, page)
    too_long = format_ts(clock[0] - hours * 3_600_000 - 60_000)
    status, page = _get(f"/api/zones/{zone}/metrics?step={step}&limit=1440&from={too_long}")
    assert (status, page["error"]["code"]) == (400, "range_too_large")


def test_a_store_that_stays_throttled_is_a_503_not_a_500() -> None:
    configure(
        Deps(_Source(StoreError("BatchGetItem state: still unprocessed after 8 attempts")), MemoryAlertLog(), lambda: 0)
    )
    try:
        status, body = _get("/api/overview")
    finally:
        configure(None)
    assert (status, body["error"]["code"]) == (503, "store_unavailable")


def test_metric_pages_from_a_start_until_now_are_not_checked_again_against_a_later_now(clock: list[int]) -> None:
    """`from` alone, just inside a day: page 2, two minutes later, must follow its cursor, not
    fail the range check again from the new now (found by a review)."""
    zone = CITY.zones[0].zone_id
    since = format_ts(clock[0] - (24 * 60 - 3) * 60_000)
    status, first = _get(f"/api/zones/{zone}/metrics?from={since}&limit=720")
    assert status == 200 and first["next_cursor"], first
    clock[0] += 120_000
    status, second = _get(f"/api/zones/{zone}/metrics?from={since}&limit=720&cursor={first['next_cursor']}")
    assert status == 200, second
    assert second["window"]["from"] == first["window"]["to"] and second["next_cursor"] is None


def test_a_forged_cursor_beyond_any_clock_is_a_400_not_a_crash(clock: list[int]) -> None:
    """Cursors are not signed: a client can encode any position. One whose times no clock can
    print crashed the route (found by a security review: `format_ts` on year 285,000,000)."""
    zone = CITY.zones[0].zone_id
    metrics = {"zone": zone, "from": None, "to": None, "step": 1, "limit": 100}
    alerts = {"since": None, "type": None, "zone_id": None}
    for path, cursor in (
        (f"/api/zones/{zone}/metrics?limit=100", encode_cursor("metrics", metrics, [2**53 - 10, 2**53])),
        ("/api/alerts", encode_cursor("alerts", alerts, ["x", 2**53])),
        ("/api/alerts", encode_cursor("alerts", alerts, ["x", -(2**40)])),
        # A page key before its `since`: DynamoDB refuses BETWEEN lo > hi, which was a 503.
        ("/api/alerts", encode_cursor("alerts", alerts, ["2000-01-01T00:00:00.000Z#x", clock[0] - 3600_000])),
    ):
        sep = "&" if "?" in path else "?"
        status, body = _get(f"{path}{sep}cursor={cursor}")
        assert (status, body["error"]["parameter"]) == (400, "cursor"), body


def test_a_zones_file_with_a_zone_id_that_is_not_an_id_is_refused() -> None:
    """The read API names zones by id in keys, paths and the page (whose map draws them as
    HTML): a zones.csv row whose id is markup is refused (found by a security review)."""
    good = zones_csv(CITY)
    assert [z.zone_id for z in parse_zones(good)] == [z.zone_id for z in CITY.zones]
    header, first, *rest = good.decode().splitlines()
    hostile = first.replace(CITY.zones[0].zone_id, "<img src=x>", 1)
    with pytest.raises(ValueError, match="not plain ids"):
        parse_zones("\n".join([header, hostile, *rest]).encode())


def test_the_city_window_is_read_once_an_interval_and_cut_to_each_request() -> None:
    """`/ingestion` read one Query per zone per request, so one caller could drive the live
    tables at 256 Queries a request (found by a security review). The real Queries run against
    the emulator in tests/test_dashboard.py; here the per-zone read is counted."""
    from streaming.readapi.sources import CITY_WINDOW_MINUTES, LiveSource

    source = LiveSource(None, None, "state", "metrics", "lake")
    reads: list[tuple[str, int, int]] = []

    def minute_rows(zone_id: str, first: int, last: int) -> list[MinuteRow]:
        reads.append((zone_id, first, last))
        return [MinuteRow(m, 1, 1, 0.0, 0, 0.0, 0, 0.0) for m in range(first, last + 1)]

    source.minute_rows = minute_rows  # type: ignore[method-assign]
    source.registry = lambda: Registry.build(CITY.zones, {s.sensor_id: s for s in CITY.sensors})  # type: ignore[method-assign]
    now = 29_000_000
    for minutes in (60, 1, 360, 60):
        rows = source.city_minute_rows(now - minutes + 1, now)
        assert {z: [r.minute for r in v] for z, v in rows.items()} == {
            z.zone_id: list(range(now - minutes + 1, now + 1)) for z in CITY.zones
        }
    # Read twice: the first hour (60 and 1 minutes cut from it), then the widest (360, then 60).
    assert reads == [(z.zone_id, now - 59, now) for z in CITY.zones] + [
        (z.zone_id, now - CITY_WINDOW_MINUTES + 1, now) for z in CITY.zones
    ]
    source.city_minute_rows(now - 89, now + 1)  # the minute turned: read again, whole hours
    assert reads[-1] == (CITY.zones[-1].zone_id, now - 118, now + 1) and len(reads) == 3 * len(CITY.zones)
