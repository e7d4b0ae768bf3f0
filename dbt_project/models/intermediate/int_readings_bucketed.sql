{#-
    Every reading with the time buckets the marts group by: its 15-minute bucket, hour, day
    and minute (all by event time, UTC). One place for the bucketing arithmetic.
-#}

with

readings as (

    select * from {{ ref('stg_lake__readings') }}

),

bucketed as (

    select
        sensor_id,
        zone_id,
        seq,
        measured_at,
        {{ bucket_15min('measured_at') }} as bucket_start,
        {{ dbt.date_trunc('hour', 'measured_at') }} as hour_start,
        cast({{ dbt.date_trunc('day', 'measured_at') }} as date) as reading_date,
        {{ dbt.date_trunc('minute', 'measured_at') }} as minute_start,
        vehicle_count,
        avg_speed_kmh,
        occupancy_pct,
        congestion_index

    from readings

)

select * from bucketed
