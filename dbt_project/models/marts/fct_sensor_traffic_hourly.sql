{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'hour_start', 'interval_grain_minutes': 60},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
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
        avg_congestion_index,
        speed_reading_count

    from aggregated

)

select * from final
