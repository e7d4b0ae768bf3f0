"""Run the simulated city: every gateway publishes its sensors' readings, minute by minute.

Time can be accelerated: `minutes` simulated minutes are spread over `duration_s` real
seconds (the demo plays a whole city-hour in a minute). Event time (`ts`) is simulated;
`sent_at` is the wall clock at publish, which is what latency is measured from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson

from streaming.contract import ContractError, gateway_message, validate_reading
from streaming.devices.gateway import Gateway
from streaming.devices.traffic import TrafficModel


@dataclass
class SimulationResult:
    """What the devices did, for the accounting check: readings published (each once,
    however often its message was resent), of which invalid, and the resends."""

    minutes: int = 0
    messages: int = 0
    readings: int = 0
    invalid_readings: int = 0
    duplicate_messages: int = 0
    duplicate_readings: int = 0
    failed_publishes: int = 0
    gateways: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    per_minute_readings: list[int] = field(default_factory=list)

    @property
    def valid_readings(self) -> int:
        return self.readings - self.invalid_readings


def run_simulation(
    model: TrafficModel,
    minutes: int,
    duration_s: float,
    connect: Callable[[str], Gateway],
    *,
    stop: threading.Event | None = None,
    on_minute: Callable[[int, SimulationResult], None] | None = None,
) -> SimulationResult:
    """Publish `minutes` simulated minutes of the whole city over `duration_s` seconds.

    `connect(gateway_id)` returns a connected Gateway (with that device's certificate).
    Returns once every publish has been acknowledged by the broker (or failed).
    """
    stop = stop or threading.Event()
    gateways = model.city.gateways()
    result = SimulationResult(gateways=len(gateways), started_at=time.time())
    # TLS handshakes dominate start-up with hundreds of devices: connect them in parallel.
    with ThreadPoolExecutor(max_workers=32) as pool:
        connections = dict(zip(gateways, pool.map(connect, gateways), strict=True))
    futures: list[Future[None]] = []
    try:
        t0 = time.monotonic()
        for minute in range(minutes):
            if stop.is_set():
                break
            published = 0
            for gw, sensors in gateways.items():
                readings = model.gateway_minute(gw, sensors, minute)
                payload = orjson.dumps(gateway_message(gw, sensors[0].zone_id, int(time.time() * 1000), readings))
                conn = connections[gw]
                futures.append(conn.publish_telemetry(sensors[0].zone_id, payload))
                result.messages += 1
                result.readings += len(readings)
                result.invalid_readings += _count_invalid(readings)
                published += len(readings)
                if model.duplicate(gw, minute):
                    futures.append(conn.publish_telemetry(sensors[0].zone_id, payload))
                    result.duplicate_messages += 1
                    result.duplicate_readings += len(readings)
            result.minutes += 1
            result.per_minute_readings.append(published)
            if on_minute:
                on_minute(minute, result)
            # Pace the simulated clock against the wall clock.
            stop.wait(max(0.0, t0 + (minute + 1) * duration_s / minutes - time.monotonic()))
        for conn in connections.values():
            conn.flush(timeout=120)
    finally:
        for conn in connections.values():
            conn.disconnect()
    result.failed_publishes = sum(1 for f in futures if f.exception() is not None)
    result.finished_at = time.time()
    return result


def _count_invalid(readings: Iterable[dict]) -> int:
    bad = 0
    for r in readings:
        try:
            validate_reading(r)
        except ContractError:
            bad += 1
    return bad
