"""Packaging the batch path for Amazon MWAA (`make mwaa-bundle`)."""
