"""Snowflake -> DuckDB replication: full, append and merge strategies, schema evolution,
atomic swaps, scheduling and status (proto_docs/sync.md).

Public surface: :class:`SyncService` (the ``catalog.sync`` controller and the CLI's runner),
:class:`SnowflakeSource`, the documented ``TYPE_MAP``.
"""

from sync.engine import TableSync
from sync.errors import SyncFailed
from sync.service import SyncService
from sync.source import SnowflakeSource, SourceTable, parse_source
from sync.state import RunRecord
from sync.typemap import TYPE_MAP, SourceColumn, duckdb_type, target_name

__all__ = [
    "TYPE_MAP",
    "RunRecord",
    "SnowflakeSource",
    "SourceColumn",
    "SourceTable",
    "SyncFailed",
    "SyncService",
    "TableSync",
    "duckdb_type",
    "parse_source",
    "target_name",
]
