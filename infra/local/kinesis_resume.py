"""Resume reading a Kinesis shard from a checkpoint, refusing checkpoints that no longer exist.

Place in the flow: between the local stream (kinesalite) and its consumers (the local
event-source poller, replay tools). A consumer that stored "processed up to sequence number
S" resumes with ``AFTER_SEQUENCE_NUMBER S``. If S no longer exists in the shard (the stream
was deleted and recreated under the same name, or the records were trimmed past retention),
Kinesis emulators answer that request with an iterator that silently yields nothing or skips
ahead (measured on kinesalite 3.3.3: AFTER_SEQUENCE_NUMBER of a sequence number from a
deleted-and-recreated stream returns no records, although the new stream holds some). Data
would be lost without a sound. :func:`resume_iterator` proves the checkpoint record is still
there before resuming after it, and raises :class:`CheckpointError` otherwise.

One case no check can catch on kinesalite: its sequence numbers encode the stream's creation
second and the record's index, so a stream recreated within the same second reissues the very
same numbers. Real Kinesis never reuses a sequence number.
"""

from __future__ import annotations

from typing import Any

import botocore.exceptions


class CheckpointError(RuntimeError):
    """A checkpoint does not name a record in the shard: resuming from it would lose data silently."""


def _shard(client: Any, stream_name: str, shard_id: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"StreamName": stream_name}
    while True:
        page = client.list_shards(**kwargs)
        for shard in page["Shards"]:
            if shard["ShardId"] == shard_id:
                return dict(shard)
        token = page.get("NextToken")
        if not token:
            raise CheckpointError(f"shard {shard_id} is not in stream {stream_name}")
        kwargs = {"NextToken": token}


def resume_iterator(
    client: Any,
    stream_name: str,
    shard_id: str,
    checkpoint: str | None,
    initial_position: str = "TRIM_HORIZON",
) -> str:
    """A shard iterator positioned right after ``checkpoint`` (or at ``initial_position`` if None).

    ``client`` is a boto3 Kinesis client. Raises :class:`CheckpointError` if the checkpointed
    record is not in the shard any more, instead of handing back an iterator that skips data.
    """
    if checkpoint is None:
        return str(
            client.get_shard_iterator(StreamName=stream_name, ShardId=shard_id, ShardIteratorType=initial_position)[
                "ShardIterator"
            ]
        )

    shard = _shard(client, stream_name, shard_id)
    first = int(shard["SequenceNumberRange"]["StartingSequenceNumber"])
    if int(checkpoint) < first:
        raise CheckpointError(
            f"checkpoint {checkpoint} precedes the first sequence number of {stream_name}/{shard_id}: "
            "it belongs to an earlier incarnation of the stream (deleted and recreated) or to another stream"
        )
    # AT (not AFTER) the checkpoint: the emulator validates the sequence number against the
    # shard, and the first record returned proves the checkpoint record itself still exists.
    try:
        iterator = client.get_shard_iterator(
            StreamName=stream_name,
            ShardId=shard_id,
            ShardIteratorType="AT_SEQUENCE_NUMBER",
            StartingSequenceNumber=checkpoint,
        )["ShardIterator"]
    except botocore.exceptions.ClientError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} refused by {stream_name}/{shard_id}: {exc}") from exc
    page = client.get_records(ShardIterator=iterator, Limit=1)
    records = page["Records"]
    if not records or records[0]["SequenceNumber"] != checkpoint:
        found = records[0]["SequenceNumber"] if records else "nothing"
        raise CheckpointError(
            f"checkpoint record {checkpoint} is gone from {stream_name}/{shard_id} (found {found}): "
            "trimmed past retention or from another incarnation of the stream; records after it may be lost"
        )
    # Positioned right after the checkpoint record: exactly where the consumer left off.
    return str(page["NextShardIterator"])
