"""The silent-zone sweeper: its decision on plain data, and against the real processor and store.

Unit tests hold the decision (`detect_silence` with the sweep's clock) and the schedule. The
integration tests run the real processor and the sweeper on the emulator's DynamoDB and
EventBridge, with an SQS queue on the alert bus counting what subscribers would receive: a zone
that goes entirely quiet gets exactly one SensorSilent per sensor and episode, and a processor
commit that lands while a sweep is in flight is never overwritten.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import yaml
from kinesis_records import BASE_MS, StreamBuilder, reading

from infra.local.schedule import run
from infra.local.scratch import fresh_processor
from streaming.processor.core import MINUTE_MS, Alert, DetectorSettings, detect_silence
from streaming.processor.handler import Processor
from streaming.processor.state import SensorState, ZoneState
from streaming.processor.store import AlertPublisher
from streaming.processor.sweeper import SWEEP_INTERVAL_S, Sweeper, processing_lag_ms, scheduled_time_ms
from streaming.registry import generate_city

CITY = generate_city(sensors=48, zones=2, seed=4)
SILENCE = DetectorSettings().silence_ms
TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "cloudformation" / "iot-analytics-system.yaml"


# -- the decision -------------------------------------------------------------------------------


def _quiet_zone(last_received_ms: int) -> ZoneState:
    state = ZoneState("Z-000")
    state.sensors = {
        "S-quiet": SensorState(hwm=3, last_ts_ms=last_received_ms - 500, last_received_ms=last_received_ms),
        "S-recent": SensorState(hwm=3, last_received_ms=last_received_ms + 2 * MINUTE_MS),
        "S-never": SensorState(hwm=1),  # only an invalid reading so far: nothing to be silent from
    }
    return state


def test_a_sweep_raises_sensors_quiet_for_the_threshold_by_the_clock() -> None:
    state = _quiet_zone(BASE_MS)
    alerts: list[Alert] = []
    detect_silence(state, BASE_MS + SILENCE - 1, alerts, DetectorSettings())
    assert alerts == []
    detect_silence(state, BASE_MS + SILENCE, alerts, DetectorSettings())
    assert [a.detail["sensor_id"] for a in alerts] == ["S-quiet"]
    assert alerts[0].event_id == f"SensorSilent/S-quiet/{BASE_MS}"
    assert alerts[0].detail["silent_for_s"] == SILENCE // 1000
    assert state.sensors["S-quiet"].silent and not state.sensors["S-recent"].silent


def test_a_silent_sensor_is_raised_once_per_episode() -> None:
    state = _quiet_zone(BASE_MS)
    first: list[Alert] = []
    detect_silence(state, BASE_MS + SILENCE, first, DetectorSettings())
    later: list[Alert] = []
    detect_silence(state, BASE_MS + 3 * SILENCE, later, DetectorSettings())
    assert len(first) == 1 and [a.detail["sensor_id"] for a in later] == ["S-recent"]


def test_the_processing_lag_of_a_shard_is_its_latest_commit_clock_less_what_it_had_received() -> None:
    lags = processing_lag_ms(
        [
            ("s-0", BASE_MS + 10 * MINUTE_MS, BASE_MS),  # an older commit of s-0
            ("s-0", BASE_MS + 20 * MINUTE_MS, BASE_MS + 12 * MINUTE_MS),  # its latest
            ("s-1", BASE_MS + 5 * MINUTE_MS, BASE_MS + 5 * MINUTE_MS),  # caught up
            ("s-2", BASE_MS, BASE_MS + 2000),  # a receive stamped ahead of the commit's clock: no lag
            ("s-3", BASE_MS + 30 * MINUTE_MS, 0),  # an item from before the attribute: nothing known
            (None, BASE_MS + 30 * MINUTE_MS, BASE_MS),  # never committed: no shard
        ]
    )
    assert lags == {"s-0": 8 * MINUTE_MS, "s-1": 0, "s-2": 0}


def test_the_sweep_judges_silence_as_of_its_scheduled_time() -> None:
    assert scheduled_time_ms({"time": "2026-11-23T18:05:00Z"}) == 1_795_457_100_000
    before = int(time.time() * 1000)
    assert scheduled_time_ms({}) >= before  # invoked by hand: the clock


def test_the_template_schedules_the_sweeper_at_its_interval() -> None:
    class Loader(yaml.SafeLoader):
        pass

    # CloudFormation's short-form intrinsics (!Ref, !Sub, ...) as plain values.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    resources = yaml.load(TEMPLATE.read_text(), Loader=Loader)["Resources"]
    assert resources["SweeperSchedule"]["Properties"]["ScheduleExpression"] == f"rate({SWEEP_INTERVAL_S // 60} minute)"
    assert resources["SweeperFunction"]["Properties"]["Handler"] == "streaming.processor.sweeper.handler"


def test_the_local_schedule_invokes_the_handler_with_scheduled_events_and_survives_a_failure() -> None:
    stop = threading.Event()
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        events.append(event)
        if len(events) == 1:
            raise RuntimeError("a failed sweep")
        if len(events) == 3:
            stop.set()
        return {"function": context.function_name}

    n = run(handler, 0.01, stop, function_name="citypulse-local-sweeper", rule_arn="arn:rule/sweeper")
    assert n == 3 and len(events) == 3
    assert all(e["detail-type"] == "Scheduled Event" and e["resources"] == ["arn:rule/sweeper"] for e in events)
    assert all(scheduled_time_ms(e) > 0 for e in events)


# -- against the real processor and store ---------------------------------------------------------

ZONE = CITY.zones[0].zone_id
GATEWAYS = [g for g in CITY.gateways().values() if g[0].zone_id == ZONE]
SENSORS = [s for g in GATEWAYS for s in g]


class Stack:
    """The real processor and sweeper on fresh tables, and a queue that receives the alert bus."""

    def __init__(self) -> None:
        self.processor: Processor = fresh_processor(CITY)
        sqs, events = boto3.client("sqs"), boto3.client("events")
        bus = self.processor.settings.event_bus
        table = self.processor.settings.processor_table
        self.sweeper = Sweeper(boto3.client("dynamodb"), table, AlertPublisher(events, bus))
        self.builder = StreamBuilder()
        self.queue = sqs.create_queue(QueueName=f"{bus}-feed")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name=f"{bus}-all", EventBusName=bus, EventPattern='{"source": ["citypulse.processor"]}')
        events.put_targets(Rule=f"{bus}-all", EventBusName=bus, Targets=[{"Id": "feed", "Arn": arn}])
        self.sqs = sqs
        self.received: list[dict[str, Any]] = []

    def send(self, minute: int, sensors: list = SENSORS, lag_ms: int = 0, congestion: float = 0.2) -> int:
        """One gateway message per gateway of `sensors`, received at BASE_MS + `minute` min and
        applied `lag_ms` later by the processor's clock."""
        received = BASE_MS + minute * MINUTE_MS
        self.processor.clock = lambda: (received + lag_ms) / 1000
        by_gateway: dict[str, list] = {}
        for s in sensors:
            by_gateway.setdefault(s.gateway_id, []).append(s)
        records = [
            self.builder.gateway_record(
                g, [reading(s, minute, received - 1000, congestion=congestion) for s in g], received
            )
            for g in by_gateway.values()
        ]
        self.processor.process(records)
        return received

    def state(self) -> ZoneState:
        return next(s for s in self.processor.store.scan_zone_states() if s.zone_id == ZONE)

    def item(self) -> dict[str, Any]:
        """The zone's item in the processor table, as stored."""
        key = {"pk": {"S": f"zone#{ZONE}"}, "sk": {"S": "state"}}
        return self.sweeper.dynamodb.get_item(TableName=self.sweeper.table, Key=key, ConsistentRead=True)["Item"]

    def alerts(self, expected: int, kind: str = "SensorSilent", deadline_s: float = 30.0) -> list[dict[str, Any]]:
        """Every alert of `kind` the bus delivered so far, waiting until `expected` have arrived."""
        end = time.monotonic() + deadline_s
        while True:
            resp = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for m in resp.get("Messages", []):
                self.received.append(orjson.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])
            of_kind = [e for e in self.received if e["detail-type"] == kind]
            if len(of_kind) >= expected or time.monotonic() > end:
                return of_kind


@pytest.mark.integration
def test_a_zone_gone_quiet_gets_one_sensor_silent_per_sensor_and_episode(aws_env: dict[str, str]) -> None:
    stack = Stack()
    half = SENSORS[: len(SENSORS) // 2]
    rest = sorted(s.sensor_id for s in SENSORS[len(half) :])
    t0 = stack.send(0)
    t2 = stack.send(2, half)  # then only half the zone reports, then nobody
    assert stack.sweeper.sweep(t0 + SILENCE - 1).silent == []  # not yet
    first = stack.sweeper.sweep(t0 + SILENCE)
    assert (first.written, first.conflicts) == (1, 0)
    assert sorted(a.detail["sensor_id"] for a in first.silent) == rest
    second = stack.sweeper.sweep(t2 + SILENCE)  # writes over its own earlier write
    assert (second.written, second.conflicts) == (1, 0)
    assert sorted(a.detail["sensor_id"] for a in second.silent) == sorted(s.sensor_id for s in half)
    assert all(s.silent for s in stack.state().sensors.values())
    again = stack.sweeper.sweep(t2 + 3 * SILENCE)  # still quiet: the same episodes, nothing new
    assert again.silent == [] and again.written == 0

    # The zone comes back (the processor clears the marks), then goes quiet again: a new episode.
    back = stack.send(20)
    assert not any(s.silent for s in stack.state().sensors.values())
    second = stack.sweeper.sweep(back + SILENCE)
    assert len(second.silent) == len(SENSORS)

    delivered = stack.alerts(expected=2 * len(SENSORS))
    per_sensor = Counter(e["detail"]["sensor_id"] for e in delivered)
    assert per_sensor == Counter({s.sensor_id: 2 for s in SENSORS})  # two episodes, one alert each
    assert len({e["detail"]["event_id"] for e in delivered}) == len(delivered)
    assert all(e["detail"]["zone_id"] == ZONE for e in delivered)


@pytest.mark.integration
def test_a_congested_zone_gone_dark_is_cleared_by_the_sweep(aws_env: dict[str, str]) -> None:
    """The zone's sensors all read a jam (raised at once by the severe rule), then its gateways
    stop: the sweep that finds them all silent ends the episode, on the bus and in the item."""
    stack = Stack()
    t0 = stack.send(0, congestion=0.95)
    assert stack.item()["congested"] == {"BOOL": True}
    swept = stack.sweeper.sweep(t0 + SILENCE)
    assert len(swept.silent) == len(SENSORS) and [a.detail_type for a in swept.cleared] == ["CongestionCleared"]
    assert (swept.written, swept.conflicts) == (1, 0)
    assert stack.item()["congested"] == {"BOOL": False} and not stack.state().congestion.congested
    (cleared,) = stack.alerts(expected=1, kind="CongestionCleared")
    assert cleared["detail"]["reason"] == "silent"
    assert cleared["detail"]["event_id"] == f"CongestionCleared/{ZONE}/1/silent"
    assert stack.sweeper.sweep(t0 + 3 * SILENCE).silent == []  # still dark: nothing more


@pytest.mark.integration
def test_a_dark_zone_is_not_cleared_when_its_readings_come_back_during_the_sweep(aws_env: dict[str, str]) -> None:
    """Found by a review: the sweep sent the dark zone's clear before its write, so a processor
    commit bringing the jam back in between left consumers told "cleared" while it went on."""
    stack = Stack()
    t0 = stack.send(0, congestion=0.95)
    publish = stack.sweeper.alerts.publish

    def back_in_between(alerts: list[Alert]) -> None:
        publish(alerts)
        if any(a.detail_type == "SensorSilent" for a in alerts):
            stack.send(6, congestion=0.95)  # the gateways come back, still jammed

    stack.sweeper.alerts.publish = back_in_between  # type: ignore[method-assign]
    raced = stack.sweeper.sweep(t0 + SILENCE)
    stack.sweeper.alerts.publish = publish  # type: ignore[method-assign]
    assert (raced.written, raced.conflicts, raced.cleared) == (0, 1, [])
    assert stack.state().congestion.congested and stack.state().congestion.episode == 1
    assert stack.item()["congested"] == {"BOOL": True}
    assert len(stack.alerts(expected=len(SENSORS))) == len(SENSORS)  # the bus delivers: the check below can fail
    assert not [e for e in stack.received if e["detail-type"] == "CongestionCleared"]


@pytest.mark.integration
def test_a_zone_sending_only_broken_readings_does_not_hide_a_dark_zone(aws_env: dict[str, str]) -> None:
    """Found by a review: the lag was read off the sensors' last valid readings, so a shard
    whose latest commit held only a zone sending broken readings looked 20 minutes behind, and
    the zone gone dark beside it was never raised."""
    stack = Stack()
    other = [s for s in CITY.sensors if s.zone_id == CITY.zones[1].zone_id]
    stack.send(0, SENSORS + other)
    last = 0
    for minute in range(1, 21):  # the other zone goes on sending, every reading out of range
        last = stack.send(minute, other, congestion=7.0)
    swept = stack.sweeper.sweep(last)
    assert swept.lag_ms == {stack.builder.shard_id: 0}
    assert sorted(a.detail["sensor_id"] for a in swept.silent) == sorted(s.sensor_id for s in SENSORS)


@pytest.mark.integration
def test_a_processor_behind_the_street_raises_only_the_zone_quiet_on_the_street(aws_env: dict[str, str]) -> None:
    """The processor applies one zone's readings ten minutes late (a backlog after an outage);
    the other zone of its shard has gone quiet on the street. By the clock both look quiet; the
    sweep raises only the quiet one."""
    stack = Stack()
    other = [s for s in CITY.sensors if s.zone_id == CITY.zones[1].zone_id]
    stack.send(0, SENSORS + other)
    lag = 10 * MINUTE_MS
    last = 0
    for minute in range(1, 13):
        last = stack.send(minute, lag_ms=lag)
    swept = stack.sweeper.sweep(last + lag)  # the street's time: the zone's readings applied 10 min late
    assert swept.lag_ms == {stack.builder.shard_id: lag}
    assert sorted(a.detail["sensor_id"] for a in swept.silent) == sorted(s.sensor_id for s in other)
    assert not any(s.silent for s in stack.state().sensors.values())
    # The backlog drains: the processor catches up with the street and the zone is still reporting.
    caught_up = stack.send(22)
    assert stack.sweeper.sweep(caught_up + 1000).silent == []


@pytest.mark.integration
def test_a_processor_commit_during_a_sweep_is_not_overwritten(aws_env: dict[str, str]) -> None:
    stack = Stack()
    last = stack.send(0)
    half = SENSORS[: len(SENSORS) // 2]
    publish = stack.sweeper.alerts.publish

    def commit_in_between(alerts: list[Alert]) -> None:
        publish(alerts)
        stack.send(1, half)  # the processor commits after the sweep's read, before its write

    stack.sweeper.alerts.publish = commit_in_between  # type: ignore[method-assign]
    raced = stack.sweeper.sweep(last + SILENCE)
    stack.sweeper.alerts.publish = publish  # type: ignore[method-assign]
    assert (raced.written, raced.conflicts) == (0, 1)
    state = stack.state()
    # The processor's commit stands: its readings are counted, its marker and live values kept.
    assert state.counters["stored"] == len(SENSORS) + len(half)
    assert all(state.sensors[s.sensor_id].last_received_ms == last + MINUTE_MS for s in half)
    assert not any(s.silent for s in state.sensors.values())

    # The next sweep decides on the new state: only the sensors still quiet, under the same ids.
    retry = stack.sweeper.sweep(last + SILENCE)
    quiet = {s.sensor_id for s in SENSORS[len(half) :]}
    assert {a.detail["sensor_id"] for a in retry.silent} == quiet
    assert {a.event_id for a in retry.silent} <= {a.event_id for a in raced.silent}
    assert (retry.written, retry.conflicts) == (1, 0)
    assert {sid for sid, s in stack.state().sensors.items() if s.silent} == quiet
    assert stack.state().counters == state.counters


@pytest.mark.integration
def test_the_processor_takes_its_own_commit_back_unparsed_and_another_writers_fresh(aws_env: dict[str, str]) -> None:
    """`StateStore` remembers the blob it saved: read back unchanged, it is the state it was made
    from (no parse); changed by another writer (here the sweeper), it is parsed again."""
    stack = Stack()
    last = stack.send(0)
    store = stack.processor.store
    mine = store.load_zone_states([ZONE])[ZONE]
    assert store.load_zone_states([ZONE])[ZONE] is mine  # the processor's own commit, unchanged
    assert mine == stack.state()  # what parsing the stored blob gives
    assert not any(s.silent for s in mine.sensors.values())
    stack.sweeper.sweep(last + SILENCE)  # the sweeper writes the zone: the blob changes
    swept = store.load_zone_states([ZONE])[ZONE]
    assert swept is not mine and swept == stack.state()
    assert all(s.silent for s in swept.sensors.values())
