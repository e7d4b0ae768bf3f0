{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_interval('hour_start', 60) }}",
        on_schema_change='fail',
        dist='sensor_id',
        sort=['hour_start', 'sensor_id'],
    )
}}

{#- Traffic per sensor and hour, from the readings; incremental by hour-aligned interval. -#}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at', 60) }}
    {% endif %}

),

aggregated as (

    select
        sensor_id,
        zone_id,
        hour_start,
        {{ traffic_measures() }}

    from readings
    group by
        sensor_id,
        zone_id,
        hour_start

),

final as (

    select
        sensor_id,
        hour_start,
        {{ dbt.dateadd('hour', 1, 'hour_start') }} as hour_end,
        zone_id,
        reading_count,
        vehicle_count,
        avg_speed_kmh,
        avg_occupancy_pct,
        avg_congestion_index

    from aggregated

)

select * from final
