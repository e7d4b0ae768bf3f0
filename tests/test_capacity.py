"""`citypulse plan` arithmetic: known inputs give known outputs, worked out by hand here."""

from __future__ import annotations

import hashlib
import math

import orjson
import pytest

from infra.capacity import (
    HOURS_PER_MONTH,
    PUSHED_CYCLE_RANGE_S,
    SECONDS_PER_MONTH,
    TABLE_QUOTA_UNITS,
    Workload,
    dynamodb_item_bytes,
    encode_gateway_message,
    hottest_shard_share,
    load_prices,
    measure_message_sizes,
    measure_zone_state_bytes,
    message_sizes,
    naive_plan,
    plan,
    provisioned_shards,
    sample_zone_states,
    tiered,
    zone_batches_per_s,
    zone_shares,
)
from streaming.contract import GATEWAY_V2, device_message
from streaming.devices.topics import telemetry_topic
from streaming.processor.state import DEDUPE_WINDOW

PRICES = load_prices()
# Known message and zone-state sizes for the hand-worked figures below (the defaults are
# measured), and a batch per shard a second: the stream read once a second with a 1 s window.
ONE_SECOND = {"stream_consumer": "SHARED_THROUGHPUT", "batching_window_s": 1}
SIZED = {"reading_bytes": 200, "message_overhead_bytes": 150, "zone_state_bytes_per_sensor": 40, **ONE_SECOND}


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
    assert item(naive_plan(Workload()), "DynamoDB") == pytest.approx(82_125)


# The default city's zones by size (the registry's zone types): 112 of 139 sensors, 60 of 198,
# 64 of 257, 4 of 258 and 16 of 317. At 40 B a sensor their zone-state items are 5.4, 7.7, 10.0,
# 10.1 and 12.4 KB: 6, 8, 11, 11 and 13 write units, 2, 2, 3, 3 and 4 read units (4 KB).
ZONE_WRU_40 = 112 * 6 + 60 * 8 + 64 * 11 + 4 * 11 + 16 * 13  # 2,108
ZONE_RRU_40 = 112 * 2 + 60 * 2 + 64 * 3 + 4 * 3 + 16 * 4  # 612


def test_citypulse_dynamodb_is_one_zone_item_per_batch() -> None:
    w = Workload(**SIZED)
    # each zone's state item in its own size, plus 1 zone-minute item, per zone per second
    assert plan(w).capacity["dynamodb_wru_per_s"] == ZONE_WRU_40 + 256
    # reads: the state items, strongly consistent (one read unit per started 4 KB, not half of
    # one), and each zone-minute item once a minute (then the container holds it)
    assert plan(w).capacity["dynamodb_rru_per_s"] == pytest.approx(ZONE_RRU_40 + 256 / 60)


def test_on_demand_tables_pay_per_request_unit() -> None:
    w = Workload(table_capacity_mode="PAY_PER_REQUEST", **SIZED)
    # (2,108 + 256) WRU/s x 2,628,000 s / 1e6 x $0.625 + (612 + 256/60) RRU/s x 2,628,000 / 1e6 x $0.125
    assert item(plan(w), "DynamoDB") == pytest.approx(2_364 * 2.628 * 0.625 + (612 + 256 / 60) * 2.628 * 0.125)


def test_provisioned_tables_pay_for_the_capacity_auto_scaling_holds() -> None:
    p = plan(Workload(**SIZED))  # PROVISIONED, held at 70 % utilisation
    # state: 2,108 WRU/s -> ceil(3,011.4) = 3,012 WCU, 612 RRU/s -> 875 RCU;
    # metrics: 256 WRU/s -> 366 WCU, 256/60 RRU/s -> 7 RCU.
    # 730 h x (3,378 WCU x $0.00065 + 882 RCU x $0.00013) = 730 x 2.310 = $1,686.6
    assert item(p, "DynamoDB") == pytest.approx(730 * (3_378 * 0.00065 + 882 * 0.00013))
    # the capacities to deploy with (auto scaling's floor): what it holds at the steady load
    assert {k: v for k, v in p.capacity.items() if k.endswith("_capacity")} == {
        "state_table_read_capacity": 875,
        "state_table_write_capacity": 3_012,
        "metrics_table_read_capacity": 7,
        "metrics_table_write_capacity": 366,
    }
    # the same load either way; provisioned is ~2.4x cheaper at this steady load
    on_demand = plan(Workload(table_capacity_mode="PAY_PER_REQUEST", **SIZED))
    assert p.capacity["dynamodb_wru_per_s"] == 2_364
    assert p.capacity["dynamodb_rru_per_s"] == pytest.approx(612 + 256 / 60)
    assert 2.3 < item(on_demand, "DynamoDB") / item(p, "DynamoDB") < 2.5


def test_the_templates_default_table_capacities_are_the_plans_for_the_default_city() -> None:
    from infra.local.provision import DEFAULT_TEMPLATE, load_template

    template = load_template(DEFAULT_TEMPLATE)
    parameters = template["Parameters"]
    scaling = [r for r in template["Resources"].values() if r["Type"] == "AWS::ApplicationAutoScaling::ScalableTarget"]
    assert {r["Properties"]["MaxCapacity"] for r in scaling} == {TABLE_QUOTA_UNITS}
    # a floor above the ceiling could not deploy: the parameters stop at it
    assert {
        parameters[f"{t}{d}Capacity"]["MaxValue"] for t in ("StateTable", "MetricsTable") for d in ("Read", "Write")
    } == {TABLE_QUOTA_UNITS}
    # ... for the template's own default reading of the stream, which the capacities follow
    reading = {
        "stream_consumer": parameters["ProcessorStreamConsumer"]["Default"],
        "batching_window_s": parameters["ProcessorBatchingWindow"]["Default"],
    }
    c = plan(Workload(**reading)).capacity
    assert {
        name: parameters[name]["Default"]
        for name in (
            "StateTableReadCapacity",
            "StateTableWriteCapacity",
            "MetricsTableReadCapacity",
            "MetricsTableWriteCapacity",
        )
    } == {
        "StateTableReadCapacity": c["state_table_read_capacity"],
        "StateTableWriteCapacity": c["state_table_write_capacity"],
        "MetricsTableReadCapacity": c["metrics_table_read_capacity"],
        "MetricsTableWriteCapacity": c["metrics_table_write_capacity"],
    }


def test_the_naive_design_keeps_an_on_demand_table_unless_told() -> None:
    assert "on-demand" in next(i.quantity for i in naive_plan(Workload()).items if i.component == "DynamoDB")
    # 50,000 WRU/s held at 70 %: ceil(71,428.6) = 71,429 WCU x 730 h x $0.00065 = $33,893
    provisioned = naive_plan(Workload(), table_capacity_mode="PROVISIONED")
    assert item(provisioned, "DynamoDB") == pytest.approx(71_429 * 730 * 0.00065)
    assert provisioned.warnings[-1].startswith("the readings table needs 0 RCU and 71,429 WCU, over DynamoDB's")
    assert not [x for x in plan(Workload()).warnings if "table" in x]


def test_the_plan_command_prints_the_table_parameters_to_deploy_with(capsys: pytest.CaptureFixture[str]) -> None:
    from infra.local.cli import main

    c = plan(Workload()).capacity
    with pytest.raises(SystemExit) as done:
        main(["plan"])
    assert done.value.code == 0
    assert (
        f"TableCapacityMode=PROVISIONED StateTableReadCapacity={c['state_table_read_capacity']} "
        f"StateTableWriteCapacity={c['state_table_write_capacity']} "
        f"MetricsTableReadCapacity={c['metrics_table_read_capacity']} "
        f"MetricsTableWriteCapacity={c['metrics_table_write_capacity']}"
    ) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--table-capacity-mode", "PAY_PER_REQUEST"])
    shown = capsys.readouterr().out
    # each zone's items in the batches its gateways send in, at the default cycle
    wru = plan(Workload(table_capacity_mode="PAY_PER_REQUEST")).capacity["dynamodb_wru_per_s"]
    assert "TableCapacityMode=PAY_PER_REQUEST\n" in shown and f"on-demand: {wru:,.0f} WRU/s" in shown


def test_a_longer_batching_window_writes_every_zone_and_lake_file_less_often() -> None:
    on_demand = {"table_capacity_mode": "PAY_PER_REQUEST", **SIZED}
    second, two = plan(Workload(**on_demand)), plan(Workload(**{**on_demand, "batching_window_s": 2}))
    assert two.capacity["dynamodb_wru_per_s"] == (ZONE_WRU_40 + 256) / 2
    # a zone-minute item is read once a minute at either window (then held)
    assert two.capacity["dynamodb_rru_per_s"] == pytest.approx(ZONE_RRU_40 / 2 + 256 / 60)
    minute_reads = 256 / 60 * 2.628 * PRICES["dynamodb_on_demand"]["read_request_units_per_million"]
    assert item(two, "DynamoDB") == pytest.approx((item(second, "DynamoDB") + minute_reads) / 2)
    shards = two.capacity["kinesis_shards"]
    assert shards == second.capacity["kinesis_shards"]  # the stream does not change
    puts = shards * SECONDS_PER_MONTH / 1000 * PRICES["s3"]["put_per_thousand"]
    assert item(second, "S3 lake") - item(two, "S3 lake") == pytest.approx(puts / 2)
    invocations = shards * SECONDS_PER_MONTH / 1e6
    # half the invocations, and half the zones' per-batch CPU (each zone in every batch either way)
    w = Workload(**on_demand)
    vcpus = 256 / 2 * w.processor_ms_per_zone_batch / 1e3 / w.processor_cpu_share
    gb_s = vcpus * SECONDS_PER_MONTH * w.lambda_memory_mb / 1024
    assert item(second, "Lambda processor") - item(two, "Lambda processor") == pytest.approx(
        invocations / 2 * PRICES["lambda"]["requests_per_million"] + gb_s * PRICES["lambda"]["gb_second"]
    )


def test_no_window_is_paced_by_lambda_reading_each_shard_once_a_second() -> None:
    # The batches of a mapping on the stream without a window follow Lambda's base rate of
    # reading a shard.
    none, second = plan(Workload(**{**SIZED, "batching_window_s": 0})), plan(Workload(**SIZED))
    assert none.capacity == second.capacity
    assert none.monthly_usd == second.monthly_usd


def test_a_pushed_consumer_with_no_window_batches_at_its_invocations_pace() -> None:
    # Enhanced fan-out, no window: a shard's batches follow each other every invocation (here
    # 0.25 s), four a second; each shard's lake file four times as often, each zone in the
    # batches its gateways sent in (below).
    fan_out = {**SIZED, "stream_consumer": "ENHANCED_FAN_OUT", "batching_window_s": 0, "pushed_cycle_s": 0.25}
    pushed, second = plan(Workload(**fan_out)), plan(Workload(**SIZED))
    shards = pushed.capacity["kinesis_shards"]
    assert shards == second.capacity["kinesis_shards"]
    puts = shards * SECONDS_PER_MONTH / 1000 * PRICES["s3"]["put_per_thousand"]
    assert item(pushed, "S3 lake") - item(second, "S3 lake") == pytest.approx(3 * puts)
    # The zones by size (139, 198, 257-258 and 317 sensors: 5, 7, 9 and 10 gateways of 32): a
    # gateway sends within a quarter second with probability 1/4, so a zone of g gateways is
    # in 4 x (1 - 0.75 ** g) batches a second, at 40 B a sensor 6, 8, 11 and 13 write units.
    per_s = {g: 4 * (1 - 0.75**g) for g in (5, 7, 9, 10)}
    assert pushed.capacity["dynamodb_wru_per_s"] == pytest.approx(
        112 * 6 * per_s[5]
        + 60 * 8 * per_s[7]
        + 68 * 11 * per_s[9]
        + 16 * 13 * per_s[10]  # state
        + 112 * per_s[5]
        + 60 * per_s[7]
        + 68 * per_s[9]
        + 16 * per_s[10]  # zone-minute items
    )
    # a window still paces a pushed consumer: every zone in every batch, one a second
    windowed = plan(Workload(**{**fan_out, "batching_window_s": 1}))
    assert windowed.capacity["dynamodb_wru_per_s"] == pytest.approx(second.capacity["dynamodb_wru_per_s"])
    assert second.capacity["dynamodb_wru_per_s"] == pytest.approx(ZONE_WRU_40 + 256)


def test_a_zone_is_written_at_most_as_often_as_its_gateways_send() -> None:
    share = 139 / 50_000  # 5 gateways of 32 sensors, each sending once a second
    assert zone_batches_per_s(Workload(**SIZED), share) == 1  # every batch of a second holds it
    assert zone_batches_per_s(Workload(**{**SIZED, "batching_window_s": 2}), share) == 0.5
    pushed = {**SIZED, "stream_consumer": "ENHANCED_FAN_OUT", "batching_window_s": 0}
    assert zone_batches_per_s(Workload(**pushed, pushed_cycle_s=0.25), share) == pytest.approx(4 * (1 - 0.75**5))
    # however short the cycle, no more batches than messages: 5 a second
    assert 4.9 < zone_batches_per_s(Workload(**pushed, pushed_cycle_s=0.001), share) < 5
    # a gateway reporting every 10 s (0.1 Hz) is in a quarter-second batch one time in 40
    slow = Workload(**pushed, pushed_cycle_s=0.25, rate_hz=0.1)
    assert zone_batches_per_s(slow, share) == pytest.approx(4 * (1 - (1 - 0.025) ** 5))


def test_a_fan_out_consumer_on_a_provisioned_stream_pays_consumer_shard_hours_and_gb_out() -> None:
    fan_out = plan(Workload(**{**SIZED, "stream_consumer": "ENHANCED_FAN_OUT"}))
    shards = fan_out.capacity["kinesis_shards"]
    # 1,562.5 records/s of 6,550 x 4/3 + 120 = 8,853.3 B: 13.83 MB/s, 33,857 GiB a month
    gb = 1562.5 * (6550 * 4 / 3 + 120) * SECONDS_PER_MONTH / 1024**3
    assert gb == pytest.approx(33_857, rel=1e-4)
    assert item(fan_out, "Kinesis enhanced fan-out") == pytest.approx(shards * 730 * 0.015 + gb * 0.013)
    # the stream itself costs what it did; a shared-throughput consumer pays nothing more
    shared = plan(Workload(**SIZED))
    assert item(fan_out, "Kinesis Data Streams") == item(shared, "Kinesis Data Streams")
    assert "Kinesis enhanced fan-out" not in {i.component for i in shared.items}


def test_a_fan_out_consumer_on_an_on_demand_stream_pays_its_retrieval_instead() -> None:
    on_demand = {**SIZED, "stream_mode": "ON_DEMAND"}
    fan_out = plan(Workload(**{**on_demand, "stream_consumer": "ENHANCED_FAN_OUT"}))
    # 9 KB billed a record (rounded up): in at $0.08/GB, out through the consumer at $0.05/GB
    gb = 1562.5 * SECONDS_PER_MONTH * 9 * 1024 / 1024**3
    assert item(fan_out, "Kinesis Data Streams") == pytest.approx(gb * 0.08 + HOURS_PER_MONTH * 0.04)
    assert item(fan_out, "Kinesis enhanced fan-out") == pytest.approx(gb * 0.05)


def test_the_templates_reading_parameters_are_the_plans() -> None:
    from infra.capacity import MAX_BATCHING_WINDOW_S, StreamConsumer
    from infra.local.provision import DEFAULT_TEMPLATE, load_template

    parameters = load_template(DEFAULT_TEMPLATE)["Parameters"]
    assert set(parameters["ProcessorStreamConsumer"]["AllowedValues"]) == set(StreamConsumer.__args__)
    window = parameters["ProcessorBatchingWindow"]
    assert (window["MinValue"], window["MaxValue"]) == (0, MAX_BATCHING_WINDOW_S)


@pytest.mark.parametrize("window", [0.5, -1, 301, True])
def test_a_window_the_mapping_cannot_take_is_refused(window: object) -> None:
    with pytest.raises(ValueError, match="whole seconds from 0 to 300"):
        Workload(**{**SIZED, "batching_window_s": window})


def test_the_plan_command_passes_the_batching_window(capsys: pytest.CaptureFixture[str]) -> None:
    from infra.local.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "--batching-window", "2"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    # the zones' measured state items (2, 3, 4, 4 and 5 WRU by size: 756) + 256 zone-minute items, / 2 s
    assert "506 WRU/s" in shown and f"{plan(Workload()).capacity['kinesis_shards'] // 2} PUT/s" in shown
    assert "ProcessorBatchingWindow=2: at most one batch per shard every 2 s (the batching window)" in shown


def test_the_plan_command_reads_through_a_fan_out_consumer_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    from infra.local.cli import main

    with pytest.raises(SystemExit):
        main(["plan"])
    shown = capsys.readouterr().out
    assert "ProcessorStreamConsumer=ENHANCED_FAN_OUT ProcessorBatchingWindow=0: at most one batch per shard" in shown
    assert "Kinesis enhanced fan-out" in shown
    # ... beside the cycle's range it estimates and what reading the stream once a second costs
    naive = naive_plan(Workload()).monthly_usd
    for cycle in PUSHED_CYCLE_RANGE_S:
        other = plan(Workload(pushed_cycle_s=cycle))
        assert f"(with invocations of {cycle:g} s instead of 0.15 s: ${other.monthly_usd:,.0f}/month" in shown
    second = plan(Workload(**ONE_SECOND))
    assert (
        "(reading the stream once a second instead, ProcessorStreamConsumer=SHARED_THROUGHPUT "
        f"ProcessorBatchingWindow=1, each alert waiting up to a second more for its shard's next batch: "
        f"${second.monthly_usd:,.0f}/month, {naive / second.monthly_usd:.1f}x)" in shown
    )
    with pytest.raises(SystemExit):
        main(["plan", "--stream-consumer", "SHARED_THROUGHPUT", "--batching-window", "1"])
    shown = capsys.readouterr().out
    assert f"{second.monthly_usd:,.0f}" in shown and "instead" not in shown
    assert "Kinesis enhanced fan-out" not in shown


@pytest.mark.parametrize("given", ["0.5", "-1", "301", "one"])
def test_the_plan_command_refuses_a_window_the_mapping_cannot_take(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.local.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "--batching-window", given])
    assert done.value.code == 2
    assert "the mapping's window is whole seconds from 0 to 300" in capsys.readouterr().err


def test_citypulse_messages_and_kinesis_volume_on_demand() -> None:
    p = plan(Workload(stream_mode="ON_DEMAND", **SIZED))
    assert p.capacity["mqtt_messages_per_s"] == 50_000 / 32
    assert p.capacity["message_bytes"] == 32 * 200 + 150
    # record = 6,550 x 4/3 + 120 = 8,853 B → billed 9 KB; 1,562.5/s over a month
    gb = 1562.5 * SECONDS_PER_MONTH * 9 * 1024 / 1024**3
    assert item(p, "Kinesis Data Streams") == pytest.approx(gb * 0.12 + HOURS_PER_MONTH * 0.04)
    assert p.capacity["kinesis_shards_equivalent"] == math.ceil(1562.5 * 8853.33 / 1048576)


def test_provisioned_stream_bills_shard_hours_and_put_units() -> None:
    w = Workload(**SIZED)
    p = plan(w)
    shards = p.capacity["kinesis_shards"]
    # 8,853 B records fit one 25 KB PUT payload unit: 1,562.5/s x 2,628,000 s = 4.10625 B units x $0.014/M
    units_usd = 1562.5 * SECONDS_PER_MONTH / 1e6 * 0.014
    assert units_usd == pytest.approx(57.4875)
    assert item(p, "Kinesis Data Streams") == pytest.approx(shards * HOURS_PER_MONTH * 0.015 + units_usd)
    # The fewest shards whose hottest (zone-keyed) shard stays within 80 % of 1 MiB/s and 1,000 records/s.
    shares = zone_shares(w.sensors, w.zones)
    bytes_s = 1562.5 * (6550 * 4 / 3 + 120)
    assert bytes_s * hottest_shard_share(shares, shards) <= 0.8 * 1048576
    assert bytes_s * hottest_shard_share(shares, shards - 1) > 0.8 * 1048576
    # One Lambda invocation per shard at a time: the shards are the processor's concurrency.
    assert p.capacity["lambda_concurrency"] == shards


def test_hottest_shard_follows_the_md5_of_the_partition_key() -> None:
    # Kinesis: shard = the equal slice of the 128-bit MD5 key space the key's hash falls into.
    keys = {"Z-000": 0.5, "Z-001": 0.3, "Z-002": 0.2}
    top_bit = {k: hashlib.md5(k.encode()).digest()[0] >> 7 for k in keys}
    by_shard = [sum(v for k, v in keys.items() if top_bit[k] == shard) for shard in (0, 1)]
    assert hottest_shard_share(keys, 2) == pytest.approx(max(by_shard))
    assert hottest_shard_share(keys, 1) == pytest.approx(1.0)


def test_evenly_keyed_stream_needs_only_the_shards_its_limits_ask_for() -> None:
    limits = PRICES["kinesis_provisioned"]
    # 50,000 records/s of 567 B: 50 shards by records at 100 %, 63 at 80 %; bytes need fewer.
    assert provisioned_shards(Workload(**SIZED), 50_000, 50_000 * 567, limits, None) == 63


def test_a_zone_over_one_shards_limits_is_refused_in_either_stream_mode() -> None:
    """Found by a review: `plan --rate 100` searched for ever, adding shards one at a time
    that no zone's records could reach (a key's records all go to one shard)."""
    limits = PRICES["kinesis_provisioned"]
    shares = {"Z-000": 0.5, "Z-001": 0.3, "Z-002": 0.2}
    with pytest.raises(ValueError, match="zone Z-000 alone would send 1,001 records/s"):
        provisioned_shards(Workload(**SIZED), 2_002, 1_000, limits, shares)
    assert provisioned_shards(Workload(**SIZED), 600, 1_000, limits, shares) == 1  # all of it within 80 %
    with pytest.raises(ValueError, match="alone would send"):
        plan(Workload(rate_hz=100, stream_mode="ON_DEMAND"))


def test_zones_hashed_together_are_parted_by_more_shards_not_in_order() -> None:
    """Two zones, each at 90 % of the 80 % headroom: a plan needs them on shards of their own.
    Kinesis splits the hash range into N equal parts, so a pair together at 2 shards may be apart
    at a higher count (found by the diff's review: the search stopped at as many shards as keys).
    """
    names = [f"Z-{n:03d}" for n in range(64)]

    def shard(key: str, shards: int) -> int:
        return (int.from_bytes(hashlib.md5(key.encode()).digest(), "big") * shards) >> 128

    limits = PRICES["kinesis_provisioned"]
    records_s = 2 * 0.9 * 0.8 * limits["shard_records_per_second"]
    a = names[0]
    b = next(k for k in names[1:] if shard(k, 2) == shard(a, 2) and shard(k, 3) == shard(a, 3))
    apart = next(n for n in range(2, 100) if shard(a, n) != shard(b, n))
    assert apart > 3  # together at 2 and 3 shards ...
    assert provisioned_shards(Workload(**SIZED), records_s, 1_000, limits, {a: 0.5, b: 0.5}) == apart
    # ... and a zone alone over the headroom has no count at all.
    with pytest.raises(ValueError, match="alone would take over 80%"):
        provisioned_shards(Workload(**SIZED), 2 * 0.81 * 800 / 0.8, 1_000, limits, {a: 0.5, b: 0.5})


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("sensors", 0, "--sensors 0"),
        ("rate_hz", 0.0, "--rate 0.0"),
        ("rate_hz", -1.0, "--rate -1.0"),
        ("rate_hz", math.nan, "--rate nan"),
        ("rate_hz", math.inf, "--rate inf"),
        ("gateway_batch", 0, "--gateway-batch 0"),
        ("zones", 0, "--zones 0"),
        ("zones", 50_001, "--zones 50001"),
    ],
)
def test_a_workload_no_city_has_is_refused(field: str, value: float, says: str) -> None:
    """Found by a review: `--rate -1` printed negative costs, `--gateway-batch 0` divided by zero."""
    with pytest.raises(ValueError, match=says.replace("+", r"\+")):
        Workload(**{field: value})


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--rate", "-1"], "citypulse: plan: --rate -1.0"),
        (["--sensors", "50000", "--rate", "100"], "alone would send"),
        (["--sensors", "2000000"], "plan at most 1,000,000"),
    ],
)
def test_the_plan_command_says_what_it_cannot_plan(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.local.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", *argv])
    assert done.value.code == 2
    assert says in capsys.readouterr().err


def test_a_small_city_is_planned_over_its_own_zones_and_told_when_batching_does_not_pay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infra.local.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "--sensors", "100"])  # 256 zones by default: more than its sensors
    assert done.value.code == 0
    assert "cheaper than the naive design" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--sensors", "16"])
    assert "dearer than the naive design" in capsys.readouterr().out


def test_basic_ingest_removes_the_messaging_charge_but_not_the_rules() -> None:
    with_bi, without = plan(Workload(**SIZED)), plan(Workload(basic_ingest=False, **SIZED))
    assert item(with_bi, "IoT Core messaging") == 0
    # 4.1 B messages x 2 units (6,550 B > 5 KB) = 8.2 B units at the tiered price
    assert item(without, "IoT Core messaging") == pytest.approx(
        tiered(50_000 / 32 * SECONDS_PER_MONTH * 2, PRICES["iot_core"]["messaging_per_million_tiers"])
    )
    assert item(with_bi, "IoT Core rules engine") == item(without, "IoT Core rules engine")


def test_quota_warnings_only_where_the_default_quota_is_exceeded() -> None:
    assert plan(Workload()).warnings == []
    assert len(naive_plan(Workload()).warnings) == 2  # 50,000 publishes/s and rule evaluations/s > 20,000


def test_message_sizes_split_a_message_into_overhead_and_readings() -> None:
    def encode(gateway_id: str, zone_id: str, sent_at_ms: int, readings: list[dict]) -> bytes:
        return b"e" * 40 + b"r" * 7 * len(readings)

    topic = len(telemetry_topic("Z-001", "gw-001-00"))
    sizes = message_sizes([("gw-001-00", "Z-001", 0, [{}] * 3), ("gw-001-00", "Z-001", 0, [{}] * 5)], encode)
    assert (sizes.reading_bytes, sizes.overhead_bytes, sizes.messages, sizes.readings) == (7, 40 + topic, 2, 8)


def test_default_sizes_are_measured_with_the_devices_encoder() -> None:
    sizes = measure_message_sizes()
    assert (Workload().reading_bytes, Workload().message_overhead_bytes) == (sizes.reading_bytes, sizes.overhead_bytes)
    # The split adds up to what the encoder produced for a real message.
    reading = {"sensor_id": "S-000001", "zone_id": "Z-001", "ts": "2026-03-02T10:00:00.000Z", "seq": 1}
    one = message_sizes([("gw-001-00", "Z-001", 0, [reading] * 4)])
    encoded = encode_gateway_message("gw-001-00", "Z-001", 0, [reading] * 4)
    assert encoded == orjson.dumps(device_message("gw-001-00", "Z-001", 0, [reading] * 4))
    assert orjson.loads(encoded)["schema_version"] == GATEWAY_V2  # what gateways publish: columns
    topic = len(telemetry_topic("Z-001", "gw-001-00"))
    assert one.overhead_bytes + 4 * one.reading_bytes == len(encoded) + topic
    # A reading of the simulator costs ~70 B in a v2 message, its own ts included (the model's
    # detectors do not report in step); a v1 JSON object costs ~180-200 B.
    assert 40 < sizes.reading_bytes < 100


def test_citypulse_is_at_least_twenty_times_cheaper_than_naive() -> None:
    w = Workload()
    assert naive_plan(w).monthly_usd / plan(w).monthly_usd >= 20
    # ... and still when the naive design gets a provisioned stream and provisioned tables as well.
    provisioned = naive_plan(w, stream_mode="PROVISIONED", table_capacity_mode="PROVISIONED")
    assert provisioned.monthly_usd / plan(w).monthly_usd >= 20


def test_the_zone_state_size_is_measured_on_the_processors_own_full_states() -> None:
    states = sample_zone_states()
    sensors = [s for z in states.values() for s in z.sensors.values()]
    assert len(states) == 4 and len(sensors) > 600
    # Every sensor reported DEDUPE_WINDOW + 1 times: its window is full, as in a running city.
    assert all(s.window == 2**DEDUPE_WINDOW - 1 and s.vehicle_count is not None for s in sensors)
    sizes = measure_zone_state_bytes()
    assert sizes.sensors == len(sensors)
    assert sizes.bytes_per_sensor == sum(len(z.to_bytes()) for z in states.values()) / len(sensors)
    assert Workload().zone_state_bytes_per_sensor == sizes.bytes_per_sensor  # what the plan costs


def test_the_measured_zone_state_costs_under_half_the_old_constant() -> None:
    # ~13.0 B a sensor and 130 B of the item's other attributes: the zones' items are 1.9, 2.6,
    # 3.4, 3.4 and 4.1 KB — 2, 3, 4, 4 and 5 write units and 1, 1, 1, 1 and 2 read units —
    # against 6 to 13 and 2 to 4 at the old 40 B.
    measured = measure_zone_state_bytes().bytes_per_sensor
    assert 10 < measured < 16
    w = plan(Workload(**{**SIZED, "zone_state_bytes_per_sensor": measured}))
    assert w.capacity["dynamodb_wru_per_s"] == 112 * 2 + 60 * 3 + 68 * 4 + 16 * 5 + 256  # 1,012
    assert w.capacity["dynamodb_rru_per_s"] == pytest.approx(112 * 1 + 60 * 1 + 68 * 1 + 16 * 2 + 256 / 60)  # 276
    assert w.capacity["dynamodb_wru_per_s"] * 2 < ZONE_WRU_40 + 256


def test_the_processors_lambda_is_its_measured_cpu_a_reading_and_a_zone_in_a_batch() -> None:
    w = Workload(**{**SIZED, "processor_us_per_reading": 4.0, "processor_ms_per_zone_batch": 2.0})
    p = plan(w)
    # 50,000 readings/s x 4 us + 256 zones in a batch a second (once a second, every zone) x 2 ms
    # = 0.2 + 0.512 CPU seconds a second; at 50 % CPU, 1.424 busy vCPUs.
    assert p.capacity["lambda_busy_vcpus"] == pytest.approx(1.424)
    assert p.capacity["lambda_concurrency"] == p.capacity["kinesis_shards"]  # 8 > 2
    gb_s = 1.424 * SECONDS_PER_MONTH * w.lambda_memory_mb / 1024
    invocations = p.capacity["kinesis_shards"] * SECONDS_PER_MONTH / 1e6
    lam = PRICES["lambda"]
    assert item(p, "Lambda processor") == pytest.approx(
        gb_s * lam["gb_second"] + invocations * lam["requests_per_million"]
    )


def test_an_items_size_is_its_attribute_names_and_values_as_dynamodb_bills_them() -> None:
    # "Item sizes and formats": names and strings in UTF-8, binaries raw, a number one byte per
    # two significant digits plus one, a Boolean one byte.
    assert dynamodb_item_bytes({"pk": {"S": "zone#Z-000"}}) == 2 + 10
    assert dynamodb_item_bytes({"zoné": {"S": "é"}}) == 5 + 2
    assert dynamodb_item_bytes({"state": {"B": b"\x00" * 2_000}}) == 5 + 2_000
    assert dynamodb_item_bytes({"updated_at": {"N": "1765000000000"}}) == 10 + 3  # 1765: 4 digits
    assert dynamodb_item_bytes({"n": {"N": "-0.0120"}}) == 1 + 2  # 12: 2 digits
    assert dynamodb_item_bytes({"congested": {"BOOL": False}}) == 9 + 1
    with pytest.raises(ValueError, match="scalar"):
        dynamodb_item_bytes({"m": {"M": {}}})


def test_a_zone_is_priced_with_its_items_other_attributes() -> None:
    # 139 sensors x 14.2 B = 1,973.8 B of state: under 2 KB alone, 2,103.8 B with the item's
    # other 130 B: three write units, not two, for each of the 112 zones of 139 sensors.
    sized = {**SIZED, "zone_state_bytes_per_sensor": 14.2}
    bare = plan(Workload(**sized, zone_state_item_overhead_bytes=0)).capacity["dynamodb_wru_per_s"]
    whole = plan(Workload(**sized, zone_state_item_overhead_bytes=130)).capacity["dynamodb_wru_per_s"]
    assert whole - bare == 112
    assert measure_zone_state_bytes().item_overhead_bytes > 100  # keys, marker, flags and names


def test_through_the_consumer_lambda_bills_each_shards_invocations_back_to_back() -> None:
    """With no window a shard's next invocation starts when its last ends: Lambda bills every
    second of every shard, not the CPU (found by a review: $225 for 2.60 busy vCPUs). By hand:
    8 shards x 2,628,000 s x 1,769/1,024 GB x $0.0000166667 = $605.33; 8 / 0.15 s x 2,628,000
    = 140.16 M invocations x $0.20 = $28.03."""
    p = plan(Workload())
    assert p.capacity["kinesis_shards"] == 8 and p.capacity["lambda_busy_vcpus"] == 8
    assert item(p, "Lambda processor") == pytest.approx(605.33 + 28.03, abs=0.01)
    once = plan(Workload(stream_consumer="SHARED_THROUGHPUT", batching_window_s=1))
    assert once.capacity["lambda_busy_vcpus"] < 1  # a 1 s window: idle between invocations
