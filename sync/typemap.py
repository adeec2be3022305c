"""Snowflake column types -> DuckDB column types: the map lives in
``catalog/snowflake_types.py`` because live tables (catalog/live.py) type their columns the way
the sync worker types a replica's, so a live table and its replica have the same schema."""

from catalog.snowflake_types import (
    TYPE_MAP,
    SourceColumn,
    columns_json,
    duckdb_type,
    fingerprint,
    is_widening,
    select_expression,
    target_name,
)

__all__ = [
    "TYPE_MAP",
    "SourceColumn",
    "columns_json",
    "duckdb_type",
    "fingerprint",
    "is_widening",
    "select_expression",
    "target_name",
]
