with

sensors as (

    select * from {{ ref('stg_registry__sensors') }}

),

zones as (

    select * from {{ ref('stg_registry__zones') }}

),

final as (

    select
        sensors.sensor_id,
        sensors.zone_id,
        zones.zone_name,
        sensors.zone_type,
        sensors.gateway_id,
        sensors.road_name,
        sensors.direction,
        sensors.lane,
        sensors.lane_count,
        sensors.speed_limit_kmh,
        sensors.latitude,
        sensors.longitude

    from sensors
    left join zones
        on sensors.zone_id = zones.zone_id

)

select * from final
