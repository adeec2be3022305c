"""Snowflake -> DuckDB replication: full, append and merge strategies, schema evolution,
atomic swaps, scheduling and status (proto_docs/sync.md).

Public surface: :class:`SyncService` (the control plane's ``catalog.SyncControl`` and the CLI's runner),
the :class:`RunRecord` each run returns, :class:`SyncFailed` (the one failure type of a run),
:class:`SnowflakeSource` (what a ``source_factory`` makes) and the documented ``TYPE_MAP``.

Inside, by concern: ``service`` schedules; ``engine`` runs one table (retries, the order of
the steps) over ``context.RunContext``; ``cursor``, ``schema_diff`` and ``strategy`` decide
(pure functions); ``extract`` reads the source; ``apply`` writes the replica in one
transaction; ``source`` talks to Snowflake; ``state`` keeps watermarks and history;
``typemap`` maps types and names.
"""

from sync.errors import SyncFailed
from sync.service import SyncService
from sync.source import SnowflakeSource
from sync.state import RunRecord
from sync.typemap import TYPE_MAP

__all__ = ["TYPE_MAP", "RunRecord", "SnowflakeSource", "SyncFailed", "SyncService"]
