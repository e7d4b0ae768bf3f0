with

source as (

    select * from {{ source('lake', 'quarantine_counts') }}

),

renamed as (

    select
        cast(received_hour as timestamp) as received_hour,
        reason_code,
        quarantined_count

    from source

)

select * from renamed
