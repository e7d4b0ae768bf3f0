"""Data-quality expectations for the batch path, derived from the data contract.

`expectations.readings` defines the suite as plain data from `streaming.contract`;
`expectations.runner` runs it as a Great Expectations 1.x checkpoint for the hourly DAG.
"""
