"""`citypulse audit`: reconcile what the processor received with what the lake holds, for a time range.

Sources, each read independently of the others:

* the lake's raw Parquet (`raw/readings/`, partitioned by **event** time): readings stored,
  counted as distinct (`sensor_id`, `seq`) per sensor — a bisected retry may write a reading
  twice, the warehouse load dedupes it, and so does this count;
* the lake's quarantine Parquet (`quarantine/`, partitioned by **receive** time): readings
  and whole messages quarantined, by reason, deduplicated on their `source_id`
  (shard/sequence/index: one row per rejected item, however often its batch was retried);
* the processor's own counters (one DynamoDB item per zone and per shard, redelivery-proof):
  received, stored, duplicates absorbed, quarantined, late per zone, and duplicates and late
  per sensor (kept in the same item, so just as redelivery-proof; they sum to the zone's).

Per sensor the report gives received = stored + quarantined (by reason) + duplicates, and late.

What the processor does **not** keep: counters per time range (its counters are cumulative
since the platform started; per-sensor ones since the processor version that added them, so
a zone whose state predates it shows per-sensor sums below its zone counters). So the balance

    received == stored + duplicates + quarantined

is checked against the counters only when the range covers everything the lake holds
(`covers_all`); for a narrower range the report gives the lake's side per sensor and says
that the counters cannot be cut to it. The counters' own balance is checked per zone always.

Readings the processor stored again because they arrived beyond the dedupe window (a resend
more than 64 sequence numbers late: stored, counted late) are shown as `restored`: one more
store decision for a (`sensor_id`, `seq`) the lake already had (a different receive time).

A fourth source, when the platform has one: the **on-failure queue** (the event-source
mapping's destination for batches whose retries were exhausted). Each queued batch is read
back from the stream by its sequence range, and its readings not already in the lake are
counted per sensor as `dead_lettered` (by the rule's receive time). So during and after an
outage every reading is somewhere the report can see:

    published == stored + quarantined + dead_lettered   (per sensor)

and after `python -m infra.local.poller redrive` the dead-lettered readings move to stored or
quarantined. Whole records that cannot be read back into readings count as `dead_lettered`
of sensor `(none)`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streaming.processor.state import ZoneState

HOUR = timedelta(hours=1)
RAW_PREFIX = "raw/readings/"
QUARANTINE_PREFIX = "quarantine/"
NO_SENSOR = "(none)"
COUNTER_NAMES = ("received", "stored", "duplicates", "quarantined", "late", "quarantined_messages")


@dataclass
class SensorAudit:
    sensor_id: str
    zone_id: str | None = None
    stored: int = 0  # distinct (sensor_id, seq) in the lake in range
    restored: int = 0  # further store decisions for a seq already stored (beyond the dedupe window)
    lake_rows: int = 0  # raw rows, retry copies included
    quarantined: Counter[str] = field(default_factory=Counter)  # reason code → readings
    duplicates: int = 0  # the processor's per-sensor counter (all time)
    late: int = 0  # ... stored but left out of live aggregates (all time)
    dead_lettered: int = 0  # distinct readings on the on-failure queue, not in the lake

    @property
    def received_distinct(self) -> int:
        """Readings received once each (duplicates are not per sensor: see the zone rows),
        including those still on the on-failure queue."""
        return self.stored + self.restored + sum(self.quarantined.values()) + self.dead_lettered

    @property
    def received(self) -> int:
        """Every reading of this sensor the processor received: once each, plus its duplicates."""
        return self.received_distinct + self.duplicates


@dataclass
class ZoneAudit:
    zone_id: str
    counters: dict[str, int] = field(default_factory=dict)  # the processor's, all time
    lake_stored: int = 0
    lake_restored: int = 0
    lake_quarantined: int = 0  # readings
    lake_quarantined_messages: int = 0
    sensor_duplicates: int = 0  # the sum of its sensors' counters
    sensor_late: int = 0

    def counter(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def sensors_match_counters(self) -> bool:
        """The per-sensor counters add up to the zone's."""
        return self.sensor_duplicates == self.counter("duplicates") and self.sensor_late == self.counter("late")

    @property
    def counters_balance(self) -> bool:
        c = self.counter
        return c("received") == c("stored") + c("duplicates") + c("quarantined")

    @property
    def lake_matches_counters(self) -> bool:
        c = self.counter
        return (
            self.lake_stored + self.lake_restored == c("stored")
            and self.lake_quarantined == c("quarantined")
            and self.lake_quarantined_messages == c("quarantined_messages")
        )


@dataclass
class AuditReport:
    start: datetime
    end: datetime
    sensors: dict[str, SensorAudit]
    zones: dict[str, ZoneAudit]
    shard_counters: dict[str, int]  # messages no zone could be attributed to (all time)
    reasons: Counter[str]  # readings quarantined in range, by reason
    message_reasons: Counter[str]  # whole messages quarantined in range, by reason
    covers_all: bool  # every lake partition and row lies in [start, end)
    raw_files: int = 0
    quarantine_files: int = 0
    dead_letter_batches: int = 0  # messages on the on-failure queue (whole batches)
    dead_letter_records: int = 0  # Kinesis records in those batches

    # -- totals -----------------------------------------------------------------------

    def total(self, name: str) -> int:
        return sum(z.counter(name) for z in self.zones.values()) + (
            self.shard_counters.get(name, 0) if name == "quarantined_messages" else 0
        )

    @property
    def stored(self) -> int:
        return sum(s.stored for s in self.sensors.values())

    @property
    def restored(self) -> int:
        return sum(s.restored for s in self.sensors.values())

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    @property
    def quarantined_messages(self) -> int:
        return sum(self.message_reasons.values())

    @property
    def dead_lettered(self) -> int:
        return sum(s.dead_lettered for s in self.sensors.values())

    @property
    def counters_balance(self) -> bool:
        """The processor's counters: received == stored + duplicates + quarantined, every zone,
        and every zone's per-sensor duplicates and late add up to its own."""
        return all(z.counters_balance and z.sensors_match_counters for z in self.zones.values())

    @property
    def balanced(self) -> bool | None:
        """received (counters) == stored + duplicates (counters) + quarantined, with stored and
        quarantined read from the lake. None when the range does not cover the counters' span."""
        if not self.covers_all:
            return None
        return (
            self.counters_balance
            and self.total("received") == self.stored + self.restored + self.total("duplicates") + self.quarantined
            and self.total("stored") == self.stored + self.restored
            and self.total("quarantined") == self.quarantined
            and self.total("quarantined_messages") == self.quarantined_messages
        )


# -- reading the lake -------------------------------------------------------------------


def _partition_hour(key: str) -> datetime | None:
    """`.../dt=2026-11-23/hour=18/x.parquet` → 2026-11-23 18:00 UTC."""
    parts = dict(p.split("=", 1) for p in key.split("/") if p.startswith(("dt=", "hour=")))
    if "dt" not in parts or "hour" not in parts:
        return None
    return datetime.strptime(f"{parts['dt']} {parts['hour']}", "%Y-%m-%d %H").replace(tzinfo=UTC)


def _list(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", ()) if o["Key"].endswith(".parquet")]
    return sorted(keys)


def _read_range(s3: Any, bucket: str, prefix: str, start: datetime, end: datetime) -> tuple[Any, int, bool]:
    """Concatenated Parquet of the partitions overlapping [start, end); files read; and whether
    every partition under `prefix` lies inside the range (partition-level check)."""
    import pyarrow as pa

    from streaming.parquet import read_parquet

    tables, inside = [], True
    for key in _list(s3, bucket, prefix):
        hour = _partition_hour(key)
        if hour is None or hour + HOUR <= start or hour >= end:
            inside = False
            continue
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        tables.append(read_parquet(body))
    if not tables:
        return None, 0, inside
    return pa.concat_tables(tables, promote_options="default"), len(tables), inside


def _lake_side(s3: Any, bucket: str, start: datetime, end: datetime) -> dict[str, Any]:
    import duckdb

    raw, raw_files, raw_inside = _read_range(s3, bucket, RAW_PREFIX, start, end)
    quarantine, q_files, q_inside = _read_range(s3, bucket, QUARANTINE_PREFIX, start, end)
    con = duckdb.connect()
    con.execute("set TimeZone = 'UTC'")
    params = [start, end]
    out: dict[str, Any] = {"raw_files": raw_files, "quarantine_files": q_files, "rows_outside": 0}
    out["stored"] = []
    out["stored_keys"] = []
    if raw is not None:
        con.register("raw_all", raw)
        out["rows_outside"] += con.execute(
            "select count(*) from raw_all where not (ts >= ? and ts < ?)", params
        ).fetchone()[0]
        # One store decision = one (sensor, seq, receive time); retry copies share all three.
        out["stored"] = con.execute(
            """
            with decisions as (
                select distinct sensor_id, seq, received_at, zone_id from raw_all where ts >= ? and ts < ?
            ), rows as (select sensor_id, count(*) as n from raw_all where ts >= ? and ts < ? group by sensor_id)
            select d.sensor_id, any_value(d.zone_id), count(distinct d.seq), count(*) - count(distinct d.seq),
                   any_value(rows.n)
            from decisions d join rows using (sensor_id) group by d.sensor_id order by d.sensor_id
            """,
            params + params,
        ).fetchall()
        out["stored_keys"] = con.execute("select distinct sensor_id, seq from raw_all").fetchall()
    out["quarantined"] = []
    out["quarantined_sources"] = set()
    if quarantine is not None:
        con.register("q_all", quarantine)
        out["rows_outside"] += con.execute(
            "select count(*) from q_all where not (received_at >= ? and received_at < ?)", params
        ).fetchone()[0]
        # source_id = shard/sequence/index, index -1 for a whole message.
        out["quarantined"] = con.execute(
            """
            select coalesce(sensor_id, ?), zone_id, reason_code, source_id like '%/-1' as whole, count(*)
            from (select distinct on (source_id) * from q_all where received_at >= ? and received_at < ?)
            group by all order by all
            """,
            [NO_SENSOR, *params],
        ).fetchall()
        out["quarantined_sources"] = {row[0] for row in con.execute("select distinct source_id from q_all").fetchall()}
    out["covers_all"] = raw_inside and q_inside and out["rows_outside"] == 0
    return out


# -- the audit --------------------------------------------------------------------------


def _client(env: dict[str, str], service: str, endpoint_var: str) -> Any:
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    return session.client(service, endpoint_url=env.get(endpoint_var) or env.get("AWS_ENDPOINT_URL"))


def _clients(env: dict[str, str]) -> tuple[Any, Any]:
    return _client(env, "s3", "AWS_ENDPOINT_URL_S3"), _client(env, "dynamodb", "AWS_ENDPOINT_URL_DYNAMODB")


def _dead_letters(env: dict[str, str], start: datetime, end: datetime) -> tuple[int, int, list[tuple[Any, ...]]]:
    """(batches, records, readings) on the on-failure queue; a reading is (sensor_id, zone_id,
    seq, source_id), None where a record cannot be read into readings (its source_id then the
    whole message's, `<shard>/<sequence>/-1`, as quarantine names it). Filtered by receive time."""
    url = env.get("CITYPULSE_PROCESSOR_DLQ_URL")
    if not url:
        return 0, 0, []
    from infra.local.poller import dead_letters, read_range
    from streaming.contract import ContractError
    from streaming.processor.envelope import decode_envelope, parse_readings

    sqs = _client(env, "sqs", "AWS_ENDPOINT_URL_SQS")
    kinesis = _client(env, "kinesis", "AWS_ENDPOINT_URL_KINESIS")
    start_ms, end_ms = start.timestamp() * 1000, end.timestamp() * 1000
    batches = records = 0
    readings: list[tuple[Any, ...]] = []
    for payload, _ in dead_letters(sqs, url):
        b = payload["KinesisBatchInfo"]
        batches += 1
        stream = b["streamArn"].rsplit("/", 1)[-1]
        for r in read_range(kinesis, stream, b["shardId"], b["startSequenceNumber"], b["endSequenceNumber"]):
            records += 1
            source = f"{b['shardId']}/{r['SequenceNumber']}"
            try:
                envelope = decode_envelope(r["Data"])
                if not start_ms <= envelope.received_at_ms < end_ms:
                    continue
                raws, _sent = parse_readings(envelope)
            except ContractError:
                readings.append((None, None, None, f"{source}/-1"))
                continue
            for index, raw in enumerate(raws):
                sensor_id = raw.get("sensor_id") if isinstance(raw, dict) else None
                seq = raw.get("seq") if isinstance(raw, dict) else None
                readings.append(
                    (
                        sensor_id if isinstance(sensor_id, str) else None,
                        envelope.zone_id,
                        seq if type(seq) is int else None,
                        f"{source}/{index}",
                    )
                )
    return batches, records, readings


def dead_lettered(
    readings: Iterable[tuple[Any, ...]], stored_keys: Iterable[tuple[str, int]], quarantined_sources: set[str]
) -> Iterator[tuple[str | None, str | None]]:
    """(sensor_id, zone_id) of each reading on the on-failure queue that the lake does not
    already account for: not stored (its sensor and seq), not quarantined (its source id, or
    its whole message's: a batch writes its quarantine before its commit, so a batch that
    failed on every retry may have quarantined readings it then dead-lettered), and once if
    the queue holds it twice."""
    counted: set[tuple[str, int]] = set(stored_keys)
    for sensor_id, zone_id, seq, source in readings:
        if source in quarantined_sources or f"{source.rsplit('/', 1)[0]}/-1" in quarantined_sources:
            continue
        if seq is not None and sensor_id is not None:
            if (sensor_id, seq) in counted:
                continue  # already stored (or on the queue twice): once is enough
            counted.add((sensor_id, seq))
        yield sensor_id, zone_id


def run_audit(state_dir: Path, start: datetime, end: datetime) -> AuditReport:
    """Audit the running local platform in `state_dir` for [start, end) (UTC)."""
    from infra.local.platform import require_running
    from streaming.processor.store import StateStore

    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware (UTC)")
    if end <= start:
        raise ValueError("end must be after start")
    info = require_running(Path(state_dir))
    env = info.env
    s3, ddb = _clients(env)
    lake = _lake_side(s3, env["CITYPULSE_LAKE_BUCKET"], start, end)
    dl_batches, dl_records, dl_readings = _dead_letters(env, start, end)

    store = StateStore(ddb, env["CITYPULSE_PROCESSOR_STATE_TABLE"], env["CITYPULSE_ZONE_METRICS_TABLE"])
    states = store.scan_zone_states()
    zones = {z.zone_id: ZoneAudit(z.zone_id, dict(z.counters)) for z in states}
    shard_counters: Counter[str] = Counter()
    for shard in store.load_shard_counters(info.shards).values():
        shard_counters.update(shard.counters)

    def zone(zone_id: str | None) -> ZoneAudit:
        key = zone_id or NO_SENSOR
        return zones.setdefault(key, ZoneAudit(key))

    sensors: dict[str, SensorAudit] = {}
    for sensor_id, zone_id, stored, restored, rows in lake["stored"]:
        sensors[sensor_id] = SensorAudit(sensor_id, zone_id, stored, restored, rows)
        z = zone(zone_id)
        z.lake_stored += stored
        z.lake_restored += restored
    reasons: Counter[str] = Counter()
    message_reasons: Counter[str] = Counter()
    for sensor_id, zone_id, code, whole, n in lake["quarantined"]:
        if whole:
            message_reasons[code] += n
            if zone_id in zones:  # else counted by its shard, not a zone
                zones[zone_id].lake_quarantined_messages += n
            continue
        reasons[code] += n
        s = sensors.setdefault(sensor_id, SensorAudit(sensor_id, zone_id))
        s.quarantined[code] += n
        zone(zone_id).lake_quarantined += n
    for sensor_id, zone_id in dead_lettered(dl_readings, lake["stored_keys"], lake["quarantined_sources"]):
        key = sensor_id or NO_SENSOR
        sensors.setdefault(key, SensorAudit(key, zone_id)).dead_lettered += 1
    add_sensor_counters(states, zones, sensors)
    return AuditReport(
        start=start,
        end=end,
        sensors=sensors,
        zones=dict(sorted(zones.items())),
        shard_counters=dict(shard_counters),
        reasons=reasons,
        message_reasons=message_reasons,
        covers_all=lake["covers_all"],
        raw_files=lake["raw_files"],
        quarantine_files=lake["quarantine_files"],
        dead_letter_batches=dl_batches,
        dead_letter_records=dl_records,
    )


def add_sensor_counters(states: list[ZoneState], zones: dict[str, ZoneAudit], sensors: dict[str, SensorAudit]) -> None:
    """The processor's per-sensor duplicates and late into the sensor rows, and their sums into
    the zone rows (a sensor with neither and no lake row in range is not listed)."""
    for state in states:
        zone = zones[state.zone_id]
        for sensor_id, s in state.sensors.items():
            zone.sensor_duplicates += s.duplicates
            zone.sensor_late += s.late
            if s.duplicates or s.late or sensor_id in sensors:
                row = sensors.setdefault(sensor_id, SensorAudit(sensor_id, state.zone_id))
                row.duplicates, row.late = s.duplicates, s.late


def render(report: AuditReport, *, max_sensors: int = 20) -> str:
    r = report
    lines = [
        f"audit      {r.start:%Y-%m-%d %H:%M}Z .. {r.end:%Y-%m-%d %H:%M}Z: "
        f"{r.raw_files} raw and {r.quarantine_files} quarantine lake files",
        f"lake       stored={r.stored:,} (distinct sensor_id, seq)  quarantined={r.quarantined:,} readings, "
        f"{r.quarantined_messages:,} whole messages"
        + (f"  restored beyond window={r.restored:,}" if r.restored else ""),
    ]
    if r.dead_letter_batches:
        lines.append(
            f"on-failure {r.dead_letter_batches:,} batches ({r.dead_letter_records:,} records) on the queue: "
            f"{r.dead_lettered:,} readings not in the lake yet (`python -m infra.local.poller redrive`)"
        )
    if r.reasons:
        lines.append("           reading reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(r.reasons.items())))
    if r.message_reasons:
        lines.append(
            "           message reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(r.message_reasons.items()))
        )
    lines.append(
        f"counters   received={r.total('received'):,}  stored={r.total('stored'):,}  "
        f"duplicates={r.total('duplicates'):,}  quarantined={r.total('quarantined'):,}  late={r.total('late'):,}  "
        f"quarantined_messages={r.total('quarantined_messages'):,}  (processor, all time, per zone)"
    )
    lines.append(
        "           every zone: received == stored + duplicates + quarantined, and its sensors' duplicates "
        f"and late add up to its own: {r.counters_balance}"
    )
    if r.balanced is None:
        lines.append(
            "balance    not checked: the lake holds data outside this range and the processor's counters are "
            "not kept per time range (widen the range to cover everything)"
        )
    else:
        lines.append(
            f"balance    received {r.total('received'):,} == stored {r.stored + r.restored:,} (lake) + duplicates "
            f"{r.total('duplicates'):,} + quarantined {r.quarantined:,} (lake): {r.balanced}"
        )
        bad = [z.zone_id for z in r.zones.values() if not z.lake_matches_counters or not z.counters_balance]
        lines.append(f"           zones where lake and counters disagree: {', '.join(bad) if bad else 'none'}")
    lines.append(
        f"zones      {'zone':<10} {'received':>9} {'stored':>8} {'dup':>6} {'quar':>6} {'late':>6} {'msgs':>5}"
    )
    for z in r.zones.values():
        c = z.counter
        lines.append(
            f"           {z.zone_id:<10} {c('received'):>9,} {c('stored'):>8,} {c('duplicates'):>6,} "
            f"{c('quarantined'):>6,} {c('late'):>6,} {c('quarantined_messages'):>5,}"
        )
    shown = sorted(
        r.sensors.values(), key=lambda s: (-sum(s.quarantined.values()), -s.duplicates - s.late, s.sensor_id)
    )[:max_sensors]
    lines.append(
        f"sensors    {len(r.sensors):,} in range; {len(shown)} shown (most quarantined first); "
        "received = stored + quarantined + duplicates; late is part of stored"
    )
    for s in shown:
        why = ", ".join(f"{k}={v}" for k, v in sorted(s.quarantined.items()))
        lines.append(
            f"           {s.sensor_id:<14} {s.zone_id or '':<8} received={s.received:<5} stored={s.stored:<5}"
            + (f" duplicates={s.duplicates}" if s.duplicates else "")
            + (f" late={s.late}" if s.late else "")
            + (f" quarantined: {why}" if why else "")
            + (f" dead-lettered={s.dead_lettered}" if s.dead_lettered else "")
        )
    return "\n".join(lines)


# -- command line (wired into infra/local/cli.py) ---------------------------------------


def parse_time(text: str) -> datetime:
    """`2026-11-23T18:00`, `2026-11-23T18:00Z`, `2026-11-23` → an aware UTC datetime."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", type=parse_time, default=None, help="UTC, e.g. 2026-11-23T18:00 (default: all)")
    p.add_argument("--end", type=parse_time, default=None, help="UTC, exclusive (default: the end of the next hour)")
    p.add_argument("--sensors", type=int, default=20, help="how many sensors to list")


def cmd_audit(args: argparse.Namespace, state_dir: Path) -> int:
    start = args.start or datetime(1970, 1, 1, tzinfo=UTC)
    end = args.end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + 2 * HOUR
    report = run_audit(state_dir, start, end)
    print(render(report, max_sensors=args.sensors))
    return 0 if report.counters_balance and report.balanced is not False else 1
