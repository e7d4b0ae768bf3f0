"""How `citypulse load` reads the processor's invocations from its logs: the cadence of each
shard's batches and the invocation that raised the incident's alert."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from infra.local.load import Invocation, cadence, deciding_call, invocations


def call(shard: str, start: float, run: float, received: int = 100, alerts: tuple[str, ...] = ()) -> Invocation:
    return Invocation(shard, start, start + run, received, alerts)


def test_invocations_are_read_from_the_handlers_log_lines(tmp_path: Path) -> None:
    def line(shard: str, timestamp: str, duration_ms: float, alert_types: list[str]) -> bytes:
        entry = {
            "level": "INFO",
            "message": "batch processed",
            "timestamp": timestamp,
            "shard": shard,
            "records": 3,
            "counts": {"received": 90, "stored": 90},
            "alert_types": alert_types,
            "duration_ms": duration_ms,
        }
        return orjson.dumps(entry) + b"\n"

    log = tmp_path / "poller-shardId-000000000001.log"
    log.write_bytes(
        line("shardId-000000000001", "2026-12-06 12:07:03,665+0000", 634.5, ["CongestionDetected"])
        + b'{"level":"INFO","message":"something else"}\n'
        + line("shardId-000000000001", "2026-12-06 12:07:01,512+0000", 346.8, [])
    )
    calls = invocations(tmp_path, {})
    assert [c.start for c in calls] == pytest.approx([1796558821.512 - 0.3468, 1796558823.665 - 0.6345])
    assert [c.end for c in calls] == pytest.approx([1796558821.512, 1796558823.665])
    assert calls[1] == Invocation("shardId-000000000001", calls[1].start, calls[1].end, 90, ("CongestionDetected",))
    # From an offset: only what was logged after it.
    first = len(line("shardId-000000000001", "2026-12-06 12:07:03,665+0000", 634.5, ["CongestionDetected"]))
    assert len(invocations(tmp_path, {log: first})) == 1


def test_cadence_follows_each_shard_from_one_invocation_to_its_next() -> None:
    calls = [
        call("a", 10.0, 0.4, 200),
        call("b", 10.5, 0.2, 100),
        call("a", 11.6, 0.3, 300),  # 1.2 s after a's first ended, 1.6 s after it started
        call("b", 11.8, 0.2, 100),  # 1.1 s after b's first ended
        call("a", 13.0, 0.5, 400),  # 1.1 s idle, 1.4 s apart
        call("a", 30.0, 0.1, 999),  # after the window: left out
    ]
    c = cadence(sorted(calls, key=lambda i: i.start), 10.0, 20.0)
    assert c["invocations"] == 5 and c["shards"] == 2
    assert c["received_p50"] == 200
    assert c["run_p50"] == pytest.approx(0.3) and c["run_p95"] == pytest.approx(0.5)
    assert sorted([c["idle_p50"], c["idle_p95"]]) == pytest.approx([1.1, 1.2])
    assert c["apart_p50"] == pytest.approx(1.4) and c["apart_p95"] == pytest.approx(1.6)


def test_cadence_needs_two_invocations_of_a_shard() -> None:
    assert cadence([call("a", 1.0, 0.2), call("b", 1.1, 0.2)], 0.0, 5.0) == {}


def test_the_deciding_invocation_is_the_last_to_raise_congestion_before_the_alert_arrived() -> None:
    calls = [
        call("a", 95.0, 0.3, alerts=("CongestionDetected",)),  # before the incident: another episode
        call("a", 100.5, 0.4),
        call("b", 101.0, 0.3, alerts=("SensorSilent",)),
        call("a", 102.0, 0.6, alerts=("CongestionDetected",)),
        call("a", 104.0, 0.3, alerts=("CongestionDetected",)),  # after the arrival
    ]
    # Its alerts leave before its writes: it may end after the alert arrived (102.5).
    assert deciding_call(calls, 100.0, 102.5) == pytest.approx({"start_s": 2.0, "end_s": 2.6, "prior_end_s": 0.9})
    assert deciding_call(calls, 100.0, 101.5) is None


def test_an_incident_at_every_minute_boundary_the_run_watches_each_in_its_own_zone() -> None:
    from infra.local.load import INCIDENT_WATCH_S, schedule_incidents

    zones = [f"Z-{i:03d}" for i in range(256)]
    start = 1_796_558_700.0  # 12:05:00 UTC: warm-up until 12:05:30, run until 12:10:30
    scheduled = schedule_incidents(zones, start, warmup_s=30, duration_s=300)
    starts = [at for _, at in scheduled]
    # From the first boundary 10 s after the warm-up (12:06:00), while more than 30 s of the run remain after it.
    assert starts == [1_796_558_760_000 + k * 60_000 for k in range(4)]
    assert starts[-1] / 1000 + INCIDENT_WATCH_S < start + 330 <= starts[-1] / 1000 + 60 + INCIDENT_WATCH_S
    assert [zone for zone, _ in scheduled] == ["Z-128", "Z-192", "Z-000", "Z-064"]
    # Too short a run for one; a city of fewer zones than boundaries: one incident per zone.
    assert schedule_incidents(zones, start, warmup_s=30, duration_s=60) == []
    assert sorted(zone for zone, _ in schedule_incidents(zones[:2], start, 30, 300)) == ["Z-000", "Z-001"]


def test_latencies_fall_in_the_bucket_of_their_upper_bound() -> None:
    from streaming.processor.handler import latency_histogram

    histogram = latency_histogram([0, 50, 50.5, 999, 1000, 1001, 9999, 10_001, 60_000, 70_000])
    assert histogram == {50: 2, 100: 1, 1000: 2, 1250: 1, 10000: 1, 15000: 1, 60000: 1, 60001: 1}


@pytest.mark.parametrize("command", ["up", "load"])
def test_a_template_parameter_goes_to_a_fresh_stack_only(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.local.cli import main

    # a running platform keeps the stack it was deployed with: refused before anything starts
    with pytest.raises(SystemExit) as done:
        main(["--state-dir", str(tmp_path), command, "--keep", "--parameter", "ProcessorBatchingWindow=0"])
    assert done.value.code == 2
    assert "--parameter deploys a fresh stack" in capsys.readouterr().err
    assert not (tmp_path / "platform.json").exists()
    # KEY=VALUE, as a deploy's parameter overrides take it
    with pytest.raises(SystemExit) as done:
        main(["--state-dir", str(tmp_path), command, "--parameter", "ProcessorBatchingWindow"])
    assert done.value.code == 2
    assert "a template parameter is KEY=VALUE" in capsys.readouterr().err


def test_an_alert_decided_before_its_incident_is_not_taken_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier episode's CongestionDetected, or one an earlier run left on the queue, would
    have given a negative latency (found by a review): only one decided at or after the
    incident's start counts, by its `detected_at` or the end of its deciding minute."""
    from infra.local.load import AlertWatcher, decided_ms

    monkeypatch.setenv("CITYPULSE_ALERT_FEED_QUEUE_URL", "http://127.0.0.1:1/queue/feed")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = 1_796_558_760_000  # 2026-12-06T12:06:00Z
    watcher = AlertWatcher({"Z-128": start})
    stale = {"zone_id": "Z-128", "minute": "2026-12-06T12:04:00.000Z"}  # decided at 12:05
    fresh = {"zone_id": "Z-128", "rule": "severe", "detected_at": "2026-12-06T12:06:07.250Z"}
    assert decided_ms(stale) == start - 60_000 and decided_ms(fresh) == start + 7_250 and decided_ms({}) == 0
    watcher.note({"detail-type": "CongestionDetected", "detail": stale}, start / 1000 - 19)
    assert watcher.arrivals == {} and not watcher.all_arrived.is_set()
    watcher.note({"detail-type": "CongestionDetected", "detail": fresh}, start / 1000 + 8.5)
    assert watcher.arrivals == {"Z-128": (start / 1000 + 8.5, fresh)} and watcher.all_arrived.is_set()


def test_latencies_past_the_last_bucket_are_over_it_not_its_label(tmp_path: Path) -> None:
    """The histogram's last bucket holds everything over 60 s: a percentile there is reported as
    "> 60 s", not as 60.001 s (found by a review)."""
    from infra.local.demo import latency_percentiles, latency_text

    entry = {"message": "batch processed", "latency_ms_histogram": {"1000": 90, "60001": 10}}
    (tmp_path / "poller-shardId-000000000000.log").write_bytes(orjson.dumps(entry) + b"\n")
    got = latency_percentiles(tmp_path)
    assert got["p50"] == 1.0 and math.isinf(got["p95"]) and math.isinf(got["p99"])
    assert (latency_text(got["p50"]), latency_text(got["p99"])) == ("1.00 s", "> 60 s")


def test_publishers_that_fall_behind_do_not_count_as_sustained() -> None:
    """The measured readings are a count of fixed ticks: they reached rate x duration however
    late the publishers ran (found by a review). The rate is now judged over the time taken."""
    from infra.local.demo import Accounting
    from infra.local.load import LoadResult

    def result(window_s: float) -> LoadResult:
        done = Accounting(received=300_000, stored=300_000)
        return LoadResult(
            rate=1000, duration_s=300, tick_s=10, sensors=1000, gateways=32, publishers=2,
            published_readings=300_000, published_messages=9_400, failed_publishes=0, warmup_s=0,
            measured_readings=300_000, measured_messages=9_400, publish_window_s=window_s,
            publisher_max_lag_s=0.0, publisher_late_ticks=0, processed_in_window=300_000, drain_s=1.0,
            before=Accounting(), at_measure=Accounting(), after=done, latency={}, stream_latency={},
            cadence={}, incidents=[], alerts_raised={}, cpu_s={}, publisher_cpu_s=0.0,
            peak_rss_kb={}, peak_total_rss_kb=0,
        )  # fmt: skip

    assert result(300.0).sustained and result(305.0).sustained  # 98.4 % of the rate
    assert not result(309.9).sustained  # 96.8 %: a tick's lag, which the late-tick count allowed
