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

`citypulse dashboard --api-url URL` serves the same page over a deployed stack instead: `/api/...`
goes to the read API in API Gateway (the stack's output `ReadApiUrl`), which takes only
requests signed (SigV4) by a principal allowed `execute-api:Invoke`, such as the operator
role; `RemoteApi` signs each with the caller's AWS credentials. The page still loads only
from 127.0.0.1, so its CSP holds.
"""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

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
        self._send(*_error_body(status, code, message))

    def _foreign_host(self) -> bool:
        """True unless the request names this server by a loopback name and its own port. A page
        of another site whose name an attacker has rebound to 127.0.0.1 (DNS rebinding) would
        otherwise be "same-origin" with the dashboard and read its API, which over a deployed
        stack signs each call with the operator's credentials."""
        port = self.server.server_address[1]
        allowed = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        return (self.headers.get("Host") or "").lower() not in allowed

    def do_GET(self) -> None:
        if self._foreign_host():
            self._error(421, "misdirected_request", "the dashboard answers to 127.0.0.1 or localhost only")
        elif len(self.path) > MAX_URL_CHARS:
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
        api: Api = self.server.api  # type: ignore[attr-defined]
        status, body, content_type = api(self.path, {k: v for k, v in self.headers.items()})
        self._send(status, body, content_type)

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


# An API answer: status, body, content type.
ApiResponse = tuple[int, bytes, str]
Api = Callable[[str, dict[str, str]], ApiResponse]


def _error_body(status: int, code: str, message: str) -> ApiResponse:
    return status, orjson.dumps({"error": {"status": status, "code": code, "message": message}}), "application/json"


def local_api(raw_path: str, headers: dict[str, str]) -> ApiResponse:
    """`/api/...` answered in-process by the read API's Lambda handler, as API Gateway would call it."""
    from streaming.readapi.handler import lambda_handler

    try:
        event = proxy_event("GET", raw_path, headers)
    except ValueError:  # parse_qsl's max_num_fields
        return _error_body(400, "too_many_parameters", f"the query has over {MAX_QUERY_FIELDS} parameters")
    result = lambda_handler(event, _LambdaContext(event["requestContext"]["requestId"]))
    body = result.get("body") or ""
    data = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    answer_headers = {k: v[-1] for k, v in (result.get("multiValueHeaders") or {}).items() if v}
    answer_headers.update(result.get("headers") or {})
    return int(result["statusCode"]), data, answer_headers.pop("Content-Type", "application/json")


@dataclass
class RemoteApi:
    """`/api/...` forwarded to the deployed read API (`base_url`, the stack's `ReadApiUrl`),
    each request signed with SigV4 for `execute-api` in `region` with `credentials` (botocore's,
    refreshed as they expire). Its answers are passed on as they come, errors included."""

    base_url: str
    credentials: Any
    region: str
    timeout_s: float = 15.0

    def url_for(self, raw_path: str) -> str:
        """The deployed API's URL of a `/api/...` request, its query encoded again: botocore
        signs a URL's query verbatim, and API Gateway checks each name and value encoded as
        SigV4 says (RFC 3986, upper-case escapes), so a raw `:` or a `%2f` signed as the browser
        wrote it would be refused. ValueError beyond `MAX_QUERY_FIELDS` parameters."""
        parts = urlsplit(raw_path)
        url = self.base_url.rstrip("/") + (parts.path.removeprefix(API_PREFIX) or "/")
        params = parse_qsl(parts.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        return url + ("?" + urlencode(params, quote_via=quote, safe="-_.~") if params else "")

    def __call__(self, raw_path: str, headers: dict[str, str]) -> ApiResponse:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        try:
            url = self.url_for(raw_path)
        except ValueError:  # parse_qsl's max_num_fields
            return _error_body(400, "too_many_parameters", f"the query has over {MAX_QUERY_FIELDS} parameters")
        request = AWSRequest(method="GET", url=url, headers={"Accept": "application/json"})
        SigV4Auth(self.credentials.get_frozen_credentials(), "execute-api", self.region).add_auth(request)
        prepared = request.prepare()
        outgoing = urllib.request.Request(prepared.url, headers=dict(prepared.headers.items()), method="GET")
        try:
            with urllib.request.urlopen(outgoing, timeout=self.timeout_s) as answer:
                return answer.status, answer.read(), answer.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as exc:  # the API's own 4xx/5xx, passed on
            return exc.code, exc.read(), exc.headers.get("Content-Type", "application/json")
        except OSError as exc:
            return _error_body(502, "read_api_unreachable", f"the read API did not answer: {exc}")


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
    """The dashboard on loopback: over a running local platform's environment (the read API
    in-process, the alert feed drained into its log), or over a deployed read API (`remote`)."""

    def __init__(
        self, env: dict[str, str] | None, host: str = HOST, port: int = 0, *, remote: RemoteApi | None = None
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the local dashboard listens on loopback only, not {host!r}")
        self.drainer: AlertFeedDrainer | None = None
        api: Api
        if remote is not None:
            api = remote
        else:
            if env is None:
                raise ValueError("the local dashboard needs the running platform's environment")
            import boto3

            from streaming.readapi.alerts import MemoryAlertLog
            from streaming.readapi.handler import Deps, configure
            from streaming.readapi.sources import LiveSource

            os.environ.update(env)  # boto3 finds the emulators the way it finds AWS
            self.alerts = MemoryAlertLog()
            configure(Deps(source=LiveSource.from_env(), alerts=self.alerts, now_ms=lambda: int(time.time() * 1000)))
            self.drainer = AlertFeedDrainer(boto3.client("sqs"), env["CITYPULSE_ALERT_FEED_QUEUE_URL"], self.alerts)
            api = local_api
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.api = api  # type: ignore[attr-defined]
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        if self.drainer is not None:
            self.drainer.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.drainer is not None:
            self.drainer.stop()
            from streaming.readapi.handler import configure

            configure(None)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def remote_api(api_url: str) -> RemoteApi:
    """The deployed read API at `api_url`, called with this machine's AWS credentials (the
    usual chain: environment, profile, SSO) in the URL's region (`<id>.execute-api.<region>.…`)."""
    import boto3

    session = boto3.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise SystemExit("no AWS credentials: sign in (e.g. as the operator role) to call the deployed read API")
    host = urlsplit(api_url).hostname or ""
    labels = host.split(".")
    region = labels[2] if len(labels) > 3 and labels[1] == "execute-api" else session.region_name
    if not region:
        raise SystemExit(f"cannot tell the region of {api_url}; set AWS_REGION")
    return RemoteApi(api_url, credentials, region)


def serve(
    state_dir: Path,
    *,
    host: str = HOST,
    port: int = 8050,
    api_url: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """`citypulse dashboard`: serve the live dashboard until Ctrl-C, over the local platform
    (which must be up) or, with `api_url`, over the deployed read API."""
    # Whether there is a platform to serve, before the front end's libraries are installed.
    info = None if api_url else require_running(state_dir)
    ensure_assets(echo)
    if info is None:
        server = DashboardServer(None, host, port, remote=remote_api(api_url)).start()
        echo(f"citypulse dashboard on {server.url} over {api_url} (Ctrl-C to stop)")
    else:
        server = DashboardServer(info.env, host, port).start()
        echo(f"citypulse dashboard on {server.url} (API under {server.url}api/ ; Ctrl-C to stop)")
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
