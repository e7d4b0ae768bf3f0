"""`citypulse dashboard`: the operators' live dashboard on 127.0.0.1, over the local platform.

Place in the flow: the local stand-in for API Gateway + the read-API Lambda + the static
site. One `ThreadingHTTPServer` (stdlib) on loopback:

* `/api/...` → an API Gateway REST proxy event → the real `streaming.readapi.handler`
  (the same code the Lambda runs) → its response, unchanged;
* anything else → the static page in `dashboard/static/` (front-end libraries vendored there
  from npm by `dashboard/package-lock.json`; the page loads nothing from anywhere else, and
  says so in its Content-Security-Policy).

A queue is not a log: the alert feed (SQS, fed by the EventBridge alert rule) is drained by
one thread into an in-memory alert log that the handler reads. In AWS the same handler reads
the DynamoDB alerts table kept by `streaming.readapi.alerts.store_alert_handler`.
"""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from infra.local.platform import REPO_ROOT, require_running

DASHBOARD_DIR = REPO_ROOT / "dashboard"
STATIC_DIR = DASHBOARD_DIR / "static"
HOST = "127.0.0.1"
API_PREFIX = "/api"
MAX_URL_CHARS = 4096
MAX_QUERY_FIELDS = 100
# The page may load only what this server serves: no CDN, no tiles, no fonts from elsewhere.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def ensure_assets(echo: Callable[[str], None] = print) -> None:
    """Install the page's front-end libraries from the lock file and vendor them into
    `dashboard/static/vendor/` (once; again when the lock file changes)."""
    lock = DASHBOARD_DIR / "package-lock.json"
    marker = DASHBOARD_DIR / "node_modules" / ".citypulse-installed"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        echo("installing the dashboard's front-end libraries (npm ci, from dashboard/package-lock.json)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=DASHBOARD_DIR, check=True)
        marker.touch()
    if not (STATIC_DIR / "vendor" / "leaflet.js").exists() or (STATIC_DIR / "vendor").stat().st_mtime < (
        marker.stat().st_mtime
    ):
        subprocess.run(["node", "scripts/vendor.mjs"], cwd=DASHBOARD_DIR, check=True, capture_output=True)


@dataclass
class _LambdaContext:
    """The parts of a Lambda context the handler's logger reads."""

    aws_request_id: str
    function_name: str = "citypulse-local-readapi"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:000000000000:function:citypulse-local-readapi"


def proxy_event(method: str, raw_path: str, headers: dict[str, str]) -> dict[str, Any]:
    """An HTTP request → the API Gateway REST proxy event the Lambda would receive.

    API Gateway decodes the query string and keeps the last value in
    `queryStringParameters` and all of them in `multiValueQueryStringParameters`."""
    parts = urlsplit(raw_path)
    path = unquote(parts.path.removeprefix(API_PREFIX) or "/", errors="replace")
    multi: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, errors="replace", max_num_fields=MAX_QUERY_FIELDS):
        multi.setdefault(key, []).append(value)
    request_id = str(uuid.uuid4())
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": {k: v[-1] for k, v in multi.items()} or None,
        "multiValueQueryStringParameters": multi or None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": f"/local{path}",
            "stage": "local",
            "requestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "identity": {"sourceIp": HOST},
        },
        "body": None,
        "isBase64Encoded": False,
    }


class _Handler(BaseHTTPRequestHandler):
    server_version = "citypulse-dashboard"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per poll every few seconds is noise; errors are answered, not logged

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = orjson.dumps({"error": {"status": status, "code": code, "message": message}})
        self._send(status, body, "application/json")

    def do_GET(self) -> None:
        if len(self.path) > MAX_URL_CHARS:
            self._error(414, "url_too_long", f"the URL is over {MAX_URL_CHARS} characters")
        elif self.path == API_PREFIX or self.path.startswith((API_PREFIX + "/", API_PREFIX + "?")):
            self._api()
        else:
            self._static()

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._error(405, "method_not_allowed", f"{self.command} is not allowed: the dashboard is read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _api(self) -> None:
        from streaming.readapi.handler import lambda_handler

        try:
            event = proxy_event("GET", self.path, {k: v for k, v in self.headers.items()})
        except ValueError:  # parse_qsl's max_num_fields
            self._error(400, "too_many_parameters", f"the query has over {MAX_QUERY_FIELDS} parameters")
            return
        result = lambda_handler(event, _LambdaContext(event["requestContext"]["requestId"]))
        body = result.get("body") or ""
        data = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
        headers = {k: v[-1] for k, v in (result.get("multiValueHeaders") or {}).items() if v}
        headers.update(result.get("headers") or {})
        content_type = headers.pop("Content-Type", "application/json")
        self._send(int(result["statusCode"]), data, content_type)

    def _static(self) -> None:
        path = unquote(urlsplit(self.path).path, errors="replace")
        if path in ("", "/"):
            path = "/index.html"
        target = (STATIC_DIR / path.lstrip("/")).resolve()
        if not target.is_relative_to(STATIC_DIR.resolve()) or not target.is_file():
            self._error(404, "not_found", f"no file {path[:80]!r}")
            return
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/javascript":
            content_type += "; charset=utf-8"
        self._send(200, target.read_bytes(), content_type)


class AlertFeedDrainer:
    """Moves alerts from the SQS alert feed into the alert log the read API serves."""

    def __init__(self, sqs: Any, queue_url: str, log: Any) -> None:
        self._sqs, self._url, self._log = sqs, queue_url, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-feed", daemon=True)
        self.received = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def drain_once(self, wait_s: int = 1) -> int:
        from streaming.readapi.alerts import alert_from_event

        resp = self._sqs.receive_message(QueueUrl=self._url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s)
        messages = resp.get("Messages", [])
        for m in messages:
            with contextlib.suppress(orjson.JSONDecodeError):
                alert = alert_from_event(orjson.loads(m["Body"]))
                if alert is not None:
                    self._log.add(alert)
            self.received += 1
        if messages:
            self._sqs.delete_message_batch(
                QueueUrl=self._url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
        return len(messages)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain_once()
            except Exception:  # the feed may be briefly unavailable; the dashboard keeps serving
                self._stop.wait(2.0)  # back-off before asking the queue again


class DashboardServer:
    """The local dashboard: HTTP server + alert-feed drainer over a running platform's environment."""

    def __init__(self, env: dict[str, str], host: str = HOST, port: int = 0) -> None:
        import boto3

        from streaming.readapi.alerts import MemoryAlertLog
        from streaming.readapi.handler import Deps, configure
        from streaming.readapi.sources import LiveSource

        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the local dashboard listens on loopback only, not {host!r}")
        os.environ.update(env)  # boto3 finds the emulators the way it finds AWS
        self.alerts = MemoryAlertLog()
        configure(Deps(source=LiveSource.from_env(), alerts=self.alerts, now_ms=lambda: int(time.time() * 1000)))
        self.drainer = AlertFeedDrainer(boto3.client("sqs"), env["CITYPULSE_ALERT_FEED_QUEUE_URL"], self.alerts)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self.drainer.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.drainer.stop()
        from streaming.readapi.handler import configure

        configure(None)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(state_dir: Path, *, host: str = HOST, port: int = 8050, echo: Callable[[str], None] = print) -> None:
    """`citypulse dashboard`: serve the live dashboard until Ctrl-C (the platform must be up)."""
    info = require_running(state_dir)
    ensure_assets(echo)
    server = DashboardServer(info.env, host, port).start()
    echo(f"citypulse dashboard on {server.url} (API under {server.url}api/ ; Ctrl-C to stop)")
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
