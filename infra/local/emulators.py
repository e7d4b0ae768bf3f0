"""Local AWS API emulators: start and stop ministack and kinesalite as child processes.

Place in the flow: the bottom of the local platform. Everything local that speaks AWS
(provisioning from the CloudFormation template, the IoT rule bridge, the event-source
poller, the processor, the DAGs) talks to these two processes through the endpoints that
:func:`aws_env` hands out:

* **ministack** (PyPI) serves every AWS API we use except Kinesis, on one loopback port.
* **kinesalite** (npm) serves Kinesis: ministack's Kinesis keeps iterator positions as list
  indexes and slows as shards fill (FIELD-NOTES), kinesalite is LevelDB-durable and keeps
  every record, in order, under concurrent producers.

Both keep durable state under the given state directory, listen on 127.0.0.1 only, on a
port the OS picked unless one is given, and log to files in the state directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
import botocore.config
import botocore.exceptions
from botocore.client import BaseClient

LOCAL_REGION = "us-east-1"
HOST = "127.0.0.1"

NODE_DIR = Path(__file__).resolve().parent
KINESALITE_SERVER_JS = NODE_DIR / "kinesalite_server.js"

# The services citypulse uses, by ministack's service names. Limiting ministack to them was
# measured: boot is ~1 s either way (ministack imports service modules lazily), so the
# filter is off by default and only offered to callers who want a smaller surface.
MINISTACK_SERVICES: tuple[str, ...] = (
    "s3",
    "dynamodb",
    "events",
    "sns",
    "sqs",
    "glue",
    "cloudformation",
    "iam",
    "kms",
    "lambda",
    "logs",
    "monitoring",
    "iot",
    "secretsmanager",
    "sts",
    "athena",
    "firehose",
)

# botocore derives each variable from the service id ("CloudWatch Logs" -> CLOUDWATCH_LOGS);
# verified against botocore's service models, not guessed.
MINISTACK_ENDPOINT_VARS: tuple[str, ...] = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_EVENTBRIDGE",
    "AWS_ENDPOINT_URL_SNS",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_GLUE",
    "AWS_ENDPOINT_URL_CLOUDFORMATION",
    "AWS_ENDPOINT_URL_IAM",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_LAMBDA",
    "AWS_ENDPOINT_URL_IOT",
    "AWS_ENDPOINT_URL_IOT_DATA_PLANE",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
    "AWS_ENDPOINT_URL_CLOUDWATCH",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "AWS_ENDPOINT_URL_ATHENA",
    "AWS_ENDPOINT_URL_FIREHOSE",
)

_LOG_TAIL_BYTES = 4000


class EmulatorError(RuntimeError):
    """An emulator failed to start or to become ready."""


@dataclass(eq=False)  # identity semantics: a running process is not a value
class Emulator:
    """A running emulator child process and where to reach it."""

    name: str
    endpoint_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)  # where this run's output begins in the shared log

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop gracefully (SIGTERM, wait), then SIGKILL the process group after ``timeout``.

        Graceful matters for ministack: its non-S3 state is written only on a clean shutdown.
        """
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
                    return
            # Whatever the emulator spawned (ministack's Lambda workers) dies with it: the
            # process group is ours alone because each emulator starts a new session.
            _kill_group(self.process.pid)
        finally:
            self._close_log()
            _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL the emulator and its process group at once (simulates a crash)."""
        try:
            _kill_group(self.process.pid)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout=10)
        finally:
            self._close_log()
            _RUNNING.discard(self)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The end of this run's log output (earlier runs on the same state dir excluded)."""
        try:
            data = self.log_path.read_bytes()[self._log_start :]
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def _close_log(self) -> None:
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Emulators started by this process and not yet stopped; stopped at interpreter exit so an
# aborted run does not leave servers behind (each runs in its own session, so no terminal
# signal reaches it).
_RUNNING: set[Emulator] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for emulator in leftovers:
        with contextlib.suppress(Exception):
            emulator.stop(timeout=10)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    state_dir: Path,
    port: int,
    cwd: Path | None = None,
) -> Emulator:
    log_path = state_dir / f"{name}.log"
    log_file = log_path.open("ab")
    log_start = log_file.tell()
    log_file.write(f"\n==== {name} starting on {HOST}:{port}: {' '.join(argv)}\n".encode())
    log_file.flush()
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        # Own session: the caller decides the stop order (a terminal Ctrl-C must not kill
        # the emulators under a consumer that is still draining), and stop() can reap the
        # whole group.
        start_new_session=True,
    )
    emulator = Emulator(name, f"http://{HOST}:{port}", process, log_path, state_dir, log_file, log_start)
    with _RUNNING_LOCK:
        _RUNNING.add(emulator)
    return emulator


def _wait_ready(emulator: Emulator, probe: Callable[[], bool], timeout: float) -> None:
    """Poll ``probe`` until it answers True; fail with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        try:
            # Waiting on the process doubles as the poll interval and notices an early exit.
            emulator.process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
        else:
            code = emulator.process.returncode
            emulator.stop()
            raise EmulatorError(
                f"{emulator.name} exited with code {code} before becoming ready; "
                f"log {emulator.log_path}:\n{emulator.log_tail()}"
            )
        if time.monotonic() > deadline:
            emulator.stop(timeout=5)
            raise EmulatorError(
                f"{emulator.name} not ready on {emulator.endpoint_url} after {timeout:.0f} s; "
                f"log {emulator.log_path}:\n{emulator.log_tail()}"
            )


def _start_with_port_retry(start: Callable[[int], Emulator], port: int | None) -> Emulator:
    # free_port() can race another process grabbing the port before the child binds it;
    # when we picked the port ourselves, pick again.
    attempts = 1 if port is not None else 3
    last: EmulatorError | None = None
    for _ in range(attempts):
        try:
            return start(port if port is not None else free_port())
        except EmulatorError as exc:
            last = exc
            if "in use" not in str(exc).lower():
                raise
    assert last is not None
    raise last


def start_ministack(
    state_dir: Path,
    port: int | None = None,
    *,
    services: tuple[str, ...] | None = None,
    ready_timeout: float = 60.0,
) -> Emulator:
    """Start ministack on 127.0.0.1 with durable state under ``state_dir`` and wait until ready.

    ``services`` limits ministack to those services (its ``SERVICES`` filter); ``None`` serves all.
    """
    state_dir = Path(state_dir).resolve()
    for sub in ("ministack", "s3", "tmp"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)

    def start(chosen: int) -> Emulator:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
        env.update(
            GATEWAY_PORT=str(chosen),
            BIND_HOST=HOST,
            # Its MQTT mTLS listener would bind 0.0.0.0:8883; the local broker replaces it.
            IOT_MTLS_ENABLED="0",
            SFTP_ENABLED="0",
            S3_PERSIST="1",
            S3_DATA_DIR=str(state_dir / "s3"),
            PERSIST_STATE="1",
            STATE_DIR=str(state_dir / "ministack"),
            MINISTACK_REGION=LOCAL_REGION,
            # Its pid file and Lambda scratch space go to TMPDIR: keep them in our state dir.
            TMPDIR=str(state_dir / "tmp"),
            PYTHONUNBUFFERED="1",
        )
        if services is not None:
            env["SERVICES"] = ",".join(services)
        # `python -m ministack` serves in this one process; the hypercorn CLI would fork a
        # worker, leaving two processes to stop.
        emulator = _spawn("ministack", [sys.executable, "-m", "ministack"], env, state_dir, chosen)
        ready_url = f"{emulator.endpoint_url}/_ministack/ready"
        _wait_ready(emulator, lambda: _http_ok(ready_url), ready_timeout)
        return emulator

    return _start_with_port_retry(start, port)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def ensure_node_modules() -> None:
    """Install the pinned npm packages (kinesalite) from package-lock.json if missing."""
    if (NODE_DIR / "node_modules" / "kinesalite" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise EmulatorError("npm not found on PATH: needed once to install kinesalite (infra/local)")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise EmulatorError(f"npm ci in {NODE_DIR} failed:\n{result.stdout}\n{result.stderr}")


def kinesis_client(endpoint_url: str, **config: Any) -> BaseClient:
    """A boto3 Kinesis client for a local endpoint with test credentials (no env needed)."""
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint_url,
        region_name=LOCAL_REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(**config),
    )


def start_kinesalite(state_dir: Path, port: int | None = None, *, ready_timeout: float = 30.0) -> Emulator:
    """Start kinesalite on 127.0.0.1, LevelDB under ``state_dir/kinesis``, and wait until it answers."""
    state_dir = Path(state_dir).resolve()
    db_dir = state_dir / "kinesis"
    db_dir.mkdir(parents=True, exist_ok=True)
    node = shutil.which("node")
    if node is None:
        raise EmulatorError("node not found on PATH: kinesalite needs Node.js >= 20")
    ensure_node_modules()

    def start(chosen: int) -> Emulator:
        env = dict(os.environ)
        env.update(AWS_REGION=LOCAL_REGION, AWS_ACCOUNT_ID="000000000000")
        argv = [node, str(KINESALITE_SERVER_JS), "--port", str(chosen), "--path", str(db_dir)]
        emulator = _spawn("kinesalite", argv, env, state_dir, chosen, cwd=NODE_DIR)
        client = kinesis_client(emulator.endpoint_url, connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})

        def probe() -> bool:
            try:
                client.list_streams(Limit=1)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                return False
            return True

        _wait_ready(emulator, probe, ready_timeout)
        return emulator

    return _start_with_port_retry(start, port)


def aws_env(ministack: Emulator, kinesis: Emulator | None = None) -> dict[str, str]:
    """Environment that routes boto3 (and the AWS CLI/SDKs) to the local emulators, per service
    (Kinesis to kinesalite when given, else to ministack with the rest)."""
    env = {var: ministack.endpoint_url for var in MINISTACK_ENDPOINT_VARS}
    if kinesis is not None:
        env["AWS_ENDPOINT_URL_KINESIS"] = kinesis.endpoint_url
    env.update(
        # Fallback for any service not listed above: ministack, never the real AWS.
        AWS_ENDPOINT_URL=ministack.endpoint_url,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION=LOCAL_REGION,
        AWS_REGION=LOCAL_REGION,
        # Emulators store aws-chunked bodies verbatim if clients add default checksums (FIELD-NOTES).
        AWS_REQUEST_CHECKSUM_CALCULATION="WHEN_REQUIRED",
        AWS_RESPONSE_CHECKSUM_VALIDATION="WHEN_REQUIRED",
    )
    return env
