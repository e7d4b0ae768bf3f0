{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        pre_hook="{{ delete_interval('bucket_start') }}",
        on_schema_change='fail',
    )
}}

{#-
    Traffic per zone and 15-minute bucket. Incremental by interval: the pre-hook deletes the
    buckets of [interval_start, interval_end) and this select re-inserts them, in one
    transaction, so a re-run of the same hour replaces rather than adds.
-#}

with

readings as (

    select * from {{ ref('stg_lake__readings') }}
    {% if is_incremental() %}
    where {{ interval_window('measured_at') }}
    {% endif %}

),

bucketed as (

    select
        zone_id,
        sensor_id,
        {{ bucket_15min('measured_at') }} as bucket_start,
        vehicle_count,
        avg_speed_kmh,
        occupancy_pct,
        congestion_index

    from readings

),

aggregated as (

    select
        zone_id,
        bucket_start,
        count(*) as reading_count,
        cast(sum(vehicle_count) as bigint) as vehicle_count,
        -- Fixed precision: float sums depend on row order, and a re-run must not change a bit.
        cast(avg(avg_speed_kmh) as numeric(9, 3)) as avg_speed_kmh,
        cast(avg(occupancy_pct) as numeric(9, 3)) as avg_occupancy_pct,
        cast(avg(congestion_index) as numeric(9, 4)) as avg_congestion_index,
        count(distinct sensor_id) as active_sensor_count

    from bucketed
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
        active_sensor_count

    from aggregated

)

select * from final
