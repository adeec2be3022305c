"""Request and response bodies of the control plane (msgspec Structs).

Request bodies forbid unknown fields: a misspelt ``ttl_seconds`` must be an error, not a
token with the default lifetime. Answers that are a domain object are that object's own
Struct (``catalog.swarms.Swarm``, ``catalog.tokens.IssuedToken``, ``TokenRecord``), not a copy.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from catalog.artefacts import StoreStatus as ArtefactsStatus
from catalog.audit import AuditEvent
from catalog.identity import TokenKind
from catalog.metrics import BackupStatus
from catalog.swarms import Swarm
from catalog.tokens import TokenRecord

log = structlog.get_logger("control_plane")


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    detail: str


class CreateSwarm(Request):
    name: str
    description: str = ""
    tables: list[str] = []


class SwarmList(msgspec.Struct, kw_only=True):
    swarms: list[Swarm]


class Allowlist(Request):
    tables: list[str]


class AllowlistOut(msgspec.Struct, kw_only=True):
    swarm: str
    tables: list[str]
    # Data tables the patterns match right now (patterns may name tables synced later).
    matching: list[str]


class CreateToken(Request):
    kind: TokenKind
    swarm: str | None = None
    agent: str | None = None
    ttl_seconds: int | None = None


class RefreshToken(Request):
    ttl_seconds: int | None = None


class TokenInfo(TokenRecord, kw_only=True):
    """A token's record (never the token) and whether it is usable right now."""

    active: bool


class TokenList(msgspec.Struct, kw_only=True):
    tokens: list[TokenInfo]


class WhoAmI(msgspec.Struct, kw_only=True):
    kind: str
    swarm: str | None
    agent: str | None
    jti: str
    expires_at: datetime
    tables: list[str]


class TableOut(msgspec.Struct, kw_only=True):
    table: str
    rows: int
    data_version: int
    swarms: list[str]
    #: The table's text for agents and its columns' (catalog/descriptions.py).
    description: str = ""
    columns: dict[str, str] = msgspec.field(default_factory=dict)


class DescriptionBody(Request):
    """``PUT /v1/tables/{schema.table}/description``: the table's text (omit to keep it, ""
    to remove it) and texts of named columns ("" removes one)."""

    table: str | None = None
    columns: dict[str, str] = msgspec.field(default_factory=dict)


class DescriptionOut(msgspec.Struct, kw_only=True):
    table: str
    description: str
    columns: dict[str, str]


class TableList(msgspec.Struct, kw_only=True):
    tables: list[TableOut]


class AuditList(msgspec.Struct, kw_only=True):
    events: list[AuditEvent]


# --- GET /v1/sync and POST /v1/sync/{table}/run (proto_docs/sync.md) -------------------------
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


# --- GET /v1/status ---------------------------------------------------------------------------
# The sections come from the components that registered them in ``Catalog.status_sections``
# (flight_server: queries, cache, profiles, async_queries) plus the catalog's own. A section
# a component registers must be declared on ``Status`` (tests/test_control_plane.py checks).


class ListenerStatus(msgspec.Struct, kw_only=True):
    up: bool
    url: str


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: 200 with ``ok`` only when every listener is up (503 otherwise)."""

    status: Literal["ok", "unavailable"]
    listeners: dict[str, ListenerStatus]


class DatabaseStatus(msgspec.Struct, kw_only=True):
    path: str
    bytes: int


class QueryLimits(msgspec.Struct, kw_only=True):
    query_timeout_seconds: float
    max_concurrent_queries: int
    max_concurrent_total: int


class QueriesStatus(msgspec.Struct, kw_only=True):
    """Flight queries in flight: streams being sent, admission slots in use (per principal)."""

    streaming: int
    queries: int
    by_principal: dict[str, int]
    tickets: int  # tickets issued and not yet expired
    limits: QueryLimits


class CachedTable(msgspec.Struct, kw_only=True):
    table: str
    version: int
    rows: int
    bytes: int


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


class CacheStatus(msgspec.Struct, kw_only=True):
    """The result cache (memory and disk tiers), with the hot-table cache under ``tables``."""

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


class SyncSection(msgspec.Struct, kw_only=True):
    """``sync`` of /v1/status: ``{"configured": false}`` without sync, else as GET /v1/sync."""

    configured: bool | UnsetType = UNSET
    tables: list[SyncTable] | UnsetType = UNSET


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

    @classmethod
    def of(cls, sections: dict[str, Any]) -> Status:
        """The typed answer of ``Catalog.status()``'s dict. A section that does not fit its
        Struct is a fault of ours: it is logged and reported in ``section_errors``, never a
        500; a section nobody declared is logged and left out."""
        fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, value in sections.items():
            if name not in fields or name == "section_errors":
                log.warning("status.undeclared_section", section=name)
                continue
            if isinstance(value, dict) and set(value) == {"error"}:  # the section raised
                errors[name] = str(value["error"])
                continue
            try:
                out[name] = msgspec.convert(value, fields[name])
            except msgspec.ValidationError as e:
                log.error("status.malformed_section", section=name, error=str(e))
                errors[name] = f"malformed section: {e}"
        if errors:
            out["section_errors"] = errors
        return cls(**out)


class QueryBody(Request):
    """``POST /v1/query``: the fields of a Flight ``{"kind": "query"}`` command
    (proto_docs/descriptors.md); the result's format is chosen by ``Accept``."""

    sql: str
    params: list[Any] = []
    max_rows: int | None = None


class RefreshArtefact(Request):
    """``POST /v1/artefacts/{id}/refresh`` (optional): the new artefact's lifetime."""

    ttl_seconds: int | None = None
