"""`citypulse plan`: the AWS capacity and monthly cost of a city, citypulse's design beside the naive one.

The naive design is the tutorial one: one MQTT message, one rule evaluation, one Kinesis
record, one Lambda record-handling and one DynamoDB write per reading. citypulse batches
readings per gateway message (and may publish through Basic Ingest), partitions the stream
by zone and writes one DynamoDB item per zone per batch (docs/architecture.md §4).

Every price comes from `infra/pricing/aws-us-east-1.json` (dated, with its sources); every
other figure is an input with a default that says where it came from. Message and reading
sizes are not constants: `measure_message_sizes` encodes real gateway messages of the
simulated city with the devices' encoder (`encode_gateway_message`, the one place to switch
when the payload format changes), and `measure_zone_state_bytes` weighs the zone states the
processor's own core makes of the traffic model's readings; DynamoDB is priced zone by zone at
each zone's size. The arithmetic is plain so that a reviewer can redo it: tests pin known
inputs to known outputs.

The Kinesis stream is planned in the capacity mode the template's `StreamMode` parameter
deploys: at a steady 50,000 readings/s provisioned shards cost a fraction of on-demand's
per-GB price; `render` prints the `ShardCount` to deploy with. The processor's DynamoDB tables
likewise, in the template's `TableCapacityMode`: the same steady load makes provisioned
capacity (auto-scaled to 70 % utilisation) cheaper than paying per request; `render` prints the
tables' capacities to deploy with. The processor reads the stream as the template's
`ProcessorStreamConsumer` and `ProcessorBatchingWindow` say: by default through an enhanced
fan-out consumer with no window, which spares each alert the batching window and multiplies the
batches that DynamoDB and the lake bill; `alternatives` prices, beside it, the range of the
cycle it estimates and reading the stream once a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import orjson

from streaming.contract import device_message
from streaming.devices.topics import telemetry_topic
from streaming.devices.traffic import Faults, TrafficModel
from streaming.processor.core import Record, apply_batch, decode_batch
from streaming.processor.envelope import rule_envelope
from streaming.processor.state import DEDUPE_WINDOW, ZoneState
from streaming.registry import generate_city

PRICES = Path(__file__).parent / "pricing" / "aws-us-east-1.json"
SECONDS_PER_MONTH = 730 * 3600  # AWS prices a month as 730 hours
HOURS_PER_MONTH = 730
GB = 1024**3
StreamMode = Literal["ON_DEMAND", "PROVISIONED"]  # the template's StreamMode parameter values
TableCapacityMode = Literal["PAY_PER_REQUEST", "PROVISIONED"]  # the template's TableCapacityMode values
# How the processor reads the stream (the template's ProcessorStreamConsumer values).
StreamConsumer = Literal["SHARED_THROUGHPUT", "ENHANCED_FAN_OUT"]
TEMPLATE_MAX_SHARDS = 64  # the template's ShardCount MaxValue
# Kinesis Data Streams' default quota of provisioned shards per account in us-east-1 (the price
# table's region; 200 in most others): Amazon Kinesis Data Streams Developer Guide, "Quotas and
# limits". The zone-keyed shard search looks that far (or twice an even spread's need).
KINESIS_SHARD_QUOTA = 500
# DynamoDB's default per-table quota of read and of write capacity units (provisioned tables),
# and the template's auto-scaling ceiling.
TABLE_QUOTA_UNITS = 40_000
# CreateEventSourceMapping takes MaximumBatchingWindowInSeconds in whole seconds, 0 to 300; with
# a standard iterator (a shared-throughput consumer) Lambda reads each shard at a base rate of
# once a second, while an enhanced fan-out consumer has the records pushed to it as they arrive
# (AWS Lambda Developer Guide, "Using Lambda with Kinesis Data Streams": polling and batching
# streams).
MAX_BATCHING_WINDOW_S = 300
POLL_INTERVAL_S = 1.0
# The shortest and longest cycle of a pushed shard with no window that `alternatives` prices.
PUSHED_CYCLE_RANGE_S = (0.1, 0.25)
# The processor's CPU by `bench/handler_bench.py`, fitted on a shard's batches of 1, 0.25 and
# 0.15 s (docs/performance.md, "Plan"): per reading, and per zone in a batch.
PROCESSOR_US_PER_READING = 3.6
PROCESSOR_MS_PER_ZONE_BATCH = 1.0


def batching_window(seconds: object) -> int:
    """`seconds` if the mapping can take it as its MaximumBatchingWindowInSeconds; else ValueError."""
    if type(seconds) is not int or not 0 <= seconds <= MAX_BATCHING_WINDOW_S:
        raise ValueError(
            f"batching window {seconds!r}: the mapping's window is whole seconds from 0 to {MAX_BATCHING_WINDOW_S} "
            "(MaximumBatchingWindowInSeconds)"
        )
    return seconds


def encode_gateway_message(gateway_id: str, zone_id: str, sent_at_ms: int, readings: list[dict[str, Any]]) -> bytes:
    """The bytes a gateway publishes: the contract's message (`device_message`: columnar,
    schema_version 2), orjson-encoded, as the devices send it.

    The one place the plan learns the payload format: every size below follows it.
    """
    return orjson.dumps(device_message(gateway_id, zone_id, sent_at_ms, readings))


@dataclass(frozen=True)
class MessageSizes:
    """Bytes per reading and per message (envelope + topic), measured by encoding real messages."""

    reading_bytes: float
    overhead_bytes: float
    messages: int  # how many gateway messages the figures average over
    readings: int


def message_sizes(
    messages: list[tuple[str, str, int, list[dict[str, Any]]]],
    encode: Callable[[str, str, int, list[dict[str, Any]]], bytes] = encode_gateway_message,
) -> MessageSizes:
    """Sizes of (gateway, zone, sent_at_ms, readings) messages under `encode`.

    A message's overhead is its encoding with no readings plus its topic; a reading costs the
    rest, averaged over all readings: (sum of full - sum of empty) / readings.
    """
    full = empty = topics = readings = 0
    for gateway_id, zone_id, sent_at_ms, batch in messages:
        full += len(encode(gateway_id, zone_id, sent_at_ms, batch))
        empty += len(encode(gateway_id, zone_id, sent_at_ms, []))
        topics += len(telemetry_topic(zone_id, gateway_id).encode())
        readings += len(batch)
    return MessageSizes((full - empty) / readings, (empty + topics) / len(messages), len(messages), readings)


@cache
def measure_message_sizes(sample_gateways: int = 64, seed: int = 7) -> MessageSizes:
    """Sizes of one minute of real messages of the default city's first `sample_gateways` gateways.

    The readings come from the simulator's traffic model (what devices send), without faults:
    every detector reports speed and occupancy (count-only detectors send less, so this errs
    high). Ids of the 50,000-sensor city have their full width.
    """
    city = generate_city(seed=seed)
    start_ms = 1_764_835_200_000  # 2025-12-04T08:00Z, a weekday morning
    model = TrafficModel(city, seed, start_ms, faults=Faults.none())
    gateways = list(city.gateways().items())[:sample_gateways]
    return message_sizes(
        [(gw, sensors[0].zone_id, start_ms + 60_000, model.gateway_minute(gw, sensors, 0)) for gw, sensors in gateways]
    )


@dataclass(frozen=True)
class StateSizes:
    """The zone-state item, measured on states the processor's core made: its state's bytes per
    sensor, and the bytes of the item's other attributes and names (`dynamodb_item_bytes`)."""

    bytes_per_sensor: float
    zones: int
    sensors: int
    item_overhead_bytes: float


# A Kinesis sequence number has 56 digits; the zone state carries the last one it applied.
_SEQUENCE_NUMBER = 49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898


def dynamodb_item_bytes(item: dict[str, dict[str, Any]]) -> int:
    """An item's size as DynamoDB bills it ("Item sizes and formats", the developer guide): each
    attribute's name in UTF-8 plus its value — a string's UTF-8 bytes, a binary's raw bytes, a
    number's byte per two significant digits plus one, a Boolean's one byte. Scalars only:
    what the processor's items hold."""
    size = 0
    for name, value in item.items():
        ((kind, v),) = value.items()
        size += len(name.encode())
        if kind == "S":
            size += len(v.encode())
        elif kind == "B":
            size += len(v)
        elif kind == "N":
            digits = v.lstrip("-").replace(".", "").strip("0") or "0"
            size += (len(digits) + 1) // 2 + 1
        elif kind in ("BOOL", "NULL"):
            size += 1
        else:
            raise ValueError(f"{name}: {kind} is not a scalar type this counts")
    return size


def sample_zone_states(sample_zones: int = 4, seed: int = 7) -> dict[str, ZoneState]:
    """The states the processor's core (`decode_batch`, `apply_batch`) makes of `sample_zones`
    zones of the default city on the traffic model's readings (no faults), each sensor having
    reported `DEDUPE_WINDOW` + 1 times: every dedupe window full, as in a running city at any
    rate. Each gateway's messages arrive at its own phase of the second, as the load
    generator sends them."""
    city = generate_city(seed=seed)
    start_ms = 1_764_835_200_000  # 2025-12-04T08:00Z, a weekday morning
    model = TrafficModel(city, seed, start_ms, faults=Faults.none())
    zone_ids = {z.zone_id for z in city.zones[:sample_zones]}
    gateways = [(gw, sensors) for gw, sensors in city.gateways().items() if sensors[0].zone_id in zone_ids]
    records = []
    received_at_ms = start_ms
    for minute in range(DEDUPE_WINDOW + 1):
        sent_at_ms = start_ms + (minute + 1) * 60_000
        for n, (gw, sensors) in enumerate(gateways):
            zone_id = sensors[0].zone_id
            payload = encode_gateway_message(gw, zone_id, sent_at_ms, model.gateway_minute(gw, sensors, minute))
            received_at_ms = sent_at_ms + 80 + n * 7_919 % 1_000
            data = rule_envelope(payload, zone_id, gw, received_at_ms)
            records.append(Record("shardId-000000000000", _SEQUENCE_NUMBER + len(records), data))
    registry = {s.sensor_id: s for s in city.sensors}
    return apply_batch(decode_batch(records, registry, zone_ids), {}, {}, {}, received_at_ms).zone_states


@cache
def measure_zone_state_bytes(sample_zones: int = 4, seed: int = 7) -> StateSizes:
    """The zone-state item as `StateStore.save_zone_states` writes it (`zone_state_item`) over
    `sample_zone_states`: its state's size per sensor (`ZoneState.to_bytes`), and the rest of the
    item. A sensor with duplicate, late or stuck counters (a faulty one) has a few bytes more."""
    from streaming.processor.store import zone_state_item

    states = sample_zone_states(sample_zones, seed).values()
    sensors = sum(len(z.sensors) for z in states)
    blobs = [(z, z.to_bytes()) for z in states]
    now_ms = max(z.watermark_ms for z in states)
    overhead = [dynamodb_item_bytes(zone_state_item(z, blob, now_ms, now_ms)) - len(blob) for z, blob in blobs]
    return StateSizes(sum(len(b) for _, b in blobs) / sensors, len(blobs), sensors, sum(overhead) / len(overhead))


def _measured_state_bytes() -> float:
    return measure_zone_state_bytes().bytes_per_sensor


def _measured_state_overhead() -> float:
    return measure_zone_state_bytes().item_overhead_bytes


def _measured_reading_bytes() -> float:
    return measure_message_sizes().reading_bytes


def _measured_overhead_bytes() -> float:
    return measure_message_sizes().overhead_bytes


@dataclass(frozen=True)
class Workload:
    sensors: int = 50_000
    rate_hz: float = 1.0  # readings per sensor per second
    gateway_batch: int = 32  # readings per MQTT message (1 = naive)
    # Measured with the devices' encoder (`measure_message_sizes`) unless given.
    reading_bytes: float = field(default_factory=_measured_reading_bytes)
    message_overhead_bytes: float = field(default_factory=_measured_overhead_bytes)
    zones: int = 256
    # Kinesis capacity mode (the template's StreamMode). Provisioned shards are sized so that
    # the hottest shard (zones hash unevenly onto shards: `hottest_shard_share`) stays within
    # `shard_utilisation` of a shard's write limits, the rest being headroom for bursts.
    stream_mode: StreamMode = "PROVISIONED"
    shard_utilisation: float = 0.8
    basic_ingest: bool = True  # publish on $aws/rules/<rule>/...: no messaging charge
    # The processor's tables (the template's TableCapacityMode). Provisioned, auto scaling keeps
    # them at `table_utilisation` of what they consume (the template's target value), never
    # below the capacity the plan prints for the city's steady load.
    table_capacity_mode: TableCapacityMode = "PROVISIONED"
    table_utilisation: float = 0.7
    # How the processor reads the stream (the template's ProcessorStreamConsumer) and its
    # mapping's MaximumBatchingWindowInSeconds (ProcessorBatchingWindow: whole seconds, 0-300).
    # An enhanced fan-out consumer with no window invokes as soon as the shard's invocation
    # before has ended: a shard's batches are then `pushed_cycle_s` apart, the invocation's own
    # duration, which sets how often each zone's state is read and written and each shard's
    # lake file put: the shorter the invocation, the more batches. 0.15 s is an estimate, not a
    # measurement (no AWS here): an invocation's requests go out in three rounds (the zones'
    # state reads; the lake file, the minute items and any alerts; the commit), of which S3's
    # PUT is the slowest (tens to a couple of hundred milliseconds), around ~25 ms of CPU for a
    # shard's share of 0.15 s (~940 readings, ~21 zones) at the handler's measured costs
    # (PROCESSOR_US_PER_READING, PROCESSOR_MS_PER_ZONE_BATCH). `alternatives` prices the
    # range, PUSHED_CYCLE_RANGE_S, beside it. Locally, on two cores shared with the rest of the
    # platform, a shard's batches came 0.22-0.66 s apart at the median (docs/performance.md, Load).
    stream_consumer: StreamConsumer = "ENHANCED_FAN_OUT"
    batching_window_s: int = 0
    pushed_cycle_s: float = 0.15
    # The processor's CPU as bench/handler_bench.py measures the handler against the emulator
    # (docs/performance.md, "Load"; the core alone is bench/processor_bench.py's): a part per
    # reading (decode, apply, its lake row) and a part per zone in a batch (the zone's state
    # read, encoded and written, its minute item written), fitted on a shard's batches of 1,
    # 0.25 and 0.15 s. The naive handler's speed on single-reading records, from one run of
    # bench/processor_bench.py (the naive design's one message per reading). And the share of a
    # batch's wall time spent on CPU (the rest waits on DynamoDB and S3), which Lambda bills too.
    processor_us_per_reading: float = PROCESSOR_US_PER_READING
    processor_ms_per_zone_batch: float = PROCESSOR_MS_PER_ZONE_BATCH
    naive_readings_per_core_s: float = 75_874
    processor_cpu_share: float = 0.5
    lambda_memory_mb: int = 1769  # = one vCPU
    # The zone-state item: its state per sensor (dedupe window and live values, compressed) and
    # the item's other attributes and names: measured on the processor's own states and items
    # (`measure_zone_state_bytes`) unless given.
    zone_state_bytes_per_sensor: float = field(default_factory=_measured_state_bytes)
    zone_state_item_overhead_bytes: float = field(default_factory=_measured_state_overhead)
    lake_bytes_per_reading: int = 25  # Parquet, zstd
    redshift_base_rpu: int = 8
    redshift_hours_per_day: float = 2.0  # hourly loads of a few minutes, plus analyst queries
    glue_crawler_runs_per_day: int = 24
    glue_crawler_dpu: int = 2

    def __post_init__(self) -> None:
        """ValueError, in the CLI's words, for a workload no city has (the arithmetic would
        print negative costs, divide by zero, or search for ever)."""
        if self.sensors < 1:
            raise ValueError(f"--sensors {self.sensors}: a city has at least one sensor")
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f"--rate {self.rate_hz}: readings per sensor per second, above 0")
        if self.gateway_batch < 1:
            raise ValueError(f"--gateway-batch {self.gateway_batch}: a gateway message holds at least one reading")
        if not 1 <= self.zones <= self.sensors:
            raise ValueError(f"--zones {self.zones}: between 1 and the city's {self.sensors:,} sensors")
        batching_window(self.batching_window_s)

    @property
    def batch_interval_s(self) -> float:
        """Seconds between two batches of a shard at steady load, an upper bound on the batches
        (the next window begins when the invocation ends, so the interval is really the window
        plus the invocation). The window, if any; with none, what paces the batches: Lambda's
        base rate of reading a shard (once a second) for a shared-throughput consumer, the
        invocation itself (`pushed_cycle_s`) for an enhanced fan-out consumer."""
        if self.batching_window_s:
            return float(self.batching_window_s)
        return self.pushed_cycle_s if self.fan_out else POLL_INTERVAL_S

    @property
    def fan_out(self) -> bool:
        """Whether the processor reads through an enhanced fan-out consumer (records pushed)."""
        return self.stream_consumer == "ENHANCED_FAN_OUT"

    @property
    def readings_per_s(self) -> float:
        return self.sensors * self.rate_hz

    @property
    def gateways(self) -> int:
        return math.ceil(self.sensors / 32)


@dataclass
class LineItem:
    component: str
    quantity: str
    monthly_usd: float


@dataclass
class Plan:
    design: str
    workload: Workload
    items: list[LineItem] = field(default_factory=list)
    capacity: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def monthly_usd(self) -> float:
        return sum(i.monthly_usd for i in self.items)

    def add(self, component: str, quantity: str, usd: float) -> None:
        self.items.append(LineItem(component, quantity, usd))


def load_prices(path: Path = PRICES) -> dict[str, Any]:
    return json.loads(path.read_text())


def tiered(units: float, tiers: list[list[Any]]) -> float:
    """Cost of `units` millions-priced items under [[tier size or None, price per million], ...]."""
    cost, left = 0.0, units
    for size, price in tiers:
        take = left if size is None else min(left, size)
        cost += take / 1e6 * price
        left -= take
        if left <= 0:
            break
    return cost


def _units(size: float, unit: float) -> int:
    return max(1, math.ceil(size / unit))


def plan(w: Workload, prices: dict[str, Any] | None = None) -> Plan:
    """citypulse's design for workload `w` (gateway batching, zone-partitioned state)."""
    p = prices or load_prices()
    out = Plan("citypulse", w)
    iot = p["iot_core"]
    msgs_s = w.readings_per_s / w.gateway_batch
    msg_bytes = w.gateway_batch * w.reading_bytes + w.message_overhead_bytes
    metered = _units(msg_bytes, iot["message_unit_bytes"])
    msgs_month = msgs_s * SECONDS_PER_MONTH
    out.capacity.update(readings_per_s=w.readings_per_s, mqtt_messages_per_s=msgs_s, message_bytes=msg_bytes)

    if w.basic_ingest and iot["basic_ingest_messaging_free"]:
        out.add("IoT Core messaging", f"{msgs_month / 1e9:.2f} B messages via Basic Ingest (not billed)", 0.0)
    else:
        out.add(
            "IoT Core messaging",
            f"{msgs_month * metered / 1e9:.2f} B x 5 KB units",
            tiered(msgs_month * metered, iot["messaging_per_million_tiers"]),
        )
    _iot_common(out, w, msgs_month * metered, msgs_s, p)

    # Kinesis: the rule's record is the base64 payload (4/3) plus ~120 B of metadata.
    # Partitioned by zone (docs/architecture.md §4): zones land unevenly on shards.
    shares = zone_shares(w.sensors, w.zones)
    shards = _kinesis(out, w, p, msgs_s, msg_bytes * 4 / 3 + 120, shares)

    # DynamoDB: per zone per batch that holds it one zone-state item, read then written, and
    # ~1 zone-minute item written (`zone_batches_per_s`). Each zone's item in its own size: units
    # are whole KB (writes) and 4 KB (reads) per item, so pricing every zone at the average size
    # would hide what the larger zones pay. Strongly consistent reads (the processor's): one
    # read unit per started 4 KB of each item. A zone-minute item is read by the first batch
    # that adds to it and then held by the container (`StateStore.load_zones`): one read a
    # zone a minute, or one a batch if its batches come less often.
    zones = [
        (
            zone_batches_per_s(w, share),
            (share * w.sensors * w.zone_state_bytes_per_sensor + w.zone_state_item_overhead_bytes) / 1024,
        )
        for share in shares.values()
    ]
    zone_batches_s = sum(n for n, _ in zones)  # each one zone-minute item
    minute_reads_s = sum(min(n, 1 / 60) for n, _ in zones)
    # The processor: its CPU follows the readings and the zones its batches hold.
    cpu_s = w.readings_per_s * w.processor_us_per_reading / 1e6 + zone_batches_s * w.processor_ms_per_zone_batch / 1e3
    _lambda(out, w, p, shards, cpu_s)
    _dynamodb(
        out,
        w,
        p,
        {
            "state": TableLoad(
                reads_per_s=sum(n * _units(kb, 4) for n, kb in zones),
                writes_per_s=sum(n * _units(kb, 1) for n, kb in zones),
            ),
            "metrics": TableLoad(reads_per_s=minute_reads_s, writes_per_s=zone_batches_s),
        },
    )

    # The lake: one Parquet object per shard per batch.
    _lake(out, w, p, puts_s=shards / w.batch_interval_s)
    _batch_side(out, w, p)
    return out


def zone_batches_per_s(w: Workload, share: float) -> float:
    """How many of its shard's batches a second hold a zone with `share` of the city's sensors.

    A batch a `w.batch_interval_s` holds every zone whose gateways sent in that time. The zone's
    ceil(share x sensors / gateway_batch) gateways each send `rate_hz` messages a second, at
    their own phases (unsynchronised devices): one sends within an interval of T seconds with
    probability min(1, rate x T), so the zone is in a batch with probability
    1 - (1 - min(1, rate x T)) ** gateways. At an interval of a second or more at 1 Hz, every
    zone is in every batch; shorter, a zone is written at most as often as its gateways send.
    """
    interval = w.batch_interval_s
    gateways = math.ceil(share * w.sensors / w.gateway_batch)
    return (1 - (1 - min(1.0, w.rate_hz * interval)) ** gateways) / interval


def naive_plan(
    w: Workload,
    prices: dict[str, Any] | None = None,
    stream_mode: StreamMode = "ON_DEMAND",
    table_capacity_mode: TableCapacityMode = "PAY_PER_REQUEST",
) -> Plan:
    """The tutorial design: everything once per reading (on an on-demand stream and an on-demand
    table, as tutorials deploy them, unless told)."""
    p = prices or load_prices()
    # A tutorial's mapping: the stream itself (a shared-throughput consumer), no window.
    w = replace(
        w,
        gateway_batch=1,
        basic_ingest=False,
        stream_mode=stream_mode,
        table_capacity_mode=table_capacity_mode,
        stream_consumer="SHARED_THROUGHPUT",
        batching_window_s=0,
    )
    out = Plan("naive", w)
    iot = p["iot_core"]
    msgs_s = w.readings_per_s
    msgs_month = msgs_s * SECONDS_PER_MONTH
    metered = _units(w.reading_bytes + w.message_overhead_bytes, iot["message_unit_bytes"])
    out.capacity.update(readings_per_s=msgs_s, mqtt_messages_per_s=msgs_s)
    out.add(
        "IoT Core messaging",
        f"{msgs_month / 1e9:.1f} B messages",
        tiered(msgs_month * metered, iot["messaging_per_million_tiers"]),
    )
    _iot_common(out, w, msgs_month * metered, msgs_s, p)
    # Keyed by sensor: 50,000 keys spread evenly.
    shards = _kinesis(out, w, p, msgs_s, (w.reading_bytes + w.message_overhead_bytes) * 4 / 3 + 120, None)
    _lambda(out, w, p, shards, w.readings_per_s / w.naive_readings_per_core_s)
    _dynamodb(out, w, p, {"readings": TableLoad(reads_per_s=0.0, writes_per_s=msgs_s)}, "one write per reading")
    _lake(out, w, p, puts_s=shards / w.batch_interval_s)
    _batch_side(out, w, p)
    return out


def _iot_common(out: Plan, w: Workload, metered_month: float, msgs_s: float, p: dict[str, Any]) -> None:
    iot = p["iot_core"]
    out.add(
        "IoT Core rules engine",
        f"{metered_month / 1e9:.2f} B rule + action units",
        metered_month / 1e6 * (iot["rules_triggered_per_million"] + iot["actions_executed_per_million"]),
    )
    minutes = w.gateways * HOURS_PER_MONTH * 60
    out.add(
        "IoT Core connectivity",
        f"{w.gateways:,} devices always connected",
        minutes / 1e6 * iot["connectivity_per_million_minutes"],
    )
    for quota in ("quota_publishes_per_second_per_account", "quota_rule_evaluations_per_second_per_account"):
        if msgs_s > iot[quota]:
            out.warnings.append(
                f"{msgs_s:,.0f} messages/s exceeds the default IoT Core {quota[6:].replace('_', ' ')}"
                f" ({iot[quota]:,}): request a quota increase"
            )


@cache
def zone_shares(sensors: int, zones: int, seed: int = 7) -> dict[str, float]:
    """Each zone's share of the readings in the synthetic city (denser zone types carry more)."""
    counts: dict[str, int] = {}
    for sensor in generate_city(sensors, zones, seed).sensors:
        counts[sensor.zone_id] = counts.get(sensor.zone_id, 0) + 1
    return {zone: n / sensors for zone, n in counts.items()}


def hottest_shard_share(shares: dict[str, float], shards: int) -> float:
    """The largest share of the traffic one shard gets when records are keyed by zone.

    Kinesis maps a record to the shard whose hash-key range holds the 128-bit MD5 of its
    partition key; a stream created with N shards splits the key space into N equal ranges.
    """
    loads = [0.0] * shards
    for zone, share in shares.items():
        loads[(int.from_bytes(hashlib.md5(zone.encode()).digest(), "big") * shards) >> 128] += share
    return max(loads)


def _shards_at_limits(records_s: float, bytes_s: float, limits: dict[str, Any]) -> int:
    """Shards a perfectly even spread would need: the on-demand stream's equivalent."""
    return max(
        1, math.ceil(max(records_s / limits["shard_records_per_second"], bytes_s / limits["shard_bytes_per_second"]))
    )


def busiest_key_fits(records_s: float, bytes_s: float, limits: dict[str, Any], shares: dict[str, float]) -> None:
    """ValueError if the busiest partition key alone is over one shard's write limits: no
    stream, provisioned or on demand, can take it (a key's records all go to one shard)."""
    zone, top = max(shares.items(), key=lambda kv: kv[1])
    if records_s * top > limits["shard_records_per_second"] or bytes_s * top > limits["shard_bytes_per_second"]:
        raise ValueError(
            f"zone {zone} alone would send {records_s * top:,.0f} records/s ({bytes_s * top / 2**20:,.2f} MiB/s) "
            f"to its shard, over a shard's write limits ({limits['shard_records_per_second']:,} records/s, "
            f"{limits['shard_bytes_per_second'] / 2**20:g} MiB/s): records are keyed by zone; plan more --zones "
            "or a larger --gateway-batch"
        )


def provisioned_shards(
    w: Workload, records_s: float, bytes_s: float, limits: dict[str, Any], shares: dict[str, float] | None
) -> int:
    """The fewest shards whose hottest shard stays within `w.shard_utilisation` of both write limits.

    `shares`: each partition key's share of the records; None for keys so many and so even
    (one per sensor) that every shard gets the same. Keyed by zone, the hottest shard is the
    zones that hash into one of N equal ranges: more shards part them, but not in order (two
    zones together at 4 shards may be apart at 5). No count serves a zone that alone is over the
    headroom; past KINESIS_SHARD_QUOTA (or twice an even spread's need) the search gives up. Both
    are ValueError, saying what to plan instead.
    """
    u = w.shard_utilisation
    if shares is None:
        return _shards_at_limits(records_s / u, bytes_s / u, limits)
    busiest_key_fits(records_s, bytes_s, limits, shares)
    zone, top = max(shares.items(), key=lambda kv: kv[1])
    if records_s * top > limits["shard_records_per_second"] * u or bytes_s * top > limits["shard_bytes_per_second"] * u:
        raise ValueError(
            f"zone {zone} alone would take over {u:.0%} of a shard's write limits ({records_s * top:,.0f} "
            "records/s): no shard count leaves it headroom; plan more --zones or a larger --gateway-batch"
        )
    start = _shards_at_limits(records_s, bytes_s, limits)
    most = max(KINESIS_SHARD_QUOTA, 2 * start)
    for shards in range(start, most + 1):
        hot = hottest_shard_share(shares, shards)
        if (
            records_s * hot <= limits["shard_records_per_second"] * u
            and bytes_s * hot <= limits["shard_bytes_per_second"] * u
        ):
            return shards
    raise ValueError(
        f"keyed by {len(shares)} zones, {records_s:,.0f} records/s: no count up to {most} provisioned shards keeps "
        f"the hottest within {u:.0%} of a shard's write limits; plan with --stream-mode ON_DEMAND (it splits hot "
        "shards) or more --zones"
    )


def _kinesis(
    out: Plan, w: Workload, p: dict[str, Any], records_s: float, record_bytes: float, shares: dict[str, float] | None
) -> int:
    """The stream's line items in `w.stream_mode`; returns its shards (the processor's concurrency).

    On-demand bills every GB written and read, each record rounded up to 1 KB. Provisioned
    bills shard-hours plus PUT payload units (25 KB each) and nothing per GB read; shards are
    sized for the records/s and bytes/s limits at `w.shard_utilisation`. The processor's
    enhanced fan-out consumer (`w.stream_consumer`) is billed apart: on a provisioned stream by
    consumer-shard-hour and GB retrieved; on an on-demand stream its GB retrieved replace the
    stream's own retrieval, at the enhanced fan-out price.
    """
    mb_s = records_s * record_bytes / 1e6
    limits = p["kinesis_provisioned"]
    out.capacity.update(kinesis_records_per_s=records_s, kinesis_mb_per_s=mb_s)
    month = records_s * SECONDS_PER_MONTH
    if w.stream_mode == "ON_DEMAND":
        if shares is not None:
            busiest_key_fits(records_s, records_s * record_bytes, limits, shares)
        kin = p["kinesis_on_demand"]
        gb = month * _units(record_bytes, kin["record_rounding_bytes"]) * kin["record_rounding_bytes"] / GB
        shards = _shards_at_limits(records_s, records_s * record_bytes, limits)
        out.capacity.update(kinesis_shards_equivalent=shards)
        out.add(
            "Kinesis Data Streams",
            f"on-demand: {gb:,.0f} GB in" + ("" if w.fan_out else " and out"),
            gb * (kin["ingest_per_gb"] + (0 if w.fan_out else kin["retrieval_per_gb"]))
            + HOURS_PER_MONTH * kin["stream_hour"],
        )
        if w.fan_out:
            out.add(
                "Kinesis enhanced fan-out",
                f"the processor's consumer: {gb:,.0f} GB out",
                gb * kin["enhanced_fan_out_retrieval_per_gb"],
            )
        return shards
    shards = provisioned_shards(w, records_s, records_s * record_bytes, limits, shares)
    units = month * _units(record_bytes, limits["put_payload_unit_bytes"])
    out.capacity.update(kinesis_shards=shards)
    out.add(
        "Kinesis Data Streams",
        f"provisioned: {shards} shards, {units / 1e9:.2f} B PUT units",
        shards * HOURS_PER_MONTH * limits["shard_hour"] + units / 1e6 * limits["put_payload_units_per_million"],
    )
    if w.fan_out:
        gb = month * record_bytes / GB
        out.add(
            "Kinesis enhanced fan-out",
            f"the processor's consumer: {shards} consumer-shards, {gb:,.0f} GB out",
            shards * HOURS_PER_MONTH * limits["enhanced_fan_out_consumer_shard_hour"]
            + gb * limits["enhanced_fan_out_retrieval_per_gb"],
        )
    if shards > TEMPLATE_MAX_SHARDS:
        out.warnings.append(
            f"{shards} shards exceed the template's ShardCount maximum ({TEMPLATE_MAX_SHARDS}): "
            "raise it or deploy StreamMode=ON_DEMAND"
        )
    return shards


def _lambda(out: Plan, w: Workload, p: dict[str, Any], shards: int, cpu_s: float) -> None:
    """The Lambda line for a processor spending `cpu_s` CPU seconds a second."""
    lam = p["lambda"]
    busy_cores = cpu_s / w.processor_cpu_share
    if w.fan_out and not w.batching_window_s:
        # Pushed with no window, a shard's next invocation starts when its last one ends: each
        # shard has one running all the time, and Lambda bills all of it, waits included.
        busy_cores = max(busy_cores, shards)
    gb_s = busy_cores * SECONDS_PER_MONTH * w.lambda_memory_mb / 1024
    invocations = shards / w.batch_interval_s * SECONDS_PER_MONTH
    out.capacity.update(lambda_concurrency=max(shards, math.ceil(busy_cores)), lambda_busy_vcpus=busy_cores)
    out.add(
        "Lambda processor",
        f"{busy_cores:.2f} busy vCPUs, {invocations / 1e6:.1f} M invocations",
        gb_s * lam["gb_second"] + invocations / 1e6 * lam["requests_per_million"],
    )


@dataclass(frozen=True)
class TableLoad:
    """A table's steady read and write units a second (strongly consistent reads)."""

    reads_per_s: float
    writes_per_s: float


def _dynamodb(out: Plan, w: Workload, p: dict[str, Any], tables: dict[str, TableLoad], why: str = "") -> None:
    """The DynamoDB line in `w.table_capacity_mode`.

    On demand bills each request unit. Provisioned bills capacity units by the hour, and auto
    scaling tracks `w.table_utilisation`: a table that consumes U units a second is held at
    ceil(U / utilisation) units, the capacities to deploy with (`capacity`, `render`: auto
    scaling's minimum, so that a table never has to climb back from nothing after a stop).
    The dashboards' reads are in neither mode's figure: auto scaling adds what they take.
    """
    wru_s = sum(t.writes_per_s for t in tables.values())
    rru_s = sum(t.reads_per_s for t in tables.values())
    out.capacity.update(dynamodb_wru_per_s=wru_s, dynamodb_rru_per_s=rru_s)
    needs = f"{wru_s:,.0f} WRU/s, {rru_s:,.0f} RRU/s" + (f" ({why})" if why else "")
    if w.table_capacity_mode == "PAY_PER_REQUEST":
        ddb = p["dynamodb_on_demand"]
        out.add(
            "DynamoDB",
            f"on-demand: {needs}",
            wru_s * SECONDS_PER_MONTH / 1e6 * ddb["write_request_units_per_million"]
            + rru_s * SECONDS_PER_MONTH / 1e6 * ddb["read_request_units_per_million"],
        )
        return
    ddb = p["dynamodb_provisioned"]
    held = {
        name: (math.ceil(t.reads_per_s / w.table_utilisation), math.ceil(t.writes_per_s / w.table_utilisation))
        for name, t in tables.items()
    }
    rcu, wcu = sum(r for r, _ in held.values()), sum(c for _, c in held.values())
    for name, (r, c) in held.items():
        out.capacity[f"{name}_table_read_capacity"] = r
        out.capacity[f"{name}_table_write_capacity"] = c
        if max(r, c) > TABLE_QUOTA_UNITS:
            out.warnings.append(
                f"the {name} table needs {r:,} RCU and {c:,} WCU, over DynamoDB's default per-table quota "
                f"({TABLE_QUOTA_UNITS:,}) and the template's auto-scaling ceiling: request an increase and raise it"
            )
    out.add(
        "DynamoDB",
        f"provisioned at {w.table_utilisation:.0%}: {wcu:,} WCU, {rcu:,} RCU for {needs}",
        HOURS_PER_MONTH * (wcu * ddb["write_capacity_unit_hour"] + rcu * ddb["read_capacity_unit_hour"]),
    )


def _lake(out: Plan, w: Workload, p: dict[str, Any], puts_s: float) -> None:
    s3 = p["s3"]
    gb_month = w.readings_per_s * SECONDS_PER_MONTH * w.lake_bytes_per_reading / GB
    out.add(
        "S3 lake",
        f"+{gb_month:,.0f} GB/month, {puts_s:.0f} PUT/s",
        gb_month * s3["standard_gb_month"] + puts_s * SECONDS_PER_MONTH / 1000 * s3["put_per_thousand"],
    )


def _batch_side(out: Plan, w: Workload, p: dict[str, Any]) -> None:
    """Redshift Serverless, MWAA and the Glue crawler: the same in both designs."""
    rs, mwaa, glue = p["redshift_serverless"], p["mwaa"], p["glue"]
    rpu_h = w.redshift_base_rpu * w.redshift_hours_per_day * HOURS_PER_MONTH / 24
    out.add("Redshift Serverless", f"{rpu_h:,.0f} RPU-hours", rpu_h * rs["rpu_hour"])
    out.add("MWAA (mw1.small)", f"{HOURS_PER_MONTH} hours", HOURS_PER_MONTH * mwaa["mw1_small_hour"])
    runs = w.glue_crawler_runs_per_day * HOURS_PER_MONTH / 24
    dpu_h = runs * w.glue_crawler_dpu * glue["crawler_minimum_minutes"] / 60
    out.add("Glue crawler", f"{runs:,.0f} runs, {dpu_h:,.0f} DPU-hours", dpu_h * glue["crawler_dpu_hour"])


def _pace(w: Workload) -> str:
    """What sets a shard's batch interval (`Workload.batch_interval_s`), in words."""
    if w.batching_window_s:
        return "the batching window"
    if w.fan_out:
        return "records pushed as they arrive, no window: the invocation's own duration"
    return "no window: Lambda reads a shard once a second"


def alternatives(w: Workload, prices: dict[str, Any] | None = None) -> list[tuple[str, Plan]]:
    """What the plan's total rests on, priced beside it: for a pushed reading with no window, the
    cycle it estimates (`Workload.pushed_cycle_s`) at either end of PUSHED_CYCLE_RANGE_S, and
    reading the stream once a second instead."""
    if not w.fan_out or w.batching_window_s:
        return []
    cycles = [
        (f"with invocations of {cycle:g} s instead of {w.pushed_cycle_s:g} s", replace(w, pushed_cycle_s=cycle))
        for cycle in PUSHED_CYCLE_RANGE_S
    ]
    once_a_second = (
        "reading the stream once a second instead, ProcessorStreamConsumer=SHARED_THROUGHPUT "
        "ProcessorBatchingWindow=1, each alert waiting up to a second more for its shard's next batch",
        replace(w, stream_consumer="SHARED_THROUGHPUT", batching_window_s=1),
    )
    return [(label, plan(x, prices)) for label, x in [*cycles, once_a_second]]


def render(
    ours: Plan, naive: Plan, naive_provisioned: Plan | None = None, others: Sequence[tuple[str, Plan]] = ()
) -> str:
    """Side by side: component, citypulse, naive (and the naive total on a provisioned stream,
    and the totals of `others`, e.g. `alternatives`)."""
    w = ours.workload
    lines = [
        f"citypulse plan: {w.sensors:,} sensors x {w.rate_hz:g} Hz = {w.readings_per_s:,.0f} readings/s, "
        f"{w.gateway_batch} readings per gateway message, {w.zones} zones"
        f"{', Basic Ingest' if w.basic_ingest else ''}",
        f"prices: {load_prices()['region']} as of {load_prices()['as_of']} (infra/pricing/aws-us-east-1.json)",
        "",
        f"{'component':<34}{'citypulse $/month':>18}{'naive $/month':>16}   citypulse quantity",
    ]
    naive_items = {i.component: i for i in naive.items}
    for item in ours.items:
        other = naive_items.get(item.component)
        lines.append(
            f"{item.component:<34}{item.monthly_usd:>18,.0f}"
            f"{(other.monthly_usd if other else 0):>16,.0f}   {item.quantity}"
        )
    ratio = naive.monthly_usd / ours.monthly_usd
    sizes = measure_message_sizes()
    states = measure_zone_state_bytes()
    lines += [
        f"{'total':<34}{ours.monthly_usd:>18,.0f}{naive.monthly_usd:>16,.0f}",
        "",
        f"citypulse is {ratio:.1f}x cheaper than the naive design."
        if ratio >= 1
        else f"citypulse is {1 / ratio:.1f}x dearer than the naive design (too few readings for its batching to pay).",
    ]
    if naive_provisioned is not None:
        lines.append(
            f"(naive on a provisioned stream and provisioned tables too: ${naive_provisioned.monthly_usd:,.0f}/month, "
            f"{naive_provisioned.monthly_usd / ours.monthly_usd:.1f}x)"
        )
    lines += [
        f"({label}: ${other.monthly_usd:,.0f}/month, {naive.monthly_usd / other.monthly_usd:.1f}x)"
        for label, other in others
    ]
    lines += [
        "",
        "assumptions:",
        f"  message sizes: {w.reading_bytes:,.1f} B per reading, {w.message_overhead_bytes:,.1f} B per message"
        f" (envelope + topic); measured by encode_gateway_message on {sizes.messages} messages"
        f" ({sizes.readings:,} readings) of the simulated city",
        f"  deploy the stack with StreamMode={w.stream_mode}"
        + (f" ShardCount={ours.capacity['kinesis_shards']}" if w.stream_mode == "PROVISIONED" else "")
        + f" (hottest zone-keyed shard at <= {w.shard_utilisation:.0%} of its write limits)",
        f"  and TableCapacityMode={w.table_capacity_mode}"
        + (
            "".join(
                f" {param}ReadCapacity={ours.capacity[f'{name}_table_read_capacity']}"
                f" {param}WriteCapacity={ours.capacity[f'{name}_table_write_capacity']}"
                for param, name in (("StateTable", "state"), ("MetricsTable", "metrics"))
            )
            + f" (the steady load takes {w.table_utilisation:.0%} of each: auto scaling's floor)"
            if w.table_capacity_mode == "PROVISIONED"
            else ""
        ),
        f"  and ProcessorStreamConsumer={w.stream_consumer} ProcessorBatchingWindow={w.batching_window_s}:"
        f" at most one batch per shard every {w.batch_interval_s:g} s ({_pace(w)}); each zone's state read and"
        " written and each shard's lake file put once per batch",
        f"  processor {w.processor_us_per_reading:g} us a reading + {w.processor_ms_per_zone_batch:g} ms a zone in a"
        f" batch (bench/handler_bench.py) at {w.processor_cpu_share:.0%} CPU;"
        f" lake {w.lake_bytes_per_reading} B per reading",
        f"  zone state {w.zone_state_bytes_per_sensor:,.1f} B per sensor + {w.zone_state_item_overhead_bytes:,.0f} B of"
        f" the item's other attributes; measured as the processor saves it (ZoneState.to_bytes, zone_state_item)"
        f" on {states.sensors:,} sensors of {states.zones} zones, full dedupe windows",
        "capacity: "
        + ", ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in ours.capacity.items()),
    ]
    lines += [f"warning: {x}" for x in ours.warnings]
    lines += [f"naive would also need: {x}" for x in naive.warnings]
    return "\n".join(lines)
