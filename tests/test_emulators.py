"""Tests of infra/local/emulators.py: the local AWS emulators listen on loopback only,
answer, keep their state where promised, and leave no process behind."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest

from infra.local.emulators import Emulator, aws_env, kinesis_client, start_kinesalite, start_ministack

pytestmark = pytest.mark.integration


def _listening_addresses(emulator: Emulator) -> set[tuple[str, int]]:
    procs = [psutil.Process(emulator.process.pid)]
    procs += procs[0].children(recursive=True)
    return {
        (c.laddr.ip, c.laddr.port)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def _descendants(emulator: Emulator) -> list[psutil.Process]:
    root = psutil.Process(emulator.process.pid)
    return [root, *root.children(recursive=True)]


def _assert_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, f"left running: {alive}"


def _ministack_client(emulator: Emulator, service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=emulator.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def test_ministack_listens_on_loopback_answers_and_stops(tmp_path: Path) -> None:
    emulator = start_ministack(tmp_path)
    try:
        listening = _listening_addresses(emulator)
        assert listening == {("127.0.0.1", emulator.port)}, listening
        with urllib.request.urlopen(f"{emulator.endpoint_url}/_ministack/health", timeout=5) as response:
            assert response.status == 200
        s3 = _ministack_client(emulator, "s3")
        s3.create_bucket(Bucket="citypulse-test-bucket")
        names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
        assert names == ["citypulse-test-bucket"]
        processes = _descendants(emulator)
    finally:
        emulator.stop()
    assert emulator.process.returncode == 0  # graceful, so its state was saved
    _assert_gone(processes)


def test_ministack_state_survives_graceful_restart(tmp_path: Path) -> None:
    first = start_ministack(tmp_path)
    try:
        ddb = _ministack_client(first, "dynamodb")
        ddb.create_table(
            TableName="citypulse-test-state",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        ddb.put_item(TableName="citypulse-test-state", Item={"pk": {"S": "a"}})
        s3 = _ministack_client(first, "s3")
        s3.create_bucket(Bucket="citypulse-test-lake")
        s3.put_object(Bucket="citypulse-test-lake", Key="k", Body=b"v")
    finally:
        first.stop()

    second = start_ministack(tmp_path)
    try:
        ddb = _ministack_client(second, "dynamodb")
        item = ddb.get_item(TableName="citypulse-test-state", Key={"pk": {"S": "a"}})
        assert item["Item"] == {"pk": {"S": "a"}}
        s3 = _ministack_client(second, "s3")
        body = s3.get_object(Bucket="citypulse-test-lake", Key="k")["Body"].read()
        assert body == b"v"
    finally:
        second.stop()


def test_kinesalite_listens_on_loopback_answers_and_stops(tmp_path: Path) -> None:
    emulator = start_kinesalite(tmp_path)
    try:
        listening = _listening_addresses(emulator)
        assert listening == {("127.0.0.1", emulator.port)}, listening
        assert kinesis_client(emulator.endpoint_url).list_streams()["StreamNames"] == []
        processes = _descendants(emulator)
    finally:
        emulator.stop()
    assert emulator.process.returncode == 0
    _assert_gone(processes)


def _read_all(client: Any, stream: str) -> list[bytes]:
    data: list[bytes] = []
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        iterator = client.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=10000)
            data += [r["Data"] for r in page["Records"]]
            if not page["Records"]:  # caught up: nothing is writing to this stream any more
                break
            iterator = page.get("NextShardIterator")
    return data


def test_kinesalite_state_survives_kill_9(tmp_path: Path) -> None:
    stream = "citypulse-test-durable"
    payloads = [f"reading-{i}".encode() for i in range(2000)]
    first = start_kinesalite(tmp_path)
    try:
        client = kinesis_client(first.endpoint_url)
        client.create_stream(StreamName=stream, ShardCount=2)
        client.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.1})
        for start in range(0, len(payloads), 500):
            response = client.put_records(
                StreamName=stream,
                Records=[{"Data": p, "PartitionKey": p.decode()} for p in payloads[start : start + 500]],
            )
            assert response["FailedRecordCount"] == 0
    finally:
        first.kill()  # SIGKILL: no chance to flush or close LevelDB
    assert first.process.returncode == -9

    second = start_kinesalite(tmp_path)
    try:
        assert sorted(_read_all(kinesis_client(second.endpoint_url), stream)) == sorted(payloads)
    finally:
        second.stop()


def test_aws_env_routes_each_service_boto3_uses(
    ministack: Emulator, kinesis: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = aws_env(ministack, kinesis)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The variable names are derived by botocore from service ids; a wrong name would
    # silently send that service to the real AWS, so check what boto3 actually resolves.
    session = boto3.Session()
    for service in (
        "s3", "dynamodb", "events", "sns", "sqs", "glue", "cloudformation", "iam", "kms", "lambda",
        "iot", "iot-data", "sts", "logs", "cloudwatch", "secretsmanager", "athena", "firehose",
    ):  # fmt: skip
        assert session.client(service).meta.endpoint_url == ministack.endpoint_url, service
    assert session.client("kinesis").meta.endpoint_url == kinesis.endpoint_url
    assert all(v.startswith("http://127.0.0.1:") for k, v in env.items() if k.startswith("AWS_ENDPOINT_URL"))
