"""`citypulse`: the command line of the local platform.

citypulse demo       start everything, play a city-hour through the real flow, run the
                     hourly and daily DAGs, print the accounting (the platform's main job)
citypulse up         start the local platform (emulators, broker, rule bridge, pollers)
citypulse status     what is running, where
citypulse down       stop everything `up` started
citypulse replay     publish recorded detector data (CSV/Parquet) into the running platform
citypulse dashboard  serve the live operator dashboard (local, or a deployed stack's read API)
citypulse airflow    serve the Airflow UI over the local DAG runs
citypulse backfill   re-run the hourly DAG over a range of hours
citypulse audit      reconcile received / stored / duplicates / quarantined for a time range
citypulse load       drive the platform at a rate in real time and report loss and latency
citypulse plan       AWS capacity and monthly cost, citypulse against the naive design
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import datetime
from pathlib import Path

from infra.local.platform import DEFAULT_STATE_DIR, PlatformError, PlatformInfo, down, stack_parameter, up


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("CITYPULSE_STATE_DIR") or DEFAULT_STATE_DIR).resolve()


def cmd_up(args: argparse.Namespace) -> int:
    info = up(_state_dir(args), sensors=args.sensors, seed=args.seed, fresh=not args.keep, parameters=_parameters(args))
    print(info.provision_report)
    print(
        f"ready: AWS emulator {info.endpoints['ministack']}, Kinesis {info.endpoints['kinesis']}, "
        f"MQTT {info.endpoints['mqtt']}"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    print("stopped the local platform" if down(state_dir) else "the local platform was not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    info = PlatformInfo.load(_state_dir(args))
    if info is None:
        print("the local platform has never been started here")
        return 1
    running = info.state == "ready" and info.running()
    print(
        f"platform: {info.state if running or info.state != 'ready' else 'not running (stale)'}"
        f" (state in {info.state_dir})"
    )
    if info.error:
        print(f"error: {info.error}")
    for name, pid in info.pids.items():
        print(f"  {name:<32} pid {pid:<8} {'running' if info.running(name) else 'stopped'}")
    for name, url in info.endpoints.items():
        print(f"  {name:<32} {url}")
    return 0 if running else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.local.demo import render_summary, run_demo

    state_dir = _state_dir(args)
    result = run_demo(state_dir, sensors=args.sensors, duration_s=args.duration, seed=args.seed)
    print(render_summary(result, state_dir))
    return 0 if result.ok else 1


def cmd_replay(args: argparse.Namespace) -> int:
    import boto3

    from infra.local.platform import gateway_connector, require_running
    from streaming.devices.replay import ColumnMap, ReplayError, plan_replay, read_rows, run_replay
    from streaming.registry import load_registry

    info = require_running(_state_dir(args))
    os.environ.update(info.env)
    env = info.env
    # The registry the processor enriches with: the one in the lake.
    registry_key = env.get("CITYPULSE_REGISTRY_KEY", "registry/sensor_registry.csv")
    body = boto3.client("s3").get_object(Bucket=env["CITYPULSE_LAKE_BUCKET"], Key=registry_key)["Body"].read()
    registry = load_registry(body)
    try:
        rows = read_rows(Path(args.file), ColumnMap.parse(args.map))
        zone = args.unknown_zone or min(s.zone_id for s in registry.values())
        plan = plan_replay(rows, registry, speed=args.speed, unknown_zone=zone)
    except ReplayError as exc:
        print(f"citypulse replay: {exc}", file=sys.stderr)
        return 2
    print(
        f"replaying {plan.rows:,} rows as {len(plan.messages):,} gateway messages from "
        f"{len({m.gateway_id for m in plan.messages})} gateways: {plan.recorded_span_s / 60:,.1f} recorded minutes "
        f"at {args.speed:g}x (about {plan.messages[-1].offset_s if plan.messages else 0:,.0f} s)"
    )
    if plan.unknown_sensors:
        print(
            f"  {len(plan.unknown_sensors)} detector ids are not in the registry (e.g. "
            f"{', '.join(sorted(plan.unknown_sensors)[:3])}): published anyway by gw-replay in zone {zone}; "
            "the processor quarantines them as unknown_sensor"
        )
    result = run_replay(plan, gateway_connector(env))
    print(
        f"published {result.readings:,} readings in {result.messages:,} messages in {result.seconds:.1f} s "
        f"({result.readings_per_s:,.0f} readings/s), {result.failed_publishes} failed"
    )
    return 0 if result.failed_publishes == 0 else 1


def cmd_dashboard(args: argparse.Namespace) -> int:
    from infra.local.dashboard_server import serve

    serve(_state_dir(args), port=args.port, api_url=args.api_url)
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    import signal

    from infra.local.airflow import UI_USER, serve_ui, ui_password
    from infra.local.platform import require_running

    state_dir = _state_dir(args)
    info = require_running(state_dir)
    proc = serve_ui(info.env, state_dir / "airflow", port=args.port)
    log = state_dir / "airflow" / "api-server.log"
    password = ui_password(state_dir / "airflow")
    print(f"Airflow UI on http://127.0.0.1:{args.port}: log in as {UI_USER} / {password} (log: {log}); Ctrl-C stops it")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from infra.local.airflow import run_backfill
    from infra.local.platform import require_running

    if args.start >= args.end:
        raise PlatformError(f"--from {args.start:%Y-%m-%dT%H:%M}Z is not before --to {args.end:%Y-%m-%dT%H:%M}Z")
    state_dir = _state_dir(args)
    info = require_running(state_dir)
    run = run_backfill(args.start, args.end, info.env, state_dir / "airflow")
    for start, state in sorted(run.run_states.items()):
        print(f"citypulse_hourly {start:%Y-%m-%d %H:%M}Z  {state}")
    print(f"backfill {'succeeded' if run.succeeded else 'FAILED'} in {run.seconds:.0f} s; logs in {run.log_dir}")
    return 0 if run.succeeded else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from infra.local.audit import cmd_audit as run

    return run(args, _state_dir(args))


def cmd_load(args: argparse.Namespace) -> int:
    from infra.local.load import render, run_load

    result = run_load(
        _state_dir(args),
        rate=args.rate,
        duration_s=args.duration,
        tick_s=args.tick,
        publishers=args.publishers,
        warmup_s=args.warmup,
        seed=args.seed,
        fresh=not args.keep,
        parameters=_parameters(args),
    )
    print(render(result))
    return 0 if result.accounted else 1


def utc_time(text: str) -> datetime:
    """An ISO 8601 time (UTC if it has no zone) as an aware UTC datetime; argparse's error if not one."""
    from infra.local.audit import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2026-03-02T09:00)") from None


def _window_seconds(text: str) -> int:
    """A MaximumBatchingWindowInSeconds as the API takes it (`infra.capacity.batching_window`)."""
    from infra.capacity import batching_window

    seconds: object = text  # not a whole number: refused as it is
    with contextlib.suppress(ValueError):
        seconds = int(text)
    try:
        return batching_window(seconds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The synthetic city `plan` spreads the sensors over (`capacity.zone_shares`) is built sensor by
# sensor: a million take ~15 s.
PLAN_MAX_SENSORS = 1_000_000


def cmd_plan(args: argparse.Namespace) -> int:
    from infra.capacity import Workload, alternatives, naive_plan, plan, render

    if args.sensors > PLAN_MAX_SENSORS:
        raise PlatformError(f"--sensors {args.sensors:,}: plan at most {PLAN_MAX_SENSORS:,} (a city's sensors)")
    try:
        w = Workload(
            sensors=args.sensors,
            rate_hz=args.rate,
            gateway_batch=args.gateway_batch,
            # By default the demo city's zones: 256, fewer in a small city (16 sensors a zone).
            zones=args.zones if args.zones is not None else min(256, max(1, args.sensors // 16)),
            basic_ingest=not args.no_basic_ingest,
            stream_mode=args.stream_mode,
            table_capacity_mode=args.table_capacity_mode,
            stream_consumer=args.stream_consumer,
            batching_window_s=args.batching_window,
        )
        provisioned = naive_plan(w, stream_mode="PROVISIONED", table_capacity_mode="PROVISIONED")
        print(render(plan(w), naive_plan(w), provisioned, alternatives(w)))
    except ValueError as exc:  # a workload no city has, or one no stream can carry
        raise PlatformError(f"plan: {exc}") from None
    return 0


def _parameters(args: argparse.Namespace) -> dict[str, str]:
    """The `--parameter`s, for a fresh platform only: a running one keeps the stack it has."""
    if args.parameter and args.keep:
        raise PlatformError("--parameter deploys a fresh stack: it cannot apply to the running platform (--keep)")
    return dict(args.parameter)


def parameter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parameter",
        type=stack_parameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a template parameter for the local stack, as a deploy overrides it (repeatable), e.g. "
        "ProcessorStreamConsumer=ENHANCED_FAN_OUT",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="citypulse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir", help="where the local platform keeps its state (default: .citypulse in the repository)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def city_flags(p: argparse.ArgumentParser, sensors: int) -> None:
        p.add_argument("--sensors", type=int, default=sensors, help=f"sensors in the city (default {sensors})")
        p.add_argument("--seed", type=int, default=7, help="seed of the city and its traffic (default 7)")

    p = sub.add_parser("demo", help="run the whole flow once and print the accounting")
    city_flags(p, 2000)
    p.add_argument("--duration", type=float, default=60, help="real seconds to play the city-hour in (default 60)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("up", help="start the local platform")
    city_flags(p, 2000)
    p.add_argument("--keep", action="store_true", help="keep the previous state instead of starting fresh")
    parameter_flag(p)
    p.set_defaults(func=cmd_up)
    sub.add_parser("status", help="show what is running").set_defaults(func=cmd_status)
    p = sub.add_parser("dashboard", help="serve the live operator dashboard on 127.0.0.1")
    p.add_argument("--port", type=int, default=8050, help="loopback port (default 8050)")
    p.add_argument(
        "--api-url",
        help="a deployed stack's ReadApiUrl output: serve the page over it, each request signed with "
        "your AWS credentials (the operator role), instead of over the local platform",
    )
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("airflow", help="serve the Airflow UI over the local DAG runs on 127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="loopback port (default 8080)")
    p.set_defaults(func=cmd_airflow)
    p = sub.add_parser("backfill", help="re-run the hourly DAG for [--from, --to) with Airflow's own backfill")
    p.add_argument("--from", dest="start", type=utc_time, required=True, help="first hour, ISO 8601 (UTC if no zone)")
    p.add_argument("--to", dest="end", type=utc_time, required=True, help="end hour, exclusive, ISO 8601")
    p.set_defaults(func=cmd_backfill)
    p = sub.add_parser("audit", help="reconcile received / stored / duplicates / quarantined for a time range")
    from infra.local.audit import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("load", help="drive the platform at R readings/s for T s in real time and report")
    p.add_argument("--rate", type=float, default=2000, help="readings per second (default 2000)")
    p.add_argument("--duration", type=float, default=60, help="seconds at that rate (default 60)")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between a gateway's messages (default 1)")
    p.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        help="seconds left out of the timings: the pollers' cold start (default 30)",
    )
    p.add_argument("--publishers", type=int, default=0, help="publisher processes (0: one per 1,500 msg/s)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--keep",
        action="store_true",
        help="use the running platform; without it, the running one is stopped and its state (the demo's "
        "warehouse too) deleted for a fresh one",
    )
    parameter_flag(p)
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("plan", help="AWS capacity and monthly cost, citypulse vs the naive design")
    p.add_argument("--sensors", type=int, default=50_000)
    p.add_argument("--rate", type=float, default=1.0, help="readings per sensor per second (default 1)")
    p.add_argument("--gateway-batch", type=int, default=32, help="readings per gateway message (default 32)")
    p.add_argument("--zones", type=int, default=None, help="zones (default 256; a city under 4,096 sensors: 1 per 16)")
    p.add_argument("--no-basic-ingest", action="store_true", help="publish on normal topics (billed messaging)")
    p.add_argument(
        "--stream-mode",
        choices=["PROVISIONED", "ON_DEMAND"],
        default="PROVISIONED",
        help="Kinesis capacity mode, as the template's StreamMode parameter (default PROVISIONED)",
    )
    p.add_argument(
        "--table-capacity-mode",
        choices=["PROVISIONED", "PAY_PER_REQUEST"],
        default="PROVISIONED",
        help="the processor's DynamoDB tables, as the template's TableCapacityMode parameter (default "
        "PROVISIONED, auto-scaled; PAY_PER_REQUEST: on demand)",
    )
    p.add_argument(
        "--stream-consumer",
        choices=["ENHANCED_FAN_OUT", "SHARED_THROUGHPUT"],
        default="ENHANCED_FAN_OUT",
        help="how the processor reads the stream, as the template's ProcessorStreamConsumer parameter (default "
        "ENHANCED_FAN_OUT: records pushed as they arrive; SHARED_THROUGHPUT: Lambda reads each shard once a second)",
    )
    p.add_argument(
        "--batching-window",
        type=_window_seconds,
        default=0,
        metavar="S",
        help="the processor mapping's MaximumBatchingWindowInSeconds, as the template's ProcessorBatchingWindow, "
        "whole seconds 0-300 (default 0): each zone's state is written and each shard's lake file put once per "
        "batch, and an alert waits for its batch",
    )
    p.set_defaults(func=cmd_plan)
    sub.add_parser("down", help="stop the local platform").set_defaults(func=cmd_down)
    p = sub.add_parser("replay", help="publish recorded detector data (CSV/Parquet) into the running platform")
    p.add_argument("file", help="a .csv or .parquet file of detector readings")
    p.add_argument(
        "--map",
        default="",
        help="contract field=file column, comma-separated, e.g. ts=timestamp,sensor_id=det_id,vehicle_count=flow "
        "(optional: avg_speed_kmh, occupancy_pct, congestion_index, lane)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="times real time (default 1; 60 = an hour a minute)")
    p.add_argument("--unknown-zone", help="zone to publish unknown detector ids in (default: the first zone)")
    p.set_defaults(func=cmd_replay)

    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except PlatformError as exc:
        print(f"citypulse: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
