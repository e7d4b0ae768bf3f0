"""The silent-zone sweeper: `SensorSilent` for zones that send nothing at all.

The processor notices a silent sensor when its zone's next records arrive (`detect_silence`
with the batch's receive time). A zone, or its one gateway, that goes quiet altogether sends
no records, so nothing would notice. The sweeper is a small scheduled Lambda (an EventBridge
schedule rule every `SWEEP_INTERVAL_S`; locally `infra/local/schedule.py` invokes this same
handler on the same rate) that reads every zone's committed state, runs the same detector with
the scheduled time as "now", publishes the alerts and marks the sensors silent in the zone's
state, so that each episode is raised once, whoever notices it first (the alert id depends only
on the sensor's last receive time). A congested zone gone dark (every reporting sensor silent)
has its episode ended by the same detector (`CongestionCleared`, reason "silent"), and the
item's `congested` attribute written with the state.

Writing beside the processor: the processor is the zone item's writer and commits with an
unconditional put of the whole item (docs/architecture.md §4). The sweeper writes back only the
`state` and `congested` attributes, and only if the item is still the version it read — the
processor's commit marker (`marker_seq`, `updated_at`) and the sweeper's own `sweeps` counter,
which a processor commit drops. So:

* the processor commits between the sweeper's read and write: the condition fails and the
  sweeper writes nothing (the processor's update is never clobbered); the next sweep retries
  on the new state;
* the processor read the item before the sweeper's write and commits after it: its put replaces
  the silent marks. A sensor still quiet is raised again, by the processor's detector or the next
  sweep, under the same event id, which consumers drop (as for any redelivered alert);
* `SensorSilent` alerts go out before the write, as the processor's go before its commit: a
  crash in between sends them again next sweep under the same ids, and never loses one. A dark
  zone's clear goes out after the write has committed the ended episode (docs/reliability.md).

Silence is judged as of how far the processor has got, not by the clock alone. Under a backlog
the processor applies readings minutes after the street sent them; by the clock every sensor of
the late shard would look quiet, and a sweep would raise ~50,000 alerts for readings still in the
stream. Each zone item records the clock of the commit that wrote it and the newest receive time
of the batch it committed (`received_through`, any record of the batch, valid or not); a
shard's latest commit gives its lag (`processing_lag_ms`), and its zones are judged as of the
sweep's time less that lag. A zone quiet on the street while its shard is read is still raised.
What the sweep cannot tell apart: a processor that has stopped altogether commits nothing, so the
lag of its last commit stands and the shard's sensors are raised by the clock, as when every zone
of the shard goes dark (the processor's error, batch-failure and iterator-age alarms report a
failing one; a trigger paused by hand reports nothing, so a redrive pauses the sweeper too);
and a zone whose shard was split keeps its parent's last lag until a child shard commits it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from streaming.processor.core import Alert, DetectorSettings, detect_silence
from streaming.processor.state import ZoneState
from streaming.processor.store import AlertPublisher, client_config

logger = Logger(service="citypulse-sweeper")
metrics = Metrics(namespace="citypulse", service="sweeper")
# Environments may share an account: each one's metrics carry its name (the template sets it).
metrics.set_default_dimensions(environment=os.environ.get("CITYPULSE_ENV_NAME", "local"))

# The schedule rule's rate (the template's SweeperSchedule says the same; a test holds them equal).
SWEEP_INTERVAL_S = 60


@dataclass
class SweepResult:
    zones: int = 0  # zone states read
    silent: list[Alert] = field(default_factory=list)  # SensorSilent raised (and published)
    cleared: list[Alert] = field(default_factory=list)  # CongestionCleared of zones gone dark (committed, published)
    written: int = 0  # zone states updated with their new silent marks
    conflicts: int = 0  # zones the processor (or another sweep) wrote meanwhile: left to the next sweep
    lag_ms: dict[str, int] = field(default_factory=dict)  # per shard, `processing_lag_ms`


def processing_lag_ms(commits: Iterable[tuple[str | None, int, int]]) -> dict[str, int]:
    """Per shard, how far behind the street the processor was at its latest commit there: the
    commit's clock less the newest receive time of the batch it committed (the items'
    `updated_at` and `received_through`, `store.zone_state_item`). `commits` are (shard, clock,
    received through) of each zone item: the shard of the state's last commit, None for a state
    never committed; received through 0 for an item written before the attribute existed."""
    latest: dict[str, tuple[int, int]] = {}  # shard → (commit clock, received through)
    for shard, at_ms, received_through in commits:
        if shard is None or not received_through:
            continue
        seen = latest.get(shard)
        if seen is None or at_ms > seen[0]:
            latest[shard] = (at_ms, received_through)
    return {shard: max(0, at_ms - received) for shard, (at_ms, received) in latest.items()}


@dataclass
class Sweeper:
    """Reads every zone state of the processor table, raises the sensors gone quiet on the street."""

    dynamodb: Any
    table: str
    alerts: AlertPublisher
    settings: DetectorSettings = field(default_factory=DetectorSettings)

    @classmethod
    def from_env(cls) -> Sweeper:
        config = client_config()
        env = os.environ
        return cls(
            dynamodb=boto3.client("dynamodb", config=config),
            table=env["CITYPULSE_PROCESSOR_STATE_TABLE"],
            alerts=AlertPublisher(boto3.client("events", config=config), env["CITYPULSE_EVENT_BUS"]),
        )

    def sweep(self, now_ms: int) -> SweepResult:
        """Raise the sensors quiet for the silence threshold as of `now_ms` less their shard's
        processing lag, publish them, and mark them silent in their zones' states."""
        pages = self.dynamodb.get_paginator("scan").paginate(
            TableName=self.table,
            ConsistentRead=True,
            FilterExpression="sk = :state",
            ExpressionAttributeValues={":state": {"S": "state"}},
        )
        zones = [(item, ZoneState.from_bytes(item["state"]["B"])) for page in pages for item in page["Items"]]
        result = SweepResult(zones=len(zones))
        result.lag_ms = processing_lag_ms(
            (state.marker_shard, int(item["updated_at"]["N"]), int(item.get("received_through", {}).get("N", 0)))
            for item, state in zones
        )
        for item, state in zones:
            raised: list[Alert] = []
            detect_silence(state, now_ms - result.lag_ms.get(state.marker_shard or "", 0), raised, self.settings)
            if not raised:
                continue
            silent = [a for a in raised if a.detail_type == "SensorSilent"]
            cleared = [a for a in raised if a.detail_type != "SensorSilent"]
            # A silent sensor's alert goes out before the write: its id is its last receive time,
            # so a sweep that loses the write sends it again or a processor raises it alike.
            self.alerts.publish(silent)
            result.silent += silent
            if self._write_back(item, state):
                result.written += 1
                # A dark zone's clear only once the state that ends its episode has committed: a
                # processor commit that brings its readings back first makes the write fail, and
                # the episode goes on with nothing said to the contrary.
                self.alerts.publish(cleared)
                result.cleared += cleared
            else:
                result.conflicts += 1
        return result

    def _write_back(self, item: dict[str, Any], state: ZoneState) -> bool:
        """Replace the item's state if the item is still the version read; False if it is not."""
        sweeps = int(item["sweeps"]["N"]) if "sweeps" in item else 0
        values: dict[str, Any] = {
            ":new": {"B": state.to_bytes()},
            ":updated": item["updated_at"],
            ":marker": item["marker_seq"],
            ":next": {"N": str(sweeps + 1)},
            ":congested": {"BOOL": state.congestion.congested},  # a dark zone's episode ended
        }
        condition = "updated_at = :updated AND marker_seq = :marker AND "
        if "sweeps" in item:
            condition += "sweeps = :sweeps"
            values[":sweeps"] = item["sweeps"]
        else:
            condition += "attribute_not_exists(sweeps)"
        try:
            self.dynamodb.update_item(
                TableName=self.table,
                Key={"pk": item["pk"], "sk": item["sk"]},
                UpdateExpression="SET #state = :new, sweeps = :next, congested = :congested",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise
        return True


@cache
def _sweeper() -> Sweeper:
    return Sweeper.from_env()


def scheduled_time_ms(event: dict[str, Any]) -> int:
    """The schedule's `time` (when the sweep was due), else the clock: a late invocation then
    judges silence as of its slot, never later."""
    at = event.get("time")
    if isinstance(at, str):
        return int(datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1000)
    return int(time.time() * 1000)


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point for the EventBridge schedule."""
    result = _sweeper().sweep(scheduled_time_ms(event))
    metrics.add_metric(name="SilentSensorsSwept", unit=MetricUnit.Count, value=len(result.silent))
    metrics.add_metric(name="DarkZonesCleared", unit=MetricUnit.Count, value=len(result.cleared))
    metrics.add_metric(name="SweepConflicts", unit=MetricUnit.Count, value=result.conflicts)
    lag = max(result.lag_ms.values(), default=0)
    metrics.add_metric(name="SweepProcessingLag", unit=MetricUnit.Milliseconds, value=lag)
    summary = {
        "zones": result.zones,
        "silent": len(result.silent),
        "cleared": len(result.cleared),
        "written": result.written,
        "conflicts": result.conflicts,
        "processing_lag_ms": result.lag_ms,
    }
    logger.info("sweep done", extra=summary)
    return summary
