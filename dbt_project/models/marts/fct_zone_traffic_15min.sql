{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'bucket_start', 'interval_grain_minutes': 15},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
        dist='zone_id',
        sort=['bucket_start', 'zone_id'],
    )
}}

{#-
    Traffic per zone and 15-minute bucket. Incremental by interval (strategy `interval`): the
    buckets of [interval_start, interval_end) are deleted and this select re-inserts them, in
    one transaction, so a re-run of the same hour replaces rather than adds.
-#}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at') }}
    {% endif %}

),

aggregated as (

    select
        zone_id,
        bucket_start,
        {{ traffic_measures() }},
        count(distinct sensor_id) as active_sensor_count

    from readings
    group by
        zone_id,
        bucket_start

),

final as (

    select
        zone_id,
        bucket_start,
        {{ dbt.dateadd('minute', 15, 'bucket_start') }} as bucket_end,
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
