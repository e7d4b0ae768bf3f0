"""The load ledger: which lake objects of a partition the warehouse holds the rows of.

Place in the flow: the hourly load writes a partition's ledger once the warehouse holds its
rows (`steps.load_settled`); the compaction keeps it true when it gathers loaded objects into
parts (`compaction`); and every hourly run first looks back over the ledgers of the hours
before it for objects that arrived after their hour was loaded (`late_hours`): a gateway's late
delivery, a Kinesis retry after the run. Those hours are loaded again, and built, checked and
compacted again, by that run (`steps.run_step`), so a late reading reaches the marts by itself
instead of waiting for someone to notice and backfill.

One JSON document per partition, outside every table location and partitioned like it (so
retention forgets it with its partition): `ledger/raw/readings/dt=…/hour=…/loaded.json`,
`ledger/quarantine/…`, the sorted keys. A partition without one was never loaded by a run that
keeps ledgers, and is left to its own run.

Nothing lost, nothing doubled: the ledger is written after the warehouse commits, so a stop
between the two leaves keys out of it, and the hour is loaded again (a load is idempotent).
The compaction gathers only ledger keys, so a late object is never folded into a part
unloaded; it swaps the part for its inputs in the ledger before it deletes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from citypulse_batch.lake import LEDGER_PREFIX, Interval, Lake, partition_prefixes


def ledger_key(prefix: str) -> str:
    """The ledger of a partition prefix (`raw/readings/dt=…/hour=…/`)."""
    return f"{LEDGER_PREFIX}{prefix}loaded.json"


def loaded(lake: Lake, prefix: str) -> set[str] | None:
    """The partition's keys the warehouse holds the rows of; None when it has no ledger."""
    document = _document(lake, prefix)
    return None if document is None else set(document["keys"])


def record(lake: Lake, prefix: str, keys: Iterable[str], reloaded_by: str | None = None) -> None:
    """The warehouse now holds the rows of exactly these keys of the partition; `reloaded_by`:
    the run (its hour) that loaded the partition again as late, which a retry of that run's
    load must find again (`late_hours`)."""
    document: dict[str, Any] = {"keys": sorted(keys)}
    if reloaded_by is not None:
        document["reloaded_by"] = reloaded_by
    lake.write_json(ledger_key(prefix), document)


def _document(lake: Lake, prefix: str) -> dict[str, Any] | None:
    return lake.read_json(ledger_key(prefix))


def swap(lake: Lake, prefix: str, inputs: Iterable[str], parts: Iterable[str]) -> None:
    """The compaction's parts hold the rows of its inputs: the ledger names the parts instead.
    Idempotent (a settle repeats it); a partition without a ledger keeps none."""
    document = _document(lake, prefix)
    if document is not None:
        keys = (set(document["keys"]) - set(inputs)) | set(parts)
        record(lake, prefix, keys, document.get("reloaded_by"))


def late_hours(lake: Lake, interval: Interval, lookback_hours: int) -> list[datetime]:
    """The hours of the `lookback_hours` before `interval` that a run has loaded and whose
    partitions have gained objects since (not in their ledger), oldest first; and those this
    run (`interval`) loaded again already (a retry of its load: the later steps must still run
    for them). A committed compaction there is finished first, and the parts of one still being
    written (another run's, in a backfill) are not late objects."""
    from citypulse_batch.compaction import settle

    me = run_name(interval)
    late = []
    for n in range(lookback_hours, 0, -1):
        hour = interval.start - timedelta(hours=n)
        for prefix in partition_prefixes(Interval.hour(hour)):
            document = _document(lake, prefix)
            if document is None:
                continue
            if document.get("reloaded_by") == me:
                late.append(hour)
                break
            settled = settle(lake, prefix)
            if settled.done:
                document = _document(lake, prefix) or document
            present = set(lake.list_keys(prefix, ".parquet")) - settled.writing
            if not set(document["keys"]).issuperset(present):
                late.append(hour)
                break
    return late


def run_name(interval: Interval) -> str:
    """How a ledger names the run that loaded its partition again (`record`'s `reloaded_by`)."""
    return interval.to_json()["start"]
