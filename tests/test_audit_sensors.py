"""The audit's per-sensor side on plain data: the processor's per-sensor counters joined to the
lake's per-sensor rows, and checked against the zone counters (the platform test runs it live)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from infra.local.audit import AuditReport, SensorAudit, ZoneAudit, add_sensor_counters, dead_lettered, render
from streaming.processor.state import SensorState, ZoneState


def _state() -> ZoneState:
    state = ZoneState("Z-001", counters={"received": 9, "stored": 6, "duplicates": 2, "quarantined": 1, "late": 1})
    state.sensors = {
        "S-1": SensorState(hwm=5, duplicates=2, late=1),
        "S-2": SensorState(hwm=5),
        "S-3": SensorState(hwm=1),  # nothing in range, nothing counted: not listed
    }
    return state


def _report(state: ZoneState) -> AuditReport:
    zones = {state.zone_id: ZoneAudit(state.zone_id, dict(state.counters), lake_stored=6, lake_quarantined=1)}
    sensors = {
        "S-1": SensorAudit("S-1", "Z-001", stored=3),
        "S-2": SensorAudit("S-2", "Z-001", stored=3, quarantined=Counter(out_of_range=1)),
    }
    add_sensor_counters([state], zones, sensors)
    return AuditReport(
        start=datetime(2026, 1, 1, tzinfo=UTC),
        end=datetime(2026, 1, 2, tzinfo=UTC),
        sensors=sensors,
        zones=zones,
        shard_counters={},
        reasons=Counter(out_of_range=1),
        message_reasons=Counter(),
        covers_all=True,
    )


def test_per_sensor_received_is_stored_plus_quarantined_plus_duplicates() -> None:
    report = _report(_state())
    s1, s2 = report.sensors["S-1"], report.sensors["S-2"]
    assert (s1.received, s1.duplicates, s1.late) == (5, 2, 1)
    assert (s2.received, s2.duplicates, s2.late) == (4, 0, 0)
    assert "S-3" not in report.sensors
    assert sum(s.received for s in report.sensors.values()) == report.total("received")
    assert report.counters_balance and report.balanced is True
    text = render(report)
    assert "S-1" in text and "duplicates=2 late=1" in text


def test_per_sensor_counters_that_do_not_add_up_to_the_zone_fail_the_balance() -> None:
    state = _state()
    state.sensors["S-2"].duplicates = 1  # one more than the zone counted
    report = _report(state)
    assert not report.zones["Z-001"].sensors_match_counters
    assert report.counters_balance is False and report.balanced is False


def test_a_dead_lettered_reading_the_lake_already_accounts_for_is_not_counted_again() -> None:
    """A batch writes its quarantine before its commit: one that failed on every retry and went
    to the on-failure queue may have quarantined some of its readings already, which the audit
    counted a second time as dead-lettered (found by a review)."""
    readings = [
        ("S-1", "Z-1", 7, "shard-0/100/0"),  # stored
        ("S-1", "Z-1", 8, "shard-0/100/1"),  # quarantined (out of range)
        (None, "Z-1", None, "shard-0/100/2"),  # quarantined, no sensor
        ("S-2", "Z-1", 9, "shard-0/101/0"),  # its whole message quarantined
        ("S-3", "Z-1", 4, "shard-0/102/0"),  # only on the queue
        ("S-3", "Z-1", 4, "shard-0/102/0"),  # ... twice
        (None, None, None, "shard-0/103/-1"),  # unreadable, only on the queue
    ]
    stored = [("S-1", 7)]
    quarantined = {"shard-0/100/1", "shard-0/100/2", "shard-0/101/-1"}
    assert list(dead_lettered(readings, stored, quarantined)) == [("S-3", "Z-1"), (None, None)]
