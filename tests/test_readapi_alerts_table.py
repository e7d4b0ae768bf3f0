"""The AWS alert log: `store_alert` and `DynamoAlertLog` against ministack's DynamoDB.

The table is created with the template's own key schema (`AlertsTable`). Locally the
dashboard drains the SQS feed into a `MemoryAlertLog` instead; these tests hold the table's
log to the same promises: each alert once, newest first, pages that neither repeat nor skip.
"""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest

from infra.local.platform import REPO_ROOT
from infra.local.provision import load_template
from streaming.readapi.alerts import DynamoAlertLog, store_alert

pytestmark = pytest.mark.integration

MAIN_TEMPLATE = REPO_ROOT / "infra" / "cloudformation" / "iot-analytics-system.yaml"


@pytest.fixture
def table(aws_env: dict[str, str]) -> tuple[Any, str]:
    template = load_template(MAIN_TEMPLATE)["Resources"]["AlertsTable"]["Properties"]
    dynamodb = boto3.client("dynamodb")
    name = f"alerts-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        AttributeDefinitions=template["AttributeDefinitions"],
        KeySchema=template["KeySchema"],
        BillingMode=template["BillingMode"],
    )
    return dynamodb, name


def _silent(sensor: str, silent_for_s: int) -> dict[str, Any]:
    return {
        "detail-type": "SensorSilent",
        "detail": {
            "event_id": f"SensorSilent/{sensor}/2026-11-23T18:00:00.000Z",
            "sensor_id": sensor,
            "zone_id": "Z-001",
            "last_received_at": "2026-11-23T18:00:00.000Z",
            "silent_for_s": silent_for_s,
        },
    }


def _congestion(zone: str, minute: int) -> dict[str, Any]:
    return {
        "detail-type": "CongestionDetected",
        "detail": {
            "event_id": f"CongestionDetected/{zone}/{minute}",
            "zone_id": zone,
            "minute": f"2026-11-23T18:{minute:02d}:00.000Z",
        },
    }


def _all_pages(log: DynamoAlertLog, **query: Any) -> list[list[str]]:
    pages, key = [], None
    while True:
        alerts, key = log.page(since_ms=0, before_key=key, **query)
        pages.append([a.event_id for a in alerts])
        if key is None:
            return pages


def test_an_alert_is_stored_once_whatever_time_its_copies_carry(table: tuple[Any, str]) -> None:
    dynamodb, name = table
    first = store_alert(dynamodb, name, _silent("S-000001", 300))
    # The sweeper announces the same silence again a minute later (a retry): same id, later time.
    again = store_alert(dynamodb, name, _silent("S-000001", 360))
    assert first is not None and again is None
    store_alert(dynamodb, name, _congestion("Z-002", 1))

    alerts, more = DynamoAlertLog(dynamodb, name).page(
        since_ms=0, before_key=None, limit=10, detail_type=None, zone_id=None
    )
    assert [a.event_id for a in alerts] == [
        "SensorSilent/S-000001/2026-11-23T18:00:00.000Z",  # at 18:05, its first copy's time
        "CongestionDetected/Z-002/1",  # at 18:02
    ]
    assert alerts[0].detail["silent_for_s"] == 300 and more is None


def test_filtered_pages_read_within_a_budget_and_follow_their_cursor(table: tuple[Any, str]) -> None:
    dynamodb, name = table
    for minute in range(40):
        store_alert(dynamodb, name, _congestion("Z-001" if minute % 10 == 0 else "Z-002", minute))
    log = DynamoAlertLog(dynamodb, name, read_budget=7)

    pages = _all_pages(log, limit=3, detail_type="CongestionDetected", zone_id="Z-001")
    found = [event for page in pages for event in page]
    # Newest first, each once; with 7 items read a request, some pages end short of 3.
    assert found == [f"CongestionDetected/Z-001/{m}" for m in (30, 20, 10, 0)]
    assert len(pages) > 2 and all(len(page) <= 3 for page in pages)

    unfiltered = _all_pages(DynamoAlertLog(dynamodb, name), limit=25, detail_type=None, zone_id=None)
    assert [len(page) for page in unfiltered] == [25, 15]
