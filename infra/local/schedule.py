"""The local stand-in for an EventBridge schedule rule that invokes a Lambda function.

In AWS `SweeperSchedule` (rate(1 minute)) invokes the sweeper Lambda with a scheduled event.
Locally the platform runs this module as one child process: it calls the **same handler**
in-process, with the same event shape, once per interval (the first one interval after start,
as a new rule fires), until SIGTERM. A failed invocation is logged and the next one comes on
schedule, as a scheduled invocation whose retries ran out is dropped in AWS.
"""

from __future__ import annotations

import argparse
import pkgutil
import signal
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from infra.local.poller import Handler, LambdaContext


def scheduled_event(rule_arn: str, at: datetime, region: str = "us-east-1") -> dict[str, Any]:
    """The event EventBridge sends for a schedule rule's firing at `at`."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [rule_arn],
        "detail": {},
    }


def run(handler: Handler, every_s: float, stop: threading.Event, *, function_name: str, rule_arn: str) -> int:
    """Invoke `handler` every `every_s` seconds (wall clock, no drift) until `stop` is set;
    returns the number of invocations."""
    invocations = 0
    due = time.monotonic() + every_s
    while not stop.wait(max(0.0, due - time.monotonic())):
        due += every_s
        event = scheduled_event(rule_arn, datetime.now(UTC))
        context = LambdaContext(function_name=function_name, aws_request_id=str(uuid.uuid4()))
        try:
            result = handler(event, context)
        except Exception:  # the next firing comes anyway; the log says why this one failed
            print(orjson.dumps({"event": "failed", "error": traceback.format_exc()}).decode(), flush=True)
        else:
            print(orjson.dumps({"event": "invoked", "result": result}, default=str).decode(), flush=True)
        invocations += 1
    return invocations


def main(argv: list[str] | None = None) -> None:
    """`python -m infra.local.schedule --handler mod.func --every SECONDS --function-name F --rule-arn A`"""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--handler", required=True)
    p.add_argument("--every", type=float, required=True, help="seconds between invocations")
    p.add_argument("--function-name", required=True)
    p.add_argument("--rule-arn", default="arn:aws:events:us-east-1:000000000000:rule/local-schedule")
    args = p.parse_args(argv)
    handler = pkgutil.resolve_name(args.handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(orjson.dumps({"event": "ready", "every_s": args.every}).decode(), flush=True)
    run(handler, args.every, stop, function_name=args.function_name, rule_arn=args.rule_arn)


if __name__ == "__main__":
    main()
