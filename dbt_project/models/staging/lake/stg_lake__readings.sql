with

source as (

    select * from {{ source('lake', 'readings') }}

),

renamed as (

    select
        sensor_id,
        zone_id,
        gateway_id,
        seq,
        lane,
        cast(ts as timestamp) as measured_at,
        vehicle_count,
        avg_speed_kmh,
        occupancy_pct,
        congestion_index,
        cast(received_at as timestamp) as received_at,
        cast(processed_at as timestamp) as processed_at

    from source

)

select * from renamed
