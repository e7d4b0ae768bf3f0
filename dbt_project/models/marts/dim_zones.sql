with

zones as (

    select * from {{ ref('stg_registry__zones') }}

),

sensors as (

    select * from {{ ref('dim_sensors') }}
    where is_current

),

sensor_counts as (

    select
        zone_id,
        count(*) as sensor_count,
        count(distinct road_name) as road_count

    from sensors
    group by zone_id

),

final as (

    select
        zones.zone_id,
        zones.zone_name,
        zones.zone_type,
        zones.grid_row,
        zones.grid_col,
        zones.latitude,
        zones.longitude,
        coalesce(sensor_counts.sensor_count, 0) as sensor_count,
        coalesce(sensor_counts.road_count, 0) as road_count

    from zones
    left join sensor_counts
        on zones.zone_id = sensor_counts.zone_id

)

select * from final
