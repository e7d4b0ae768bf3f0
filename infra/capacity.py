"""`citypulse plan`: the AWS capacity and monthly cost of a city, citypulse's design beside the naive one.

The naive design is the tutorial one: one MQTT message, one rule evaluation, one Kinesis
record, one Lambda record-handling and one DynamoDB write per reading. citypulse batches
readings per gateway message (and may publish through Basic Ingest), partitions the stream
by zone and writes one DynamoDB item per zone per batch (docs/architecture.md §4).

Every price comes from `infra/pricing/aws-us-east-1.json` (dated, with its sources); every
other figure is an input with a default that says where it came from. The arithmetic is
plain so that a reviewer can redo it: tests pin known inputs to known outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PRICES = Path(__file__).parent / "pricing" / "aws-us-east-1.json"
SECONDS_PER_MONTH = 730 * 3600  # AWS prices a month as 730 hours
HOURS_PER_MONTH = 730
GB = 1024**3


@dataclass(frozen=True)
class Workload:
    sensors: int = 50_000
    rate_hz: float = 1.0  # readings per sensor per second
    gateway_batch: int = 32  # readings per MQTT message (1 = naive)
    reading_bytes: int = 200  # one JSON reading (measured: the simulator's readings are 180-210 B)
    message_overhead_bytes: int = 150  # gateway envelope + topic
    zones: int = 256
    basic_ingest: bool = True  # publish on $aws/rules/<rule>/...: no messaging charge
    batching_window_s: float = 1.0  # event-source mapping window
    # Processor speed on one core, readings/s, and the share of a batch's wall time spent on
    # CPU (the rest waits on DynamoDB/S3). Defaults: bench/processor_bench.py, docs/performance.md.
    processor_readings_per_core_s: float = 300_000
    processor_cpu_share: float = 0.5
    lambda_memory_mb: int = 1769  # = one vCPU
    zone_state_bytes_per_sensor: int = 40  # compressed per-sensor dedupe + live state
    lake_bytes_per_reading: int = 25  # Parquet, zstd
    redshift_base_rpu: int = 8
    redshift_hours_per_day: float = 2.0  # hourly loads of a few minutes, plus analyst queries
    glue_crawler_runs_per_day: int = 24
    glue_crawler_dpu: int = 2

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
    iot, kin = p["iot_core"], p["kinesis_on_demand"]
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
    record_bytes = msg_bytes * 4 / 3 + 120
    billed = _units(record_bytes, kin["record_rounding_bytes"]) * kin["record_rounding_bytes"]
    gb_in = msgs_month * billed / GB
    out.add(
        "Kinesis Data Streams (on-demand)",
        f"{gb_in:,.0f} GB in, 1 stream",
        gb_in * kin["ingest_per_gb"] + gb_in * kin["retrieval_per_gb"] + HOURS_PER_MONTH * kin["stream_hour"],
    )
    shards = max(1, math.ceil(max(msgs_s / 1000, msgs_s * record_bytes / 1048576)))
    out.capacity.update(
        kinesis_records_per_s=msgs_s, kinesis_mb_per_s=msgs_s * record_bytes / 1e6, kinesis_shards_equivalent=shards
    )

    _lambda(out, w, p, shards, w.processor_readings_per_core_s)

    # DynamoDB: per zone per batch one zone-state item and ~1 zone-minute item, read then written.
    ddb = p["dynamodb_on_demand"]
    batches_per_zone_s = 1 / w.batching_window_s
    state_kb = w.sensors / w.zones * w.zone_state_bytes_per_sensor / 1024
    wru_s = w.zones * batches_per_zone_s * (_units(state_kb, 1) + 1)
    rru_s = w.zones * batches_per_zone_s * (_units(state_kb, 4) + 1) * 2  # strongly consistent reads
    out.capacity.update(dynamodb_wru_per_s=wru_s, dynamodb_rru_per_s=rru_s)
    out.add(
        "DynamoDB (on-demand)",
        f"{wru_s:,.0f} WRU/s, {rru_s:,.0f} RRU/s",
        wru_s * SECONDS_PER_MONTH / 1e6 * ddb["write_request_units_per_million"]
        + rru_s * SECONDS_PER_MONTH / 1e6 * ddb["read_request_units_per_million"],
    )

    # The lake: one Parquet object per shard per batch.
    _lake(out, w, p, puts_s=shards / w.batching_window_s)
    _batch_side(out, w, p)
    return out


def naive_plan(w: Workload, prices: dict[str, Any] | None = None) -> Plan:
    """The tutorial design: everything once per reading."""
    p = prices or load_prices()
    w = replace(w, gateway_batch=1, basic_ingest=False)
    out = Plan("naive", w)
    iot, kin, ddb = p["iot_core"], p["kinesis_on_demand"], p["dynamodb_on_demand"]
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
    gb_in = msgs_month * kin["record_rounding_bytes"] / GB
    out.add(
        "Kinesis Data Streams (on-demand)",
        f"{gb_in:,.0f} GB in (1 KB per record)",
        gb_in * (kin["ingest_per_gb"] + kin["retrieval_per_gb"]) + HOURS_PER_MONTH * kin["stream_hour"],
    )
    shards = max(1, math.ceil(msgs_s / 1000))
    out.capacity.update(kinesis_records_per_s=msgs_s, kinesis_shards_equivalent=shards)
    # Measured: the tutorial handler does ~123,000 records/s on a core (FIELD-NOTES).
    _lambda(out, w, p, shards, 123_000)
    out.capacity.update(dynamodb_wru_per_s=msgs_s)
    out.add(
        "DynamoDB (on-demand)",
        f"{msgs_s:,.0f} WRU/s (one write per reading)",
        msgs_s * SECONDS_PER_MONTH / 1e6 * ddb["write_request_units_per_million"],
    )
    _lake(out, w, p, puts_s=shards / w.batching_window_s)
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


def _lambda(out: Plan, w: Workload, p: dict[str, Any], shards: int, per_core: float) -> None:
    lam = p["lambda"]
    busy_cores = w.readings_per_s / per_core / w.processor_cpu_share
    gb_s = busy_cores * SECONDS_PER_MONTH * w.lambda_memory_mb / 1024
    invocations = shards / w.batching_window_s * SECONDS_PER_MONTH
    out.capacity.update(lambda_concurrency=max(shards, math.ceil(busy_cores)), lambda_busy_vcpus=busy_cores)
    out.add(
        "Lambda processor",
        f"{busy_cores:.2f} busy vCPUs, {invocations / 1e6:.1f} M invocations",
        gb_s * lam["gb_second"] + invocations / 1e6 * lam["requests_per_million"],
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


def render(ours: Plan, naive: Plan) -> str:
    """Side by side: component, citypulse, naive."""
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
    lines += [
        f"{'total':<34}{ours.monthly_usd:>18,.0f}{naive.monthly_usd:>16,.0f}",
        "",
        f"citypulse is {ratio:.1f}x cheaper than the naive design.",
        "capacity: "
        + ", ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in ours.capacity.items()),
    ]
    lines += [f"warning: {x}" for x in ours.warnings]
    lines += [f"naive would also need: {x}" for x in naive.warnings]
    return "\n".join(lines)
