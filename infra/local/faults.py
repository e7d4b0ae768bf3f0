"""A fault-injecting reverse proxy in front of the AWS emulator, for the fault-injection suite.

Flow: processor (boto3) ──HTTP──▶ **this proxy** ──▶ ministack (DynamoDB, S3, EventBridge).

The processor's clients are pointed at it through their ordinary endpoint settings
(`AWS_ENDPOINT_URL_DYNAMODB`, `_S3`, `_EVENTBRIDGE`), so the code under test is unchanged and
botocore's real retry path runs: the proxy answers a chosen share of requests with the error
each service really returns when it throttles or fails —

| kind | DynamoDB | S3 | EventBridge |
|---|---|---|---|
| `throttle` | 400 `ProvisionedThroughputExceededException` | 503 `SlowDown` | 400 `ThrottlingException` |
| `500` | 500 `InternalServerError` | 500 `InternalError` | 500 `InternalException` |
| `503` | 503 `ServiceUnavailable` | 503 `ServiceUnavailable` | 503 `ServiceUnavailable` |

— and forwards everything else untouched. The service is read from the request's SigV4
credential scope (`…/us-east-1/dynamodb/aws4_request`), not guessed from the path.

What fails is decided by a **plan** (a JSON file, read on every request, so a test can move
from "throttled" to "outage" to "healthy" while the platform runs; a changed plan starts its
fault sequence afresh):

    {"seed": 8, "scenario": "throttling",
     "rules": [{"service": "dynamodb", "rate": 0.3, "kinds": ["throttle", "500"]}]}

The n-th request to a service fails when a generator seeded with (seed, scenario, service, n)
says so: the same plan gives the same fault sequence on every run. `rate: 1` is an outage.
`GET /__faults__` returns the plan and what was injected and forwarded, per service and kind
(S3 bucket names cannot contain `_`, so the path never shadows a bucket).

Run: `python -m infra.local.faults --upstream http://127.0.0.1:4566 --plan plan.json`; it
prints `{"event":"ready","url":…}` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import random
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

SERVICES = ("dynamodb", "s3", "events")
KINDS = ("throttle", "500", "503")
STATS_PATH = "/__faults__"
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)
_SCOPE = re.compile(r"Credential=[^/,]+/\d{8}/[^/]+/([^/]+)/aws4_request")

_DDB = "com.amazonaws.dynamodb.v20120810#"


def _json_error(status: int, error_type: str, message: str, content_type: str) -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps({"__type": error_type, "message": message})
    return status, {"Content-Type": content_type, "x-amzn-ErrorType": error_type.rsplit("#", 1)[-1]}, body


def _s3_error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        "<RequestId>fault-injection</RequestId></Error>"
    ).encode()
    return status, {"Content-Type": "application/xml"}, body


def error_response(service: str, kind: str) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body the real service sends for this kind of failure."""
    if service == "dynamodb":
        ct = "application/x-amz-json-1.0"
        return {
            "throttle": lambda: _json_error(400, _DDB + "ProvisionedThroughputExceededException", "injected", ct),
            "500": lambda: _json_error(500, _DDB + "InternalServerError", "injected", ct),
            "503": lambda: _json_error(503, _DDB + "ServiceUnavailable", "injected", ct),
        }[kind]()
    if service == "events":
        ct = "application/x-amz-json-1.1"
        return {
            "throttle": lambda: _json_error(400, "ThrottlingException", "Rate exceeded (injected)", ct),
            "500": lambda: _json_error(500, "InternalException", "injected", ct),
            "503": lambda: _json_error(503, "ServiceUnavailable", "injected", ct),
        }[kind]()
    if service == "s3":
        return {
            "throttle": lambda: _s3_error(503, "SlowDown", "Please reduce your request rate. (injected)"),
            "500": lambda: _s3_error(500, "InternalError", "injected"),
            "503": lambda: _s3_error(503, "ServiceUnavailable", "injected"),
        }[kind]()
    raise ValueError(f"no fault model for service {service!r}")


@dataclass(frozen=True)
class FaultRule:
    service: str
    rate: float
    kinds: tuple[str, ...] = ("throttle",)

    def __post_init__(self) -> None:
        if self.service not in SERVICES:
            raise ValueError(f"fault rule: service {self.service!r} is not one of {SERVICES}")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"fault rule for {self.service}: rate {self.rate} is outside 0..1")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ValueError(f"fault rule for {self.service}: kinds {self.kinds} must be some of {KINDS}")


@dataclass(frozen=True)
class FaultPlan:
    seed: int = 0
    scenario: str = "healthy"
    rules: tuple[FaultRule, ...] = ()

    @classmethod
    def from_json(cls, data: bytes) -> FaultPlan:
        raw = orjson.loads(data) if data.strip() else {}
        rules = tuple(
            FaultRule(r["service"], float(r["rate"]), tuple(r.get("kinds", ("throttle",))))
            for r in raw.get("rules", ())
        )
        return cls(int(raw.get("seed", 0)), str(raw.get("scenario", "healthy")), rules)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "seed": self.seed,
                "scenario": self.scenario,
                "rules": [{"service": r.service, "rate": r.rate, "kinds": list(r.kinds)} for r in self.rules],
            }
        )

    def write(self, path: Path) -> None:
        """Replace the plan file atomically (the proxy never reads half a plan)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.to_json())
        tmp.replace(path)

    def decide(self, service: str, n: int) -> str | None:
        """The fault for the n-th request to `service` under this plan, or None to forward it."""
        rule = next((r for r in self.rules if r.service == service), None)
        if rule is None or rule.rate == 0:
            return None
        rng = random.Random(f"{self.seed}/{self.scenario}/{service}/{n}")
        if rng.random() >= rule.rate:
            return None
        return rng.choice(rule.kinds)


@dataclass
class FaultState:
    """The current plan (reloaded when its file changes) and what the proxy has done."""

    plan_path: Path
    plan: FaultPlan = field(default_factory=FaultPlan)
    plan_bytes: bytes | None = None
    requests: Counter[str] = field(default_factory=Counter)  # per service, under the current plan
    injected: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (scenario, service, kind)
    forwarded: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self, service: str) -> str | None:
        with self.lock:
            self._reload()
            n = self.requests[service]
            self.requests[service] += 1
            kind = self.plan.decide(service, n)
            if kind is None:
                self.forwarded[service] += 1
            else:
                self.injected[(self.plan.scenario, service, kind)] += 1
            return kind

    def _reload(self) -> None:
        # Read every time (a few hundred bytes): file timestamps are too coarse to tell two
        # plans written in the same few milliseconds apart.
        try:
            data = self.plan_path.read_bytes()
        except FileNotFoundError:
            data = b""
        if data != self.plan_bytes:
            self.plan = FaultPlan.from_json(data)
            self.plan_bytes = data
            self.requests.clear()  # each plan's fault sequence starts at request 0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            self._reload()
            injected: dict[str, dict[str, dict[str, int]]] = {}
            for (scenario, service, kind), n in self.injected.items():
                injected.setdefault(scenario, {}).setdefault(service, {})[kind] = n
            return {
                "plan": orjson.loads(self.plan.to_json()),
                "injected": injected,
                "forwarded": dict(self.forwarded),
            }


def service_of(headers: Any) -> str | None:
    """The AWS service a signed request is for, from its SigV4 credential scope."""
    match = _SCOPE.search(headers.get("Authorization", ""))
    return match.group(1) if match else None


def make_handler(upstream: str, state: FaultState) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)
    local = threading.local()

    def connection() -> http.client.HTTPConnection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        return conn

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the platform's logs

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path == STATS_PATH and self.command == "GET":
                self._reply(200, {"Content-Type": "application/json"}, orjson.dumps(state.stats()))
                return
            service = service_of(self.headers)
            kind = state.next_fault(service) if service in SERVICES else None
            if kind is not None:
                self._reply(*error_response(service, kind))  # type: ignore[arg-type]
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
                conn = connection()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    local.conn = None
                    if attempt == 2:
                        raise
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            self._reply(resp.status, out, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def serve(upstream: str, plan_path: Path, port: int = 0) -> ThreadingHTTPServer:
    """Start the proxy on 127.0.0.1 in a background thread; `server.shutdown()` stops it."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(upstream, FaultState(plan_path)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True).start()
    return server


def stats(url: str) -> dict[str, Any]:
    """What a running proxy has injected and forwarded."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", STATS_PATH)
        return orjson.loads(conn.getresponse().read())
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="the emulator's endpoint URL")
    p.add_argument("--plan", type=Path, required=True, help="JSON fault plan, re-read when it changes")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = serve(args.upstream, args.plan, args.port)
    print(orjson.dumps({"event": "ready", "url": f"http://127.0.0.1:{server.server_port}"}).decode(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        sys.exit(0)


if __name__ == "__main__":
    main()
