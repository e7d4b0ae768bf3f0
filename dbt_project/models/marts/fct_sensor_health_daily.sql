{{
    config(
        materialized='incremental',
        incremental_strategy='interval',
        meta={'interval_column': 'reading_date', 'interval_grain_minutes': 1440},
        pre_hook="{{ lock_interval() }}",
        on_schema_change='append_new_columns',
        tags=['daily'],
        dist='sensor_id',
        sort=['reading_date', 'sensor_id'],
    )
}}

{#-
    One row per registered sensor and day with readings anywhere in the city: uptime,
    completeness and a stuck-value flag. Built by the daily DAG for whole UTC days (the
    interval must be day-aligned; the hourly DAG excludes tag:daily).

    * expected_readings = 1440 minutes x expected_readings_per_minute (every detector in the
      registry reports once a minute); completeness_pct = readings / expected, capped at 100.
    * uptime_pct = minutes with at least one reading / 1440.
    * stuck: the same non-zero vehicle count in >= stuck_run_readings consecutive readings
      (by event time, then seq) within the day; runs of zero are a quiet road, not a fault.
    A registered sensor with no reading that day gets a row of zeros: that is the signal.
-#}

{%- set minutes_per_day = 1440 -%}

with

readings as (

    select * from {{ ref('int_readings_bucketed') }}
    {% if is_incremental() %}
        where {{ interval_window('measured_at', minutes_per_day) }}
    {% endif %}

),

sensors as (

    select
        sensor_id,
        zone_id

    from {{ ref('dim_sensors') }}
    where is_current

),

days as (

    select distinct reading_date from readings

),

per_sensor_day as (

    select
        sensor_id,
        reading_date,
        count(*) as reading_count,
        count(distinct minute_start) as active_minutes

    from readings
    group by
        sensor_id,
        reading_date

),

runs as (

    -- Consecutive readings with the same count share (position - position among equal counts).
    select
        sensor_id,
        reading_date,
        vehicle_count,
        row_number()
            over (
                partition by sensor_id, reading_date
                order by measured_at, seq
            )
        - row_number() over (
            partition by sensor_id, reading_date, vehicle_count
            order by measured_at, seq
        ) as run_id

    from readings

),

run_lengths as (

    select
        sensor_id,
        reading_date,
        count(*) as run_readings

    from runs
    where vehicle_count > 0
    group by
        sensor_id,
        reading_date,
        vehicle_count,
        run_id

),

longest_runs as (

    select
        sensor_id,
        reading_date,
        max(run_readings) as longest_repeat_run

    from run_lengths
    group by
        sensor_id,
        reading_date

),

final as (

    select
        sensors.sensor_id,
        days.reading_date,
        sensors.zone_id,
        coalesce(per_sensor_day.reading_count, 0) as reading_count,
        {{ minutes_per_day }} * {{ var('expected_readings_per_minute') }} as expected_readings,
        coalesce(per_sensor_day.active_minutes, 0) as active_minutes,
        cast(
            100.0 * coalesce(per_sensor_day.active_minutes, 0) / {{ minutes_per_day }}
            as numeric(7, 3)
        ) as uptime_pct,
        cast(
            100.0 * least(
                coalesce(per_sensor_day.reading_count, 0),
                {{ minutes_per_day }} * {{ var('expected_readings_per_minute') }}
            ) / ({{ minutes_per_day }} * {{ var('expected_readings_per_minute') }})
            as numeric(7, 3)
        ) as completeness_pct,
        coalesce(longest_runs.longest_repeat_run, 0) as longest_repeat_run,
        coalesce(longest_runs.longest_repeat_run, 0) >= {{ var('stuck_run_readings') }} as is_stuck

    from sensors
    cross join days
    left join per_sensor_day
        on
            sensors.sensor_id = per_sensor_day.sensor_id
            and days.reading_date = per_sensor_day.reading_date
    left join longest_runs
        on
            sensors.sensor_id = longest_runs.sensor_id
            and days.reading_date = longest_runs.reading_date

)

select * from final
