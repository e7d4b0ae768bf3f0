"""`citypulse plan` arithmetic: known inputs give known outputs, worked out by hand here."""

from __future__ import annotations

import math

import pytest

from infra.capacity import HOURS_PER_MONTH, SECONDS_PER_MONTH, Workload, load_prices, naive_plan, plan, tiered

PRICES = load_prices()


def item(p, name: str) -> float:
    return next(i.monthly_usd for i in p.items if i.component == name)


def test_price_table_is_dated_and_cites_a_source_for_every_service() -> None:
    assert PRICES["as_of"] == "2026-11-23"
    priced = {k for k in PRICES if isinstance(PRICES[k], dict) and k not in ("sources",)}
    services = {k.split("_on_demand")[0].split("_provisioned")[0] for k in priced}
    assert services <= set(PRICES["sources"]), services - set(PRICES["sources"])
    assert all(url.startswith("https://aws.amazon.com/") for url in PRICES["sources"].values())


def test_tiered_messaging_price() -> None:
    tiers = PRICES["iot_core"]["messaging_per_million_tiers"]  # $1.00 first 1 B, $0.80 next 4 B, $0.70 after
    assert tiered(1e9, tiers) == pytest.approx(1000)
    assert tiered(6e9, tiers) == pytest.approx(1000 + 3200 + 700)


def test_naive_iot_messaging_at_50k_sensors_one_hertz() -> None:
    # 50,000 msg/s x 2,628,000 s = 131.4 B messages, each under 5 KB:
    # 1 B x $1.00/M + 4 B x $0.80/M + 126.4 B x $0.70/M = 1,000 + 3,200 + 88,480 = $92,680
    assert item(naive_plan(Workload()), "IoT Core messaging") == pytest.approx(92_680)


def test_naive_dynamodb_is_one_write_per_reading() -> None:
    # 50,000 WRU/s x 2,628,000 s / 1e6 x $0.625 = $82,125
    assert item(naive_plan(Workload()), "DynamoDB (on-demand)") == pytest.approx(82_125)


def test_citypulse_dynamodb_is_one_zone_item_per_batch() -> None:
    w = Workload()
    # 50,000 / 256 zones x 40 B = 7.63 KB → 8 WRU + 1 zone-minute item = 9 WRU per zone per second
    assert plan(w).capacity["dynamodb_wru_per_s"] == 256 * 9
    # reads: (ceil(7.63/4) = 2 + 1) RRU x 2 (strongly consistent) per zone per second
    assert plan(w).capacity["dynamodb_rru_per_s"] == 256 * 3 * 2


def test_citypulse_messages_and_kinesis_volume() -> None:
    w = Workload()
    p = plan(w)
    assert p.capacity["mqtt_messages_per_s"] == 50_000 / 32
    assert p.capacity["message_bytes"] == 32 * 200 + 150
    # record = 6,550 x 4/3 + 120 = 8,853 B → billed 9 KB; 1,562.5/s over a month
    gb = 1562.5 * SECONDS_PER_MONTH * 9 * 1024 / 1024**3
    assert item(p, "Kinesis Data Streams (on-demand)") == pytest.approx(gb * 0.12 + HOURS_PER_MONTH * 0.04)
    assert p.capacity["kinesis_shards_equivalent"] == math.ceil(1562.5 * 8853.33 / 1048576)


def test_basic_ingest_removes_the_messaging_charge_but_not_the_rules() -> None:
    w = Workload()
    with_bi, without = plan(w), plan(Workload(basic_ingest=False))
    assert item(with_bi, "IoT Core messaging") == 0
    # 4.1 B messages x 2 units (6,550 B > 5 KB) = 8.2 B units at the tiered price
    assert item(without, "IoT Core messaging") == pytest.approx(
        tiered(50_000 / 32 * SECONDS_PER_MONTH * 2, PRICES["iot_core"]["messaging_per_million_tiers"])
    )
    assert item(with_bi, "IoT Core rules engine") == item(without, "IoT Core rules engine")


def test_quota_warnings_only_where_the_default_quota_is_exceeded() -> None:
    assert plan(Workload()).warnings == []
    assert len(naive_plan(Workload()).warnings) == 2  # 50,000 publishes/s and rule evaluations/s > 20,000


def test_citypulse_is_an_order_of_magnitude_cheaper_than_naive() -> None:
    w = Workload()
    assert naive_plan(w).monthly_usd / plan(w).monthly_usd > 15
