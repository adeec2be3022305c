"""What one attempt of one table's run works with, in one value.

Extraction (sync/extract.py) and apply (sync/apply.py) take a :class:`RunContext` instead of
a dozen parameters each: the table's configuration, the source connection and table, the
replica's name, the state the run started from (cursor columns and watermark), the DuckDB
cursor that holds the run's private staging tables and its transaction, the run record the
counts go to, and the run's logger. It is frozen: a step that needs a variant (the key scan
of a reconcile counts into its own record) makes one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
from structlog.typing import FilteringBoundLogger

from catalog import TableRef
from catalog.config import SyncTableConfig
from catalog.descriptions import SourceComments
from sync.cursor import Roles
from sync.errors import SyncFailed
from sync.source import SnowflakeSource, SourceTable
from sync.state import RunRecord, SyncStateStore, TableState
from sync.typemap import SourceColumn

# (rows read so far, bytes read so far, expected rows or None)
ProgressFn = Callable[[int, int, int | None], None]


@dataclass(frozen=True, slots=True)
class RunContext:
    entry: SyncTableConfig
    key: str  # the target, lower case: the state and history key
    src: SourceTable
    ref: TableRef
    source: SnowflakeSource
    columns: tuple[SourceColumn, ...]  # the source's, in source order
    roles: Roles
    state: TableState | None  # as the last run left it (watermark, fingerprint, last full)
    store: SyncStateStore
    cur: duckdb.DuckDBPyConnection
    run: RunRecord
    cancel: threading.Event
    progress: ProgressFn | None
    log: FilteringBoundLogger  # bound to the table
    # The source's table and column comments, cleaned; recorded at commit (None: the stored
    # ones are left as they are).
    comments: SourceComments | None = None

    @property
    def batch_rows(self) -> int | None:
        """Keyset page size, or None: one query, streamed in the source's own chunks."""
        return self.entry.batch_rows

    def check_cancel(self) -> None:
        """Stop between batches when the server is stopping (the transaction rolls back)."""
        if self.cancel.is_set():
            raise SyncFailed("cancelled: the server is stopping")
