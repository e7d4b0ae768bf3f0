"""A private Mosquitto broker: the local stand-in for AWS IoT Core's MQTT endpoint.

Flow: gateways (streaming/devices) ──MQTT+mTLS──▶ **this broker** ──▶ rule bridge
(infra/local/rule_bridge.py) ──▶ Kinesis.

It reproduces the IoT Core properties the rest of the platform relies on:

* mutual TLS only, on 127.0.0.1: a client needs a certificate from the local CA
  (infra/local/certs.py), and a revoked one is refused (``crlfile``);
* the certificate CN is the MQTT username *and* client id (``use_identity_as_username`` +
  ``use_username_as_clientid``), so a device cannot take over another's session, and the
  IoT policy's "publish only on your own topic" becomes the ACL pattern
  ``citypulse/telemetry/+/%u`` (and, with a rule name, its Basic Ingest form
  ``$aws/rules/<rule>/citypulse/telemetry/+/%u``);
* oversized packets are refused like IoT Core's 128 KB message limit, loudly (the client
  is disconnected) rather than dropped.

Everything (config, ACL, log, optional persistence) is generated into a state directory.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.local.certs import BRIDGE_CN, LocalCA
from streaming.devices.topics import basic_ingest_prefix

TELEMETRY_FILTER = "citypulse/telemetry/#"
DEVICE_PUBLISH_PATTERN = "citypulse/telemetry/+/%u"

# IoT Core refuses payloads over 128 KiB; the packet also carries the topic and headers.
MAX_PACKET_SIZE = 128 * 1024 + 1024
# Mosquitto's default of 1000 silently drops QoS 1 messages for a subscriber that falls
# behind or is offline (the publisher still gets its PUBACK). The rule bridge is that
# subscriber while it restarts, so the queue must hold minutes of traffic: 200 k messages
# is ~4 min at 50 k readings/s in 50-reading messages, and the byte cap bounds memory.
DEFAULT_MAX_QUEUED_MESSAGES = 200_000
DEFAULT_MAX_QUEUED_BYTES = 4 * 1024**3
# The bridge acknowledges a message only once Kinesis has it, so the broker's outgoing
# in-flight window (default 20) bounds bridge throughput to window / (flush latency).
# 1000 lets a 50-100 ms Kinesis round trip still carry >10 k messages/s.
DEFAULT_MAX_INFLIGHT_MESSAGES = 1000

_READY_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


# Brokers run in their own session (so a terminal's Ctrl-C reaches us, not them); this makes
# sure a script that dies without calling stop() does not leave them behind.
_RUNNING: set[subprocess.Popen[bytes]] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for process in leftovers:
        with contextlib.suppress(Exception):
            process.terminate()
            process.wait(_STOP_TIMEOUT_S)


class BrokerError(RuntimeError):
    """Mosquitto could not be started, or did not become ready in time."""


@dataclass
class Broker:
    """A running private Mosquitto. ``stop()`` (or the context manager) ends it."""

    host: str
    port: int
    ca_path: Path
    state_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    plain_port: int | None = None
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Terminate gracefully (persistence, if on, is saved), killing after ``timeout`` s."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with _RUNNING_LOCK:
            _RUNNING.discard(self.process)

    def kill(self) -> None:
        """End the broker abruptly (SIGKILL), as a crash would; for fault tests."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        with _RUNNING_LOCK:
            _RUNNING.discard(self.process)

    @property
    def running(self) -> bool:
        return not self._stopped and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host`` now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """Path of the mosquitto binary (PATH first, then Debian's /usr/sbin)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError("mosquitto not found: install the Debian package 'mosquitto'")
    return found


def render_acl(basic_ingest_rule: str | None = None) -> str:
    """The ACL for the TLS listener (usernames are certificate CNs).

    With ``basic_ingest_rule``, a gateway may also publish on its own topic behind that
    rule's Basic Ingest prefix (as the IoT policy allows), and the bridge reads those.
    """
    device = [f"pattern write {DEVICE_PUBLISH_PATTERN}"]
    bridge = [f"topic read {TELEMETRY_FILTER}"]
    if basic_ingest_rule is not None:
        prefix = basic_ingest_prefix(basic_ingest_rule)
        device.append(f"pattern write {prefix}{DEVICE_PUBLISH_PATTERN}")
        bridge.append(f"topic read {prefix}{TELEMETRY_FILTER}")
    return "\n".join(
        [
            "# Generated by infra/local/broker.py. Mirrors the IoT policy: a gateway publishes only",
            "# on topics ending in its own id (directly or through Basic Ingest), and reads nothing.",
            *device,
            "",
            f"user {BRIDGE_CN}",
            *bridge,
            "",
        ]
    )


def render_plain_acl() -> str:
    """The ACL for the optional plaintext listener, where the client id is the only identity."""
    return "\n".join(
        [
            "# Generated by infra/local/broker.py. Plaintext, unauthenticated, loopback-only: a",
            "# client is whoever its client id says. For local experiments only.",
            "pattern write citypulse/telemetry/+/%c",
            f"topic read {TELEMETRY_FILTER}",
            "",
        ]
    )


def render_config(
    *,
    state_dir: Path,
    host: str,
    port: int,
    ca: LocalCA,
    server_cert: Path,
    server_key: Path,
    use_crl: bool,
    persistence: bool,
    max_queued_messages: int,
    max_queued_bytes: int,
    max_inflight_messages: int,
    plain_port: int | None,
) -> str:
    """The mosquitto.conf text for a private broker."""
    lines = [
        "# Generated by infra/local/broker.py; rewritten on every start.",
        "per_listener_settings true",
        # Without this, a broker started as root drops to user 'mosquitto' and can no longer
        # read the 0600 server key in the state dir.
        f"user {getpass.getuser()}",
        f"log_dest file {state_dir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {max_queued_bytes}",
        f"max_inflight_messages {max_inflight_messages}",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "queue_qos0_messages false",
        "upgrade_outgoing_qos false",
    ]
    if persistence:
        # Mosquitto saves on graceful exit and every autosave_interval; a kill -9 loses what
        # arrived since the last save.
        lines += [
            "persistence true",
            f"persistence_location {state_dir}/",
            "autosave_interval 10",
        ]
    else:
        lines.append("persistence false")
    lines += [
        "",
        f"listener {port} {host}",
        "protocol mqtt",
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"cafile {ca.cert_path}",
        f"certfile {server_cert}",
        f"keyfile {server_key}",
        f"acl_file {state_dir / 'acl'}",
    ]
    if use_crl:
        lines.append(f"crlfile {ca.crl_path}")
    if plain_port is not None:
        lines += [
            "",
            f"listener {plain_port} {host}",
            "protocol mqtt",
            "allow_anonymous true",
            f"acl_file {state_dir / 'acl.plain'}",
        ]
    return "\n".join(lines) + "\n"


def start_broker(
    state_dir: Path,
    ca: LocalCA,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    use_crl: bool = True,
    persistence: bool = True,
    plain_port: int | None = None,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES,
    ready_timeout: float = _READY_TIMEOUT_S,
    basic_ingest_rule: str | None = None,
) -> Broker:
    """Start Mosquitto with mTLS on ``host:port`` (a free port if None) and wait until it serves TLS.

    ``plain_port`` (0 = a free one) adds an unauthenticated plaintext listener, only when
    explicitly asked for. The CRL is read at start: restart the broker after revoking.

    ``persistence`` (on by default) keeps sessions, subscriptions and queued messages in the
    state dir across a restart. Without it, the rule bridge's subscription is gone after a
    broker restart, and whatever gateways publish before the bridge resubscribes is
    acknowledged and dropped (measured: ~500 of 3,000 messages).

    ``basic_ingest_rule`` (the IoT rule's name) also admits each device's Basic Ingest topic
    ``$aws/rules/<rule>/citypulse/telemetry/+/<its id>``; the rule bridge reads it.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise BrokerError(f"the local broker binds loopback only, not {host!r}")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    server = ca.server_identity()
    bridge = ca.bridge_identity()
    (state_dir / "acl").write_text(render_acl(basic_ingest_rule))
    if plain_port is not None:
        (state_dir / "acl.plain").write_text(render_plain_acl())
    binary = find_mosquitto()

    # A port we picked can be taken between our probe and Mosquitto's bind; pick again then.
    attempts = 1 if port is not None else 3
    last_error = ""
    config_path = state_dir / "mosquitto.conf"
    log_path = state_dir / "mosquitto.log"
    for _ in range(attempts):
        tls_port = port if port is not None else free_port(host)
        p_port = (free_port(host) if plain_port == 0 else plain_port) if plain_port is not None else None
        config_path.write_text(
            render_config(
                state_dir=state_dir,
                host=host,
                port=tls_port,
                ca=ca,
                server_cert=server.cert_path,
                server_key=server.key_path,
                use_crl=use_crl,
                persistence=persistence,
                max_queued_messages=max_queued_messages,
                max_queued_bytes=max_queued_bytes,
                max_inflight_messages=max_inflight_messages,
                plain_port=p_port,
            )
        )
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        # Errors before the log file opens (bad config, bind failure) go to stderr: keep them
        # in a file rather than a pipe nobody drains.
        with open(state_dir / "mosquitto.stderr", "wb") as stderr:
            process = subprocess.Popen(
                [binary, "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        broker = Broker(
            host=host,
            port=tls_port,
            ca_path=ca.cert_path,
            state_dir=state_dir,
            config_path=config_path,
            log_path=log_path,
            process=process,
            plain_port=p_port,
        )
        try:
            _wait_ready(broker, bridge.cert_path, bridge.key_path, ready_timeout)
            return broker
        except BrokerError as e:
            broker.stop()
            stderr_text = (state_dir / "mosquitto.stderr").read_text(errors="replace")
            last_error = f"{e}\n--- stderr ---\n{stderr_text}\n--- log ---\n{broker.log_text()[log_offset:]}"
            if "in use" not in last_error:
                break
    raise BrokerError(f"mosquitto did not start: {last_error}")


def _wait_ready(broker: Broker, cert: Path, key: Path, timeout: float) -> None:
    # Ready means a full mutual-TLS handshake succeeds, i.e. the listener is bound and its
    # certificates and CRL loaded. Each failed try waits on the process itself, so a broker
    # that exits on a config error is reported at once rather than at the deadline.
    ctx = ssl.create_default_context(cafile=str(broker.ca_path))
    ctx.load_cert_chain(str(cert), str(key))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with (
                socket.create_connection((broker.host, broker.port), timeout=1.0) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                # A clean close_notify, so the broker log shows no spurious TLS error; the
                # handshake having succeeded is what counts.
                with contextlib.suppress(OSError):
                    tls.unwrap()
                return
        except (OSError, ssl.SSLError) as e:
            last = e
        if time.monotonic() > deadline:
            raise BrokerError(f"no TLS handshake with {broker.host}:{broker.port} within {timeout}s: {last}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = broker.process.wait(0.05)
            raise BrokerError(f"mosquitto exited with code {rc}")
