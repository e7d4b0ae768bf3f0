{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'bucket_start', 'interval_grain_minutes': 15},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
        dist='sensor_id',
        sort=['bucket_start', 'sensor_id'],
    )
}}

{#- Traffic per sensor and 15-minute bucket; incremental by interval like fct_zone_traffic_15min. -#}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at') }}
    {% endif %}

),

aggregated as (

    select
        sensor_id,
        zone_id,
        bucket_start,
        {{ traffic_measures() }}

    from readings
    group by
        sensor_id,
        zone_id,
        bucket_start

),

final as (

    select
        sensor_id,
        bucket_start,
        {{ dbt.dateadd('minute', 15, 'bucket_start') }} as bucket_end,
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
