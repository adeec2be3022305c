"""What the process reports about itself, and the two small interfaces through which the
control plane asks for it: the answers of ``GET /v1/status``, ``GET /healthz``,
``GET /v1/sync`` and ``POST /v1/sync/{table}/run`` as msgspec Structs, and the protocols
:class:`StatusReport` and :class:`SyncControl`.

They live here, in the shared core, because three packages name them and may import only
``catalog``: the components that produce a section (``flight_server`` fills ``QueriesStatus``,
``CacheStatus`` and friends, ``sync`` fills ``SyncStatus``), the control plane that serves
them (its OpenAPI schema is derived from these Structs, so a client sees every field), and
``quiver`` (the process wiring assembles a :class:`Status` from the components it started;
``quiver sync`` decodes the sync answers into the same Structs). Nothing here is filled as a
side effect: ``quiver/runtime.py`` hands the control plane one ``StatusReport`` and, when
sync is configured, one ``SyncControl`` (proto_docs/control_plane.md, "Status and sync
answers"; proto_docs/sync.md).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec
from msgspec import UNSET, UnsetType

from catalog.metrics import BackupStatus

# --- listeners and health -----------------------------------------------------------------------


class ListenerStatus(msgspec.Struct, kw_only=True):
    up: bool
    url: str


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: 200 with ``ok`` only when every listener is up (503 otherwise)."""

    status: Literal["ok", "unavailable"]
    listeners: dict[str, ListenerStatus]


# --- the catalog's own part of /v1/status ---------------------------------------------------------


class DatabaseStatus(msgspec.Struct, kw_only=True):
    path: str
    bytes: int


class CatalogStatus(msgspec.Struct, kw_only=True):
    """What the catalog itself says about the process (``Catalog.core_status``)."""

    version: str
    uptime_seconds: float
    database: DatabaseStatus
    tables: int
    swarms: int


# --- the data plane's sections (flight_server) ------------------------------------------------------


class QueryLimits(msgspec.Struct, kw_only=True):
    """The server's ``[limits]``, and how many swarms have limits of their own on top
    (``PUT /v1/swarms/{name}/limits``, catalog/limits.py)."""

    query_timeout_seconds: float
    max_concurrent_queries: int
    max_concurrent_total: int
    max_rows: int
    swarms_with_limits: int


class QueriesStatus(msgspec.Struct, kw_only=True):
    """Flight queries in flight: streams being sent, admission slots in use (per principal);
    and the results sent inline in a FlightInfo since start (flight_server/inline.py)."""

    streaming: int
    queries: int
    by_principal: dict[str, int]
    tickets: int  # tickets issued and not yet expired
    limits: QueryLimits
    inlined: int  # results sent inline (quiver_inline_results_total)
    inlined_bytes: int  # the bytes of their Arrow IPC streams (quiver_inline_bytes_total)


class CachedTable(msgspec.Struct, kw_only=True):
    table: str
    version: int
    rows: int
    bytes: int


class TableReloadStatus(msgspec.Struct, kw_only=True):
    """The hot tables of the previous run, loaded again after a restart
    (``[cache] reload_hot_tables``; flight_server/table_cache.py "HotTables")."""

    enabled: bool = False
    remembered: int = 0  # tables listed in DATA_DIR/hot-tables.json at start
    reloaded: int = 0  # loaded again (or already held by a scan's fill)
    skipped: dict[str, int] = {}  # by reason: dropped, changed, too_large, failed
    pending: int = 0  # still waiting for an idle moment (or being loaded)
    done: bool = True  # nothing is pending


class TableCacheStatus(msgspec.Struct, kw_only=True):
    """The hot-table cache (scanned tables kept in memory as Arrow)."""

    enabled: bool
    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    fills: dict[str, int]  # ok, too_large, failed
    evicted: dict[str, int]  # by reason
    tables: list[CachedTable]  # most recently used first
    # How tables are filled: "idle" (queued by the scan that missed, loaded while the data
    # plane is idle), "scan" (by the first scan as it streams) or "off".
    fill_mode: str = "scan"
    queued: int = 0  # tables waiting for an idle fill
    idle_fills: dict[str, int] = {}  # ok, yielded (a call arrived), stale (a newer version got in first)
    idle_filling: str | None = None  # the table an idle fill is reading now
    reload: TableReloadStatus = msgspec.field(default_factory=TableReloadStatus)


class ResultCacheStatus(msgspec.Struct, kw_only=True):
    """The result cache on its own (memory and disk tiers): ``ResultCache.stats``."""

    enabled: bool
    entries: int
    bytes: int
    memory_entries: int
    memory_bytes: int
    disk_entries: int
    disk_bytes: int
    max_bytes: int
    max_memory_bytes: int
    max_entry_bytes: int
    ttl_seconds: float
    hits: int
    misses: int
    uncacheable: int
    too_large: int
    evicted: dict[str, int]  # by reason


class CacheStatus(ResultCacheStatus, kw_only=True):
    """``cache`` of /v1/status: the result cache, with the hot-table cache under ``tables``."""

    tables: TableCacheStatus


class ProfilesStatus(msgspec.Struct, kw_only=True):
    """The column-profile cache."""

    entries: int
    hits: int
    computed: int


class AsyncQueriesStatus(msgspec.Struct, kw_only=True):
    queued: int
    running: int
    retained: int  # finished queries whose state (and result, if any) is kept
    result_bytes: int


# --- sync (proto_docs/sync.md) ------------------------------------------------------------------
# Times are RFC 3339 text as the sync service writes it (kept as text, so the answer is
# byte-for-byte what it was before it was typed).


class SyncRun(msgspec.Struct, kw_only=True):
    """A table's last (or current) run."""

    started_at: str
    ended_at: str | None  # null while running
    rows_read: int
    rows_written: int
    outcome: str  # ok, failed or running
    error: str | None  # a sentence fit to show (never a secret); while running, the last transient error


class SyncTable(msgspec.Struct, kw_only=True):
    table: str
    source: str
    mode: str
    watermark: str | None  # ISO text of the cursor's high-water mark, or null
    running: bool
    next_run_at: str | None  # null when scheduling is off
    last_run: SyncRun | None  # null before the first run


class SyncStatus(msgspec.Struct, kw_only=True):
    """``GET /v1/sync``: the state of every replicated table (also ``sync`` of /v1/status)."""

    tables: list[SyncTable]


class SyncTriggered(msgspec.Struct, kw_only=True):
    """``POST /v1/sync/{table}/run``: what was queued."""

    table: str
    queued: bool
    follow_up: bool  # the table was running: one follow-up run is queued
    full: bool


class SyncSection(msgspec.Struct, kw_only=True):
    """``sync`` of /v1/status: ``{"configured": false}`` without sync, else as GET /v1/sync."""

    configured: bool | UnsetType = UNSET
    tables: list[SyncTable] | UnsetType = UNSET


# --- GET /v1/status -----------------------------------------------------------------------------


class ArtefactsStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The ``artefacts`` section of GET /v1/status."""

    count: int  # artefacts kept (expired ones until the janitor's next pass)
    bytes: int  # their content
    tables: int  # of them tabular
    uploading: int  # uploads in progress


class Status(msgspec.Struct, kw_only=True):
    """``GET /v1/status``. A section whose component is not running is absent; one that
    failed is absent too and named in ``section_errors`` (one broken section never hides
    the rest)."""

    version: str
    uptime_seconds: float
    listeners: dict[str, ListenerStatus]
    database: DatabaseStatus
    tables: int
    swarms: int
    queries: QueriesStatus | UnsetType = UNSET
    cache: CacheStatus | UnsetType = UNSET
    profiles: ProfilesStatus | UnsetType = UNSET
    async_queries: AsyncQueriesStatus | UnsetType = UNSET
    sync: SyncSection | UnsetType = UNSET
    backup: BackupStatus | UnsetType = UNSET
    artefacts: ArtefactsStatus | UnsetType = UNSET
    section_errors: dict[str, str] | UnsetType = UNSET


# --- what the control plane is handed ---------------------------------------------------------------


# runtime_checkable: Litestar checks a dependency's value against the handler's annotation.
@runtime_checkable
class StatusReport(Protocol):
    """The whole process's status and health, assembled by the process wiring from the
    components it started (``quiver/status.py``)."""

    def status(self) -> Status: ...

    def health(self) -> Health: ...


@runtime_checkable
class SyncControl(Protocol):
    """What the control plane may ask of the sync worker (``sync.SyncService``)."""

    def status(self) -> SyncStatus: ...

    def trigger(self, table: str, *, full: bool = False) -> SyncTriggered: ...
