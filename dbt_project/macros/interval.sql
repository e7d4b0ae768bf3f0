{#
    The half-open interval [interval_start, interval_end) a build covers.

    The hourly DAG passes the interval it loaded in CITYPULSE_INTERVAL_START/_END (the
    environment, read here at run time, leaves dbt's partial parse valid from hour to hour;
    --vars would force a full parse); by hand, --vars interval_start/interval_end work too.
    Incremental marts replace exactly the buckets inside it (delete, then insert, in the
    model's transaction: `get_incremental_interval_sql`), so re-running an hour changes
    nothing. Without an interval an incremental build replaces everything.
#}

{% macro interval_bounds(grain_minutes=15) -%}
    {%- set start = var('interval_start', none) or env_var('CITYPULSE_INTERVAL_START', '') or none -%}
    {%- set end = var('interval_end', none) or env_var('CITYPULSE_INTERVAL_END', '') or none -%}
    {%- if start is none and end is none -%}
        {{ return(none) }}
    {%- endif -%}
    {%- if start is none or end is none -%}
        {{ exceptions.raise_compiler_error("pass both interval_start and interval_end, or neither") }}
    {%- endif -%}
    {%- set parsed = [] -%}
    {%- for value in [start, end] -%}
        {%- set moment = modules.datetime.datetime.fromisoformat(value | string | replace('Z', '+00:00')) -%}
        {#- Warehouse timestamps are UTC without a zone: bring an aware bound to UTC first. -#}
        {%- if moment.tzinfo is not none -%}
            {#- (dbt's `modules.datetime` has no `timezone`: the offset is taken off by hand) -#}
            {%- set moment = (moment - moment.utcoffset()).replace(tzinfo=none) -%}
        {%- endif -%}
        {#- A bound inside a bucket (15 min, hour, day) would split it and duplicate its key. -#}
        {%- if (moment.hour * 60 + moment.minute) % grain_minutes != 0 or moment.second != 0
               or moment.microsecond != 0 -%}
            {{ exceptions.raise_compiler_error("interval bound " ~ value ~ " is not aligned to "
                                               ~ grain_minutes ~ " minutes (" ~ this ~ ")") }}
        {%- endif -%}
        {%- do parsed.append(moment.strftime('%Y-%m-%d %H:%M:%S')) -%}
    {%- endfor -%}
    {%- if parsed[0] >= parsed[1] -%}
        {{ exceptions.raise_compiler_error("empty interval: " ~ parsed[0] ~ " >= " ~ parsed[1]) }}
    {%- endif -%}
    {{ return(parsed) }}
{%- endmacro %}


{% macro interval_window(column, grain_minutes=15) -%}
    {%- set bounds = interval_bounds(grain_minutes) -%}
    {%- if bounds is none -%}
        1 = 1
    {%- else -%}
        {{ column }} >= cast('{{ bounds[0] }}' as timestamp)
        and {{ column }} < cast('{{ bounds[1] }}' as timestamp)
    {%- endif -%}
{%- endmacro %}


{#- How an incremental mart replaces its build's interval: `incremental_strategy='interval'`,
    the interval's column and grain in the model's meta (`interval_column`,
    `interval_grain_minutes`, default 15), and `lock_interval()` as its pre-hook. Both steps run
    in the model's transaction.

    The pre-hook: two builds of one interval at once (overlapping runs; the daily DAG beside an
    hourly run's rebuild of the same day) would each miss the other's uncommitted rows and leave
    them twice: on PostgreSQL and Redshift the build first locks the mart until it commits (on
    Redshift the lock must come first to order the builds' snapshots). DuckDB has one writer at
    a time.

    The strategy: after dbt has brought the mart's columns up to date (on_schema_change
    'append_new_columns': a column a later release adds is appended, null on the rows built
    before it), delete the interval's buckets and insert the new ones. The delete follows the
    schema change: DuckDB cannot alter a table it has deleted from in the same transaction, so
    a delete in the pre-hook failed the first rebuild after an upgrade. -#}
{% macro lock_interval() -%}
    {%- if is_incremental() -%}
        {%- if target.type == 'postgres' -%}
            lock table {{ this }} in share row exclusive mode
        {%- elif target.type == 'redshift' -%}
            lock {{ this }}
        {%- endif -%}
    {%- endif -%}
{%- endmacro %}


{% macro get_incremental_interval_sql(arg_dict) -%}
    {%- set meta = config.get('meta') or {} -%}
    {%- if 'interval_column' not in meta -%}
        {{ exceptions.raise_compiler_error("incremental_strategy 'interval' needs meta.interval_column (" ~ this ~ ")") }}
    {%- endif -%}
    {%- set target_relation = arg_dict['target_relation'] -%}
    {%- set columns = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    delete from {{ target_relation }}
    where {{ interval_window(meta['interval_column'], meta.get('interval_grain_minutes', 15)) }};
    insert into {{ target_relation }} ({{ columns }})
    select {{ columns }} from {{ arg_dict['temp_relation'] }}
{%- endmacro %}


{#- Start of the 15-minute bucket holding a timestamp, with cross-database macros only. -#}
{% macro bucket_15min(column) -%}
    {{ dbt.dateadd(
        'minute',
        '15 * cast(floor(extract(minute from ' ~ column ~ ') / 15) as integer)',
        dbt.date_trunc('hour', column)
    ) }}
{%- endmacro %}
