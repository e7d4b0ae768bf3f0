"""Stand-ins for dbt's cross-database macros, so sqlfluff's jinja templater renders the models.

sqlfluff's dbt templater needs a live dbt project and connection; the jinja templater with
dbt builtins needs none (lint runs offline, in CI, without a warehouse). It renders
`{{ dbt.dateadd(...) }}` with these functions, which emit the Redshift spelling.
"""


def dateadd(datepart: str, interval: object, from_date_or_timestamp: str) -> str:
    return f"dateadd({datepart}, {interval}, {from_date_or_timestamp})"


def datediff(first_date: str, second_date: str, datepart: str) -> str:
    return f"datediff({datepart}, {first_date}, {second_date})"


def date_trunc(datepart: str, date: str) -> str:
    return f"date_trunc('{datepart}', {date})"
