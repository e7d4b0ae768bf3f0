{{
    config(
        materialized='table',
        tags=['daily'],
        dist='zone_id',
        sort=['zone_id', 'day_of_week', 'hour_of_day'],
    )
}}

{#-
    The typical week of each zone: per zone x weekday (0 = Sunday ... 6 = Saturday, UTC) x
    hour of day, the mean over the observed hours of vehicles per hour; speed and congestion
    over those hours' readings (each hour's mean weighted by its reading count, not one hour
    one vote: an hour of an outage with a few readings must not weigh like a full one; the
    speed by the hour's readings that have one); and whether this is the
    zone's peak hour of that weekday (most vehicles; ties to the earlier hour). Rebuilt whole
    by the daily DAG from fct_zone_traffic_hourly. Counts are averaged as numerics: Redshift's
    AVG of an integer column is an integer.
-#}

with

hours as (

    select
        zone_id,
        cast(extract(dow from hour_start) as integer) as day_of_week,
        cast(extract(hour from hour_start) as integer) as hour_of_day,
        cast(vehicle_count as numeric(18, 3)) as vehicle_count,
        reading_count,
        -- An hour built before the marts had speed_reading_count (null: added 2026-12-07)
        -- weighs its speed by all its readings, as the profiles did until then.
        coalesce(speed_reading_count, case when avg_speed_kmh is not null then reading_count end) as speed_weight,
        avg_speed_kmh * coalesce(speed_reading_count, reading_count) as speed_total,
        avg_congestion_index * reading_count as congestion_total

    from {{ ref('fct_zone_traffic_hourly') }}

),

profiles as (

    select
        zone_id,
        day_of_week,
        hour_of_day,
        count(*) as hours_observed,
        cast(avg(vehicle_count) as numeric(12, 3)) as avg_vehicles_per_hour,
        cast(sum(speed_total) / nullif(sum(speed_weight), 0) as numeric(9, 3)) as avg_speed_kmh,
        cast(sum(congestion_total) / nullif(sum(reading_count), 0) as numeric(9, 4)) as avg_congestion_index

    from hours
    group by
        zone_id,
        day_of_week,
        hour_of_day

),

final as (

    select
        *,
        row_number() over (
            partition by zone_id, day_of_week
            order by avg_vehicles_per_hour desc, hour_of_day asc
        ) = 1 as is_peak_hour

    from profiles

)

select * from final
