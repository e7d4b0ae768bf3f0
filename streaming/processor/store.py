"""The processor's AWS side: load and save state in DynamoDB, land Parquet in the S3 lake,
publish alerts on EventBridge. Plain boto3; endpoints come from the environment
(`AWS_ENDPOINT_URL_<SERVICE>`), so the same code talks to AWS or to the local emulators.

Write order per batch is what makes a crash harmless: alerts, lake files and zone-minute
aggregates (at once, `run_all`), then the zone state (the commit point), then shard counters.
Anything written before a crash is either overwritten identically or skipped by a
marker when the batch is delivered again; alerts carry ids for consumers to drop repeats by.
Batch calls larger than one request (25 items a write, 100 keys a read) send their requests
at once too.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config

from streaming.contract import lake_arrow_schema, quarantine_arrow_schema
from streaming.processor.core import HOUR_MS, MINUTE_MS, Alert, LakeColumns, QuarantineColumns
from streaming.processor.state import MinuteAggregate, ShardCounters, ZoneState
from streaming.unprocessed import retry, until_processed

# Live zone-minute metrics are for dashboards and alerts; the lake and warehouse keep history.
METRICS_TTL_S = 7 * 24 * 3600
_KNOWN_ZONES_MAX = 4_096  # zone states a container remembers (StateStore._known)
# Minutes behind a zone's watermark whose aggregates a container holds (StateStore._held):
# beyond the allowed lateness (15 min by default) no reading adds to them. One held too briefly
# is only read again.
_HELD_MINUTES = 20
_T = TypeVar("_T")


def client_config(env: Mapping[str, str] = os.environ) -> Config:
    """The botocore config of every processor-side AWS client (processor and sweeper): `standard`
    retries — throttling and 5xx retried with exponential back-off and full jitter, under a retry
    quota — for `CITYPULSE_AWS_MAX_ATTEMPTS` total attempts (default 10). Not `adaptive`: its
    client-side rate limiter is per container, and the event-source mapping (or the next scheduled
    sweep) is already the outer back-off. Beyond these attempts a batch is reported failed
    (batchItemFailures), retried by the mapping, then sent to its on-failure destination.

    No client-side parameter validation: botocore walks every attribute of every item before
    sending it, 5-16 % of a load-shaped batch (`bench/handler_bench.py`, docs/performance.md
    "Load"). The services validate what they receive; a request they refuse fails the batch as
    one refused by botocore did."""
    attempts = int(env.get("CITYPULSE_AWS_MAX_ATTEMPTS", "10"))
    return Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},
        max_pool_connections=32,
        parameter_validation=False,
    )


def run_all(calls: Sequence[Callable[[], _T]], pool: Executor) -> list[_T]:
    """Run `calls` at once (the first on this thread, the others on `pool`) and return their
    results in order once all have ended. A failure is raised only then (the first one), so a
    failed batch leaves no request of its own in flight when its retry begins."""
    futures = [pool.submit(c) for c in calls[1:]]
    results: list[Any] = []
    error: BaseException | None = None
    if calls:
        try:
            results.append(calls[0]())
        except Exception as exc:
            error = exc
    for f in futures:
        exc = f.exception()
        if exc is None:
            results.append(f.result())
        elif error is None:
            error = exc
    if error is not None:
        raise error
    return results


def io_pool(name: str) -> ThreadPoolExecutor:
    """Threads for concurrent AWS requests (boto3 clients are thread-safe; the requests wait on
    the network, not on the interpreter). Eight keep well under the clients' 32 connections."""
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix=name)


def minute_bucket(minute: int) -> str:
    """Sort key of a zone-minute item: `m#2026-11-23T18:05`."""
    return "m#" + datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M")


def _n(value: float | int) -> dict[str, str]:
    # Kinesis sequence numbers have up to 56 digits, beyond DynamoDB's 38: markers are strings.
    return {"N": repr(value) if isinstance(value, float) else str(value)}


@dataclass
class StateStore:
    """DynamoDB tables: `processor_table` (pk/sk: zone state, shard counters) and
    `metrics_table` (zone_id/bucket: zone-minute aggregates)."""

    dynamodb: Any
    processor_table: str
    metrics_table: str
    # zone → (the state blob this container last saved or parsed, and its ZoneState). A blob
    # read back unchanged (no other writer since: the sweeper's writes change it) is that state,
    # so its parse is skipped: the core never modifies the states it is given. `ZoneState`
    # serialises deterministically and losslessly, so equal bytes mean an equal state.
    _known: dict[str, tuple[bytes, ZoneState]] = field(default_factory=dict, repr=False)
    # zone → minute → its zone-minute aggregate as the metrics table holds it while the zone's
    # state is `_known`'s blob: what this container wrote or read for it in the batches it
    # committed. Such a minute is not read again (`load_zones`). Only a writer that also commits
    # the zone's state can change them: the processor of the zone's shard, one invocation at a
    # time (another container's commit changes the blob, and the zone's minutes are forgotten);
    # the sweeper writes states only. What an invocation that failed wrote before its commit
    # point, its retry writes again from these.
    _held: dict[str, dict[int, MinuteAggregate]] = field(default_factory=dict, repr=False)
    # The requests of one batch call, sent at once (`run_all`).
    _pool: ThreadPoolExecutor = field(default_factory=lambda: io_pool("dynamodb"), init=False, repr=False)

    # -- reads ------------------------------------------------------------------------

    def _batch_get(self, table: str, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        chunks = [{"Keys": keys[start : start + 100], "ConsistentRead": True} for start in range(0, len(keys), 100)]
        calls = [partial(self._until_processed, "batch_get_item", table, chunk) for chunk in chunks]
        return [item for items in run_all(calls, self._pool) for item in items]

    def _until_processed(self, operation: str, table: str, request: Any) -> list[dict[str, Any]]:
        return until_processed(self.dynamodb, operation, table, request)

    def load_zones(
        self, zone_ids: Iterable[str], minute_keys: Iterable[tuple[str, int]]
    ) -> tuple[dict[str, ZoneState], dict[tuple[str, int], MinuteAggregate]]:
        """The zones' states and the stored aggregates of the zone-minutes a batch adds to. A
        zone-minute this container holds (`_held`) is not read, unless the zone's state read back
        is not the one it knew: then another writer has committed the zone since, and its held
        minutes are read again, after the states. The others are read beside the states."""
        keys = set(minute_keys)
        held = {(z, m): self._held[z][m] for z, m in keys if m in self._held.get(z, ())}
        states, minutes = run_all(
            [partial(self.load_zone_states, zone_ids), partial(self.load_minutes, keys - held.keys())], self._pool
        )
        # `_state_of` forgets the minutes of a zone whose state it did not know.
        stale = {(z, m) for z, m in held if z not in self._held}
        if stale:
            minutes.update(self.load_minutes(stale))
        minutes.update((k, agg) for k, agg in held.items() if k not in stale)
        return states, minutes

    def load_zone_states(self, zone_ids: Iterable[str]) -> dict[str, ZoneState]:
        keys = [{"pk": {"S": f"zone#{z}"}, "sk": {"S": "state"}} for z in zone_ids]
        out = {}
        for item in self._batch_get(self.processor_table, keys):
            state = self._state_of(item["state"]["B"], item["pk"]["S"].removeprefix("zone#"))
            out[state.zone_id] = state
        return out

    def _state_of(self, blob: bytes, zone_id: str) -> ZoneState:
        """The ZoneState of a stored blob: the one it was made from when this container saved (or
        parsed) exactly these bytes last, else parsed (~0.8 us a sensor) and remembered."""
        known = self._known.get(zone_id)
        if known is not None and known[0] == blob:
            return known[1]
        state = ZoneState.from_bytes(blob)
        self._remember(zone_id, blob, state)
        self._held.pop(zone_id, None)  # written by another writer: its minutes too, maybe
        return state

    def _remember(self, zone_id: str, blob: bytes, state: ZoneState) -> None:
        if len(self._known) >= _KNOWN_ZONES_MAX and zone_id not in self._known:
            self._known.clear()  # a container meets its shards' zones; bounded all the same
            self._held.clear()
        self._known[zone_id] = (blob, state)

    def forget(self, zone_ids: Iterable[str]) -> None:
        """Forget what is held of these zones (a batch of theirs failed): read them afresh."""
        for zone_id in zone_ids:
            self._known.pop(zone_id, None)
            self._held.pop(zone_id, None)

    def load_shard_counters(self, shard_ids: Iterable[str]) -> dict[str, ShardCounters]:
        keys = [{"pk": {"S": f"shard#{s}"}, "sk": {"S": "counters"}} for s in shard_ids]
        out: dict[str, ShardCounters] = {}
        for item in self._batch_get(self.processor_table, keys):
            shard_id = item["pk"]["S"].removeprefix("shard#")
            counters = {k: int(v["N"]) for k, v in item.get("counters", {}).get("M", {}).items()}
            out[shard_id] = ShardCounters(shard_id, int(item["marker_seq"]["S"]), counters)
        return out

    def load_minutes(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], MinuteAggregate]:
        by_bucket = {(zone, minute_bucket(minute)): (zone, minute) for zone, minute in keys}
        request = [{"zone_id": {"S": z}, "bucket": {"S": b}} for z, b in by_bucket]
        out: dict[tuple[str, int], MinuteAggregate] = {}
        for item in self._batch_get(self.metrics_table, request):
            key = by_bucket[(item["zone_id"]["S"], item["bucket"]["S"])]
            out[key] = MinuteAggregate(
                readings=int(item["readings"]["N"]),
                vehicles=int(item["vehicles"]["N"]),
                speed_sum=float(item["speed_sum"]["N"]),
                speed_n=int(item["speed_n"]["N"]),
                occupancy_sum=float(item["occupancy_sum"]["N"]),
                occupancy_n=int(item["occupancy_n"]["N"]),
                congestion_sum=float(item["congestion_sum"]["N"]),
                marker_shard=item["marker_shard"]["S"],
                marker_seq=int(item["marker_seq"]["S"]),
            )
        return out

    # -- writes -----------------------------------------------------------------------

    def _batch_write(self, table: str, items: list[dict[str, Any]]) -> None:
        puts = [{"PutRequest": {"Item": i}} for i in items]
        chunks = [puts[start : start + 25] for start in range(0, len(puts), 25)]
        run_all([partial(self._until_processed, "batch_write_item", table, chunk) for chunk in chunks], self._pool)

    def save_minutes(self, minutes: Mapping[tuple[str, int], MinuteAggregate]) -> None:
        items = []
        for (zone, minute), a in minutes.items():
            items.append(
                {
                    "zone_id": {"S": zone},
                    "bucket": {"S": minute_bucket(minute)},
                    "minute_start": _n(minute * MINUTE_MS),
                    "readings": _n(a.readings),
                    "vehicles": _n(a.vehicles),
                    "speed_sum": _n(a.speed_sum),
                    "speed_n": _n(a.speed_n),
                    "occupancy_sum": _n(a.occupancy_sum),
                    "occupancy_n": _n(a.occupancy_n),
                    "congestion_sum": _n(a.congestion_sum),
                    "marker_shard": {"S": a.marker_shard or ""},
                    "marker_seq": {"S": str(a.marker_seq)},
                    "expires_at": _n(minute * 60 + METRICS_TTL_S),
                }
            )
        self._batch_write(self.metrics_table, items)

    def save_zone_states(
        self,
        states: Mapping[str, ZoneState],
        now_ms: int,
        minutes: Mapping[tuple[str, int], MinuteAggregate],
        received_through: int,
    ) -> None:
        """The commit point: the zones' states, each item one write. `minutes`: the batch's
        zone-minute aggregates as the metrics table now holds them (those it read, those it
        wrote), held from here on for the committed zones (`load_zones`). `now_ms` and
        `received_through`: the commit's clock and the batch's newest receive time (`zone_state_item`)."""
        blobs = {zone: s.to_bytes() for zone, s in states.items()}
        items = [zone_state_item(s, blobs[zone], now_ms, received_through) for zone, s in states.items()]
        self._batch_write(self.processor_table, items)
        for zone, s in states.items():
            self._remember(zone, blobs[zone], s)
        for (zone, minute), agg in minutes.items():
            if zone in states:
                self._held.setdefault(zone, {})[minute] = agg
        for zone, s in states.items():  # a zone's minutes older than any it still aggregates
            held = self._held.get(zone)
            if held is not None:
                oldest = s.watermark_ms // MINUTE_MS - _HELD_MINUTES
                for minute in [m for m in held if m < oldest]:
                    del held[minute]

    def save_shard_counters(self, counters: Mapping[str, ShardCounters]) -> None:
        items = [
            {
                "pk": {"S": f"shard#{shard}"},
                "sk": {"S": "counters"},
                "marker_seq": {"S": str(c.marker_seq)},
                "counters": {"M": {k: _n(v) for k, v in c.counters.items()}},
            }
            for shard, c in counters.items()
        ]
        self._batch_write(self.processor_table, items)

    def scan_zone_states(self) -> list[ZoneState]:
        """Every zone's state (dashboards and the accounting report; not on the hot path)."""
        paginator = self.dynamodb.get_paginator("scan")
        out = []
        for page in paginator.paginate(TableName=self.processor_table):
            out.extend(ZoneState.from_bytes(i["state"]["B"]) for i in page["Items"] if i["sk"]["S"] == "state")
        return out


def zone_state_item(state: ZoneState, blob: bytes, now_ms: int, received_through: int) -> dict[str, Any]:
    """A zone's item in the processor table: its state (`blob`, `state.to_bytes()`), and beside it
    what the sweeper's conditional write and the operators read without parsing it. `now_ms`:
    the commit's clock; `received_through`: the newest receive time of the committing batch
    (0: unknown), so the commit's clock less it is the processor's lag behind the street."""
    item = {
        "pk": {"S": f"zone#{state.zone_id}"},
        "sk": {"S": "state"},
        "zone_id": {"S": state.zone_id},
        "state": {"B": blob},
        "congested": {"BOOL": state.congestion.congested},
        "marker_seq": {"S": str(state.marker_seq)},
        "updated_at": _n(now_ms),
    }
    if received_through:
        item["received_through"] = _n(received_through)
    return item


def zone_set_tag(zone_ids: Iterable[str | None]) -> str:
    """A short stable name of a set of zones (None: records no zone claims).

    A lake object is named after its batch and this set. A retry of the same records writes
    the same object again only when it holds the same zones: if some of the batch's zones
    committed before the batch failed, the retry skips them and holds fewer, and must not
    replace the object that holds their rows; it lands beside it (raw duplicates, which the
    warehouse load drops and counts)."""
    names = sorted({z or "" for z in zone_ids})
    return hashlib.blake2b("\n".join(names).encode(), digest_size=4).hexdigest()


def _hour_path(hour: int) -> str:
    t = datetime.fromtimestamp(hour * HOUR_MS / 1000, UTC)
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


@dataclass
class LakeWriter:
    """Parquet files in the lake: one per event-time hour per batch, named after the
    batch's shard and sequence range so that a retried batch overwrites its own file."""

    s3: Any
    bucket: str

    def _put(self, key: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=buf.getvalue())

    def write_readings(self, by_hour: Mapping[int, LakeColumns], batch_name: str) -> list[str]:
        return self._write_hours("raw/readings", lake_arrow_schema(), by_hour, batch_name)

    def write_quarantine(self, by_hour: Mapping[int, QuarantineColumns], batch_name: str) -> list[str]:
        return self._write_hours("quarantine", quarantine_arrow_schema(), by_hour, batch_name)

    def _write_hours(
        self, prefix: str, schema: pa.Schema, by_hour: Mapping[int, LakeColumns | QuarantineColumns], batch_name: str
    ) -> list[str]:
        """One Parquet object per hour that has rows, `<prefix>/dt=/hour=/<batch>-<zones>.parquet`;
        their keys. `<zones>` names the set of zones whose rows the object holds (`zone_set_tag`)."""
        keys = []
        for hour, cols in by_hour.items():
            if len(cols):
                key = f"{prefix}/{_hour_path(hour)}/{batch_name}-{zone_set_tag(cols.zone_ids)}.parquet"
                self._put(key, pa.Table.from_pydict(cols.columns, schema=schema))
                keys.append(key)
        return keys

    def read_bytes(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@dataclass
class AlertPublisher:
    """Alerts on the EventBridge bus; rules there fan out to SNS, Slack and the alert feed."""

    events: Any
    bus_name: str
    source: str = "citypulse.processor"

    def publish(self, alerts: list[Alert]) -> None:
        for start in range(0, len(alerts), 10):
            entries = [
                {
                    "Source": self.source,
                    "DetailType": a.detail_type,
                    "Detail": orjson.dumps({**a.detail, "event_id": a.event_id}).decode(),
                    "EventBusName": self.bus_name,
                }
                for a in alerts[start : start + 10]
            ]
            pending = entries

            def call() -> bool | None:
                nonlocal pending
                resp = self.events.put_events(Entries=pending)
                if not resp.get("FailedEntryCount"):
                    return True
                pending = [e for e, r in zip(pending, resp["Entries"], strict=True) if r.get("ErrorCode")]
                return None

            retry(call, "PutEvents")
