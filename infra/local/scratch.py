"""The real processor on its own fresh DynamoDB tables, lake bucket and alert bus in the
emulator, its registry read from the lake: for tests (with the `aws_env` fixture active) and
benchmarks (`bench/handler_bench.py`), with boto3 pointed at the emulator by the environment."""

from __future__ import annotations

import uuid

import boto3

from streaming.processor.handler import Processor, Settings
from streaming.processor.store import AlertPublisher, LakeWriter, StateStore, client_config
from streaming.registry import City, load_registry, registry_csv


def fresh_processor(city: City) -> Processor:
    suffix = uuid.uuid4().hex[:8]
    config = client_config()  # the processor's own, as `Processor.from_env` builds it
    ddb, s3, events = (boto3.client(service, config=config) for service in ("dynamodb", "s3", "events"))
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
    lake = LakeWriter(s3, settings.lake_bucket)
    s3.put_object(Bucket=settings.lake_bucket, Key=settings.registry_key, Body=registry_csv(city))
    registry = load_registry(lake.read_bytes(settings.registry_key))
    return Processor(
        settings=settings,
        store=StateStore(ddb, settings.processor_table, settings.metrics_table),
        lake=lake,
        alerts=AlertPublisher(events, settings.event_bus),
        registry=registry,
        zones={s.zone_id for s in registry.values()},
    )
