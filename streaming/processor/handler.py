"""The processor Lambda: a thin adapter from a Kinesis event to the pure core and back.

Kinesis → (this handler) → DynamoDB live state + S3 lake + EventBridge alerts. The
event-source mapping calls it per shard with up to 10,000 records; it answers with
`batchItemFailures` (ReportBatchItemFailures). Bad input never fails a batch — it is
quarantined by the core. Only infrastructure failures (a store still failing after
retries) do, and then the whole batch is reported failed from its first record: every
write is idempotent, so redelivery is safe and nothing is lost or doubled.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import boto3
import pybase64
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from streaming.processor.core import DecodedBatch, DetectorSettings, Record, apply_batch, decode_batch
from streaming.processor.store import AlertPublisher, LakeWriter, StateStore, client_config, io_pool, run_all
from streaming.registry import Sensor, load_registry
from streaming.unprocessed import StoreError

logger = Logger(service="citypulse-processor")
metrics = Metrics(namespace="citypulse", service="processor")
# Environments may share an account: each one's metrics carry its name (the template sets it).
metrics.set_default_dimensions(environment=os.environ.get("CITYPULSE_ENV_NAME", "local"))

# Latency histogram buckets (ms, upper bounds) logged per batch so that percentiles can
# be merged exactly across batches; CloudWatch gets the same values through EMF.
LATENCY_BUCKETS_MS = (*range(50, 1000, 50), *range(1000, 10000, 250), *range(10000, 60001, 5000))


@dataclass(frozen=True)
class Settings:
    lake_bucket: str
    processor_table: str
    metrics_table: str
    event_bus: str
    registry_key: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            lake_bucket=env["CITYPULSE_LAKE_BUCKET"],
            processor_table=env["CITYPULSE_PROCESSOR_STATE_TABLE"],
            metrics_table=env["CITYPULSE_ZONE_METRICS_TABLE"],
            event_bus=env["CITYPULSE_EVENT_BUS"],
            registry_key=env.get("CITYPULSE_REGISTRY_KEY", "registry/sensor_registry.csv"),
        )


@dataclass
class Processor:
    """The processor with its clients and registry: built once per Lambda container."""

    settings: Settings
    store: StateStore
    lake: LakeWriter
    alerts: AlertPublisher
    registry: dict[str, Sensor]
    zones: set[str]
    detectors: DetectorSettings = field(default_factory=DetectorSettings)
    # The commit's clock: each zone's item records it (`updated_at`), and the sweeper reads the
    # processor's lag behind the street from it (`sweeper.processing_lag_ms`).
    clock: Callable[[], float] = time.time
    # The batch's reads, and its writes before the commit point, go out at once (`run_all`).
    _io: ThreadPoolExecutor = field(default_factory=lambda: io_pool("processor"), init=False, repr=False)

    @classmethod
    def from_env(cls) -> Processor:
        return cls.for_settings(Settings.from_env())

    @classmethod
    def for_settings(cls, settings: Settings) -> Processor:
        """The processor of these tables, bucket and bus: its clients, and the registry read from the lake."""
        config = client_config()
        lake = LakeWriter(boto3.client("s3", config=config), settings.lake_bucket)
        registry = load_registry(lake.read_bytes(settings.registry_key))
        return cls(
            settings=settings,
            store=StateStore(boto3.client("dynamodb", config=config), settings.processor_table, settings.metrics_table),
            lake=lake,
            alerts=AlertPublisher(boto3.client("events", config=config), settings.event_bus),
            registry=registry,
            zones={s.zone_id for s in registry.values()},
        )

    def process(self, records: list[Record]) -> dict[str, Any]:
        """Run one batch end to end; returns counts and a latency histogram for the log."""
        started = time.time()
        decoded = decode_batch(records, self.registry, self.zones)
        try:
            return self._process(records, decoded, started)
        except BaseException:
            self.store.forget(decoded.by_zone)  # its retry reads what this batch may have half-written
            raise

    def _process(self, records: list[Record], decoded: DecodedBatch, started: float) -> dict[str, Any]:
        (zone_states, minutes), shard_counters = run_all(
            [
                partial(self.store.load_zones, decoded.by_zone, decoded.minute_keys()),
                partial(self.store.load_shard_counters, {r.shard_id for r, *_ in decoded.unattributed}),
            ],
            self._io,
        )
        now_ms = int(self.clock() * 1000)
        out = apply_batch(decoded, zone_states, minutes, shard_counters, now_ms, self.detectors)

        first, last = records[0], records[-1]
        batch_name = f"{first.shard_id}-{first.sequence_number}-{last.sequence_number}"
        # Everything before the commit point at once, alerts first (on this thread): none waits
        # for another, and each is harmless to repeat on a retry (docs/architecture.md §4).
        run_all(
            [
                partial(self.alerts.publish, out.alerts),
                partial(self.lake.write_readings, out.lake, batch_name),
                partial(self.lake.write_quarantine, out.quarantine, batch_name),
                partial(self.store.save_minutes, out.minutes),
            ],
            self._io,
        )
        # The commit point.
        self.store.save_zone_states(out.zone_states, now_ms, {**minutes, **out.minutes}, decoded.received_through)
        self.store.save_shard_counters(out.shard_counters)

        committed_ms = int(time.time() * 1000)
        return {
            "shard": first.shard_id,
            "records": len(records),
            "counts": dict(out.counts),
            "alerts": len(out.alerts),
            "alert_types": [a.detail_type for a in out.alerts],
            "latency_ms_histogram": latency_histogram(
                committed_ms - sent
                for rec, sent in decoded.sent_at
                if (rec.shard_id, rec.sequence_number) not in out.redelivered
            ),
            "redelivered": out.redelivered,
            "committed_ms": committed_ms,
            "duration_ms": round((time.time() - started) * 1000, 1),
        }


def latency_histogram(latencies_ms: Iterable[float]) -> dict[int, int]:
    """Counts per `LATENCY_BUCKETS_MS` bucket (its upper bound; beyond the last, one past it)."""
    histogram: dict[int, int] = {}
    for latency in latencies_ms:
        i = bisect_left(LATENCY_BUCKETS_MS, latency)
        bucket = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else LATENCY_BUCKETS_MS[-1] + 1
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return histogram


@cache
def _processor() -> Processor:
    return Processor.from_env()


def records_already_applied(shard_id: str, records: list[dict[str, Any]]) -> list[str]:
    """Sequence numbers of Kinesis `records` (GetRecords shape; the partition key is the zone)
    that the processor would skip as redeliveries, because what decides for them has already
    moved past them. A redrive of the on-failure queue asks this first: a dead-lettered record
    whose zone has since committed later records cannot be told from one that was applied, so
    it is held on the queue (and counted by the audit) rather than delivered into a skip.

    A record of no known zone (an unknown zone's topic, a broken envelope) is decided by its
    shard's marker, not a zone's: decoded here as the processor decodes it, it is held when the
    shard has moved past it. Without that, such a record was redriven into a skip and its queue
    message deleted: no quarantine row, no count (found by a review)."""
    processor = _processor()
    decoded = decode_batch(
        [Record(shard_id, int(r["SequenceNumber"]), bytes(r["Data"])) for r in records],
        processor.registry,
        processor.zones,
    )
    unattributed = {rec.sequence_number for rec, *_ in decoded.unattributed}
    attributed = [r for r in records if int(r["SequenceNumber"]) not in unattributed]
    states = processor.store.load_zone_states({r["PartitionKey"] for r in attributed})
    held = [
        r["SequenceNumber"]
        for r in attributed
        if (state := states.get(r["PartitionKey"])) is not None
        and state.already_applied(shard_id, int(r["SequenceNumber"]))
    ]
    if unattributed:
        counters = processor.store.load_shard_counters([shard_id]).get(shard_id)
        marker = counters.marker_seq if counters is not None else -1
        held += [
            r["SequenceNumber"] for r in records if (seq := int(r["SequenceNumber"])) in unattributed and seq <= marker
        ]
    return held


def records_from_event(event: dict[str, Any]) -> list[Record]:
    """Kinesis event records → core Records (base64 decoded; shard from the event id)."""
    out = []
    for r in event["Records"]:
        shard_id = r["eventID"].split(":", 1)[0]
        k = r["kinesis"]
        out.append(Record(shard_id, int(k["sequenceNumber"]), pybase64.b64decode(k["data"])))
    return out


# Failures of the services a batch writes to, after their own retries: the batch is sound.
TRANSIENT = (StoreError, BotoCoreError, ClientError)


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point for the Kinesis event-source mapping."""
    records = records_from_event(event)
    if not records:
        return {"batchItemFailures": []}
    try:
        summary = _processor().process(records)
    except TRANSIENT:
        # A service that still failed after its retries: report the batch from its first
        # record, to be delivered again whole (redelivery is idempotent).
        logger.exception("batch failed; reporting it for retry", extra={"records": len(records)})
        metrics.add_metric(name="BatchFailures", unit=MetricUnit.Count, value=1)
        return {"batchItemFailures": [{"itemIdentifier": str(records[0].sequence_number)}]}
    except Exception:
        # Anything else may be the batch's own doing (a record the code cannot take). Raised, so
        # that Lambda bisects the batch (BisectBatchOnFunctionError): reported from its first
        # record, it would be retried whole until the whole of it went to the on-failure queue.
        logger.exception("batch failed; raising it for Lambda to bisect", extra={"records": len(records)})
        metrics.add_metric(name="BatchFailures", unit=MetricUnit.Count, value=1)
        raise
    # From each record's arrival in the stream to the commit: the batching window and the
    # invocation, without the way from the device to the stream (IoT Core, the rule).
    committed_s = summary["committed_ms"] / 1000
    redelivered = summary.pop("redelivered", ())
    summary["stream_ms_histogram"] = latency_histogram(
        (committed_s - record["kinesis"]["approximateArrivalTimestamp"]) * 1000
        for record, rec in zip(event["Records"], records, strict=True)
        if (rec.shard_id, rec.sequence_number) not in redelivered
    )
    counts = summary["counts"]
    for name, metric in (
        ("received", "ReadingsReceived"),
        ("stored", "ReadingsStored"),
        ("quarantined", "ReadingsQuarantined"),
        ("quarantined_messages", "MessagesQuarantined"),
        ("duplicates", "Duplicates"),
        ("late", "LateReadings"),
        ("redelivered_records", "RedeliveredRecords"),
    ):
        metrics.add_metric(name=metric, unit=MetricUnit.Count, value=counts.get(name, 0))
    metrics.add_metric(name="AlertsRaised", unit=MetricUnit.Count, value=summary["alerts"])
    metrics.add_metric(name="BatchDurationMs", unit=MetricUnit.Milliseconds, value=summary["duration_ms"])
    logger.info("batch processed", extra=summary)
    return {"batchItemFailures": []}
