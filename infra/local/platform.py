"""The local platform: every AWS piece of citypulse on one machine, behind one supervisor.

`citypulse up` starts a detached supervisor process (`python -m infra.local.platform`)
that brings up, in order:

1. the AWS API emulators (ministack; kinesalite for Kinesis) on loopback ports,
2. the stack, provisioned from `infra/cloudformation/iot-analytics-system.yaml` through
   the emulator's CloudFormation API, with stand-ins reported for what it cannot run,
3. the sensor registry in the lake,
4. Mosquitto with mutual TLS and per-device ACLs in place of IoT Core,
5. the rule bridge honouring the template's IoT rule (in place of the rule's Kinesis action),
6. one event-source poller per shard invoking the real processor handler,
7. the sweeper's schedule (`infra/local/schedule.py`) invoking the real sweeper handler.

It writes `platform.json` in the state directory (endpoints, environment, pids) and
stays in the foreground of its own session until `citypulse down` (SIGTERM), then stops
everything it started. The business code is the same as in AWS: only the environment
(`AWS_ENDPOINT_URL_*`, resource names) differs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from infra.local.certs import LocalCA
    from streaming.devices.gateway import Gateway
    from streaming.registry import City

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "infra" / "cloudformation" / "iot-analytics-system.yaml"
DEFAULT_STATE_DIR = REPO_ROOT / ".citypulse"
STATE_FILE = "platform.json"


class PlatformError(RuntimeError):
    """The local platform could not start, or is not running when it should be."""


@dataclass
class PlatformInfo:
    """What `up` leaves behind for the other commands (`platform.json`)."""

    state: str  # starting | ready | failed | stopped
    supervisor_pid: int
    state_dir: str
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    provision_report: str = ""
    stream: str = ""
    shards: list[str] = field(default_factory=list)
    sensors: int = 0
    seed: int = 0
    error: str = ""
    # Start time (clock ticks since boot) of each process, so that a recycled pid is never
    # mistaken for ours: only a process with the same pid *and* start time is signalled.
    starts: dict[str, int] = field(default_factory=dict)

    def record(self, name: str, pid: int) -> None:
        if name != "supervisor":
            self.pids[name] = pid
        self.starts[name] = process_start(pid) or -1

    def running(self, name: str = "supervisor") -> bool:
        """Whether the process this platform started under `name` is still alive."""
        pid = self.supervisor_pid if name == "supervisor" else self.pids.get(name)
        return pid is not None and process_start(pid) == self.starts.get(name)

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_bytes(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))
        os.replace(tmp, state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> PlatformInfo | None:
        try:
            return cls(**orjson.loads((state_dir / STATE_FILE).read_bytes()))
        except FileNotFoundError:
            return None


def demo_city(sensors: int, seed: int) -> City:
    """The city the local platform runs: `sensors` detectors, about 16 per zone, at most 256 zones."""
    from streaming.registry import generate_city

    return generate_city(sensors=sensors, zones=min(256, max(1, sensors // 16)), seed=seed)


def device_gateway(ca: LocalCA, gateway_id: str, host: str, port: int, **options: Any) -> Gateway:
    """A gateway (not yet connected) with its own X.509 device certificate from the local CA."""
    from streaming.devices.gateway import Gateway

    identity = ca.device_identity(gateway_id)  # one X.509 certificate per device
    return Gateway(
        gateway_id,
        endpoint=host,
        port=port,
        cert_path=identity.cert_path,
        key_path=identity.key_path,
        ca_path=ca.cert_path,
        **options,
    )


def gateway_connector(env: Mapping[str, str], **options: Any) -> Callable[[str], Gateway]:
    """`connect(gateway_id)`: a connected gateway on the running platform's broker, as `env` describes it.

    `env` is the platform's environment (`CITYPULSE_PKI_DIR`, `CITYPULSE_MQTT_HOST`, `CITYPULSE_MQTT_PORT`);
    `options` go to every Gateway (e.g. `basic_ingest_rule`, `max_in_flight`).
    """
    from infra.local.certs import LocalCA

    ca = LocalCA.load_or_create(Path(env["CITYPULSE_PKI_DIR"]))
    host, port = env["CITYPULSE_MQTT_HOST"], int(env["CITYPULSE_MQTT_PORT"])

    def connect(gateway_id: str) -> Gateway:
        gateway = device_gateway(ca, gateway_id, host, port, **options)
        gateway.connect()
        return gateway

    return connect


def process_start(pid: int) -> int | None:
    """A live process's start time in clock ticks since boot (None if gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # field 22 of stat(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _error_action_args(error_action: dict[str, Any] | None) -> list[str]:
    """The rule bridge's arguments for the rule's S3 error action (none without one)."""
    s3 = (error_action or {}).get("s3")
    if not s3:
        return []
    return ["--error-bucket", str(s3["bucketName"]), "--error-key", str(s3["key"])]


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(
        argv,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        start_new_session=True,
    )


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, marker: bytes, timeout: float) -> None:
    """Wait until a child writes `marker` to its log (its readiness signal), or fail."""
    deadline = time.monotonic() + timeout
    while marker not in log.read_bytes():
        if proc.poll() is not None:
            raise PlatformError(f"{log.stem} exited with {proc.returncode} before it was ready; see {log}")
        if time.monotonic() > deadline:
            raise PlatformError(f"{log.stem} was not ready within {timeout:.0f} s; see {log}")
        time.sleep(0.05)  # the child reports readiness only through its log


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def supervise(
    state_dir: Path,
    sensors: int,
    seed: int,
    env_name: str = "local",
    faults: Path | None = None,
    parameters: dict[str, str] | None = None,
) -> None:
    """Run the platform in this process until SIGTERM/SIGINT (the supervisor's body). With `faults`
    (a plan for infra/local/faults.py) the processor reaches DynamoDB, S3 and EventBridge through
    the fault-injecting proxy: the fault-injection suite's configuration, nothing else changes.
    `parameters`: the stack's template parameters where they are not the template's defaults,
    as a deploy passes them."""
    # Imported here: `citypulse status` and `down` must not pay for boto3, awscrt, pyarrow.
    import boto3

    from infra.local.broker import start_broker
    from infra.local.certs import LocalCA
    from infra.local.emulators import aws_env, start_kinesalite, start_ministack
    from infra.local.provision import provision
    from streaming.registry import registry_csv, zones_csv

    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    info = PlatformInfo(
        state="starting", supervisor_pid=os.getpid(), state_dir=str(state_dir), sensors=sensors, seed=seed
    )
    info.record("supervisor", os.getpid())
    info.save(state_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stoppers: list[Any] = []
    children: list[subprocess.Popen[bytes]] = []

    def step(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    try:
        step("starting AWS emulators (ministack, kinesalite)")
        ministack = start_ministack(state_dir / "aws")
        stoppers.append(ministack)
        kinesis = start_kinesalite(state_dir / "aws")
        stoppers.append(kinesis)
        env = {**os.environ, **aws_env(ministack, kinesis)}
        info.endpoints.update(ministack=ministack.endpoint_url, kinesis=kinesis.endpoint_url)
        info.record("ministack", ministack.process.pid)
        info.record("kinesalite", kinesis.process.pid)

        step(f"provisioning {TEMPLATE.relative_to(REPO_ROOT)} through the emulator's CloudFormation")
        os.environ.update(aws_env(ministack, kinesis))  # for this process's own boto3 calls
        report = provision(TEMPLATE, env_name, aws_env(ministack, kinesis), parameters=parameters)
        info.provision_report = report.render()
        env.update(report.processor_env)
        # What the local tools (CLI, DAG connections, dashboard) need from the stack outputs.
        out = report.outputs
        env.update(
            CITYPULSE_STREAM=out["TelemetryStreamName"],
            CITYPULSE_ALERT_FEED_QUEUE_URL=out["AlertFeedQueueUrl"],
            CITYPULSE_GLUE_DATABASE=out["GlueDatabaseName"],
            CITYPULSE_CRAWLER=out["RawReadingsCrawlerName"],
        )
        esm = report.event_source_mappings[0]
        stream = next(s for s in report.streams if s.name == esm.stream_name)
        info.stream = stream.name

        step(f"uploading the registry of a {sensors:,}-sensor city (seed {seed}) to the lake")
        city = demo_city(sensors, seed)
        s3 = boto3.client("s3")
        bucket = env["CITYPULSE_LAKE_BUCKET"]
        s3.put_object(
            Bucket=bucket,
            Key=env.get("CITYPULSE_REGISTRY_KEY", "registry/sensor_registry.csv"),
            Body=registry_csv(city),
        )
        s3.put_object(Bucket=bucket, Key="registry/zones.csv", Body=zones_csv(city))

        step("starting Mosquitto with mutual TLS and per-device ACLs")
        ca = LocalCA.load_or_create(state_dir / "pki")
        rule = report.topic_rule
        # Devices may also publish through Basic Ingest ($aws/rules/<rule>/...), as the IoT policy allows.
        broker = start_broker(state_dir / "broker", ca, basic_ingest_rule=rule.name)
        stoppers.append(broker)
        info.record("mosquitto", broker.process.pid)
        info.endpoints.update(mqtt=f"mqtts://localhost:{broker.port}")
        env.update(
            CITYPULSE_MQTT_HOST="localhost",
            CITYPULSE_MQTT_PORT=str(broker.port),
            CITYPULSE_CA=str(broker.ca_path),
            CITYPULSE_PKI_DIR=str(state_dir / "pki"),
            CITYPULSE_TOPIC_RULE=rule.name,
        )

        step(f"starting the rule bridge for IoT rule {rule.name}")
        bridge_id = ca.bridge_identity()
        bridge = _spawn(
            "rule-bridge",
            [
                sys.executable,
                "-m",
                "infra.local.rule_bridge",
                "--sql",
                rule.sql,
                "--partition-key",
                rule.partition_key,
                "--stream",
                rule.stream_name,
                "--broker-host",
                "localhost",
                "--broker-port",
                str(broker.port),
                "--ca",
                str(broker.ca_path),
                "--cert",
                str(bridge_id.cert_path),
                "--key",
                str(bridge_id.key_path),
                "--rule-name",
                rule.name,
                *_error_action_args(rule.error_action),
            ],
            env,
            logs,
        )
        children.append(bridge)
        info.record("rule-bridge", bridge.pid)
        # Until the bridge has subscribed, the broker drops what devices publish (nobody is
        # subscribed yet): the platform is not ready before the bridge says so.
        _wait_for_line(bridge, logs / "rule-bridge.log", b'"event":"ready"', timeout=60)

        kinesis_client = boto3.client("kinesis")
        shards = [s["ShardId"] for s in kinesis_client.list_shards(StreamName=stream.name)["Shards"]]
        info.shards = shards
        step(f"starting {len(shards)} event-source pollers (one per shard) with the real handler")
        dlq = _queue_url(esm.on_failure_destination) if esm.on_failure_destination else None
        if dlq:
            env.update(CITYPULSE_PROCESSOR_DLQ_URL=dlq)  # for `citypulse audit` and the redrive
        poller_env = env
        if faults is not None:
            proxy = _spawn(
                "faults",
                [
                    sys.executable,
                    "-m",
                    "infra.local.faults",
                    "--upstream",
                    ministack.endpoint_url,
                    "--plan",
                    str(faults),
                ],
                env,
                logs,
            )
            children.append(proxy)
            info.record("faults", proxy.pid)
            _wait_for_line(proxy, logs / "faults.log", b'"event":"ready"', timeout=30)
            url = orjson.loads((logs / "faults.log").read_bytes().splitlines()[-1])["url"]
            info.endpoints.update(faults=url)
            service_vars = ("AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EVENTBRIDGE")
            poller_env = {**env, **dict.fromkeys(service_vars, url)}
        for shard in shards:
            argv = [
                sys.executable,
                "-m",
                "infra.local.poller",
                "--stream",
                stream.name,
                "--shard",
                shard,
                "--function-name",
                esm.function_name,
                "--checkpoint-dir",
                str(state_dir / "poller"),
                "--batch-size",
                str(esm.batch_size),
                "--batching-window",
                str(esm.maximum_batching_window_s),
                "--max-retries",
                str(esm.maximum_retry_attempts if esm.maximum_retry_attempts is not None else 10_000),
            ]
            if esm.consumer:
                argv += ["--consumer", esm.consumer]
            if not esm.bisect_batch_on_function_error:
                argv.append("--no-bisect")
            if dlq:
                argv += ["--dlq-url", dlq]
            proc = _spawn(f"poller-{shard}", argv, poller_env, logs)
            children.append(proc)
            info.record(f"poller-{shard}", proc.pid)

        from streaming.processor.sweeper import SWEEP_INTERVAL_S

        sweeper_name = next(r.physical_id for r in report.resources if r.logical_id == "SweeperFunction")
        step(f"starting the sweeper's schedule (every {SWEEP_INTERVAL_S} s) with the real handler")
        sweeper = _spawn(
            "sweeper",
            [
                sys.executable,
                "-m",
                "infra.local.schedule",
                "--handler",
                "streaming.processor.sweeper.handler",
                "--every",
                str(SWEEP_INTERVAL_S),
                "--function-name",
                str(sweeper_name),
            ],
            {**env, **report.function_env[str(sweeper_name)]},
            logs,
        )
        children.append(sweeper)
        info.record("sweeper", sweeper.pid)

        info.env = {k: v for k, v in env.items() if k.startswith(("AWS_", "CITYPULSE_"))}
        info.state = "ready"
        info.save(state_dir)
        step("ready")
        while not stop.wait(1.0):
            for proc in children:
                if proc.poll() is not None:
                    raise PlatformError(
                        f"a platform process exited with {proc.returncode}: {proc.args[:4]} (see {logs})"
                    )
    except Exception as exc:
        info.state = "failed"
        info.error = f"{exc}"
        info.save(state_dir)
        traceback.print_exc()
    finally:
        step("stopping")
        for proc in reversed(children):
            _stop_process(proc)
        for s in reversed(stoppers):
            with contextlib.suppress(Exception):
                s.stop()
        if info.state != "failed":
            info.state = "stopped"
        info.save(state_dir)
        step("stopped")


def _queue_url(arn: str) -> str:
    """SQS queue ARN → URL, as the local poller's on-failure destination needs."""
    import boto3

    name = arn.rsplit(":", 1)[-1]
    return boto3.client("sqs").get_queue_url(QueueName=name)["QueueUrl"]


# --- client side: what the CLI calls ---------------------------------------------------------


def up(
    state_dir: Path,
    *,
    sensors: int,
    seed: int,
    fresh: bool = True,
    timeout: float = 180.0,
    echo: Any = print,
    faults: Path | None = None,
    parameters: dict[str, str] | None = None,
) -> PlatformInfo:
    """Start the supervisor detached and wait until it reports ready (or failed); `parameters`
    go to the stack (`supervise`)."""
    current = PlatformInfo.load(state_dir)
    if current and current.state in ("starting", "ready") and current.running():
        if not fresh:
            return current
        down(state_dir, echo=echo)
    if fresh and state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    log = open(state_dir / "logs" / "platform.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.local.platform",
            "--state-dir",
            str(state_dir),
            "--sensors",
            str(sensors),
            "--seed",
            str(seed),
            *(["--faults", str(faults)] if faults is not None else []),
            *[arg for key, value in (parameters or {}).items() for arg in ("--parameter", f"{key}={value}")],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    shown = 0
    while time.monotonic() < deadline:
        lines = (state_dir / "logs" / "platform.log").read_text(errors="replace").splitlines()
        for line in lines[shown:]:
            if line.startswith("["):
                echo(f"  {line}")
        shown = len(lines)
        info = PlatformInfo.load(state_dir)
        if info and info.supervisor_pid == proc.pid:
            if info.state == "ready":
                return info
            if info.state == "failed":
                proc.wait(30)
                raise PlatformError(
                    f"the local platform failed to start: {info.error}\nsee {state_dir / 'logs' / 'platform.log'}"
                )
        if proc.poll() is not None:
            raise PlatformError(
                f"the platform supervisor exited with {proc.returncode}; see {state_dir / 'logs' / 'platform.log'}"
            )
        time.sleep(0.2)  # polling a file another process writes; no event to wait on
    down(state_dir, echo=echo)
    raise PlatformError(f"the local platform was not ready within {timeout:.0f} s")


def down(state_dir: Path, timeout: float = 60.0, echo: Any = print) -> bool:
    """Stop the supervisor (which stops everything it started); kill leftovers. True if
    anything was running."""
    info = PlatformInfo.load(state_dir)
    if info is None:
        return False
    was_running = info.running()
    if was_running:
        os.kill(info.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while info.running() and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for another session's process to exit; no handle to wait on
    for name, pid in {"supervisor": info.supervisor_pid, **info.pids}.items():
        if info.running(name):
            echo(f"  killing leftover {name} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    info = PlatformInfo.load(state_dir) or info
    if info.state in ("starting", "ready"):
        info.state = "stopped"
        info.save(state_dir)
    return was_running


def require_running(state_dir: Path) -> PlatformInfo:
    info = PlatformInfo.load(state_dir)
    if info is None or info.state != "ready" or not info.running():
        raise PlatformError("the local platform is not running: start it with `citypulse up` or `citypulse demo`")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="citypulse local platform supervisor (use `citypulse up`)")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--sensors", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--faults", type=Path, default=None, help="fault plan: the processor's AWS calls go through it")
    p.add_argument("--parameter", type=stack_parameter, action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    supervise(args.state_dir, args.sensors, args.seed, faults=args.faults, parameters=dict(args.parameter))


def stack_parameter(text: str) -> tuple[str, str]:
    """`KEY=VALUE` of a template parameter, as `aws cloudformation deploy --parameter-overrides` takes it."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: a template parameter is KEY=VALUE")
    return key, value


if __name__ == "__main__":
    main()
