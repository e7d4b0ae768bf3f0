{#
    Data tests of the interval-built relations look at the build's interval only.

    The hourly DAG rebuilds one hour; its tests need not re-read every hour before it (a
    unique test over raw readings would grow with the warehouse's whole history, every hour).
    Relations named in the var `interval_test_columns` are filtered on their time column to
    the build's interval (`interval_window`), keeping its rows whose time is null: a
    `not_null` test of the time column itself must still see them (a window alone drops
    them, and the test could never fail). A build without an interval tests everything, as
    do tests of every other relation. dbt wraps the model of every generic test in
    `get_where_subquery` (the documented hook for custom `where` logic); a test's own `where`
    config still applies on top.
#}
{% macro get_where_subquery(relation) -%}
    {%- set filters = [] -%}
    {%- set where = config.get('where') -%}
    {%- if where -%}
        {%- do filters.append('(' ~ where ~ ')') -%}
    {%- endif -%}
    {%- set column = var('interval_test_columns', {}).get(relation.identifier) -%}
    {%- if column and interval_bounds() is not none -%}
        {%- do filters.append('(' ~ column ~ ' is null or ' ~ interval_window(column) ~ ')') -%}
    {%- endif -%}
    {%- if filters -%}
        {%- do return('(select * from ' ~ relation ~ ' where ' ~ filters | join(' and ') ~ ') dbt_subquery') -%}
    {%- endif -%}
    {%- do return(relation) -%}
{%- endmacro %}
