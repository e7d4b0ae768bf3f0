"""`citypulse demo`: the platform's main job, end to end on one machine.

Start the local platform, play one city-hour of simulated traffic through the real flow
(devices → MQTT/mTLS → rule → Kinesis → processor → DynamoDB + lake → EventBridge),
wait until every reading is accounted for, run the hourly Airflow DAG for that hour
(Glue crawler → warehouse load → dbt → Great Expectations → publish), then the daily DAG
for its day (daily marts, retention, dbt docs and Great Expectations data docs), and print
what happened. The platform is left running for inspection; `citypulse down` stops it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra.local.platform import PlatformInfo, demo_city, gateway_connector, up

HOUR_MS = 3_600_000


@dataclass
class Accounting:
    """Per-reading counts from the processor's own (redelivery-proof) counters."""

    received: int = 0
    stored: int = 0
    quarantined: int = 0
    duplicates: int = 0
    late: int = 0
    quarantined_messages: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def read_accounting() -> Accounting:
    """Sum the counters kept in every zone's state and every shard's counter item."""
    import boto3

    from streaming.processor.store import StateStore

    store = StateStore(
        boto3.client("dynamodb"),
        os.environ["CITYPULSE_PROCESSOR_STATE_TABLE"],
        os.environ["CITYPULSE_ZONE_METRICS_TABLE"],
    )
    totals: dict[str, int] = {}
    for zone in store.scan_zone_states():
        for k, v in zone.counters.items():
            totals[k] = totals.get(k, 0) + v
    for shard in store.load_shard_counters(_shards()).values():
        for k, v in shard.counters.items():
            totals[k] = totals.get(k, 0) + v
    return Accounting(
        received=totals.get("received", 0),
        stored=totals.get("stored", 0),
        quarantined=totals.get("quarantined", 0),
        duplicates=totals.get("duplicates", 0),
        late=totals.get("late", 0),
        quarantined_messages=totals.get("quarantined_messages", 0),
        reasons={
            k.removeprefix("quarantined_"): v
            for k, v in sorted(totals.items())
            if k.startswith("quarantined_") and k != "quarantined_messages"
        },
    )


def _shards() -> list[str]:
    import boto3

    stream = os.environ["CITYPULSE_STREAM"]
    return [s["ShardId"] for s in boto3.client("kinesis").list_shards(StreamName=stream)["Shards"]]


def wait_until_accounted(
    expected: int, timeout: float, echo: Callable[[str], None], *, received: int = 0
) -> Accounting:
    """Poll the processor's counters until it has stored or quarantined `expected` readings
    (every distinct reading sent, and what it had before) and, when the copies sent are known,
    received `received` (readings and copies), or time runs out. Not `received` alone: it also
    counts the copies a device sent again, which would end the wait while as many distinct
    readings were still on their way."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        acc = read_accounting()
        done = acc.stored + acc.quarantined
        if done != last:
            echo(f"  processor has stored or quarantined {done:,} of {expected:,} readings")
            last = done
        if (done >= expected and acc.received >= received) or time.monotonic() > deadline:
            return acc
        time.sleep(1.0)  # polling another process's progress; there is no event to wait on


def batch_log_entries(log_dir: Path, since: dict[Path, int] | None = None) -> Iterator[dict[str, Any]]:
    """The processor's "batch processed" log entries, from every poller's log; `since` gives a
    byte offset per log file to start from (a run against a running platform)."""
    for path in log_dir.glob("poller-*.log"):
        with open(path, "rb") as f:
            f.seek((since or {}).get(path, 0))
            for line in f:
                if b'"batch processed"' in line:
                    yield orjson.loads(line)


def latency_percentiles(
    log_dir: Path, since: dict[Path, int] | None = None, histogram: str = "latency_ms_histogram"
) -> dict[str, float]:
    """Publish → committed-to-live-store latency, merged from the processor's per-batch
    histograms in its logs (what CloudWatch would aggregate from the EMF metrics); with
    `histogram="stream_ms_histogram"`, from each message's arrival in the stream instead. A
    percentile in the histogram's last bucket, past its last bound, is infinity ("over 60 s",
    `latency_text`), not the bucket's label."""
    hist: dict[int, int] = {}
    for entry in batch_log_entries(log_dir, since):
        for bucket, count in entry.get(histogram, {}).items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + count
    total = sum(hist.values())
    out: dict[str, float] = {"messages": float(total)}
    if not total:
        return out
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        seen = 0
        for bucket in sorted(hist):
            seen += hist[bucket]
            if seen >= q * total:
                out[name] = bucket / 1000 if bucket <= _last_bucket_ms() else math.inf
                break
    return out


def latency_text(seconds: float) -> str:
    """A percentile of `latency_percentiles` for people: "1.25 s", or "> 60 s" past the histogram."""
    return f"{seconds:.2f} s" if math.isfinite(seconds) else f"> {_last_bucket_ms() // 1000} s"


def _last_bucket_ms() -> int:
    """The processor's last latency bucket bound; imported when needed, not with this module
    (the handler brings its clients, Powertools and pyarrow: ~0.4 s)."""
    from streaming.processor.handler import LATENCY_BUCKETS_MS

    return LATENCY_BUCKETS_MS[-1]


def read_alert_feed(max_wait_s: float = 5.0) -> dict[str, int]:
    """Count the alerts that reached the alert-feed queue through the EventBridge rule."""
    import boto3

    sqs = boto3.client("sqs")
    url = os.environ["CITYPULSE_ALERT_FEED_QUEUE_URL"]
    counts: dict[str, int] = {}
    seen: set[str] = set()
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, VisibilityTimeout=60)
        messages = resp.get("Messages", [])
        if not messages and seen:
            break
        for m in messages:
            if m["MessageId"] in seen:
                continue
            seen.add(m["MessageId"])
            event = orjson.loads(m["Body"])
            counts[event.get("detail-type", "?")] = counts.get(event.get("detail-type", "?"), 0) + 1
    return counts


@dataclass
class DemoResult:
    sensors: int
    hour_start_ms: int
    simulation: Any
    accounting: Accounting
    latency: dict[str, float]
    alerts: dict[str, int]
    dag: Any
    daily: Any
    seconds: float
    info: PlatformInfo

    @property
    def balanced(self) -> bool:
        sim, acc = self.simulation, self.accounting
        return (
            sim.readings == acc.stored + acc.quarantined
            and acc.received == sim.readings + sim.duplicate_readings
            and acc.duplicates == sim.duplicate_readings
        )

    @property
    def ok(self) -> bool:
        return (
            self.balanced
            and self.dag is not None
            and self.dag.succeeded
            and self.daily is not None
            and self.daily.succeeded
        )


def run_demo(
    state_dir: Path,
    *,
    sensors: int,
    duration_s: float,
    seed: int,
    echo: Callable[[str], None] = print,
    drain_timeout_s: float = 180.0,
) -> DemoResult:
    """The main job. Raises PlatformError if the platform cannot start."""
    from infra.local.airflow import run_daily, run_hourly
    from streaming.devices.simulator import run_simulation
    from streaming.devices.traffic import TrafficModel

    started = time.monotonic()
    echo(f"citypulse demo: {sensors:,} sensors, one city-hour in {duration_s:.0f} s, seed {seed}")
    echo("starting the local platform")
    info = up(state_dir, sensors=sensors, seed=seed, fresh=True, echo=echo)
    os.environ.update(info.env)
    city = demo_city(sensors, seed)
    hour_start = (int(time.time() * 1000) // HOUR_MS - 1) * HOUR_MS
    model = TrafficModel.with_random_incidents(city, seed, hour_start, 60)
    # Basic Ingest: messages go straight to the rule (no IoT Core messaging charge in AWS).
    connect = gateway_connector(info.env, basic_ingest_rule=info.env["CITYPULSE_TOPIC_RULE"])

    def progress(minute: int, sim: Any) -> None:
        if minute % 10 == 9 or minute == 0:
            echo(
                f"  simulated {minute + 1:2d} of 60 minutes: {sim.readings:,} readings in {sim.messages:,} "
                f"gateway messages ({sim.duplicate_messages} resent)"
            )

    hour_label = time.strftime("%Y-%m-%d %H:00 UTC", time.gmtime(hour_start / 1000))
    echo(f"publishing the city-hour {hour_label} from {len(city.gateways())} gateways over MQTT + mutual TLS")
    sim = run_simulation(model, 60, duration_s, connect, on_minute=progress)
    echo("waiting until the processor has accounted for every reading")
    acc = wait_until_accounted(sim.readings, drain_timeout_s, echo, received=sim.readings + sim.duplicate_readings)

    echo(f"running the hourly Airflow DAG for {hour_label}")
    from datetime import UTC, datetime

    hour = datetime.fromtimestamp(hour_start / 1000, UTC)
    dag = run_hourly(hour, info.env, state_dir / "airflow")
    echo(f"running the daily Airflow DAG for {hour:%Y-%m-%d} (daily marts, dbt docs, data docs)")
    daily = run_daily(hour.date(), info.env, state_dir / "airflow")
    return DemoResult(
        sensors=sensors,
        hour_start_ms=hour_start,
        simulation=sim,
        accounting=acc,
        latency=latency_percentiles(state_dir / "logs"),
        alerts=read_alert_feed(),
        dag=dag,
        daily=daily,
        seconds=time.monotonic() - started,
        info=info,
    )


def _dag_lines(run: Any) -> list[str]:
    failed = sorted(t for t, state in run.task_states.items() if state in ("failed", "upstream_failed"))
    done = sum(1 for state in run.task_states.values() if state == "success")
    lines = [
        f"dag        citypulse_hourly {run.interval_start:%Y-%m-%d %H:%M}Z: {run.state} in {run.seconds:.0f} s "
        f"({done} tasks succeeded, {len(run.task_states) - done - len(failed)} skipped"
        + (f", failed: {', '.join(failed)})" if failed else ")")
    ]
    steps = (run.report or {}).get("steps", {})
    if load := steps.get("load"):
        lines.append(
            f"warehouse  {load['engine']}: {load['rows_loaded']:,} rows loaded from {load['reading_files']} "
            f"lake files ({load['duplicates_dropped']} duplicates dropped), {load['sensors']:,} sensors"
        )
    if dbt := steps.get("dbt"):
        lines.append(
            f"dbt        target {dbt['target']}: models {dbt['models_passed']} passed, {dbt['models_failed']} "
            f"failed; tests {dbt['tests_passed']} passed, {dbt['tests_failed']} failed"
        )
    if gx := steps.get("expectations"):
        lines.append(
            f"checks     Great Expectations suite {gx['suite']}: {gx['passed']} of {gx['evaluated']} "
            f"expectations passed on {gx['rows']:,} rows"
        )
    if recon := steps.get("reconciliation"):
        lines.append(
            f"           marts reconciled with raw ({recon['suite']}): {recon['passed']} of "
            f"{recon['evaluated']} expectations passed (totals per mart, no gaps in the zone time spine)"
        )
    if compaction := steps.get("compaction"):
        lines.append(
            f"lake       compacted: {compaction['objects_before']:,} objects -> {compaction['objects_after']:,} "
            f"({compaction['rows_rewritten']:,} rows rewritten; readings and quarantine partitions of the hour)"
            + (f"; left whole: {', '.join(compaction['skipped'])}" if compaction.get("skipped") else "")
        )
    return lines


def _daily_lines(run: Any) -> list[str]:
    failed = sorted(t for t, state in run.task_states.items() if state in ("failed", "upstream_failed"))
    lines = [
        f"daily      citypulse_daily {run.day:%Y-%m-%d}: {run.state} in {run.seconds:.0f} s"
        + (f" (failed: {', '.join(failed)})" if failed else "")
    ]
    if build := run.summaries.get("dbt_build_daily"):
        lines.append(
            f"           daily marts: models {build['models_passed']} passed, {build['models_failed']} failed; "
            f"tests {build['tests_passed']} passed, {build['tests_failed']} failed"
        )
    docs = run.summaries.get("data_docs") or {}
    lines += [
        f"docs       dbt docs: {run.dbt_docs}" + ("" if run.dbt_docs.is_file() else " (not written)"),
        f"           Great Expectations data docs: {run.data_docs}"
        + (f" ({docs['validation_pages']} validation results)" if docs else " (not written)"),
    ]
    return lines


def render_summary(r: DemoResult, state_dir: Path) -> str:
    sim, acc = r.simulation, r.accounting
    lines = ["", "=" * 72, "citypulse demo summary", "=" * 72]
    lines += [
        f"readings   published={sim.readings:,}  stored={acc.stored:,}  quarantined={acc.quarantined:,}  "
        f"duplicates={acc.duplicates:,}",
        f"           published == stored + quarantined: {sim.readings == acc.stored + acc.quarantined}"
        f"   (resent by devices: {sim.duplicate_readings:,}; late: {acc.late:,})",
    ]
    if acc.reasons:
        lines.append("           quarantine reasons: " + ", ".join(f"{k}={v}" for k, v in acc.reasons.items()))
    lat = r.latency
    if "p50" in lat:
        lines.append(
            f"latency    publish -> queryable in the live store: p50 {latency_text(lat['p50'])}, "
            f"p99 {latency_text(lat['p99'])} over {int(lat['messages']):,} gateway messages"
        )
    alerts = ", ".join(f"{k}={v}" for k, v in sorted(r.alerts.items())) or "none"
    lines.append(f"alerts     delivered through EventBridge to the alert feed: {alerts}")
    if r.dag is not None:
        lines += _dag_lines(r.dag)
    if r.daily is not None:
        lines += _daily_lines(r.daily)
    lines += [
        f"platform   still running for inspection (state in {state_dir}); stop it with `citypulse down`",
        f"           AWS emulator {r.info.endpoints.get('ministack')}, MQTT {r.info.endpoints.get('mqtt')}",
        f"finished   in {r.seconds:.0f} s: {'OK' if r.ok else 'NOT OK'}",
    ]
    return "\n".join(lines)
