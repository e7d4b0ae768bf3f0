"""`citypulse dashboard --api-url`: the page served on loopback over a deployed read API.

The deployed API is IAM-authorized (SigV4, `execute-api`). Its stand-in here is a loopback
HTTP server that checks each request's signature the way API Gateway does, by computing it
again from what it received (method, path, query, signed headers, date) with the caller's
secret, and answers 403 when it differs. No AWS, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from infra.local.dashboard_server import DashboardServer, RemoteApi, remote_api

REGION = "eu-west-1"
CALLER = Credentials("AKIDCITYPULSETEST", "the-operators-secret")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), Signature=([0-9a-f]{64})")


class _ApiGatewayStandIn(BaseHTTPRequestHandler):
    """Answers a GET whose SigV4 signature it can compute again with `server.secret`."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        verdict = self._check()
        status, body = (200, {"path": self.path}) if verdict is None else (403, {"message": verdict})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _check(self) -> str | None:
        match = _AUTH.fullmatch(self.headers.get("Authorization", ""))
        if match is None:
            return "Missing Authentication Token"
        credential, signed, signature = match.groups()
        access_key, day, region, service, terminal = credential.split("/")
        if (access_key, region, service, terminal) != (CALLER.access_key, REGION, "execute-api", "aws4_request"):
            return f"credential scope {credential}"
        names = signed.split(";")
        # As API Gateway does: the query's names and values decoded, then encoded as SigV4 says
        # (botocore encodes `params` so); the path as it came.
        path, _, query = self.path.partition("?")
        received = AWSRequest(
            method="GET",
            url=f"http://{self.headers['Host']}{path}",
            params=parse_qsl(query, keep_blank_values=True),
            headers={name: self.headers[name] for name in names},
        )
        received.context["timestamp"] = self.headers["X-Amz-Date"]
        signer = SigV4Auth(Credentials(access_key, self.server.secret), service, region)  # type: ignore[attr-defined]
        if day != self.headers["X-Amz-Date"][:8] or set(signer.headers_to_sign(received).keys()) != set(names):
            return "signed headers or date"
        expected = signer.signature(signer.string_to_sign(received, signer.canonical_request(received)), received)
        return None if expected == signature else "The request signature we calculated does not match"


@pytest.fixture
def api_gateway() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ApiGatewayStandIn)
    httpd.secret = CALLER.secret_key  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _get(url: str) -> tuple[int, Any, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = answer.read()
            kind = answer.headers["Content-Type"]
            status = answer.status
    except urllib.error.HTTPError as exc:
        body, kind, status = exc.read(), exc.headers["Content-Type"], exc.code
    return status, json.loads(body) if kind.startswith("application/json") else body, kind


def _dashboard(api_gateway: ThreadingHTTPServer) -> DashboardServer:
    port = api_gateway.server_address[1]
    return DashboardServer(None, remote=RemoteApi(f"http://127.0.0.1:{port}/api", CALLER, REGION))


def test_api_requests_reach_the_deployed_api_signed_path_and_query_intact(api_gateway: ThreadingHTTPServer) -> None:
    with _dashboard(api_gateway) as dashboard:
        status, body, _ = _get(dashboard.url + "api/zones?limit=5&cursor=a%2Fb%3D&state=congested")

    assert status == 200, body
    assert body == {"path": "/api/zones?limit=5&cursor=a%2Fb%3D&state=congested"}


def test_a_query_as_a_browser_writes_it_is_signed_as_api_gateway_checks_it(api_gateway: ThreadingHTTPServer) -> None:
    """A raw `:` (a timestamp), a lower-case escape and a `+`: signed verbatim, each would be
    refused; encoded again, the API receives the same values."""
    with _dashboard(api_gateway) as dashboard:
        status, body, _ = _get(dashboard.url + "api/alerts?since=2026-11-23T18:05:00Z&cursor=a%2fb&type=a+b")

    assert status == 200, body
    assert body == {"path": "/api/alerts?since=2026-11-23T18%3A05%3A00Z&cursor=a%2Fb&type=a%20b"}


def test_the_apis_refusal_is_passed_on_as_it_came(api_gateway: ThreadingHTTPServer) -> None:
    api_gateway.secret = "another-secret"  # type: ignore[attr-defined]  # the caller's key is not trusted
    with _dashboard(api_gateway) as dashboard:
        status, body, kind = _get(dashboard.url + "api/overview")

    assert (status, kind) == (403, "application/json")
    assert body == {"message": "The request signature we calculated does not match"}


def test_an_unreachable_api_is_a_clear_502_and_the_page_is_still_served(api_gateway: ThreadingHTTPServer) -> None:
    port = api_gateway.server_address[1]
    api_gateway.shutdown()
    api_gateway.server_close()
    with DashboardServer(None, remote=RemoteApi(f"http://127.0.0.1:{port}/api", CALLER, REGION, 3.0)) as dashboard:
        status, body, _ = _get(dashboard.url + "api/zones")
        page_status, page, kind = _get(dashboard.url)

    assert status == 502 and body["error"]["code"] == "read_api_unreachable"
    assert page_status == 200 and kind.startswith("text/html") and b"<html" in page.lower()


def test_the_region_comes_from_the_apis_url_and_the_credentials_from_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CALLER.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CALLER.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    api = remote_api("https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/api")

    assert api.region == REGION
    assert api.credentials.get_frozen_credentials().access_key == CALLER.access_key
    assert api.url_for("/api/zones/Z-001/metrics?minutes=15") == (
        "https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/api/zones/Z-001/metrics?minutes=15"
    )
