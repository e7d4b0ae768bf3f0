"""The real processor on its own fresh DynamoDB tables, lake bucket and alert bus in the
emulator, its registry read from the lake: for tests (with the `aws_env` fixture active) and
benchmarks (`bench/handler_bench.py`), with boto3 pointed at the emulator by the environment."""

from __future__ import annotations

import uuid

import boto3

from streaming.processor.handler import Processor, Settings
from streaming.registry import City, registry_csv


def fresh_processor(city: City) -> Processor:
    suffix = uuid.uuid4().hex[:8]
    ddb, s3, events = boto3.client("dynamodb"), boto3.client("s3"), boto3.client("events")
    settings = Settings(f"lake-{suffix}", f"state-{suffix}", f"metrics-{suffix}", f"bus-{suffix}", "registry/r.csv")
    for table, (hash_key, range_key) in (
        (settings.processor_table, ("pk", "sk")),
        (settings.metrics_table, ("zone_id", "bucket")),
    ):
        ddb.create_table(
            TableName=table,
            KeySchema=[
                {"AttributeName": hash_key, "KeyType": "HASH"},
                {"AttributeName": range_key, "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in (hash_key, range_key)],
            BillingMode="PAY_PER_REQUEST",
        )
    s3.create_bucket(Bucket=settings.lake_bucket)
    events.create_event_bus(Name=settings.event_bus)
    s3.put_object(Bucket=settings.lake_bucket, Key=settings.registry_key, Body=registry_csv(city))
    return Processor.for_settings(settings)
