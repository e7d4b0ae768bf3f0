"""`citypulse load --rate R --duration T`: drive the local platform at a sustained rate, in real time.

The city has R x tick sensors; every tick each gateway publishes one message with one reading
per sensor it serves (event time = the wall clock now, `seq` = the tick's number since the
epoch), over MQTT + mutual TLS through the same `Gateway` the devices use, from several
publisher processes (one awscrt process moves only a few thousand messages per second).
Gateways are spread evenly over the tick, each at its own phase (seeded, kept from tick to tick),
paced against the wall clock.

Afterwards it waits until the processor's redelivery-proof counters account for every
reading and reports: readings/s published and processed, readings lost (published -
stored - quarantined, must be 0), publish → queryable latency p50/p95/p99 (the processor's
per-batch histograms), alert latency (an incident scheduled at a known minute → its
`CongestionDetected` on the SQS alert feed), the pollers' CPU per reading, and each platform
component's CPU and peak RSS (to find the bottleneck).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra.local.demo import (
    Accounting,
    batch_log_entries,
    latency_percentiles,
    latency_text,
    read_accounting,
    wait_until_accounted,
)
from infra.local.platform import REPO_ROOT, PlatformError, demo_city, gateway_connector, pid_alive, require_running, up

MINUTE_MS = 60_000
INCIDENT_WATCH_S = 30  # the run must last this long past the incident's start for one to be scheduled
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- /proc: CPU and memory of a process tree --------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def process_tree(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """`pid` and all its descendants (an emulator may run under a wrapper)."""
    children = _children_map() if children is None else children
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> tuple[int, int]:
    """(current RSS, peak RSS = VmHWM) summed over `pids`, in KiB."""
    now = peak = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        now += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        peak += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return now, peak


def component(name: str) -> str:
    return "pollers" if name.startswith("poller-") else name


class ResourceMonitor:
    """CPU per component between `mark()`s; peak RSS sampled (current RSS summed at one instant)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_total_kb = 0
        self.peak_kb: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def trees(self) -> dict[str, list[int]]:
        children = _children_map()
        out: dict[str, list[int]] = {}
        for name, pid in self.pids.items():
            out.setdefault(component(name), []).extend(process_tree(pid, children))
        return out

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pids) for name, pids in self.trees().items()}

    def sample(self) -> None:
        total = 0
        for name, pids in self.trees().items():
            now, hwm = rss_kb(pids)
            total += now
            self.peak_kb[name] = max(self.peak_kb.get(name, 0), hwm)
        self.peak_total_kb = max(self.peak_total_kb, total)

    def start(self, every_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(every_s):  # sampling, not synchronisation
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()


# --- the publisher process ---------------------------------------------------------------------


@dataclass
class PublisherResult:
    messages: int = 0
    readings: int = 0
    failed: int = 0
    ticks: int = 0
    max_lag_s: float = 0.0  # how far behind its schedule the publisher fell at worst
    late_ticks: int = 0  # measured ticks with a message sent a whole tick or more after it was due
    measured_messages: int = 0  # sent after the warm-up
    measured_readings: int = 0
    cpu_s: float = 0.0
    connect_s: float = 0.0
    first_publish: float = 0.0
    last_publish: float = 0.0


class TickReadings:
    """One gateway's readings per tick: the traffic model's values for the current minute
    (computed once per sensor-minute), stamped with the tick's event time and sequence number.

    A reading counts the vehicles of its own tick: a Poisson draw around the minute's flow
    scaled to the tick (seeded per gateway), so a 1 s detector reports 0, 1 or 2 vehicles,
    not the minute's whole count every second. Repeating that count would overstate traffic
    60 times and is what a stuck detector looks like: the processor would rightly raise
    `SensorStuck` for nearly every sensor. Ticks of a minute or longer send the minute's count.

    With ticks shorter than a minute, the next minute's values are computed a share at each tick
    of this one. The model takes ~45 us a sensor: all at the minute's first tick, 50,000 sensors
    were ~2 s of CPU at the very moment the load test's incidents begin."""

    def __init__(self, model: Any, sensors: list[Any], tick_s: float) -> None:
        import zlib

        import numpy as np

        self.model = model
        self.sensors = sensors
        self.tick_ms = tick_s * 1000
        self.share = tick_s * 1000 / MINUTE_MS  # of the minute's vehicles, expected per tick
        self.rng = np.random.default_rng([model.seed, zlib.crc32(sensors[0].gateway_id.encode())])
        self.minute = -(10**9)
        self.readings: list[dict[str, Any]] = []
        self.rates: Any = None
        self.ahead: list[dict[str, Any]] = []  # the next minute's, computed so far
        self.draws: list[list[int]] = []  # this minute's counts, a row per tick (`_counts`)

    def at(self, ts_ms: int, seq: int) -> list[dict[str, Any]]:
        from streaming.contract import format_ts

        minute = (ts_ms - self.model.start_ms) // MINUTE_MS
        if minute != self.minute:
            if minute != self.minute + 1:
                self.ahead = []  # not the minute computed ahead
            done = len(self.ahead)
            self.readings = self.ahead + [self.model.reading(s, minute) for s in self.sensors[done:]]
            self.rates = [r["vehicle_count"] * self.share for r in self.readings]
            self.minute = minute
            self.ahead = []
            self.draws = []
        if self.share < 1:
            # This tick's share of the next minute: what is left over the ticks left (this one too).
            ticks_left = max(1, math.ceil((self.model.start_ms + (minute + 1) * MINUTE_MS - ts_ms) / self.tick_ms))
            done = len(self.ahead)
            todo = math.ceil((len(self.sensors) - done) / ticks_left)
            self.ahead += [self.model.reading(s, minute + 1) for s in self.sensors[done : done + todo]]
        ts = format_ts(ts_ms)
        counts = self._counts() if self.share < 1 else None
        for i, r in enumerate(self.readings):
            r["ts"] = ts
            r["seq"] = seq
            if counts is not None:
                r["vehicle_count"] = counts[i]
        return self.readings

    def _counts(self) -> list[int]:
        """This tick's vehicle counts: the minute's Poisson draws, a row a tick, drawn a minute's
        ticks at a time (one numpy call per gateway-minute instead of one per tick)."""
        if not self.draws:
            ticks = max(1, round(1 / self.share))
            self.draws = self.rng.poisson(self.rates, size=(ticks, len(self.rates))).tolist()
            self.draws.reverse()
        return self.draws.pop()


def publisher_main(argv: list[str] | None = None) -> None:
    """One publisher process: its share of the gateways, paced tick by tick.

    Protocol on stdout/stdin (JSON lines): it prints {"connected": n} once its gateways are
    connected, reads one line {"t0": epoch_s, "incidents": [...]} (the common start and the
    incidents scheduled from it), publishes until t0 + duration, flushes, and prints its
    PublisherResult.
    """
    from dataclasses import asdict

    from streaming.contract import device_message
    from streaming.devices.traffic import Faults, Incident, TrafficModel

    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON: sensors, seed, index, count, tick_s, duration_s, ...")
    spec = orjson.loads(p.parse_args(argv).spec)
    env = os.environ
    city = demo_city(spec["sensors"], spec["seed"])
    all_gateways = city.gateways()
    mine = [gw for i, gw in enumerate(all_gateways) if i % spec["count"] == spec["index"]]
    connect = gateway_connector(
        env, basic_ingest_rule=env["CITYPULSE_TOPIC_RULE"], max_in_flight=spec.get("max_in_flight", 100)
    )

    res = PublisherResult()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        conns = list(pool.map(connect, mine))
    res.connect_s = time.monotonic() - started
    print(orjson.dumps({"connected": len(conns)}).decode(), flush=True)
    start = orjson.loads(sys.stdin.readline())
    t0 = start["t0"]
    # The incidents come with the start: they are scheduled from it (`schedule_incidents`).
    incidents = [Incident(**i) for i in start["incidents"]]
    model = TrafficModel(city, spec["seed"], spec["start_ms"], incidents, Faults.none())
    sources = [
        (conn, all_gateways[gw][0].zone_id, TickReadings(model, all_gateways[gw], spec["tick_s"]))
        for gw, conn in zip(mine, conns, strict=True)
    ]
    # Each gateway at its own phase of the tick, as unsynchronised devices report: shuffled
    # (seeded), not in the city's order, in which a zone's gateways sit together and would
    # reach the stream in one burst, each zone in one batch a second whatever the window.
    random.Random(f"{spec['seed']}:{spec['index']}").shuffle(sources)
    tick, duration, warmup = spec["tick_s"], spec["duration_s"], spec.get("warmup_s", 0.0)
    n_ticks = max(1, round((warmup + duration) / tick))
    t_measure = t0 + warmup
    n = len(sources)
    cpu0 = time.process_time()
    stop = threading.Event()
    try:
        for k in range(n_ticks):
            tick_start = t0 + k * tick
            seq = round(tick_start / tick)
            measured = tick_start >= t_measure - 1e-6
            tick_lag = 0.0
            for i, (conn, zone_id, source) in enumerate(sources):
                # Spread the gateways evenly over the tick, as unsynchronised devices would be.
                due = tick_start + i * tick / n
                ahead = due - time.time()
                if ahead > 0.002:
                    stop.wait(ahead)  # pacing against the wall clock
                now = time.time()
                tick_lag = max(tick_lag, now - due)
                now_ms = int(now * 1000)
                readings = source.at(now_ms, seq)
                payload = orjson.dumps(device_message(conn.gateway_id, zone_id, now_ms, readings))
                conn.publish_telemetry(zone_id, payload)
                res.messages += 1
                res.readings += len(readings)
                if measured:
                    res.measured_messages += 1
                    res.measured_readings += len(readings)
                if not res.first_publish:
                    res.first_publish = now
            res.ticks += 1
            if measured:
                res.max_lag_s = max(res.max_lag_s, tick_lag)
                res.late_ticks += tick_lag >= tick
        res.last_publish = time.time()
        for conn in conns:
            stats = conn.flush(timeout=300)
            res.failed += stats.failed
    finally:
        res.cpu_s = time.process_time() - cpu0
        for conn in conns:
            conn.disconnect()
    print(orjson.dumps(asdict(res)).decode(), flush=True)


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    rate: float
    duration_s: float
    tick_s: float
    sensors: int
    gateways: int
    publishers: int
    published_readings: int
    published_messages: int
    failed_publishes: int
    warmup_s: float
    measured_readings: int  # published after the warm-up
    measured_messages: int
    publish_window_s: float  # from the end of the warm-up to the last publish
    publisher_max_lag_s: float
    publisher_late_ticks: int
    processed_in_window: int  # readings the processor committed while publishing went on
    drain_s: float  # after the last publish until every reading was accounted for
    before: Accounting
    at_measure: Accounting  # when the warm-up ended
    after: Accounting
    latency: dict[str, float]
    stream_latency: dict[str, float]  # the same from each message's arrival in the stream
    cadence: dict[str, float]  # of the processor's invocations while publishing (`cadence`)
    incidents: list[dict[str, Any]]  # each scheduled incident and its alert (`run_load`)
    alerts_raised: dict[str, int]  # by the processor during the run, by type
    cpu_s: dict[str, float]  # per component from the end of the warm-up until all was accounted for
    publisher_cpu_s: float
    peak_rss_kb: dict[str, int]
    peak_total_rss_kb: int
    machine: dict[str, str] = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return self.after.stored - self.before.stored

    @property
    def quarantined(self) -> int:
        return self.after.quarantined - self.before.quarantined

    @property
    def received(self) -> int:
        return self.after.received - self.before.received

    @property
    def duplicates(self) -> int:
        return self.after.duplicates - self.before.duplicates

    @property
    def lost(self) -> int:
        return self.published_readings - self.stored - self.quarantined

    @property
    def accounted(self) -> bool:
        return (
            self.lost == 0 and self.failed_publishes == 0 and self.received == self.published_readings + self.duplicates
        )

    @property
    def sustained(self) -> bool:
        """Published on schedule and processed as fast as published (no backlog left to drain)."""
        return (
            self.publisher_late_ticks == 0
            # Achieved over the time it took, not counted: the ticks are fixed, so a count alone
            # holds however late the publishers ran.
            and self.measured_readings >= 0.98 * self.rate * max(self.publish_window_s, self.duration_s)
            and self.processed_in_window >= 0.95 * self.measured_readings
            and self.drain_s < max(10.0, 5 * self.tick_s)
        )

    @property
    def received_after_measure(self) -> int:
        return self.after.received - self.at_measure.received


def _machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(os.cpu_count()), "cpu": model, "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _log_offsets(log_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in log_dir.glob("poller-*.log")}


@dataclass(frozen=True)
class Invocation:
    """One processor invocation, from its "batch processed" log entry (epoch seconds)."""

    shard: str
    start: float
    end: float
    received: int
    alert_types: tuple[str, ...]


def invocations(log_dir: Path, since: dict[Path, int]) -> list[Invocation]:
    """The processor's invocations logged after the `since` offsets, in order of their start."""
    from datetime import datetime

    out = []
    for entry in batch_log_entries(log_dir, since):
        end = datetime.fromisoformat(entry["timestamp"]).timestamp()
        out.append(
            Invocation(
                entry["shard"],
                end - entry["duration_ms"] / 1000,
                end,
                entry["counts"].get("received", 0),
                tuple(entry["alert_types"]),
            )
        )
    return sorted(out, key=lambda i: i.start)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def cadence(calls: list[Invocation], t_from: float, t_to: float) -> dict[str, float]:
    """How a shard's invocations follow each other between t_from and t_to: p50 and p95 of how
    long one runs, of the time from its end to the shard's next start (the batching window,
    which begins when an invocation ends, then reading the shard), and of start to next start;
    and the median readings an invocation received. Empty without two invocations of a shard."""
    runs: list[float] = []
    idle: list[float] = []
    apart: list[float] = []
    received: list[float] = []
    last: dict[str, Invocation] = {}
    for call in calls:
        if not t_from <= call.start <= t_to:
            continue
        runs.append(call.end - call.start)
        received.append(call.received)
        before = last.get(call.shard)
        if before is not None:
            idle.append(call.start - before.end)
            apart.append(call.start - before.start)
        last[call.shard] = call
    if not apart:
        return {}
    out = {"invocations": float(len(runs)), "shards": float(len(last)), "received_p50": _quantile(received, 0.5)}
    for name, values in (("run", runs), ("idle", idle), ("apart", apart)):
        out[f"{name}_p50"], out[f"{name}_p95"] = _quantile(values, 0.5), _quantile(values, 0.95)
    return out


def deciding_call(calls: list[Invocation], incident_start: float, arrived: float) -> dict[str, float] | None:
    """The invocation that raised the incident's `CongestionDetected`: the last one to raise one
    that started between the incident and the alert's arrival (its alerts leave before its
    writes, so it may end after the arrival). Its start and end, and the end of its shard's
    invocation before it, in seconds after the incident began."""
    before: dict[str, Invocation] = {}
    found = None
    for call in calls:
        if incident_start <= call.start <= arrived and "CongestionDetected" in call.alert_types:
            found = (call, before.get(call.shard))
        before[call.shard] = call
    if found is None:
        return None
    call, prior = found
    out = {"start_s": call.start - incident_start, "end_s": call.end - incident_start}
    if prior is not None:
        out["prior_end_s"] = prior.end - incident_start
    return out


def _processed_between(calls: list[Invocation], t_from: float, t_to: float) -> int:
    """Readings the processor committed in invocations that ended between t_from and t_to (epoch s)."""
    return sum(call.received for call in calls if t_from <= call.end <= t_to)


def _alerts_raised(calls: list[Invocation]) -> dict[str, int]:
    """Alerts the processor published in these invocations, by detail type."""
    raised: dict[str, int] = {}
    for call in calls:
        for kind in call.alert_types:
            raised[kind] = raised.get(kind, 0) + 1
    return dict(sorted(raised.items()))


class AlertWatcher:
    """Long-polls the alert feed, noting when the first `CongestionDetected` of each zone's
    incident arrives: decided at or after the incident's start (`zones`: zone -> its start,
    epoch ms), so that an alert of an earlier episode, or one left on the queue by an earlier
    run, is not taken for it."""

    def __init__(self, zones: dict[str, int]) -> None:
        import boto3

        self.zones = zones
        self.sqs = boto3.client("sqs")
        self.url = os.environ["CITYPULSE_ALERT_FEED_QUEUE_URL"]
        self.arrivals: dict[str, tuple[float, dict[str, Any]]] = {}
        self.all_arrived = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            resp = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            arrived = time.time()
            for m in resp.get("Messages", []):
                self.note(orjson.loads(m["Body"]), arrived)
                self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=m["ReceiptHandle"])

    def note(self, event: dict[str, Any], arrived: float) -> None:
        """An event off the feed, arrived at `arrived` (epoch s)."""
        detail = event.get("detail", {})
        zone = detail.get("zone_id")
        if event.get("detail-type") == "CongestionDetected" and zone in self.zones:
            if decided_ms(detail) >= self.zones[zone]:
                self.arrivals.setdefault(zone, (arrived, detail))
            if len(self.arrivals) == len(self.zones):
                self.all_arrived.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def decided_ms(detail: dict[str, Any]) -> int:
    """When a `CongestionDetected` was decided, in event time: its `detected_at` (the severe
    rule), or the end of its deciding `minute` (a closed minute); 0 when it says neither."""
    from streaming.contract import parse_ts_ms

    try:
        if isinstance(detail.get("detected_at"), str):
            return parse_ts_ms(detail["detected_at"])
        if isinstance(detail.get("minute"), str):
            return parse_ts_ms(detail["minute"]) + 60_000
    except ValueError:
        pass
    return 0


def schedule_incidents(zones: list[str], start: float, warmup_s: float, duration_s: float) -> list[tuple[str, int]]:
    """(zone, start in epoch ms) of the load test's incidents: one at every minute boundary (the
    traffic model changes state on them) from the first at least 10 s after the warm-up of a run
    publishing from `start`, while the run lasts INCIDENT_WATCH_S past it, each in its own zone,
    spread over the city's list.
    The severe rule decides within seconds; a milder jam would wait for two closed minutes."""
    end = start + warmup_s + duration_s
    first = math.ceil((start + warmup_s + 10) * 1000 / MINUTE_MS) * MINUTE_MS
    starts = list(range(first, math.ceil((end - INCIDENT_WATCH_S) * 1000), MINUTE_MS))[: len(zones)]
    if not starts:
        return []
    step = len(zones) // len(starts)
    return [(zones[(len(zones) // 2 + k * step) % len(zones)], at) for k, at in enumerate(starts)]


def run_load(
    state_dir: Path,
    *,
    rate: float,
    duration_s: float,
    tick_s: float = 1.0,
    publishers: int = 0,
    warmup_s: float = 30.0,
    seed: int = 7,
    fresh: bool = True,
    drain_timeout_s: float = 600.0,
    echo: Callable[[str], None] = print,
    parameters: dict[str, str] | None = None,
) -> LoadResult:
    """Run the load; `fresh` starts a new platform for a city of rate x tick sensors (its stack
    deployed with `parameters`), otherwise the running platform is used (its city must have
    that many sensors)."""
    from streaming.contract import parse_ts_ms
    from streaming.devices.traffic import Incident

    sensors = round(rate * tick_s)
    if sensors < 1:  # checked before anything starts or is deleted
        raise PlatformError(f"--rate {rate:g} x --tick {tick_s:g} s is less than one sensor")
    if not duration_s > 0 or not warmup_s >= 0:
        raise PlatformError(f"--duration {duration_s:g} must be above 0 and --warmup {warmup_s:g} at least 0")
    if fresh:
        echo(f"starting the local platform for a {sensors:,}-sensor city")
        info = up(state_dir, sensors=sensors, seed=seed, fresh=True, echo=echo, parameters=parameters)
    else:
        info = require_running(state_dir)
        if info.sensors != sensors:
            raise PlatformError(
                f"the running platform's city has {info.sensors:,} sensors; rate x tick needs {sensors:,} "
                f"(restart with `citypulse up --sensors {sensors}` or use a fresh platform)"
            )
        seed = info.seed
    os.environ.update(info.env)
    city = demo_city(sensors, seed)
    gateways = city.gateways()
    msgs_per_s = len(gateways) / tick_s
    publishers = publishers or max(1, math.ceil(msgs_per_s / 1500))
    log_dir = state_dir / "logs"

    start_ms = int(time.time() * 1000) // MINUTE_MS * MINUTE_MS

    spec = {
        "sensors": sensors,
        "seed": seed,
        "count": publishers,
        "tick_s": tick_s,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "start_ms": start_ms,
    }
    env = {**os.environ, **info.env}
    echo(
        f"load: {rate:,.0f} readings/s = {sensors:,} sensors / {tick_s:g} s tick, {len(gateways):,} gateways "
        f"({msgs_per_s:,.0f} messages/s), {publishers} publisher processes, {duration_s:.0f} s, real time"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "infra.local.load", "--spec", orjson.dumps({**spec, "index": i}).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )
        for i in range(publishers)
    ]
    try:
        for proc in procs:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise PlatformError(f"a publisher exited with {proc.wait()} before connecting")
        echo(f"  {len(gateways):,} gateways connected over MQTT + mutual TLS")
        before = read_accounting()
        monitor = ResourceMonitor({k: v for k, v in info.pids.items() if pid_alive(v)})
        t0 = math.ceil(time.time()) + 1.0
        scheduled = schedule_incidents([z.zone_id for z in city.zones], t0, warmup_s, duration_s)
        incidents = [Incident(zone, (at - start_ms) // MINUTE_MS, 60, severity=0.85) for zone, at in scheduled]
        watcher = AlertWatcher(dict(scheduled)) if scheduled else None
        if watcher:
            watcher.start()
        monitor.start()
        start = orjson.dumps({"t0": t0, "incidents": [vars(i) for i in incidents]}).decode()
        for proc in procs:
            proc.stdin.write(start + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        for zone, at_ms in scheduled:
            echo(f"  incident in zone {zone} from {time.strftime('%H:%M:%S', time.gmtime(at_ms / 1000))}Z")
        # The measured window starts after the warm-up (the processors' cold start is outside it).
        t_measure = t0 + warmup_s
        threading.Event().wait(max(0.0, t_measure - time.time()))  # pacing against the wall clock
        offsets = _log_offsets(log_dir)
        cpu_before = monitor.cpu()
        at_measure = read_accounting()
        echo(f"  warm-up of {warmup_s:g} s over; measuring for {duration_s:g} s")
        results = []
        pub_cpu_after = 0.0
        for proc in procs:
            out, _ = proc.communicate(timeout=duration_s + 600)
            if proc.returncode != 0:
                raise PlatformError(f"a publisher exited with {proc.returncode}")
            results.append(PublisherResult(**orjson.loads(out.strip().splitlines()[-1])))
            pub_cpu_after += results[-1].cpu_s
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last_publish = max(r.last_publish for r in results)
    published = sum(r.readings for r in results)
    echo(f"  published {published:,} readings; waiting until the processor has accounted for them")
    after = wait_until_accounted(before.stored + before.quarantined + published, drain_timeout_s, echo)
    accounted_at = time.time()
    cpu_after = monitor.cpu()  # over the same window as the wall time it is divided by
    # Alerts: wait a little for a detection that is due but still in flight.
    if watcher:
        watcher.all_arrived.wait(30)
        watcher.stop()
    monitor.stop()
    calls = invocations(log_dir, offsets)
    alerts = []
    for zone, at_ms in scheduled:
        incident: dict[str, Any] = {"zone": zone, "incident_start": at_ms / 1000}
        if watcher and zone in watcher.arrivals:
            arrived, detail = watcher.arrivals[zone]
            incident.update(
                arrived=arrived,
                latency_s=arrived - at_ms / 1000,
                rule=detail.get("rule"),
                deciding=deciding_call(calls, at_ms / 1000, arrived),
            )
            if isinstance(detail.get("detected_at"), str):
                # When the rule decided (event time of the zone's watermark, or the deciding minute's
                # close): what the pipeline adds to the rule is the rest.
                incident["after_decision_s"] = arrived - parse_ts_ms(detail["detected_at"]) / 1000
        alerts.append(incident)
    return LoadResult(
        rate=rate,
        duration_s=duration_s,
        tick_s=tick_s,
        sensors=sensors,
        gateways=len(gateways),
        publishers=publishers,
        published_readings=published,
        published_messages=sum(r.messages for r in results),
        failed_publishes=sum(r.failed for r in results),
        warmup_s=warmup_s,
        measured_readings=sum(r.measured_readings for r in results),
        measured_messages=sum(r.measured_messages for r in results),
        publish_window_s=last_publish - t_measure,
        publisher_max_lag_s=max(r.max_lag_s for r in results),
        publisher_late_ticks=max(r.late_ticks for r in results),
        processed_in_window=_processed_between(calls, t_measure, last_publish),
        drain_s=accounted_at - last_publish,
        before=before,
        at_measure=at_measure,
        after=after,
        latency=latency_percentiles(log_dir, since=offsets),
        stream_latency=latency_percentiles(log_dir, since=offsets, histogram="stream_ms_histogram"),
        cadence=cadence(calls, t_measure, last_publish),
        incidents=alerts,
        alerts_raised=_alerts_raised(calls),
        cpu_s={k: cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0) for k in cpu_after},
        publisher_cpu_s=pub_cpu_after,
        peak_rss_kb=monitor.peak_kb,
        peak_total_rss_kb=monitor.peak_total_kb,
        machine=_machine(),
    )


def render(r: LoadResult) -> str:
    window = max(r.publish_window_s, 1e-9)
    wall = r.publish_window_s + r.drain_s
    lines = ["", "=" * 72, "citypulse load summary", "=" * 72]
    lines.append(
        f"offered    {r.rate:,.0f} readings/s for {r.duration_s:.0f} s: {r.sensors:,} sensors, "
        f"{r.gateways:,} gateways, tick {r.tick_s:g} s, {r.publishers} publisher processes"
    )
    lines.append(
        f"published  {r.measured_readings:,} readings in {r.measured_messages:,} messages over {window:.1f} s after "
        f"a {r.warmup_s:g} s warm-up = {r.measured_readings / window:,.0f} readings/s "
        f"({r.measured_messages / window:,.0f} msg/s); {r.published_readings:,} in all; "
        f"failed publishes {r.failed_publishes}; publisher max lag {r.publisher_max_lag_s:.2f} s, "
        f"late ticks {r.publisher_late_ticks}"
    )
    lines.append(
        f"processed  {r.processed_in_window:,} readings during the publish window = "
        f"{r.processed_in_window / window:,.0f} readings/s; drained the rest {r.drain_s:.1f} s after the last publish"
    )
    lines.append(
        f"accounting stored={r.stored:,} quarantined={r.quarantined:,} duplicates={r.duplicates:,} "
        f"received={r.received:,}; lost={r.lost:,} (published - stored - quarantined); "
        f"every reading accounted for: {r.accounted}"
    )
    lat = r.latency
    if "p50" in lat:
        lines.append(
            f"latency    publish -> queryable: p50 {latency_text(lat['p50'])}, p95 {latency_text(lat['p95'])}, "
            f"p99 {latency_text(lat['p99'])} over {int(lat['messages']):,} gateway messages"
        )
    lat = r.stream_latency
    if "p50" in lat:
        lines.append(
            f"           of which from arrival in the stream (the batching window and the invocation): p50 "
            f"{latency_text(lat['p50'])}, p95 {latency_text(lat['p95'])}, p99 {latency_text(lat['p99'])}"
        )
    c = r.cadence
    if c:
        lines.append(
            f"batches    {int(c['invocations']):,} invocations on {int(c['shards'])} shards while publishing, "
            f"{c['received_p50']:,.0f} readings each (p50); each ran p50 {c['run_p50']:.2f} s / p95 "
            f"{c['run_p95']:.2f} s, the shard's next started p50 {c['idle_p50']:.2f} s / p95 {c['idle_p95']:.2f} s "
            f"after it ended (the batching window begins when an invocation ends), so p50 "
            f"{c['apart_p50']:.2f} s / p95 {c['apart_p95']:.2f} s apart"
        )
    if not r.incidents:
        lines.append(
            f"alert      no incident scheduled: the run ends within {INCIDENT_WATCH_S} s of the first minute "
            "boundary after the warm-up"
        )
    latencies = sorted(a["latency_s"] for a in r.incidents if "latency_s" in a)
    if latencies:
        lines.append(
            f"alert      {len(r.incidents)} incident{'s' if len(r.incidents) > 1 else ''} (one a minute, each in "
            f"its own zone), {len(latencies)} "
            f"CongestionDetected on the alert feed: after p50 {_quantile(latencies, 0.5):.1f} s "
            f"(min {latencies[0]:.1f} s, max {latencies[-1]:.1f} s) from the incident's start"
        )
    for a in r.incidents:
        head = f"           {a['zone']} at {time.strftime('%H:%M:%S', time.gmtime(a['incident_start']))}Z: "
        if "latency_s" not in a:
            lines.append(head + "no CongestionDetected arrived on the alert feed")
            continue
        d = a.get("deciding")
        lines.append(
            head
            + f"after {a['latency_s']:.1f} s (rule {a['rule']}"
            + (f", {a['after_decision_s']:.1f} s after it decided" if "after_decision_s" in a else "")
            + ")"
            + (
                f"; the deciding invocation ran from {d['start_s']:.2f} to {d['end_s']:.2f} s"
                + (f", its shard's one before it ended at {d['prior_end_s']:.2f} s" if "prior_end_s" in d else "")
                if d
                else ""
            )
        )
    raised = ", ".join(f"{kind} {n:,}" for kind, n in r.alerts_raised.items()) or "none"
    lines.append(f"alerts     raised by the processor after the warm-up: {raised}")
    pollers = r.cpu_s.get("pollers", 0.0)
    lines.append(
        f"cpu        pollers {pollers:.1f} s for {r.received_after_measure:,} readings = "
        f"{pollers / max(r.received_after_measure, 1) * 1e6:.1f} us/reading; per component "
        f"(s over {wall:.0f} s, cores): "
        + ", ".join(f"{k} {v:.1f} ({v / max(wall, 1e-9):.2f})" for k, v in sorted(r.cpu_s.items()))
        + f", publishers {r.publisher_cpu_s:.1f} ({r.publisher_cpu_s / (window + r.warmup_s):.2f} while publishing)"
    )
    lines.append(
        f"memory     peak RSS of the platform's processes together {r.peak_total_rss_kb / 1024:,.0f} MiB; "
        "each (VmHWM): " + ", ".join(f"{k} {v / 1024:,.0f}" for k, v in sorted(r.peak_rss_kb.items())) + " MiB"
    )
    m = r.machine
    lines.append(f"machine    nproc {m.get('nproc')}, {m.get('cpu')}, load average at the end {m.get('load')}")
    verdict = "sustained" if r.sustained else "NOT sustained"
    lines.append(f"result     {verdict}; {'OK' if r.accounted else 'NOT OK: readings unaccounted for'}")
    return "\n".join(lines)


if __name__ == "__main__":
    publisher_main()
