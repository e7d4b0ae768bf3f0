"""The fault-injecting proxy (infra/local/faults.py) and the processor's retry and concurrency
helpers (`retry`, unprocessed batch items, `run_all`).

Plans are deterministic; the injected errors are the ones each service really sends, so that
botocore classifies and retries them as it would in AWS (checked against ministack through the
proxy); the store's own retry of unprocessed batch items gives up loudly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from infra.local.emulators import Emulator
from infra.local.faults import FaultPlan, FaultRule, serve, stats
from streaming.processor.store import StateStore, run_all
from streaming.unprocessed import StoreError, retry

ALL_KINDS = ("throttle", "500", "503")


def test_a_plan_gives_the_same_faults_for_the_same_seed_and_scenario() -> None:
    rules = (FaultRule("dynamodb", 0.3, ALL_KINDS),)
    plan = FaultPlan(8, "throttling", rules)
    sequence = [plan.decide("dynamodb", n) for n in range(200)]
    assert sequence == [FaultPlan(8, "throttling", rules).decide("dynamodb", n) for n in range(200)]
    assert sequence != [FaultPlan(8, "other", rules).decide("dynamodb", n) for n in range(200)]
    assert 30 <= sum(k is not None for k in sequence) <= 90 and set(sequence) == {None, *ALL_KINDS}
    assert all(plan.decide("s3", n) is None for n in range(50))  # no rule: never
    outage = FaultPlan(1, "outage", (FaultRule("s3", 1.0, ("503",)),))
    assert {outage.decide("s3", n) for n in range(50)} == {"503"}
    assert FaultPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError):
        FaultRule("kinesis", 0.5)
    with pytest.raises(ValueError):
        FaultRule("s3", 1.5)


def test_the_store_retry_backs_off_then_gives_up_loudly() -> None:
    answers = iter([None, None, "done"])
    assert retry(lambda: next(answers), "BatchWriteItem t") == "done"
    calls: list[int] = []
    with pytest.raises(StoreError, match="BatchWriteItem t: still unprocessed after 3 attempts"):
        retry(lambda: calls.append(1), "BatchWriteItem t", attempts=3)
    assert len(calls) == 3


def test_the_store_sends_what_dynamodb_left_unprocessed_until_nothing_is() -> None:
    ddb = boto3.client("dynamodb", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    store = StateStore(ddb, "state", "metrics")
    keys = [{"pk": {"S": f"zone#Z-{n}"}, "sk": {"S": "state"}} for n in range(3)]
    found = [{**k, "n": {"N": str(n)}} for n, k in enumerate(keys)]

    def request(k: list[dict[str, Any]]) -> dict[str, Any]:
        return {"state": {"Keys": k, "ConsistentRead": True}}

    with Stubber(ddb) as stub:
        answer = {"Responses": {"state": found[:2]}, "UnprocessedKeys": request(keys[2:])}
        stub.add_response("batch_get_item", answer, {"RequestItems": request(keys)})
        stub.add_response("batch_get_item", {"Responses": {"state": found[2:]}}, {"RequestItems": request(keys[2:])})
        assert store._batch_get("state", keys) == found
        puts = [{"PutRequest": {"Item": item}} for item in found]
        stub.add_response(
            "batch_write_item", {"UnprocessedItems": {"state": puts[1:]}}, {"RequestItems": {"state": puts}}
        )
        stub.add_response("batch_write_item", {"UnprocessedItems": {}}, {"RequestItems": {"state": puts[1:]}})
        store._batch_write("state", found)
        stub.assert_no_pending_responses()
        for _ in range(8):
            stub.add_response("batch_write_item", {"UnprocessedItems": {"state": puts}})
        with pytest.raises(StoreError, match="BatchWriteItem state: still unprocessed after 8 attempts"):
            store._batch_write("state", found)


class _Recording(ThreadPoolExecutor):
    """A pool that keeps the futures it hands out."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


def test_run_all_runs_every_call_at_once_and_returns_results_in_order() -> None:
    threads: list[str] = []
    together = threading.Barrier(3, timeout=10)  # passed only if all three calls run at the same time

    def call(n: int) -> int:
        threads.append(threading.current_thread().name)
        together.wait()
        return n * 10

    with _Recording() as pool:
        assert run_all([lambda: call(0), lambda: call(1), lambda: call(2)], pool) == [0, 10, 20]
        assert len(pool.futures) == 2
    assert threads.count(threading.current_thread().name) == 1  # the first call ran on this thread
    assert run_all([], pool) == []


def test_run_all_raises_the_first_failure_only_after_every_call_has_ended() -> None:
    failed = threading.Event()
    ran: list[str] = []

    def first() -> None:
        failed.set()
        raise ValueError("the first call")

    def slow() -> None:
        failed.wait(10)  # still running when the first call fails
        ran.append("slow")
        raise KeyError("a later call")

    with _Recording() as pool:
        with pytest.raises(ValueError, match="the first call"):
            run_all([first, slow, lambda: ran.append("quick")], pool)
        assert all(f.done() for f in pool.futures) and sorted(ran) == ["quick", "slow"]
        with pytest.raises(KeyError, match="a later call"):  # the first failure in call order
            run_all([lambda: None, slow, lambda: 1 / 0], pool)


@pytest.fixture
def proxy(ministack: Emulator, aws_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    server = serve(ministack.endpoint_url, plan)
    try:
        yield f"http://127.0.0.1:{server.server_port}", plan
    finally:
        server.shutdown()
        server.server_close()


def _clients(url: str, attempts: int, name: str) -> tuple[Any, Any, Any]:
    """DynamoDB, S3 and EventBridge clients through the proxy; a table and a bucket called `name`."""
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts})
    ddb, s3, events = (boto3.client(s, endpoint_url=url, config=config) for s in ("dynamodb", "s3", "events"))
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    s3.create_bucket(Bucket=name)
    return ddb, s3, events


@pytest.mark.integration
def test_injected_errors_are_the_services_own_and_botocore_retries_them(proxy: tuple[str, Path]) -> None:
    url, plan = proxy
    ddb, s3, events = _clients(url, attempts=2, name="faults-t")
    expected = {
        ("dynamodb", "throttle"): "ProvisionedThroughputExceededException",
        ("dynamodb", "500"): "InternalServerError",
        ("dynamodb", "503"): "ServiceUnavailable",
        ("s3", "throttle"): "SlowDown",
        ("s3", "500"): "InternalError",
        ("s3", "503"): "ServiceUnavailable",
        ("events", "throttle"): "ThrottlingException",
        ("events", "500"): "InternalException",
        ("events", "503"): "ServiceUnavailable",
    }
    calls = {
        "dynamodb": lambda: ddb.put_item(TableName="faults-t", Item={"pk": {"S": "a"}}),
        "s3": lambda: s3.put_object(Bucket="faults-t", Key="k", Body=b"x"),
        "events": lambda: events.put_events(Entries=[{"Source": "t", "DetailType": "d", "Detail": "{}"}]),
    }
    for (service, kind), code in expected.items():
        FaultPlan(1, f"{service}-{kind}", (FaultRule(service, 1.0, (kind,)),)).write(plan)
        with pytest.raises(ClientError) as err:
            calls[service]()
        assert err.value.response["Error"]["Code"] == code
        # Retried once (2 attempts): botocore took it for a throttle or a transient server error.
        assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 1, (service, kind)
    injected = stats(url)["injected"]
    assert all(injected[f"{s}-{k}"][s] == {k: 2} for s, k in expected)


@pytest.mark.integration
def test_throttled_calls_succeed_within_their_retries_and_change_nothing(proxy: tuple[str, Path]) -> None:
    url, plan = proxy
    ddb, s3, _ = _clients(url, attempts=10, name="faults-u")
    FaultPlan(3, "flaky", (FaultRule("dynamodb", 0.3, ALL_KINDS), FaultRule("s3", 0.3, ALL_KINDS))).write(plan)
    for i in range(12):
        ddb.put_item(TableName="faults-u", Item={"pk": {"S": f"k{i}"}})
        s3.put_object(Bucket="faults-u", Key=f"k{i}", Body=f"v{i}".encode())
    FaultPlan().write(plan)
    items = ddb.scan(TableName="faults-u", ConsistentRead=True)["Items"]
    assert sorted(i["pk"]["S"] for i in items) == sorted(f"k{i}" for i in range(12))
    assert [s3.get_object(Bucket="faults-u", Key=f"k{i}")["Body"].read() for i in range(12)] == [
        f"v{i}".encode() for i in range(12)
    ]
    injected = stats(url)["injected"]["flaky"]
    assert sum(injected["dynamodb"].values()) > 0 and sum(injected["s3"].values()) > 0
