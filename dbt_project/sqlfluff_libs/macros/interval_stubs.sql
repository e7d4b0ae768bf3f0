{#- Lint-only stand-ins for macros/interval.sql, whose vars and dbt modules exist only in dbt. -#}
{% macro interval_window(column, grain_minutes=15) -%}
    {{ column }} >= cast('2026-01-01 00:00:00' as timestamp)
    and {{ column }} < cast('2026-01-02 00:00:00' as timestamp)
{%- endmacro %}

{% macro lock_interval() -%}
{%- endmacro %}
