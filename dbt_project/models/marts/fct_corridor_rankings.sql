{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'ranking_date', 'interval_grain_minutes': 1440},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
        tags=['daily'],
        dist='all',
        sort=['ranking_date', 'congestion_rank'],
    )
}}

{#-
    Roads (corridors) ranked per day: the most congested first (`congestion_rank` 1 = highest
    mean congestion index) and the slowest first (`speed_rank` 1 = lowest mean speed). A road
    is the registry's `road_name` across zones and directions. Ties break by road name, so
    ranks are dense and stable on every engine. Daily, for whole UTC days. A sensor's road is its
    latest version's, current or closed: a day built again later (an hour of it loaded again as
    late) keeps the readings of a sensor the registry has retired since.
-#}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at', 1440) }}
    {% endif %}

),

sensors as (

    select
        sensor_id,
        road_name

    from (
        select
            sensor_id,
            road_name,
            row_number() over (partition by sensor_id order by valid_from desc) as recency

        from {{ ref('dim_sensors') }}
    ) as versions
    where recency = 1

),

per_road as (

    select
        sensors.road_name,
        readings.reading_date as ranking_date,
        count(distinct readings.sensor_id) as sensor_count,
        {{ traffic_measures() }}

    from readings
    inner join sensors
        on readings.sensor_id = sensors.sensor_id
    group by
        sensors.road_name,
        readings.reading_date

),

final as (

    select
        road_name,
        ranking_date,
        row_number() over (
            partition by ranking_date
            order by avg_congestion_index desc, road_name asc
        ) as congestion_rank,
        row_number() over (
            partition by ranking_date
            order by avg_speed_kmh is null, avg_speed_kmh, road_name
        ) as speed_rank,
        sensor_count,
        reading_count,
        vehicle_count,
        avg_speed_kmh,
        avg_occupancy_pct,
        avg_congestion_index,
        speed_reading_count

    from per_road

)

select * from final
