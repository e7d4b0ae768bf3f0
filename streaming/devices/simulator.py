"""Run the simulated city: every gateway publishes its sensors' readings, minute by minute.

Each gateway follows the model's send plan (`TrafficModel.send_plan`): normally one
message per minute, but a faulty gateway may hold minutes back and deliver them late and
shuffled, or resend its last messages byte for byte (duplicates, bursts).

Time can be accelerated: `minutes` simulated minutes are spread over `duration_s` real
seconds (the demo plays a whole city-hour in a minute). Event time (`ts`) is simulated;
`sent_at` is the wall clock at publish, which is what latency is measured from.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import orjson

from streaming.contract import ContractError, device_message, validate_reading
from streaming.devices.gateway import Gateway, connect_all
from streaming.devices.traffic import TrafficModel


@dataclass
class SimulationResult:
    """What the devices did, for the accounting check: readings published (each once,
    however often its message was resent), of which invalid, and the resends (all readings
    of a resent message, invalid ones included)."""

    minutes: int = 0
    messages: int = 0
    readings: int = 0
    invalid_readings: int = 0
    duplicate_messages: int = 0
    duplicate_readings: int = 0
    late_messages: int = 0  # delivered in a later minute than their readings' (buffered by the gateway)
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
    connections = connect_all(gateways, connect)
    plans = {gw: model.send_plan(gw, minutes) for gw in gateways}
    # The last messages each gateway sent, byte for byte, for duplicates and bursts to resend.
    keep = max(1, model.faults.burst_messages[1])
    recent: dict[str, OrderedDict[int, tuple[bytes, int] | None]] = {gw: OrderedDict() for gw in gateways}
    futures: list[Future[None]] = []
    try:
        t0 = time.monotonic()
        for slot in range(minutes):
            if stop.is_set():
                break
            published = 0
            for gw, sensors in gateways.items():
                zone_id = sensors[0].zone_id
                conn = connections[gw]
                sent = recent[gw]
                for send in plans[gw][slot]:
                    if send.resend is None:
                        readings = model.gateway_minute(gw, sensors, send.minute)
                        # A gateway whose sensors are all silent has nothing to send.
                        entry = None
                        if readings:
                            message = device_message(gw, zone_id, int(time.time() * 1000), readings)
                            entry = (orjson.dumps(message), len(readings))
                            result.messages += 1
                            result.readings += len(readings)
                            result.invalid_readings += _count_invalid(readings)
                            result.late_messages += send.minute != slot
                            published += len(readings)
                        sent[send.minute] = entry
                        while len(sent) > keep:
                            sent.popitem(last=False)
                    else:
                        entry = sent.get(send.minute)
                        if entry is not None:
                            result.duplicate_messages += 1
                            result.duplicate_readings += entry[1]
                    if entry is not None:
                        futures.append(conn.publish_telemetry(zone_id, entry[0]))
            result.minutes += 1
            result.per_minute_readings.append(published)
            if on_minute:
                on_minute(slot, result)
            # Pace the simulated clock against the wall clock.
            stop.wait(max(0.0, t0 + (slot + 1) * duration_s / minutes - time.monotonic()))
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
