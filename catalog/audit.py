"""The audit log: admin mutations, authentication failures and MCP tool calls (``mcp.tool``,
mcp_server/server.py: the SQL's fingerprint, never its text), with who, what, target, outcome,
client address and request id.

Writes are buffered in memory and flushed in batches (on a timer, before every read, and at
shutdown) so a flood of bad tokens never turns into a flood of database writes. Per-request
records of reads go to structlog and to the query log (catalog/query_log.py), not here.
Events older than ``[audit] retention_days`` are deleted in batches by :meth:`AuditLog.prune`
(called from the housekeeping thread, catalog/retention.py), so internet noise -- every
refused token is an event -- does not grow the table for as long as the server runs.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from catalog.buffers import RecordBuffer
from catalog.database import SYSTEM_SCHEMA, Database

log = structlog.get_logger(__name__)

MAX_BUFFER = 10_000
# Rows one retention DELETE removes: bounds the transaction (and the WAL) of a first pass
# over a table that grew for months.
PRUNE_BATCH = 10_000


class AuditEvent(msgspec.Struct, kw_only=True):
    id: int | None = None
    occurred_at: datetime
    actor: str | None
    action: str
    target: str | None
    outcome: str
    client: str | None
    request_id: str | None
    detail: str | None = None


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._buffer: RecordBuffer[AuditEvent] = RecordBuffer(MAX_BUFFER)
        # Serializes this table's writers (flushes from any thread, retention): an insert and
        # a delete of the audit table never run in two transactions at once.
        self._write_lock = threading.Lock()

    def record(
        self,
        action: str,
        *,
        outcome: str,
        actor: str | None = None,
        target: str | None = None,
        client: str | None = None,
        request_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        event = AuditEvent(
            occurred_at=datetime.now(UTC),
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            client=client,
            request_id=request_id,
            detail=detail,
        )
        # The structlog twin is what fail2ban and log shippers read.
        log.info(
            "audit",
            audit_action=action,
            outcome=outcome,
            actor=actor,
            target=target,
            client=client,
            request_id=request_id,
        )
        self._buffer.add(event)

    def flush(self) -> int:
        """Write the buffered events; return how many. The write lock is taken *before* the
        buffer: a flush that finds the buffer empty (a reader's, before it queries) waits for
        one that took the events to commit them, so a read after flush sees every event
        recorded before it."""
        with self._write_lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        batch, dropped = self._buffer.take()
        if dropped:
            log.warning("audit.dropped", events=dropped)
        if not batch:
            return 0
        rows = [
            [
                e.occurred_at,
                e.actor,
                e.action,
                e.target,
                e.outcome,
                e.client,
                e.request_id,
                e.detail,
            ]
            for e in batch
        ]
        with self._db.transaction() as cur:
            cur.executemany(
                f"INSERT INTO {SYSTEM_SCHEMA}.audit "
                "(occurred_at, actor, action, target, outcome, client, request_id, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def prune(self, before: datetime, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the events that occurred before ``before``, ``batch`` rows per transaction
        (oldest first); return how many were deleted. Buffered events are newer than any
        cutoff in the past and are left alone."""
        deleted = 0
        while True:
            with self._write_lock, self._db.transaction() as cur:
                cur.execute(
                    f"DELETE FROM {SYSTEM_SCHEMA}.audit WHERE id IN (SELECT id FROM {SYSTEM_SCHEMA}.audit "
                    "WHERE occurred_at < ? ORDER BY id LIMIT ?)",
                    [before, batch],
                )
                row = cur.fetchone()
            n = int(row[0]) if row else 0
            deleted += n
            if n < batch:
                return deleted

    def query(
        self,
        *,
        since: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]:
        self.flush()
        where, params = [], []
        filters: list[tuple[str, Any]] = [
            ("occurred_at >= ?", since),
            ("actor = ?", actor),
            ("action = ?", action),
            ("outcome = ?", outcome),
        ]
        for clause, value in filters:
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = (
            "SELECT id, occurred_at, actor, action, target, outcome, client, request_id, detail "
            f"FROM {SYSTEM_SCHEMA}.audit"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._db.reading() as cur:
            rows = cur.execute(sql, params).fetchall()
        fields = (
            "id",
            "occurred_at",
            "actor",
            "action",
            "target",
            "outcome",
            "client",
            "request_id",
            "detail",
        )
        return [AuditEvent(**dict(zip(fields, r, strict=True))) for r in rows]
