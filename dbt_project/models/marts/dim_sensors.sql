{#-
    The sensor registry as a slowly changing dimension (type 2): one row per version of a
    detector, from the snapshot `registry_sensors_snapshot`. `valid_from` / `valid_to` are
    the snapshot times the version was first / last seen (the registry carries no change
    time of its own); the current version has `valid_to` null and `is_current` true. A
    detector removed from the registry keeps its history, closed.
-#}

with

sensor_versions as (

    select * from {{ ref('registry_sensors_snapshot') }}

),

zones as (

    select * from {{ ref('stg_registry__zones') }}

),

final as (

    select
        sensor_versions.dbt_scd_id as sensor_version_id,
        sensor_versions.sensor_id,
        sensor_versions.zone_id,
        zones.zone_name,
        sensor_versions.zone_type,
        sensor_versions.gateway_id,
        sensor_versions.road_name,
        sensor_versions.direction,
        sensor_versions.lane,
        sensor_versions.lane_count,
        sensor_versions.speed_limit_kmh,
        sensor_versions.latitude,
        sensor_versions.longitude,
        sensor_versions.dbt_valid_from as valid_from,
        sensor_versions.dbt_valid_to as valid_to,
        sensor_versions.dbt_valid_to is null as is_current

    from sensor_versions
    left join zones
        on sensor_versions.zone_id = zones.zone_id

)

select * from final
