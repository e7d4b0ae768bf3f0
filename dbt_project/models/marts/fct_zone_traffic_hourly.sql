{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'hour_start', 'interval_grain_minutes': 60},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
        dist='zone_id',
        sort=['hour_start', 'zone_id'],
    )
}}

{#-
    Traffic per zone and hour, from the readings (not from the 15-minute mart: a mean of
    means would weigh a quiet quarter like a busy one). Incremental by hour-aligned interval.
-#}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at', 60) }}
    {% endif %}

),

aggregated as (

    select
        zone_id,
        hour_start,
        {{ traffic_measures() }},
        count(distinct sensor_id) as active_sensor_count

    from readings
    group by
        zone_id,
        hour_start

),

final as (

    select
        zone_id,
        hour_start,
        {{ dbt.dateadd('hour', 1, 'hour_start') }} as hour_end,
        reading_count,
        vehicle_count,
        avg_speed_kmh,
        avg_occupancy_pct,
        avg_congestion_index,
        active_sensor_count,
        speed_reading_count

    from aggregated

)

select * from final
