"""Lake compaction: an hour partition's many small Parquet objects gathered into a few large ones.

Place in the flow: the hourly DAG's `compact_lake` task, once `load_warehouse` holds the
interval, beside `dbt_build` (it reads and writes the lake only). The processor lands one
object per shard, batch and hour (`streaming.processor.store.LakeWriter`): thousands a
partition an hour in AWS, where the Glue crawler, Athena and Redshift COPY pay per object.
Afterwards a partition of `raw/readings/` or `quarantine/` holds one object per
`TARGET_BYTES` of what it held, named `compacted-<generation>-<part>-of-<parts>.parquet`, its
rows as they were: raw duplicates stay, and the warehouse load drops and counts them alike
before and after.

Nothing lost, nothing doubled, wherever a run stops. A run is a *generation* (a random name),
with a manifest outside every table location (`compaction/<partition>/<generation>.json`):

1. the manifest is written, `writing`, with the inputs and the parts to come;
2. each part is written to local disk, its rows checked against its inputs' footers, uploaded;
3. the manifest turns `written`: the commit point;
4. the partition's load ledger names the parts instead of the inputs (`citypulse_batch.ledger`),
   then the inputs are deleted (but one written again since the listing: its ETag changed, so
   it is kept, out of the ledger, for its hour to be loaded again), then the manifest.

Every run, and every load, first settles what others left (`settle`): a `written` generation's
step 4 is done; a `writing` one's parts are deleted (its inputs are all still there) when the
run that wrote it is the one settling (its task's retry: the attempt before was stopped) or
once it is older than `STALE_AFTER_MS`, so that a stopped run's work is undone but a live
one's is not: runs overlap (a backfill's runs, the run of an hour beside a later hour's run
that loads it again), and a run cannot tell another's generation being written from one
stopped. Until then its parts are no rows for anyone (`settle` names them; loads and look
backs leave them out), and a run that would compact the partition leaves it to the live one.
Two runs that settle one partition at the same moment see no generation of the other's: the
partition's *lease* decides between them. A run takes it once it has settled
(`compaction/<partition>/lease`, an S3 conditional write that fails if the object exists)
before it lists anything, and gives it back when it is done or has failed (a delete
conditional on the ETag it wrote, so it never removes another run's); a run that cannot take
it leaves the partition to the one that did. A lease left by a stopped run is given back by
the settle that finishes or undoes its generation, by its own task's retry, or by anyone
once it is older than `STALE_AFTER_MS`.

Only objects the ledger says the warehouse holds are inputs: one that arrived after the load
(a late reading) stays as it is until a later run loads its hour again (`ledger.late_hours`),
and is gathered then. Between steps 3 and 4 a reader listing the partition sees the inputs'
rows twice; a load settles the partition before it reads, and would drop them as duplicates
anyway. A batch the processor writes again after its object was compacted (a Kinesis retry
long after the first delivery) lands beside the part, is loaded with its hour again and
gathered then: raw duplicates in the lake, as a bisected retry leaves, which the load drops
and counts.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from citypulse_batch import ledger
from citypulse_batch.lake import COMPACTION_PREFIX, Lake

COMPACTED = "compacted-"
# Input bytes a part gathers: parts of ~200 MB of zstd Parquet, within the 128 MB-1 GB that
# Athena and Redshift Spectrum read best. A part below half of it is gathered again with the
# newcomers; a larger one is left as it is.
TARGET_BYTES = 256 * 2**20
ROW_GROUP_ROWS = 2**20  # rows a row group holds (the processor's files hold a batch's)
# A `writing` generation this old was stopped (the compaction task's timeout is 30 minutes):
# younger, it may be another run's, still at work.
STALE_AFTER_MS = 2 * 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


class CompactionError(RuntimeError):
    """A partition that cannot be compacted as it is: nothing of it was changed."""


@dataclass(slots=True)
class PartitionCompaction:
    """What one partition held before and after, and what was settled of an earlier run."""

    prefix: str
    objects_before: int = 0
    objects_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rows_rewritten: int = 0
    settled: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the partition was left as it is (`CompactionError`, another run)

    def holding(self, objects: Sequence[tuple[str, int]]) -> PartitionCompaction:
        """Before and after: `objects` (key, size), as the partition holds them until a
        compaction of it commits."""
        self.objects_before = self.objects_after = len(objects)
        self.bytes_before = self.bytes_after = sum(size for _, size in objects)
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def manifest_prefix(prefix: str) -> str:
    """Where a partition's manifests are kept: beside it, outside the table's location."""
    return COMPACTION_PREFIX + prefix


def lease_key(prefix: str) -> str:
    """The partition's lease: held by the one run compacting it (no `.json`: not a manifest)."""
    return manifest_prefix(prefix) + "lease"


# What S3 answers a conditional request whose condition does not hold: 412; 409 when another
# conditional write of the key is under way; 404 for a conditional delete of no object.
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"}


@dataclass(frozen=True, slots=True)
class Lease:
    """A partition's lease as its holder wrote it, and the ETag that version has."""

    etag: str
    generation: str
    owner: str | None
    started_ms: int


def _take_lease(lake: Lake, prefix: str, generation: str, owner: str | None) -> Lease | None:
    """The partition's lease for this run, or None if another run holds it."""
    lease = {"generation": generation, "owner": owner, "started_ms": now_ms()}
    try:
        put = lake.client.put_object(
            Bucket=lake.bucket, Key=lease_key(prefix), Body=json.dumps(lease).encode(), IfNoneMatch="*"
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in _CONDITION_FAILED:
            raise
        # botocore retries a put whose answer it lost: the first may have written our lease.
        held = _read_lease(lake, prefix)
        return held if held is not None and held.generation == generation else None
    return Lease(put["ETag"], generation, owner, lease["started_ms"])


def _read_lease(lake: Lake, prefix: str) -> Lease | None:
    try:
        got = lake.client.get_object(Bucket=lake.bucket, Key=lease_key(prefix))
    except lake.client.exceptions.NoSuchKey:
        return None
    lease = json.loads(got["Body"].read())
    return Lease(got["ETag"], lease["generation"], lease.get("owner"), lease.get("started_ms", 0))


def _give_back(lake: Lake, prefix: str, lease: Lease) -> None:
    """Delete the lease if it is still this version (another run's is never removed)."""
    try:
        lake.client.delete_object(Bucket=lake.bucket, Key=lease_key(prefix), IfMatch=lease.etag)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in _CONDITION_FAILED:
            raise


def _stopped(started_ms: int, of: str | None, owner: str | None) -> bool:
    """Whether work begun at `started_ms` by run `of` counts as stopped for run `owner`: its own
    (a retry), or older than `STALE_AFTER_MS` (see the module's steps)."""
    return (owner is not None and of == owner) or now_ms() - started_ms >= STALE_AFTER_MS


def is_part(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(COMPACTED)


def _manifests(lake: Lake, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, manifest) of each generation the partition has (one deleted since the listing,
    settled by someone else, is left out)."""
    for key in lake.list_keys(manifest_prefix(prefix), ".json"):
        manifest = lake.read_json(key)
        if manifest is not None:
            yield key, manifest


def _generation(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")


@dataclass(slots=True)
class Settled:
    """What `settle` did, and the parts of generations still being written (no one's rows yet)."""

    done: list[str] = field(default_factory=list)
    writing: set[str] = field(default_factory=set)


def settle(lake: Lake, prefix: str, owner: str | None = None) -> Settled:
    """Finish what a stopped run committed, undo what a stopped run left writing, and leave
    alone a generation younger than `STALE_AFTER_MS` unless `owner` (the settling run) wrote it
    (see the module's steps). A manifest from before the start time was recorded counts as
    stopped. The lease goes back with the generation it was taken for, or on its own once it
    counts as stopped (its run stopped before it wrote a manifest, or after it deleted it)."""
    settled = Settled()
    lease = _read_lease(lake, prefix)
    ended: set[str] = set()
    for key, manifest in _manifests(lake, prefix):
        if manifest["state"] == "written":
            _finish(lake, prefix, key, manifest["inputs"], manifest["parts"], manifest.get("etags"))
            settled.done.append(f"finished {_generation(key)}")
        elif not _stopped(manifest.get("started_ms", 0), manifest.get("owner"), owner):
            settled.writing.update(manifest["parts"])
            continue
        else:
            lake.delete(manifest["parts"])
            lake.delete([key])
            settled.done.append(f"undid {_generation(key)}")
        ended.add(_generation(key))
    if lease is not None and (lease.generation in ended or _stopped(lease.started_ms, lease.owner, owner)):
        _give_back(lake, prefix, lease)
    return settled


def _finish(
    lake: Lake, prefix: str, manifest: str, inputs: list[str], parts: list[str], etags: dict[str, str] | None
) -> int:
    """Step 4, after the commit: the ledger names the parts instead of the inputs, then the
    inputs and the manifest are deleted. Each step is idempotent (a settle repeats them).

    An input written again since it was listed (`etags`: a processor's retry lands a batch
    under the same key) is not the object the part holds: it is kept, and being out of the
    ledger now, its hour is loaded again and it is gathered by a later run. Returns how many
    inputs were kept so."""
    ledger.swap(lake, prefix, inputs, parts)
    deleted = inputs
    if etags is not None:
        now = lake.etags(prefix, ".parquet")
        deleted = [key for key in inputs if now.get(key, etags.get(key)) == etags.get(key)]
    lake.delete(deleted)
    lake.delete([manifest])
    return len(inputs) - len(deleted)  # the inputs kept


def _groups(objects: Sequence[tuple[str, int]], target_bytes: int) -> list[list[tuple[str, int]]]:
    """Consecutive objects in groups of about `target_bytes` each (at least one object a group)."""
    total = sum(size for _, size in objects)
    count = max(1, -(-total // target_bytes))
    groups: list[list[tuple[str, int]]] = [[] for _ in range(count)]
    seen = 0
    for key, size in objects:
        groups[min(count - 1, seen * count // total if total else 0)].append((key, size))
        seen += size
    return [g for g in groups if g]


def _same_schema(fragment: Any, first: Any) -> None:
    if not fragment.physical_schema.equals(first.physical_schema):
        raise CompactionError(f"s3://{fragment.path} differs in schema from s3://{first.path}")


def _write_part(
    lake: Lake, filesystem: Any, inputs: Sequence[tuple[str, int]], key: str, path: Path, reference: Any = None
) -> tuple[int, int, Any]:
    """One part from `inputs` (key, size), written at `path` then uploaded to `key`: (rows, bytes,
    the fragment every input's schema was held to). `reference`: the partition's first input,
    as an earlier part of the same run returned it; else this part's first."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    parquet = ds.ParquetFileFormat()
    # Sizes from the listing: Arrow asks S3 for none (a request an object, one after another).
    fragments = [parquet.make_fragment(f"{lake.bucket}/{k}", filesystem, file_size=size) for k, size in inputs]
    first = reference if reference is not None else fragments[0]
    schema = first.physical_schema
    dataset = ds.FileSystemDataset(fragments, schema, parquet, filesystem)
    checked: set[str] = set()
    expected = rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        pending: list[Any] = []
        held = 0
        try:
            for tagged in dataset.scanner().scan_batches():
                fragment = tagged.fragment
                if fragment.path not in checked:  # its footer, read by the scan
                    # Arrow casts an input of another schema to the first's, filling a missing
                    # column with nulls: a partition of mixed schemas is left alone.
                    _same_schema(fragment, first)
                    checked.add(fragment.path)
                    expected += fragment.metadata.num_rows
                pending.append(tagged.record_batch)
                held += tagged.record_batch.num_rows
                if held >= ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=held)
                    rows, pending, held = rows + held, [], 0
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            # ... and fails on values it cannot cast (a column's type changed): the same verdict,
            # if a schema differs; anything else (a damaged object, say) is raised as it is.
            for fragment in fragments:
                _same_schema(fragment, first)
            raise
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=held)
            rows += held
    if rows != expected or len(checked) != len(fragments):
        raise CompactionError(
            f"{key}: wrote {rows} rows of {len(checked)} inputs; they hold {expected} of {len(fragments)}"
        )
    # Uploaded only once whole: boto3's transfer aborts a failed multipart upload.
    lake.client.upload_file(str(path), lake.bucket, key)
    return rows, path.stat().st_size, first


def compact_partition(
    lake: Lake, prefix: str, target_bytes: int = TARGET_BYTES, owner: str | None = None
) -> PartitionCompaction:
    """Gather the partition's small objects (and small parts) into parts; idempotent. `owner`:
    the run compacting (its generations are its own to undo when it runs again)."""
    settled = settle(lake, prefix, owner)
    summary = PartitionCompaction(prefix, settled=settled.done)
    # A new name every run: the same inputs seen again (every one re-landed) must not rewrite,
    # or on a stop delete, the parts that already hold them.
    generation = secrets.token_hex(8)
    lease = None if settled.writing else _take_lease(lake, prefix, generation, owner)
    if lease is None:  # another run is compacting it now
        summary.holding(lake.list_objects(prefix, ".parquet")).skipped = "another run is compacting it"
        return summary
    try:
        _compact_leased(lake, prefix, summary, generation, target_bytes, owner)
    finally:
        # Failed or not: a generation left writing or written protects the partition itself.
        _give_back(lake, prefix, lease)
    return summary


def _compact_leased(
    lake: Lake, prefix: str, summary: PartitionCompaction, generation: str, target_bytes: int, owner: str | None
) -> None:
    """`compact_partition`'s work once its run holds the partition's lease: list, write, commit."""
    # Sizes for the groups, ETags for the deletes (`_finish`), from one listing.
    entries = lake.list_entries(prefix, ".parquet")
    objects = [(key, size) for key, size, _ in entries]
    summary.holding(objects)
    # Only objects the warehouse holds the rows of: one that arrived after the load waits, as
    # it is, for its hour to be loaded again (`ledger.late_hours`). No ledger: all of them.
    loaded = ledger.loaded(lake, prefix)
    inputs = [
        (key, size)
        for key, size in objects
        if (loaded is None or key in loaded) and (not is_part(key) or size < target_bytes // 2)
    ]
    if len(inputs) < 2:
        return
    keys = [key for key, _ in inputs]
    chosen = set(keys)
    etags = {key: etag for key, _, etag in entries if key in chosen}
    groups = _groups(inputs, target_bytes)
    parts = [f"{prefix}{COMPACTED}{generation}-{n:05d}-of-{len(groups):05d}.parquet" for n in range(len(groups))]
    manifest = f"{manifest_prefix(prefix)}{generation}.json"
    started = {"inputs": keys, "parts": parts, "etags": etags, "started_ms": now_ms(), "owner": owner}
    lake.write_json(manifest, {"state": "writing", **started})
    filesystem = lake.filesystem()
    written = 0
    try:
        with tempfile.TemporaryDirectory(prefix="citypulse-compaction-") as work:
            reference = None  # every part's inputs are held to the partition's first schema
            for group, part in zip(groups, parts, strict=True):
                local = Path(work) / "part.parquet"
                rows, size, reference = _write_part(lake, filesystem, group, part, local, reference)
                summary.rows_rewritten += rows
                written += size
    except BaseException:
        # Undo now what a later settle would once it is stale: this generation only.
        lake.delete(parts)
        lake.delete([manifest])
        raise
    lake.write_json(manifest, {"state": "written", **started})
    kept = _finish(lake, prefix, manifest, keys, parts, etags)
    summary.objects_after = len(objects) - len(inputs) + kept + len(parts)
    summary.bytes_after = summary.bytes_before - sum(size for _, size in inputs) + written


def compact(
    lake: Lake, prefixes: Sequence[str], target_bytes: int = TARGET_BYTES, owner: str | None = None
) -> dict[str, Any]:
    """Compact each partition; the totals and each partition's summary (for XCom and the run report).

    A partition that cannot be compacted as it is (`CompactionError`: mixed schemas, say, in
    the hour a contract change was deployed) is left whole and named in `skipped`; the others
    are compacted all the same. Failures of S3 itself are raised: the task retries them."""
    partitions = []
    for prefix in prefixes:
        try:
            partitions.append(compact_partition(lake, prefix, target_bytes, owner))
        except CompactionError as exc:
            left = PartitionCompaction(prefix, skipped=str(exc))
            partitions.append(left.holding(lake.list_objects(prefix, ".parquet")))
    return {
        "objects_before": sum(p.objects_before for p in partitions),
        "objects_after": sum(p.objects_after for p in partitions),
        "rows_rewritten": sum(p.rows_rewritten for p in partitions),
        "skipped": [p.prefix for p in partitions if p.skipped],
        "partitions": [p.to_json() for p in partitions],
    }
