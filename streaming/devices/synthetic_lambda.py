"""Synthetic traffic in AWS: one simulated minute of the city per invocation, through IoT Core.

Place in the flow: an EventBridge schedule (every minute, non-production stacks only, see
``SyntheticTrafficFunction`` in infra/cloudformation/iot-analytics-system.yaml) invokes
:func:`handler`, which publishes every gateway's message for the minute that just ended on
its telemetry topic with ``iot-data:Publish``. From there the message takes the real
ingestion path: topic rule -> Kinesis -> processor, exactly as a roadside gateway's would.
Locally the simulator (streaming/devices/simulator.py, ``citypulse demo``) plays this part
over MQTT with mutual TLS.

The readings come from :class:`streaming.devices.traffic.TrafficModel` over the city of
:func:`streaming.registry.generate_city` (``CITYPULSE_SYNTHETIC_SENSORS``,
``CITYPULSE_SYNTHETIC_SEED``); the registry uploaded to the lake must be the same city, or
the processor quarantines the readings as unknown sensors.

This module must import without awscrt (not in the Lambda package): it does not use the
MQTT gateway client, only its topic layout.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from streaming.contract import device_message
from streaming.devices.topics import telemetry_topic
from streaming.devices.traffic import MINUTE_MS, TrafficModel
from streaming.registry import City, generate_city

PUBLISH_THREADS = 16
DAY_MS = 24 * 60 * MINUTE_MS

Publish = Callable[[str, bytes], None]


@dataclass(frozen=True)
class MinutePublished:
    """What one invocation sent."""

    minute_start_ms: int
    messages: int
    readings: int
    duplicates: int


@cache
def _city(sensors: int, seed: int) -> City:
    return generate_city(sensors=sensors, seed=seed)


def publish_minute(city: City, seed: int, minute_start_ms: int, publish: Publish) -> MinutePublished:
    """Publish every gateway's message for the minute starting at ``minute_start_ms``.

    Event time is that minute; ``seq`` is the epoch minute, so consecutive invocations carry
    increasing sequence numbers per sensor, as a device's would. A message the model marks
    as a duplicate is published twice (the processor must count it once).
    """
    if minute_start_ms % MINUTE_MS:
        raise ValueError(f"minute_start_ms {minute_start_ms} is not aligned to a minute")
    # One model a day, asked for this minute of it: a model started at this minute would draw
    # every invocation's noise from the same seeds (minute 0), and the feed would repeat itself
    # minute after minute (every sensor "stuck"). Its fault episodes are drawn from the day's start.
    day_start = minute_start_ms - minute_start_ms % DAY_MS
    model = TrafficModel(city, seed * 100_000 + day_start // DAY_MS, start_ms=day_start, sensor_seed=seed)
    minute = (minute_start_ms - day_start) // MINUTE_MS
    sent_at = int(time.time() * 1000)
    jobs: list[tuple[str, bytes]] = []
    readings = duplicates = 0
    for gateway_id, sensors in city.gateways().items():
        batch = model.gateway_minute(gateway_id, sensors, minute)
        if not batch:
            continue
        zone_id = sensors[0].zone_id
        payload = json.dumps(device_message(gateway_id, zone_id, sent_at, batch), separators=(",", ":")).encode()
        topic = telemetry_topic(zone_id, gateway_id)
        jobs.append((topic, payload))
        readings += len(batch)
        if model.duplicate(gateway_id, minute):
            jobs.append((topic, payload))
            duplicates += 1
    # IoT Core's HTTPS publish takes ~20 ms: a few threads keep a 50,000-sensor minute well
    # inside the function's timeout.
    with ThreadPoolExecutor(max_workers=PUBLISH_THREADS) as pool:
        for future in [pool.submit(publish, topic, payload) for topic, payload in jobs]:
            future.result()
    return MinutePublished(minute_start_ms, len(jobs), readings, duplicates)


def _iot_data_client() -> Any:
    """An iot-data client for the account's ATS data endpoint (or the one the environment names)."""
    import boto3

    if os.environ.get("AWS_ENDPOINT_URL_IOT_DATA_PLANE") or os.environ.get("AWS_ENDPOINT_URL"):
        return boto3.client("iot-data")
    endpoint = boto3.client("iot").describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    return boto3.client("iot-data", endpoint_url=f"https://{endpoint}")


def _scheduled_ms(event: dict[str, Any]) -> int:
    """The schedule's firing time (EventBridge's ``time``), else now."""
    stamp = event.get("time") if isinstance(event, dict) else None
    if isinstance(stamp, str):
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
    return int(time.time() * 1000)


def handler(event: dict[str, Any], context: Any, *, client: Any = None) -> dict[str, Any]:
    """Lambda entry point: publish the minute that ended before the schedule fired."""
    sensors = int(os.environ.get("CITYPULSE_SYNTHETIC_SENSORS", "2000"))
    seed = int(os.environ.get("CITYPULSE_SYNTHETIC_SEED", "7"))
    iot = client if client is not None else _iot_data_client()
    minute_start = (_scheduled_ms(event) // MINUTE_MS - 1) * MINUTE_MS

    def publish(topic: str, payload: bytes) -> None:
        iot.publish(topic=topic, qos=1, payload=payload)

    done = publish_minute(_city(sensors, seed), seed, minute_start, publish)
    return {
        "minute_start_ms": done.minute_start_ms,
        "messages": done.messages,
        "readings": done.readings,
        "duplicates": done.duplicates,
    }
