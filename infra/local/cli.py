"""`citypulse`: the command line of the local platform.

citypulse demo     start everything, play a city-hour through the real flow, run the
                   hourly DAG, print the accounting (the platform's main job)
citypulse up       start the local platform (emulators, broker, rule bridge, pollers)
citypulse status   what is running, where
citypulse down     stop everything `up` started
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from infra.local.platform import DEFAULT_STATE_DIR, PlatformError, PlatformInfo, down, pid_alive, up


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("CITYPULSE_STATE_DIR") or DEFAULT_STATE_DIR).resolve()


def cmd_up(args: argparse.Namespace) -> int:
    info = up(_state_dir(args), sensors=args.sensors, seed=args.seed, fresh=not args.keep)
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
    running = info.state == "ready" and pid_alive(info.supervisor_pid)
    print(
        f"platform: {info.state if running or info.state != 'ready' else 'not running (stale)'}"
        f" (state in {info.state_dir})"
    )
    if info.error:
        print(f"error: {info.error}")
    for name, pid in info.pids.items():
        print(f"  {name:<32} pid {pid:<8} {'running' if pid_alive(pid) else 'stopped'}")
    for name, url in info.endpoints.items():
        print(f"  {name:<32} {url}")
    return 0 if running else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.local.demo import render_summary, run_demo

    state_dir = _state_dir(args)
    result = run_demo(state_dir, sensors=args.sensors, duration_s=args.duration, seed=args.seed)
    print(render_summary(result, state_dir))
    return 0 if result.ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from infra.capacity import Workload, naive_plan, plan, render

    w = Workload(
        sensors=args.sensors,
        rate_hz=args.rate,
        gateway_batch=args.gateway_batch,
        zones=args.zones,
        basic_ingest=not args.no_basic_ingest,
    )
    print(render(plan(w), naive_plan(w)))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="citypulse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", help="where the local platform keeps its state (default: ./.citypulse)")
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
    p.set_defaults(func=cmd_up)
    sub.add_parser("status", help="show what is running").set_defaults(func=cmd_status)
    p = sub.add_parser("plan", help="AWS capacity and monthly cost, citypulse vs the naive design")
    p.add_argument("--sensors", type=int, default=50_000)
    p.add_argument("--rate", type=float, default=1.0, help="readings per sensor per second (default 1)")
    p.add_argument("--gateway-batch", type=int, default=32, help="readings per gateway message (default 32)")
    p.add_argument("--zones", type=int, default=256)
    p.add_argument("--no-basic-ingest", action="store_true", help="publish on normal topics (billed messaging)")
    p.set_defaults(func=cmd_plan)
    sub.add_parser("down", help="stop the local platform").set_defaults(func=cmd_down)

    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except PlatformError as exc:
        print(f"citypulse: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
