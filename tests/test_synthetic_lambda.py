"""The synthetic-traffic Lambda (streaming/devices/synthetic_lambda.py): its minute against a fake
iot-data client, and once through the real client to the emulator's IoT Core."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from streaming.contract import GATEWAY_V2, ContractError, message_readings, parse_ts_ms, validate_reading
from streaming.devices import synthetic_lambda
from streaming.registry import generate_city


class FakeIotData:
    """Records what boto3's iot-data ``publish`` would have sent."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish(self, **kwargs: Any) -> None:
        self.published.append(kwargs)


def test_handler_publishes_the_minute_before_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYPULSE_SYNTHETIC_SENSORS", "300")
    monkeypatch.setenv("CITYPULSE_SYNTHETIC_SEED", "3")
    fake = FakeIotData()
    result = synthetic_lambda.handler({"time": "2026-11-23T18:05:00Z"}, None, client=fake)

    minute_start = int(datetime(2026, 11, 23, 18, 4, tzinfo=UTC).timestamp() * 1000)
    city = generate_city(sensors=300, seed=3)
    gateways = city.gateways()
    assert result["minute_start_ms"] == minute_start
    assert result["messages"] == len(fake.published) == len(gateways) + result["duplicates"]

    seen_readings = 0
    versions: set[int] = set()
    by_topic: dict[str, int] = {}
    for message in fake.published:
        assert message["qos"] == 1
        _, _, zone_id, gateway_id = message["topic"].split("/")
        by_topic[message["topic"]] = by_topic.get(message["topic"], 0) + 1
        body = json.loads(message["payload"])
        assert (body["gateway_id"], body["zone_id"]) == (gateway_id, zone_id)
        versions.add(body["schema_version"])
        readings = message_readings(body)
        assert {r["sensor_id"] for r in readings} <= {s.sensor_id for s in gateways[gateway_id]}
        for reading in readings:
            assert reading["seq"] == minute_start // 60_000
            assert minute_start <= parse_ts_ms(reading["ts"]) < minute_start + 60_000
        seen_readings += len(readings)
    assert GATEWAY_V2 in versions  # columnar, unless a faulty reading cannot be a row of v2
    # Every gateway published; only the model's duplicates went twice.
    assert set(by_topic) == {f"citypulse/telemetry/{s[0].zone_id}/{gw}" for gw, s in gateways.items()}
    assert sum(n - 1 for n in by_topic.values()) == result["duplicates"]
    # "readings" counts each reading once, however often its message went out.
    assert seen_readings == result["readings"] + _duplicate_readings(fake.published)
    assert result["readings"] == 300


def _duplicate_readings(published: list[dict[str, Any]]) -> int:
    seen: set[str] = set()
    extra = 0
    for message in published:
        if message["topic"] in seen:
            extra += len(message_readings(json.loads(message["payload"])))
        seen.add(message["topic"])
    return extra


def test_readings_honour_the_contract_but_for_injected_faults() -> None:
    city = generate_city(sensors=300, seed=5)
    sent: list[tuple[str, bytes]] = []
    done = synthetic_lambda.publish_minute(city, 5, 60_000 * 29_000_000, lambda t, p: sent.append((t, p)))
    invalid = 0
    for _, payload in sent:
        for reading in message_readings(json.loads(payload)):
            try:
                validate_reading(reading)
            except ContractError:
                invalid += 1
    assert done.readings == 300  # no silences at the default fault rates
    assert invalid <= 0.05 * done.readings  # the model's invalid-reading rate is 0.2 %


def test_unaligned_minute_is_refused() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        synthetic_lambda.publish_minute(generate_city(sensors=256, seed=1), 1, 61_000, lambda t, p: None)


def test_imports_without_awscrt() -> None:
    """The Lambda package has no awscrt: the module must not pull in the MQTT client."""
    code = (
        "import sys; sys.modules['awscrt'] = None; sys.modules['awsiot'] = None\n"
        "import streaming.devices.synthetic_lambda as m; print(m.handler.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "handler"


def test_consecutive_invocations_draw_new_noise_and_no_sensor_repeats_itself() -> None:
    """Each invocation builds its model afresh; drawn from the minute's own seeds, not the same
    ones every minute (found by a review: every sensor sent the same count twelve minutes in a
    row, which the processor calls stuck)."""
    city = generate_city(sensors=300, seed=5)
    counts: dict[str, list[int]] = {}
    first = 60_000 * 29_000_000 + 8 * 60 * 60_000  # a morning: traffic on every road
    for minute in range(12):
        sent: list[tuple[str, bytes]] = []
        synthetic_lambda.publish_minute(city, 5, first + minute * 60_000, lambda t, p, sent=sent: sent.append((t, p)))
        for _, payload in {t: p for t, p in sent}.items():
            for r in message_readings(json.loads(payload)):
                counts.setdefault(r["sensor_id"], []).append(r["vehicle_count"])
    repeating = [s for s, c in counts.items() if len(c) == 12 and len(set(c)) == 1 and c[0]]
    assert len(counts) == 300 and repeating == []
    assert sum(len(set(c)) > 3 for c in counts.values()) > 250


def test_a_count_only_detector_stays_count_only_across_midnight() -> None:
    """Whether a detector measures speed is a property of the detector: the feed's model, started
    afresh each day, drew it again at every midnight (181 of ~100 count-only detectors changed
    kind overnight; found by a review)."""
    city = generate_city(sensors=300, seed=5)
    midnight = 60_000 * 29_000_000 // 86_400_000 * 86_400_000 + 86_400_000

    def count_only(minute_start_ms: int) -> set[str]:
        sent: list[bytes] = []
        synthetic_lambda.publish_minute(city, 5, minute_start_ms, lambda t, p: sent.append(p))
        readings = [r for payload in sent for r in message_readings(json.loads(payload))]
        return {r["sensor_id"] for r in readings if "avg_speed_kmh" not in r and "occupancy_pct" not in r}

    before, after = count_only(midnight - 60_000), count_only(midnight)
    assert len(before) > 5
    assert before == after


@pytest.mark.integration
def test_the_handler_publishes_through_the_real_iot_data_client(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same minute through boto3's iot-data client to the emulator's IoT Core, read back
    through a topic rule with an SQS action (found by a review: only a fake client ever saw the
    deployed Lambda's one call)."""
    import boto3

    monkeypatch.setenv("CITYPULSE_SYNTHETIC_SENSORS", "300")
    monkeypatch.setenv("CITYPULSE_SYNTHETIC_SEED", "3")
    sqs, iot = boto3.client("sqs"), boto3.client("iot")
    queue = sqs.create_queue(QueueName="synthetic-lambda-feed")["QueueUrl"]
    rule = "synthetic_lambda_feed"
    iot.create_topic_rule(
        ruleName=rule,
        topicRulePayload={
            "sql": "SELECT topic() AS topic, * FROM 'citypulse/telemetry/#'",
            "actions": [{"sqs": {"queueUrl": queue, "roleArn": "arn:aws:iam::000000000000:role/rule"}}],
            "ruleDisabled": False,
        },
    )
    try:
        result = synthetic_lambda.handler({"time": "2026-11-23T18:05:00Z"}, None)
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(received) < result["messages"] and time.monotonic() < deadline:
            got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for m in got.get("Messages", []):
                received.append(json.loads(m["Body"]))
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
    finally:
        iot.delete_topic_rule(ruleName=rule)
    gateways = generate_city(sensors=300, seed=3).gateways()
    assert len(received) == result["messages"] == len(gateways) + result["duplicates"]
    for body in received:
        _, _, zone_id, gateway_id = body.pop("topic").split("/")
        assert (body["gateway_id"], body["zone_id"]) == (gateway_id, zone_id)
        assert {r["sensor_id"] for r in message_readings(body)} <= {s.sensor_id for s in gateways[gateway_id]}
    assert {b["gateway_id"] for b in received} == set(gateways)
