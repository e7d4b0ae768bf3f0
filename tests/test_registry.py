"""The synthetic city and the registry files it is shipped as."""

from __future__ import annotations

from collections import Counter

import pytest

from streaming.registry import (
    SENSORS_PER_GATEWAY,
    ZONE_TYPES,
    generate_city,
    load_registry,
    registry_csv,
    zones_csv,
)


@pytest.fixture(scope="module")
def city():
    return generate_city()  # the default city: 50,000 sensors


def test_default_city_has_50k_sensors_over_at_least_200_zones(city) -> None:
    assert len(city.sensors) == 50_000
    assert len(city.zones) >= 200
    assert len({s.sensor_id for s in city.sensors}) == 50_000
    assert set(Counter(z.zone_type for z in city.zones)) == set(ZONE_TYPES)


def test_same_seed_same_city_other_seed_other_city(city) -> None:
    assert registry_csv(generate_city()) == registry_csv(city)
    assert registry_csv(generate_city(seed=8)) != registry_csv(city)


def test_gateways_serve_one_zone_and_at_most_32_sensors(city) -> None:
    for gateway_id, sensors in city.gateways().items():
        assert len(sensors) <= SENSORS_PER_GATEWAY
        assert len({s.zone_id for s in sensors}) == 1, gateway_id


def test_sensors_sit_inside_their_zone_on_the_street_grid(city) -> None:
    zones = {z.zone_id: z for z in city.zones}
    for s in city.sensors[::97]:
        z = zones[s.zone_id]
        # zones are 1 km squares: a sensor is within ~0.71 km of its zone centre
        assert abs(s.lat - z.lat) <= 0.0046 and abs(s.lon - z.lon) <= 0.0076
        assert 1 <= s.lane <= s.lanes


def test_the_centre_is_instrumented_more_densely_than_residential_streets(city) -> None:
    per_zone = Counter(s.zone_id for s in city.sensors)
    by_type: dict[str, list[int]] = {}
    for z in city.zones:
        by_type.setdefault(z.zone_type, []).append(per_zone[z.zone_id])
    mean = {t: sum(v) / len(v) for t, v in by_type.items()}
    assert mean["centre"] > mean["arterial"] > mean["residential"]


def test_registry_csv_round_trips(city) -> None:
    loaded = load_registry(registry_csv(city))
    assert list(loaded.values()) == list(city.sensors)
    assert zones_csv(city).startswith(b"zone_id,name,zone_type,grid_row,grid_col,lat,lon\n")


def test_a_registry_with_a_wrong_header_is_refused() -> None:
    with pytest.raises(ValueError, match="header"):
        load_registry(b"id,zone\nS-1,Z-1\n")


def test_a_city_needs_a_sensor_per_zone() -> None:
    with pytest.raises(ValueError, match="at least one sensor per zone"):
        generate_city(sensors=10, zones=20)
