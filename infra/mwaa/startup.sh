#!/bin/sh
# MWAA startup script (UNTESTED offline): dbt in its own virtualenv, outside Airflow's constraints.
# MWAA runs this on every scheduler, worker and webserver before Airflow starts; exported
# variables reach the Airflow processes. The venv lives on local disk and is rebuilt when the
# container is new (~1 min); dbt's version is pinned like the project's (dbt-core <1.12).
set -eu
DBT_VENV="${DBT_VENV:-/usr/local/airflow/dbt_venv}"
if [ ! -x "$DBT_VENV/bin/dbt" ]; then
    python3 -m venv "$DBT_VENV"
    "$DBT_VENV/bin/pip" install --quiet --no-cache-dir "dbt-core>=1.11,<1.12" "dbt-redshift>=1.10,<1.12"
fi
# citypulse_batch.dbt_build runs this executable in a subprocess (same arguments, counts from
# its run_results.json) instead of dbt in-process, which the workers do not have.
export CITYPULSE_DBT_EXECUTABLE="$DBT_VENV/bin/dbt"
# The dbt project is deployed inside the dags folder (dags/dbt_project, read-only there).
export CITYPULSE_DBT_PROJECT_DIR="${AIRFLOW_HOME:-/usr/local/airflow}/dags/dbt_project"
