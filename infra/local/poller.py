"""The local stand-in for Lambda's Kinesis event-source mapping.

In AWS the event-source mapping polls each shard, hands the processor Lambda batches of
up to `BatchSize` records (waiting up to `MaximumBatchingWindowInSeconds` to fill one),
honours `ReportBatchItemFailures`, bisects a failing batch, retries up to
`MaximumRetryAttempts` and then sends the batch's coordinates to the on-failure
destination. This module does the same against the local Kinesis, calling the **real
handler** in-process with real Kinesis-shaped events, one shard per process — as Lambda
runs one invocation per shard at a time.

Its checkpoint (the last sequence number the handler finished) is a file written
atomically after each successful batch, so a killed poller resumes where it stopped
and redelivers at most the batch in flight. It never skips silently: resuming from a
checkpoint the stream no longer holds raises.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import os
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

from infra.local.kinesis_resume import CheckpointError, resume_iterator

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class MappingConfig:
    """The event-source mapping's settings (read from the CloudFormation template)."""

    batch_size: int = 10_000
    batching_window_s: float = 1.0
    max_retry_attempts: int = 3
    bisect_on_error: bool = True
    poll_interval_s: float = 0.2


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
        checkpoint: Checkpoint,
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
        return resume_iterator(self.kinesis, self.stream_name, self.shard_id, self.checkpoint.load())

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
            if self._deliver_chunk(chunk, pending):
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
        window_started = 0.0
        size = self.config.batch_size
        while not stop.is_set():
            if iterator is None:
                raise CheckpointError(f"{self.shard_id} was closed; resharding is not emulated locally")
            resp = self.kinesis.get_records(ShardIterator=iterator, Limit=size)
            iterator = resp.get("NextShardIterator")
            records = resp["Records"]
            if records and not buffer:
                window_started = time.monotonic()
            buffer.extend(records)
            while len(buffer) >= size:
                self.deliver(buffer[:size])
                buffer = buffer[size:]
                window_started = time.monotonic()
            if buffer and time.monotonic() - window_started >= self.config.batching_window_s:
                self.deliver(buffer)
                buffer = []
            elif not records:
                # Lambda polls an idle shard about once a second; a little faster here.
                stop.wait(self.config.poll_interval_s)


def main(argv: list[str] | None = None) -> None:
    """`python -m infra.local.poller --stream S --shard ID --handler mod.func ...`"""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stream", required=True)
    p.add_argument("--shard", required=True)
    p.add_argument("--handler", default="streaming.processor.handler.handler")
    p.add_argument("--function-name", default="citypulse-processor")
    p.add_argument("--checkpoint-dir", type=Path, required=True)
    p.add_argument("--dlq-url", default=None, help="SQS queue for the on-failure destination")
    p.add_argument("--batch-size", type=int, default=MappingConfig.batch_size)
    p.add_argument("--batching-window", type=float, default=MappingConfig.batching_window_s)
    p.add_argument("--max-retries", type=int, default=MappingConfig.max_retry_attempts)
    p.add_argument("--no-bisect", action="store_true")
    args = p.parse_args(argv)

    module, func = args.handler.rsplit(".", 1)
    handler = getattr(importlib.import_module(module), func)
    sqs = boto3.client("sqs") if args.dlq_url else None

    def on_failure(payload: dict[str, Any]) -> None:
        print(f"poller {args.shard}: batch sent to the on-failure destination: {payload}", file=sys.stderr, flush=True)
        if sqs is not None:
            sqs.send_message(QueueUrl=args.dlq_url, MessageBody=orjson.dumps(payload).decode())

    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    poller = ShardPoller(
        kinesis=boto3.client("kinesis"),
        stream_name=args.stream,
        shard_id=args.shard,
        handler=handler,
        function_name=args.function_name,
        checkpoint=Checkpoint(args.checkpoint_dir / f"{args.shard}.seq"),
        config=MappingConfig(
            batch_size=args.batch_size,
            batching_window_s=args.batching_window,
            max_retry_attempts=args.max_retries,
            bisect_on_error=not args.no_bisect,
        ),
        on_failure=on_failure,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    poller.run(stop)


if __name__ == "__main__":
    main()
