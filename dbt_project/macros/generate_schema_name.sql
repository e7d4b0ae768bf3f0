{#
    Custom schemas are used as-is (staging, marts) rather than dbt's default
    "<target schema>_<custom schema>": the dashboard, notebooks and QuickSight datasets
    address marts.fct_... the same way on every engine.
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
