{{
    config(
        materialized='table',
        dist='zone_id',
        sort=['episode_start', 'zone_id'],
    )
}}

{#-
    Congestion episodes per zone, from the zone 15-minute means, with the processor's
    hysteresis: a bucket whose mean congestion index is >= congestion_raise_at (0.7) raises,
    <= congestion_clear_at (0.4) clears, anything between keeps the zone's previous state.
    An episode is a maximal run of congested buckets: it starts at the raising bucket and ends
    at the end of its last congested bucket (= the start of the clearing bucket when they are
    adjacent). Missing buckets keep the state too (no evidence either way), so an episode can
    span a gap: its duration counts the gap, `bucket_count` only the buckets seen. An episode
    with no clearing bucket yet is `is_ongoing`. Rebuilt whole each run: an episode can start
    in one hour and end in another. Without DISTINCT ON or IGNORE NULLS (not portable): the
    "last signal" is the first row of its signal group, numbered by a running count.
-#}

with

buckets as (

    select
        zone_id,
        bucket_start,
        bucket_end,
        avg_congestion_index

    from {{ ref('fct_zone_traffic_15min') }}

),

signalled as (

    select
        *,
        case
            when avg_congestion_index >= {{ var('congestion_raise_at') }} then 1
            when avg_congestion_index <= {{ var('congestion_clear_at') }} then 0
        end as congestion_signal

    from buckets

),

signal_groups as (

    select
        *,
        sum(case when congestion_signal is null then 0 else 1 end) over (
            partition by zone_id
            order by bucket_start
            rows between unbounded preceding and current row
        ) as signal_group

    from signalled

),

stated as (

    select
        *,
        -- The group's first row carries its signal; before any signal the zone is clear.
        coalesce(first_value(congestion_signal) over (
            partition by zone_id, signal_group
            order by bucket_start
            rows between unbounded preceding and unbounded following
        ), 0) as is_congested,
        max(bucket_start) over (partition by zone_id) as zone_last_bucket_start

    from signal_groups

),

transitions as (

    select
        *,
        case
            when
                is_congested = 1
                and coalesce(lag(is_congested) over (partition by zone_id order by bucket_start), 0) = 0
                then 1
            else 0
        end as starts_episode

    from stated

),

numbered as (

    select
        *,
        sum(starts_episode) over (
            partition by zone_id
            order by bucket_start
            rows between unbounded preceding and current row
        ) as episode_number

    from transitions

),

episodes as (

    select
        zone_id,
        episode_number,
        min(bucket_start) as episode_start,
        max(bucket_end) as episode_end,
        max(avg_congestion_index) as peak_congestion_index,
        count(*) as bucket_count,
        max(case when bucket_start = zone_last_bucket_start then 1 else 0 end) as touches_last_bucket

    from numbered
    where is_congested = 1
    group by
        zone_id,
        episode_number

),

final as (

    select
        zone_id,
        episode_start,
        episode_end,
        cast({{ dbt.datediff('episode_start', 'episode_end', 'minute') }} as integer) as duration_minutes,
        peak_congestion_index,
        bucket_count,
        touches_last_bucket = 1 as is_ongoing

    from episodes

)

select * from final
