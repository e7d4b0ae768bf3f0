{#
    The snapshot's valid times on PostgreSQL: UTC without a zone, as every other time in the
    warehouse. dbt-postgres takes `now()` in the session's zone, which is the server's unless set
    (DuckDB's profile sets its own; Redshift's sessions are UTC).
#}

{% macro postgres__snapshot_get_time() -%}
    (now() at time zone 'utc')
{%- endmacro %}
