"""Snowflake -> DuckDB replication (see issue: sync worker)."""
