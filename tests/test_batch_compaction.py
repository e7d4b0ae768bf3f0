"""Lake compaction: a partition's small objects gathered into parts, every row kept exactly once.

Integration tests against ministack's S3 with the batch fixture lake (two shard files and a
redelivered reading in the interval's partition); a stop at any step is injected through a
client that fails on a chosen call, and the next run must leave the rows of a clean one.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from batch_lake import (
    FailingClient,
    FixtureLake,
    put_parquet,
    reading,
    s3_client,
    session_lake,
    unique_name,
    write_fixture_lake,
)
from hypothesis import given
from hypothesis import strategies as st

from citypulse_batch import compaction, steps
from citypulse_batch.compaction import CompactionError, compact, compact_partition, manifest_prefix
from citypulse_batch.lake import Interval, Lake, quarantine_prefixes, readings_prefixes
from citypulse_batch.warehouse import DuckDBWarehouse
from streaming.contract import lake_arrow_schema, quarantine_arrow_schema
from streaming.parquet import read_parquet

pytestmark = pytest.mark.integration


@pytest.fixture
def fixture_lake(aws_env: dict[str, str]) -> FixtureLake:
    return write_fixture_lake(s3_client(aws_env), unique_name("lake-compact"))


@pytest.fixture
def partition(fixture_lake: FixtureLake) -> str:
    return readings_prefixes(Interval(fixture_lake.start, fixture_lake.end))[0]


def _rows(lake: Lake, prefix: str) -> Counter[tuple[Any, ...]]:
    """Every row of the partition's objects, duplicates counted."""
    rows: Counter[tuple[Any, ...]] = Counter()
    for key in lake.list_keys(prefix, ".parquet"):
        rows.update(tuple(r.values()) for r in read_parquet(lake.read(key)).to_pylist())
    return rows


def test_a_partition_becomes_one_part_holding_every_row_and_the_load_reads_it_alike(
    tmp_path: Path, fixture_lake: FixtureLake, partition: str
) -> None:
    lake = session_lake(fixture_lake.bucket)
    interval = Interval(fixture_lake.start, fixture_lake.end)
    rows = _rows(lake, partition)
    before = DuckDBWarehouse(tmp_path / "before.duckdb").load(interval, lake)

    summary = compact(lake, readings_prefixes(interval) + quarantine_prefixes(interval))

    keys = lake.list_keys(partition)
    assert (
        len(keys) == 1
        and keys[0].rsplit("/", 1)[1].startswith("compacted-")
        and keys[0].endswith("-00000-of-00001.parquet")
    )
    assert _rows(lake, partition) == rows and sum(rows.values()) == 62  # the redelivered copy kept
    assert (summary["objects_before"], summary["objects_after"], summary["rows_rewritten"]) == (3, 2, 62)
    readings, quarantine = summary["partitions"]
    assert (readings["objects_before"], readings["objects_after"], readings["settled"]) == (2, 1, [])
    assert readings["bytes_after"] == lake.list_objects(partition)[0][1]
    assert (quarantine["objects_before"], quarantine["objects_after"], quarantine["rows_rewritten"]) == (1, 1, 0)
    assert lake.list_keys(manifest_prefix(partition)) == []
    after = DuckDBWarehouse(tmp_path / "after.duckdb").load(interval, lake)
    assert after.reading_files == 1
    assert {**after.to_json(), "reading_files": 2} == before.to_json()


def test_a_second_run_changes_nothing_and_a_late_file_joins_the_small_part(
    fixture_lake: FixtureLake, partition: str
) -> None:
    lake = session_lake(fixture_lake.bucket)
    compact_partition(lake, partition)
    first = lake.list_objects(partition)

    again = compact_partition(lake, partition)

    assert lake.list_objects(partition) == first
    assert (again.objects_before, again.objects_after, again.rows_rewritten) == (1, 1, 0)
    sensor = fixture_lake.city.sensors[5]
    late = [reading(sensor.sensor_id, sensor.zone_id, 700, fixture_lake.start.replace(minute=58))]
    put_parquet(
        lake.client,
        lake.bucket,
        f"{partition}shardId-000000000001-49650000000000000000000099.parquet",
        late,
        lake_arrow_schema(),
    )
    rows = _rows(lake, partition)

    joined = compact_partition(lake, partition)

    assert (joined.objects_before, joined.objects_after, joined.rows_rewritten) == (2, 1, 63)
    assert _rows(lake, partition) == rows
    assert lake.list_objects(partition) != first  # a new generation


def test_parts_split_by_size_and_a_large_part_is_left_alone(fixture_lake: FixtureLake, partition: str) -> None:
    lake = session_lake(fixture_lake.bucket)
    rows = _rows(lake, partition)
    target = min(size for _, size in lake.list_objects(partition))  # one input a part

    summary = compact_partition(lake, partition, target_bytes=target)

    keys = lake.list_keys(partition)
    assert [k.rsplit("-", 3)[1:] for k in keys] == [["00000", "of", "00002.parquet"], ["00001", "of", "00002.parquet"]]
    assert (summary.objects_after, summary.rows_rewritten) == (2, 62)
    assert _rows(lake, partition) == rows
    # Both parts are over half the target: nothing left to gather.
    assert compact_partition(lake, partition, target_bytes=target).rows_rewritten == 0


@pytest.mark.parametrize("after", [1, 2], ids=["first part", "second part"])
def test_a_run_failing_while_it_writes_leaves_the_partition_as_it_was(
    fixture_lake: FixtureLake, partition: str, after: int
) -> None:
    lake = session_lake(fixture_lake.bucket)
    objects = lake.list_objects(partition)
    target = min(size for _, size in objects)
    failing = session_lake(fixture_lake.bucket, FailingClient(lake.client, upload_file=after))

    with pytest.raises(ConnectionError, match="injected: upload_file"):
        compact_partition(failing, partition, target_bytes=target)

    assert lake.list_objects(partition) == objects
    assert lake.list_keys(manifest_prefix(partition)) == []


@pytest.mark.parametrize("next_by", ["its retry", "a later run, once stale"])
def test_a_run_that_dies_while_it_writes_is_undone_by_the_next(
    fixture_lake: FixtureLake, partition: str, monkeypatch: pytest.MonkeyPatch, next_by: str
) -> None:
    owner = "scheduled__2026-03-02T10:00:00+00:00"
    lake = session_lake(fixture_lake.bucket)
    rows = _rows(lake, partition)
    target = min(size for _, size in lake.list_objects(partition))
    # The first part is uploaded, the second fails, and the undo fails too: what a killed
    # worker leaves. The partition then holds the inputs and a part: rows twice.
    dying = session_lake(fixture_lake.bucket, FailingClient(lake.client, upload_file=2, delete_objects=1))
    with pytest.raises(ConnectionError):
        compact_partition(dying, partition, target_bytes=target, owner=owner)
    assert sum(_rows(lake, partition).values()) > sum(rows.values())
    assert len(lake.list_keys(manifest_prefix(partition))) == 1
    # Young, it may be a live run's (runs overlap): another run leaves it alone, its part no
    # one's rows yet.
    young = compact_partition(lake, partition, owner="another run")
    assert young.settled == [] and young.skipped and len(lake.list_keys(manifest_prefix(partition))) == 1
    if next_by == "a later run, once stale":
        started = compaction.now_ms()
        monkeypatch.setattr(compaction, "now_ms", lambda: started + compaction.STALE_AFTER_MS)

    # Its own task's retry (found by a review: it skipped its own stopped attempt for 2 h), or
    # any run once the generation is stale.
    summary = compact_partition(lake, partition, owner=owner if next_by == "its retry" else "another run")

    assert len(summary.settled) == 1 and summary.settled[0].startswith("undid ")
    assert _rows(lake, partition) == rows
    assert len(lake.list_keys(partition)) == 1
    assert lake.list_keys(manifest_prefix(partition)) == []


def test_two_runs_that_settle_at_once_compact_the_partition_once(
    fixture_lake: FixtureLake, partition: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both settle before either writes a manifest, so neither sees the other's generation: the
    lease lets one compact and the other leave it (before it, both wrote a part: rows twice)."""
    rows = _rows(session_lake(fixture_lake.bucket), partition)
    both_settled = threading.Barrier(2, timeout=30)
    settle = compaction.settle

    def settle_then_wait(lake: Lake, prefix: str, owner: str | None = None) -> compaction.Settled:
        settled = settle(lake, prefix, owner)
        both_settled.wait()
        return settled

    monkeypatch.setattr(compaction, "settle", settle_then_wait)
    with ThreadPoolExecutor(max_workers=2) as pool:
        lakes = [session_lake(fixture_lake.bucket) for _ in range(2)]
        runs = [pool.submit(compact_partition, lake, partition, owner=f"run {n}") for n, lake in enumerate(lakes)]
        summaries = [run.result() for run in runs]

    lake = session_lake(fixture_lake.bucket)
    assert sorted(s.skipped or "" for s in summaries) == ["", "another run is compacting it"]
    assert _rows(lake, partition) == rows
    assert len(lake.list_keys(partition)) == 1
    assert lake.list_keys(manifest_prefix(partition)) == []  # the lease given back


@pytest.mark.parametrize("next_by", ["its retry", "a later run, once stale"])
def test_a_lease_left_by_a_stopped_run_is_given_back_by_its_retry_or_once_stale(
    fixture_lake: FixtureLake, partition: str, monkeypatch: pytest.MonkeyPatch, next_by: str
) -> None:
    """A run killed after it took the lease and before its manifest: no generation to settle,
    only the lease, which keeps other runs out until it counts as stopped."""
    owner = "scheduled__2026-03-02T10:00:00+00:00"
    lake = session_lake(fixture_lake.bucket)
    rows = _rows(lake, partition)
    objects = lake.list_objects(partition)
    assert compaction._take_lease(lake, partition, "killed", owner) is not None
    assert compaction._take_lease(lake, partition, "another", "another run") is None

    young = compact_partition(lake, partition, owner="another run")
    assert young.skipped == "another run is compacting it" and lake.list_objects(partition) == objects
    assert lake.list_keys(manifest_prefix(partition)) == [compaction.lease_key(partition)]
    if next_by == "a later run, once stale":
        started = compaction.now_ms()
        monkeypatch.setattr(compaction, "now_ms", lambda: started + compaction.STALE_AFTER_MS)

    summary = compact_partition(lake, partition, owner=owner if next_by == "its retry" else "another run")

    assert summary.skipped is None and (summary.objects_before, summary.objects_after) == (2, 1)
    assert _rows(lake, partition) == rows
    assert lake.list_keys(manifest_prefix(partition)) == []


def test_a_lease_whose_put_answer_was_lost_is_still_the_runs_own(fixture_lake: FixtureLake, partition: str) -> None:
    """botocore retries a put whose answer it lost; if the first landed, the retry's condition
    fails on the run's own lease (found by the diff's review: the run then took itself for
    another, and its lease kept every run out for 2 h)."""
    lake = session_lake(fixture_lake.bucket)
    first = compaction._take_lease(lake, partition, "mine", "run 1")
    assert first is not None
    retried = compaction._take_lease(lake, partition, "mine", "run 1")  # the same generation again
    assert retried is not None and retried.etag == first.etag
    assert compaction._take_lease(lake, partition, "theirs", "run 2") is None
    compaction._give_back(lake, partition, retried)
    assert compaction._read_lease(lake, partition) is None


def test_a_lease_is_given_back_only_in_the_version_its_run_wrote(fixture_lake: FixtureLake, partition: str) -> None:
    """A run whose lease was taken over as stale must not delete its successor's."""
    lake = session_lake(fixture_lake.bucket)
    stale = compaction._take_lease(lake, partition, "stale", "run 1")
    assert stale is not None
    compaction._give_back(lake, partition, stale)
    successor = compaction._take_lease(lake, partition, "successor", "run 2")
    assert successor is not None

    compaction._give_back(lake, partition, stale)  # the stopped run, back late

    assert compaction._read_lease(lake, partition) == successor


def test_the_hours_load_settles_a_stopped_compaction_before_it_reads(
    tmp_path: Path, fixture_lake: FixtureLake, partition: str
) -> None:
    lake = session_lake(fixture_lake.bucket)
    interval = Interval(fixture_lake.start, fixture_lake.end)
    with pytest.raises(ConnectionError):  # stopped after its commit: inputs and part side by side
        compact_partition(session_lake(fixture_lake.bucket, FailingClient(lake.client, delete_objects=1)), partition)

    summary = steps.load_settled(DuckDBWarehouse(tmp_path / "warehouse.duckdb"), interval, lake)

    # The fixture's one redelivered reading, not the 61 other rows of the inputs read twice.
    assert (summary.rows_loaded, summary.duplicates_dropped, summary.reading_files) == (60, 1, 1)
    assert lake.list_keys(manifest_prefix(partition)) == []


def test_a_run_that_dies_after_its_commit_is_finished_by_the_next(fixture_lake: FixtureLake, partition: str) -> None:
    lake = session_lake(fixture_lake.bucket)
    rows = _rows(lake, partition)
    dying = session_lake(fixture_lake.bucket, FailingClient(lake.client, delete_objects=1))
    with pytest.raises(ConnectionError):
        compact_partition(dying, partition)
    assert sum(_rows(lake, partition).values()) == 2 * sum(rows.values())  # inputs and their part

    summary = compact_partition(lake, partition)

    assert len(summary.settled) == 1 and summary.settled[0].startswith("finished ")
    assert _rows(lake, partition) == rows
    assert len(lake.list_keys(partition)) == 1
    assert lake.list_keys(manifest_prefix(partition)) == []


@pytest.mark.parametrize("change", ["a column left out", "a column of another type"])
@pytest.mark.parametrize("target_bytes", [compaction.TARGET_BYTES, 1], ids=["one part", "a part an object"])
def test_a_partition_of_mixed_schemas_is_left_alone(
    fixture_lake: FixtureLake, partition: str, change: str, target_bytes: int
) -> None:
    """Left whole whether the odd object shares a part with the others or is a part of its own
    (then the parts already written are undone)."""
    lake = session_lake(fixture_lake.bucket)
    schema = lake_arrow_schema()
    sensor = fixture_lake.city.sensors[0]
    row = reading(sensor.sensor_id, sensor.zone_id, 800, fixture_lake.start)
    lane = schema.get_field_index("lane")
    if change == "a column left out":  # Arrow would fill it with nulls
        other = schema.remove(lane)
        del row["lane"]
    else:  # Arrow cannot cast "left" to the first file's int64
        other = schema.set(lane, pa.field("lane", pa.string()))
        row["lane"] = "left"
    put_parquet(lake.client, lake.bucket, f"{partition}shardId-000000000002-1.parquet", [row], other)
    objects = lake.list_objects(partition)

    with pytest.raises(CompactionError, match="differs in schema"):
        compact_partition(lake, partition, target_bytes)
    assert lake.list_objects(partition) == objects
    assert lake.list_keys(manifest_prefix(partition)) == []

    # The hour's task names it and goes on with the hour's other partitions.
    quarantine = quarantine_prefixes(Interval(fixture_lake.start, fixture_lake.end))[0]
    put_parquet(
        lake.client, lake.bucket, f"{quarantine}part-1.parquet", fixture_lake.quarantine[:1], quarantine_arrow_schema()
    )
    summary = compact(lake, [partition, quarantine], target_bytes)

    assert summary["skipped"] == [partition]
    assert "differs in schema" in summary["partitions"][0]["skipped"]
    assert lake.list_objects(partition) == objects
    parts = 1 if target_bytes == compaction.TARGET_BYTES else 2
    assert (summary["partitions"][1]["objects_before"], summary["partitions"][1]["objects_after"]) == (2, parts)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=1_000), min_size=1, max_size=40),
    target=st.integers(min_value=1, max_value=3_000),
)
def test_groups_keep_every_object_in_order_in_about_target_sized_groups(sizes: list[int], target: int) -> None:
    objects = [(f"k{n:03d}", size) for n, size in enumerate(sizes)]
    groups = compaction._groups(objects, target)

    assert [o for g in groups for o in g] == objects
    assert all(groups)
    assert len(groups) <= max(1, -(-sum(sizes) // target))
    # A group goes over the target only by the object that crossed its boundary.
    assert all(sum(s for _, s in g[:-1]) <= target for g in groups)
