{#
    A compound primary key is unique: no two rows share the combination of columns.
    (dbt_utils has this test, but packages cannot be installed offline, at run time.)
#}
{% test unique_combination_of_columns(model, combination_of_columns) %}

with grouped as (
    select
        {{ combination_of_columns | join(',\n        ') }},
        count(*) as duplicate_rows
    from {{ model }}
    group by
        {{ combination_of_columns | join(',\n        ') }}
)

select *
from grouped
where duplicate_rows > 1

{% endtest %}
