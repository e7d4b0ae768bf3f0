"""`citypulse load` at a reduced rate: a fresh platform, real time, gateway-batched, several
publisher processes — and not one reading lost.

Timings are reported by the command and recorded in docs/performance.md; they are not asserted
here (they depend on the machine). What is asserted is the accounting: every published reading
is stored or quarantined, none twice, by the processor's redelivery-proof counters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.local.load import render, run_load
from infra.local.platform import down

pytestmark = pytest.mark.integration

RATE = 2_000  # readings/s: 2,000 sensors, one reading each per 1 s tick
DURATION_S = 20


# The stack as the template deploys it (the stream read once a second, a 1 s window), and as
# `citypulse plan` prints it for a city: through an enhanced fan-out consumer, no window.
FAN_OUT = {"ProcessorStreamConsumer": "ENHANCED_FAN_OUT", "ProcessorBatchingWindow": "0"}


@pytest.mark.parametrize("parameters", [{}, FAN_OUT], ids=["shared-throughput-1s", "fan-out-no-window"])
def test_load_loses_no_reading(tmp_path: Path, parameters: dict[str, str]) -> None:
    state = tmp_path / "state"
    lines: list[str] = []
    session_env = dict(os.environ)  # run_load points this process's boto3 at its own platform
    try:
        result = run_load(
            state,
            rate=RATE,
            duration_s=DURATION_S,
            publishers=2,
            warmup_s=5,
            fresh=True,
            echo=lines.append,
            parameters=parameters,
        )
        report = render(result)
    finally:
        down(state, echo=lines.append)
        os.environ.clear()
        os.environ.update(session_env)  # later tests keep the session's emulators
    assert result.sensors == RATE and result.publishers == 2
    # Every tick of the run was published: one reading per sensor per tick, warm-up included.
    assert result.failed_publishes == 0, report
    assert result.published_readings == RATE * (DURATION_S + 5), report
    assert result.measured_readings == RATE * DURATION_S, report
    # Zero loss, nothing doubled: published == stored + quarantined, per the processor's counters.
    assert result.lost == 0, report
    assert result.stored + result.quarantined == result.published_readings, report
    assert result.received == result.published_readings + result.duplicates, report
    assert result.accounted, report
    # The latency histograms cover every gateway message published after the warm-up.
    assert result.latency["messages"] >= result.measured_messages, report
    # Each shard's batches, as its invocations logged them. With the 1 s window, which begins
    # when an invocation ends, a shard's next invocation starts at least a window after one
    # ends; pushed with no window, it does not wait for one.
    c = result.cadence
    assert c["shards"] == 4 and c["invocations"] >= 4 * DURATION_S / 3, report
    assert c["apart_p50"] >= c["idle_p50"], report
    if parameters == FAN_OUT:
        assert c["idle_p50"] < 0.99, report
    else:
        assert c["idle_p50"] >= 0.99, report
    assert f"{int(c['invocations']):,} invocations on 4 shards" in report
    # From each message's arrival in the stream: a part of its way from the publisher, never more.
    stream = result.stream_latency
    assert stream["messages"] >= result.measured_messages, report
    assert stream["p50"] <= result.latency["p50"] and stream["p99"] <= result.latency["p99"], report
    assert "of which from arrival in the stream" in report
