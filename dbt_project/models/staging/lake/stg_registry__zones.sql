with

source as (

    select * from {{ source('registry', 'zones') }}

),

renamed as (

    select
        zone_id,
        name as zone_name,
        zone_type,
        grid_row,
        grid_col,
        lat as latitude,
        lon as longitude

    from source

)

select * from renamed
