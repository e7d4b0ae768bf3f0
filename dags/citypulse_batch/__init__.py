"""The batch path's logic: what the `citypulse_hourly` DAG's tasks do, importable and tested.

Place in the flow: after the streaming processor has landed readings in the S3 lake, the
hourly DAG (`dags/citypulse_hourly.py`, thin) calls these modules to load one interval of
lake into the warehouse (`warehouse`), build the dbt marts (`dbt_build`), check the data
(`expectations.runner`), and report and announce the result (`report`, `events`).

Nothing here does I/O at import: the DAG file imports `settings` and `events` while the
scheduler parses it; heavy libraries (duckdb, pyarrow, dbt, Great Expectations) are imported
inside the functions that use them.
"""
