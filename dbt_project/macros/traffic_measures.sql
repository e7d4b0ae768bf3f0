{#-
    The traffic measures every traffic mart computes over its group of readings, at fixed
    precision: float sums depend on row order, and rebuilding an interval must not change a
    bit. Means are plain means over readings (nulls from count-only detectors ignored);
    `speed_reading_count` is how many readings the speed mean is over, so that groups can be
    combined into a mean over readings (sum of avg_speed_kmh * speed_reading_count, divided by
    the sum of speed_reading_count).
-#}
{% macro traffic_measures() -%}
        count(*) as reading_count,
        count(avg_speed_kmh) as speed_reading_count,
        cast(sum(vehicle_count) as bigint) as vehicle_count,
        cast(avg(avg_speed_kmh) as numeric(9, 3)) as avg_speed_kmh,
        cast(avg(occupancy_pct) as numeric(9, 3)) as avg_occupancy_pct,
        cast(avg(congestion_index) as numeric(9, 4)) as avg_congestion_index
{%- endmacro %}
