with

source as (

    select * from {{ source('registry', 'sensor_registry') }}

),

renamed as (

    select
        sensor_id,
        zone_id,
        gateway_id,
        zone_type,
        road as road_name,
        direction,
        lane,
        lanes as lane_count,
        speed_limit_kmh,
        lat as latitude,
        lon as longitude

    from source

)

select * from renamed
