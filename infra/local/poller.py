"""The local stand-in for Lambda's Kinesis event-source mapping.

In AWS the event-source mapping polls each shard, hands the processor Lambda batches of
up to `BatchSize` records (waiting up to `MaximumBatchingWindowInSeconds` to fill one; the
next window begins as soon as the previous invocation completes, as AWS documents it),
honours `ReportBatchItemFailures`, bisects a failing batch, retries up to
`MaximumRetryAttempts` and then sends the batch's coordinates to the on-failure
destination. This module does the same against the local Kinesis, calling the **real
handler** in-process with real Kinesis-shaped events, one shard per process — as Lambda
runs one invocation per shard at a time.

Its checkpoint (the last sequence number the handler finished) is a file written
atomically after each successful batch, so a killed poller resumes where it stopped
and redelivers at most the batch in flight. It never skips silently: resuming from a
checkpoint the stream no longer holds raises.

`python -m infra.local.poller redrive --dlq-url URL` is the way back from the on-failure
destination: it reads each queued batch's records back from the stream (by shard and
sequence range, oldest first), delivers them to the handler with the same retries, and
deletes the queue message only once that batch is done (a batch that fails again goes back to
the queue as a new message). Records whose zone has committed later records since are held on
the queue rather than delivered into a redelivery skip (see `redrive`). In AWS the same function
redrives the real queue.
"""

from __future__ import annotations

import argparse
import base64
import os
import pkgutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from infra.local.kinesis_resume import CheckpointError, resume_iterator

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

# Lambda reads a shard through a shared-throughput (standard iterator) mapping at a base rate of
# once a second once it has caught up (AWS Lambda Developer Guide, "Using Lambda with Kinesis
# Data Streams": polling and batching streams).
SHARED_READ_INTERVAL_S = 1.0
# How soon a record put on a caught-up shard reaches its reader, on average: ~200 ms for a
# shared-throughput reader, ~70 ms pushed to an enhanced fan-out consumer (Kinesis Data Streams
# Developer Guide, "Reading data": message propagation delay). The poller reads an idle shard
# that often.
SHARED_PROPAGATION_S = 0.2
PUSHED_PROPAGATION_S = 0.07


@dataclass(frozen=True)
class MappingConfig:
    """The event-source mapping's settings (read from the CloudFormation template)."""

    batch_size: int = 10_000
    batching_window_s: float = 1.0
    max_retry_attempts: int = 3
    bisect_on_error: bool = True
    poll_interval_s: float = SHARED_PROPAGATION_S
    # The least time from the start of one of a shard's batches to the start of the next that
    # is not full: 0 for an enhanced fan-out consumer, whose records are pushed as they arrive;
    # `SHARED_READ_INTERVAL_S` for a mapping on the stream itself.
    read_interval_s: float = 0.0


@dataclass
class LambdaContext:
    """The fields of Lambda's context object the handler and Powertools read."""

    function_name: str
    aws_request_id: str
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = ""
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = "local"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


class Checkpoint:
    """Last processed sequence number of one shard, in a file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def save(self, sequence_number: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(sequence_number)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class ShardPoller:
    """Feeds one shard to the handler, exactly like the managed event-source mapping."""

    def __init__(
        self,
        *,
        kinesis: Any,
        stream_name: str,
        shard_id: str,
        handler: Handler,
        function_name: str,
        checkpoint: Checkpoint | None,
        config: MappingConfig,
        on_failure: Callable[[dict[str, Any]], None],
        region: str = "us-east-1",
    ) -> None:
        self.kinesis = kinesis
        self.stream_name = stream_name
        self.shard_id = shard_id
        self.handler = handler
        self.function_name = function_name
        self.checkpoint = checkpoint
        self.config = config
        self.on_failure = on_failure
        self.region = region
        arn = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]["StreamARN"]
        self.stream_arn = arn
        self.invocations = 0

    def _iterator(self) -> str:
        # Raises CheckpointError rather than resuming from a checkpoint the stream lost.
        start = self.checkpoint.load() if self.checkpoint is not None else None
        return resume_iterator(self.kinesis, self.stream_name, self.shard_id, start)

    def _event(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "Records": [
                {
                    "kinesis": {
                        "kinesisSchemaVersion": "1.0",
                        "partitionKey": r["PartitionKey"],
                        "sequenceNumber": r["SequenceNumber"],
                        "data": base64.b64encode(r["Data"]).decode(),
                        "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp(),
                    },
                    "eventSource": "aws:kinesis",
                    "eventVersion": "1.0",
                    "eventID": f"{self.shard_id}:{r['SequenceNumber']}",
                    "eventName": "aws:kinesis:record",
                    "invokeIdentityArn": f"arn:aws:iam::000000000000:role/{self.function_name}",
                    "awsRegion": self.region,
                    "eventSourceARN": self.stream_arn,
                }
                for r in records
            ]
        }

    def _invoke(self, records: list[dict[str, Any]]) -> str | None:
        """Invoke once; return the sequence number to retry from, or None on success."""
        self.invocations += 1
        context = LambdaContext(
            self.function_name,
            str(uuid.uuid4()),
            invoked_function_arn=f"arn:aws:lambda:{self.region}:000000000000:function:{self.function_name}",
        )
        response = self.handler(self._event(records), context) or {}
        failures = response.get("batchItemFailures") or []
        if not failures:
            return None
        # Lambda retries from the lowest failed sequence number.
        return min((f["itemIdentifier"] for f in failures), key=int)

    def deliver(self, records: list[dict[str, Any]]) -> None:
        """Deliver a batch with ReportBatchItemFailures, bisect and retries; afterwards every
        record either succeeded or its batch's coordinates went to the on-failure destination,
        and the checkpoint has moved past it."""
        pending = [records]
        while pending:
            chunk = pending.pop(0)
            if self._deliver_chunk(chunk, pending) and self.checkpoint is not None:
                self.checkpoint.save(chunk[-1]["SequenceNumber"])

    def _deliver_chunk(self, chunk: list[dict[str, Any]], pending: list[list[dict[str, Any]]]) -> bool:
        """True when `chunk` is finished; False when it was bisected into `pending`."""
        batch, attempts = chunk, 0
        while True:
            try:
                failed_from = self._invoke(batch)
            except Exception as exc:  # a function error: what Lambda sees as an unhandled exception
                print(f"poller {self.shard_id}: handler raised {exc!r}", file=sys.stderr, flush=True)
                if self.config.bisect_on_error and len(batch) > 1:
                    half = len(batch) // 2
                    pending[:0] = [batch[:half], batch[half:]]
                    return False
                failed_from = batch[0]["SequenceNumber"]
            if failed_from is None:
                return True
            batch = [r for r in batch if int(r["SequenceNumber"]) >= int(failed_from)]
            attempts += 1
            if attempts > self.config.max_retry_attempts:
                self.on_failure(
                    {
                        "requestContext": {"condition": "RetryAttemptsExhausted", "functionArn": self.function_name},
                        "KinesisBatchInfo": {
                            "shardId": self.shard_id,
                            "startSequenceNumber": batch[0]["SequenceNumber"],
                            "endSequenceNumber": batch[-1]["SequenceNumber"],
                            "batchSize": len(batch),
                            "streamArn": self.stream_arn,
                        },
                    }
                )
                return True

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set, invoking the handler per batch."""
        iterator = self._iterator()
        buffer: list[dict[str, Any]] = []
        # The batching window begins when the previous invocation ends (none yet: already over);
        # a shared-throughput shard is read again no sooner than its base rate allows.
        window_ends = 0.0
        window, size, base = self.config.batching_window_s, self.config.batch_size, self.config.read_interval_s
        while not stop.is_set():
            if iterator is None:
                raise CheckpointError(f"{self.shard_id} was closed; resharding is not emulated locally")
            try:
                resp = self.kinesis.get_records(ShardIterator=iterator, Limit=size)
            except (BotoCoreError, ClientError) as exc:
                # As the managed mapping does, a failed or expired read is retried from the last
                # checkpoint rather than ending the poller; records read but not yet delivered
                # are read again.
                print(f"poller {self.shard_id}: GetRecords failed ({exc!r}); resuming", file=sys.stderr, flush=True)
                stop.wait(self.config.poll_interval_s)
                iterator, buffer = self._iterator(), []
                continue
            iterator = resp.get("NextShardIterator")
            records = resp["Records"]
            buffer.extend(records)
            while len(buffer) >= size:
                started = time.monotonic()
                self.deliver(buffer[:size])
                buffer = buffer[size:]
                window_ends = max(time.monotonic() + window, started + base)
            now = time.monotonic()
            if buffer and now >= window_ends:
                self.deliver(buffer)
                buffer = []
                window_ends = max(time.monotonic() + window, now + base)
            elif buffer:
                # Gathering: read the shard once a poll interval, and when the window closes
                # (a read at a time keeps the last one, which the batch waits for, small).
                stop.wait(min(window_ends - now, self.config.poll_interval_s))
            elif not records:
                # A caught-up shard: its next record reaches the reader a propagation delay
                # after it is put.
                stop.wait(self.config.poll_interval_s)


def read_range(kinesis: Any, stream_name: str, shard_id: str, start: str, end: str) -> list[dict[str, Any]]:
    """The records of one shard from sequence number `start` to `end`, inclusive."""
    iterator = kinesis.get_shard_iterator(
        StreamName=stream_name, ShardId=shard_id, ShardIteratorType="AT_SEQUENCE_NUMBER", StartingSequenceNumber=start
    )["ShardIterator"]
    out: list[dict[str, Any]] = []
    empty = 0
    while iterator and empty < 3:  # Kinesis may answer empty a few times before the records
        resp = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
        for r in resp["Records"]:
            if int(r["SequenceNumber"]) > int(end):
                return out
            out.append(r)
        if out and out[-1]["SequenceNumber"] == end:
            return out
        empty = 0 if resp["Records"] else empty + 1
        iterator = resp.get("NextShardIterator")
    raise CheckpointError(f"{shard_id}: records up to {end} are no longer in the stream (past its retention?)")


# How long a read of the on-failure queue hides each message it has received: long enough to
# read a queue of tens of thousands of failed batches before the first come back.
READ_VISIBILITY_S = 600


class DeadLetterReadError(RuntimeError):
    """The on-failure queue could not be read whole within the visibility timeout."""


def dead_letters(sqs: Any, queue_url: str, *, delete: bool = False) -> list[tuple[dict[str, Any], str]]:
    """Every message on the on-failure queue as (payload, receipt handle), oldest batch first
    per shard. Each is received with a visibility timeout (`READ_VISIBILITY_S`); unless the
    caller means to delete them (`delete`), they are made visible again at once, so reading the
    queue consumes nothing. A message a crashed reader left hidden reappears after the timeout.

    A message received twice means the read outlasted the timeout: the first messages came
    back, and the read can no longer tell the queue's end from its beginning. It stops and
    raises `DeadLetterReadError` (with the messages made visible again) rather than go round the
    queue for ever or hand back part of it as the whole."""
    seen: dict[str, tuple[dict[str, Any], str]] = {}

    def release() -> None:
        for _, handle in seen.values():
            sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=handle, VisibilityTimeout=0)

    try:
        while True:
            got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=READ_VISIBILITY_S)
            messages = got.get("Messages", [])
            if not messages:
                break
            again = [m["MessageId"] for m in messages if m["MessageId"] in seen]
            for m in messages:
                seen[m["MessageId"]] = (orjson.loads(m["Body"]), m["ReceiptHandle"])
            if again:
                raise DeadLetterReadError(
                    f"{queue_url}: message {again[0]} came back after {len(seen)} were read: reading the"
                    f" queue took longer than its {READ_VISIBILITY_S} s visibility timeout; read it in parts"
                )
    except BaseException:
        release()
        raise
    if not delete:
        release()

    def oldest_first(item: tuple[dict[str, Any], str]) -> tuple[str, int]:
        batch = item[0]["KinesisBatchInfo"]
        return batch["shardId"], int(batch["startSequenceNumber"])

    return sorted(seen.values(), key=oldest_first)


def redrive(
    *,
    sqs: Any,
    queue_url: str,
    kinesis: Any,
    handler: Handler,
    function_name: str,
    config: MappingConfig,
    on_failure: Callable[[dict[str, Any]], None],
    already_applied: Callable[[str, list[dict[str, Any]]], list[str]] | None = None,
) -> tuple[int, int]:
    """Deliver every batch on the on-failure queue again, oldest first per shard; returns the
    number of records redriven and the number held. A message is deleted only after its batch
    was delivered (or, failing again, sent back to the queue by `on_failure`).

    `already_applied(shard, records)` names the records the processor's state has moved past
    (their zone committed later records since): delivering them would only be skipped as
    redeliveries, so they are held — their message stays on the queue, where the audit keeps
    counting whatever of it is not in the lake — and the rest of the batch is delivered."""
    total = held = 0
    pollers: dict[tuple[str, str], ShardPoller] = {}
    for payload, handle in dead_letters(sqs, queue_url, delete=True):
        batch = payload["KinesisBatchInfo"]
        stream_name = batch["streamArn"].rsplit("/", 1)[-1]
        key = (stream_name, batch["shardId"])
        if key not in pollers:
            pollers[key] = ShardPoller(
                kinesis=kinesis,
                stream_name=stream_name,
                shard_id=batch["shardId"],
                handler=handler,
                function_name=function_name,
                checkpoint=None,  # the live poller's checkpoint is not ours to move
                config=config,
                on_failure=on_failure,
            )
        records = read_range(
            kinesis, stream_name, batch["shardId"], batch["startSequenceNumber"], batch["endSequenceNumber"]
        )
        past = set(already_applied(batch["shardId"], records)) if already_applied else set()
        todo = [r for r in records if r["SequenceNumber"] not in past]
        if todo:
            pollers[key].deliver(todo)
        total += len(todo)
        if past:
            held += len(past)
            sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
        else:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=handle)
    return total, held


def main(argv: list[str] | None = None) -> None:
    """`python -m infra.local.poller --stream S --shard ID --handler mod.func ...`, or
    `python -m infra.local.poller redrive --dlq-url URL` to deliver the on-failure queue again."""
    argv = sys.argv[1:] if argv is None else argv
    redriving = argv[:1] == ["redrive"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if redriving:
        argv = argv[1:]
    p.add_argument("--stream", required=not redriving)
    p.add_argument("--shard", required=not redriving)
    p.add_argument("--handler", default="streaming.processor.handler.handler")
    p.add_argument("--function-name", default="citypulse-processor")
    p.add_argument("--checkpoint-dir", type=Path, required=not redriving)
    p.add_argument("--dlq-url", default=None, help="SQS queue for the on-failure destination")
    p.add_argument("--batch-size", type=int, default=MappingConfig.batch_size)
    p.add_argument("--batching-window", type=float, default=MappingConfig.batching_window_s)
    p.add_argument(
        "--consumer",
        help="the enhanced fan-out consumer the mapping reads through: records pushed as they arrive, so no "
        "base rate of reading the shard (default: the stream itself, read at most once a second once caught up)",
    )
    p.add_argument("--max-retries", type=int, default=MappingConfig.max_retry_attempts)
    p.add_argument("--no-bisect", action="store_true")
    p.add_argument(
        "--already-applied",
        default="streaming.processor.handler.records_already_applied",
        help="redrive: function naming the records the processor's state has moved past",
    )
    args = p.parse_args(argv)
    handler = pkgutil.resolve_name(args.handler)
    sqs = boto3.client("sqs") if args.dlq_url else None

    def on_failure(payload: dict[str, Any]) -> None:
        print(f"poller {args.shard}: batch sent to the on-failure destination: {payload}", file=sys.stderr, flush=True)
        if sqs is not None:
            sqs.send_message(QueueUrl=args.dlq_url, MessageBody=orjson.dumps(payload).decode())

    config = MappingConfig(
        batch_size=args.batch_size,
        batching_window_s=args.batching_window,
        read_interval_s=0.0 if args.consumer else SHARED_READ_INTERVAL_S,
        poll_interval_s=PUSHED_PROPAGATION_S if args.consumer else SHARED_PROPAGATION_S,
        max_retry_attempts=args.max_retries,
        bisect_on_error=not args.no_bisect,
    )
    if redriving:
        if sqs is None:
            p.error("redrive needs --dlq-url")
        n, held = redrive(
            sqs=sqs,
            queue_url=args.dlq_url,
            kinesis=boto3.client("kinesis"),
            handler=handler,
            function_name=args.function_name,
            config=config,
            on_failure=on_failure,
            already_applied=pkgutil.resolve_name(args.already_applied),
        )
        if held:
            print(
                f"redrive: {held} records held on the queue: their zone has committed later records since "
                "(see `citypulse audit` for what of them is missing from the lake)",
                file=sys.stderr,
                flush=True,
            )
        print(orjson.dumps({"event": "redriven", "records": n, "held": held}).decode(), flush=True)
        return
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    poller = ShardPoller(
        kinesis=boto3.client("kinesis"),
        stream_name=args.stream,
        shard_id=args.shard,
        handler=handler,
        function_name=args.function_name,
        checkpoint=Checkpoint(args.checkpoint_dir / f"{args.shard}.seq"),
        config=config,
        on_failure=on_failure,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    poller.run(stop)


if __name__ == "__main__":
    main()
