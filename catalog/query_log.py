"""The query log: one record per data-plane request (proto_docs/governance.md).

Every scan, sample, profile, query (Flight, Flight SQL, ``POST /v1/query``) and export gets
one :class:`QueryRecord` when it ends — refused ones too — with who asked, what kind, the
tables read, the SQL text (literals replaced by ``?`` with ``[query_log] redact_literals``,
found by DuckDB's tokenizer: :func:`catalog.sqlguard.redact_literals`), the parameter count,
the rows and bytes sent where the path counts them, the milliseconds, the outcome and the
error code. A request that ran SQL in Snowflake (live tables, proto_docs/federation.md) also
has ``remote`` = ``"snowflake"`` and ``remote_query_ids``: the Snowflake query id of each
query it ran there, in order (a mixed query: one per pull) — what an admin looks up in
Snowflake's ``QUERY_HISTORY``. The data plane collects them in a :class:`RemoteWork`, which
also takes the request's one ``live_queries_per_day`` (catalog/budgets.py) before its first
query is sent.

Recording is on the hot path of every request, so :meth:`QueryLog.record` only appends to an
in-memory buffer (bounded: beyond :data:`MAX_BUFFER` records are counted as dropped, never
block a request); the housekeeping thread flushes it in one ``executemany`` per batch
(``Catalog.maintain``, like catalog/audit.py), and so does every read and shutdown. Records
older than ``[query_log] retention_days`` are deleted in batches (catalog/retention.py).
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Literal

import msgspec
import structlog

from catalog.budgets import Budgets
from catalog.buffers import RecordBuffer
from catalog.clock import Clock, utcnow
from catalog.config import QueryLogConfig
from catalog.database import SYSTEM_SCHEMA, Database, insert_columns
from catalog.errors import bounded
from catalog.identity import Principal
from catalog.sqlguard import redact_literals

log = structlog.get_logger(__name__)

MAX_BUFFER = 50_000
PRUNE_BATCH = 10_000
#: The SQL text kept per record (characters); a longer one is cut (the guard bounds it anyway).
MAX_SQL_CHARS = 8_000

Outcome = Literal["ok", "refused", "failed"]
#: Codes that say the server did the work and it did not finish (everything else that is not
#: OK is a refusal: the request was turned down, most of them before any work).
FAILURE_CODES = frozenset({"INTERNAL", "DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE", "ERROR"})


def outcome_of(code: str | None) -> Outcome:
    """``ok`` for no code (or ``OK``), ``failed`` for a fault of the run, else ``refused``."""
    if code is None or code == "OK":
        return "ok"
    return "failed" if code in FAILURE_CODES else "refused"


class QueryRecord(msgspec.Struct, kw_only=True):
    id: int | None = None
    occurred_at: datetime
    principal: str
    swarm: str | None
    agent: str | None
    kind: str
    via: str
    tables: list[str]
    sql: str | None
    params: int
    rows: int | None
    bytes: int | None
    ms: float
    outcome: str
    error_code: str | None
    request_id: str | None
    #: "snowflake" when the request ran SQL there (live tables), else null.
    remote: str | None = None
    #: The Snowflake query ids of what it ran there, in order; null when it ran nothing there.
    remote_query_ids: list[str] | None = None


class RemoteWork:
    """The Snowflake side of one data-plane request (see the module docs): made by the
    handler that records the request, handed to every live query it starts. :meth:`begin`
    before each query is sent — the first takes the request's live query from its swarm's
    budget (RESOURCE_EXHAUSTED when spent: nothing is sent) —, :meth:`ran` with the query id
    Snowflake answered."""

    def __init__(self, budgets: Budgets | None, principal: Principal | None) -> None:
        self._budgets = budgets
        self._principal = principal
        self._lock = threading.Lock()
        self.sent = False
        self.query_ids: list[str] = []

    def begin(self) -> None:
        with self._lock:
            if self.sent:
                return
            if self._budgets is not None and self._principal is not None:
                self._budgets.take_live(self._principal)
            self.sent = True

    def ran(self, query_id: str | None) -> None:
        if query_id:
            with self._lock:
                self.query_ids.append(bounded(query_id, 100))


class QueryPage(msgspec.Struct, kw_only=True):
    """One page of ``GET /v1/queries``, newest first; ``next_cursor`` goes as ``cursor`` for
    the next (older) page, null on the last."""

    queries: list[QueryRecord]
    next_cursor: int | None


#: The columns a flush writes: (column, DuckDB type, QueryRecord field), as in
#: catalog/migrations/0007_query_log.sql and later migrations.
_BATCH_COLUMNS = (
    ("occurred_at", "TIMESTAMPTZ", "occurred_at"),
    ("principal", "VARCHAR", "principal"),
    ("swarm", "VARCHAR", "swarm"),
    ("agent", "VARCHAR", "agent"),
    ("kind", "VARCHAR", "kind"),
    ("via", "VARCHAR", "via"),
    ("tables", "VARCHAR[]", "tables"),
    ("sql_text", "VARCHAR", "sql"),
    ("params", "INTEGER", "params"),
    ("rows", "BIGINT", "rows"),
    ("bytes", "BIGINT", "bytes"),
    ("ms", "DOUBLE", "ms"),
    ("outcome", "VARCHAR", "outcome"),
    ("error_code", "VARCHAR", "error_code"),
    ("request_id", "VARCHAR", "request_id"),
    ("remote", "VARCHAR", "remote"),
    ("remote_query_ids", "VARCHAR[]", "remote_query_ids"),
)
_COLUMNS = (
    "id, occurred_at, principal, swarm, agent, kind, via, tables, sql_text, params, rows, bytes, "
    "ms, outcome, error_code, request_id, remote, remote_query_ids"
)
_FIELDS = tuple(f.strip() for f in _COLUMNS.replace("sql_text", "sql").split(","))


class QueryLog:
    def __init__(
        self, db: Database, config: QueryLogConfig, clock: Clock, budgets: Budgets | None = None
    ) -> None:
        self._db = db
        # What a request spent is charged to its swarm's budgets (catalog/budgets.py).
        self._budgets = budgets
        self._config = config
        self._clock = clock
        self._buffer: RecordBuffer[QueryRecord] = RecordBuffer(MAX_BUFFER)
        # One writer of the table at a time (flushes from any thread, retention).
        self._write_lock = threading.Lock()
        #: Transactions that wrote records: a test checks a burst of requests costs a few.
        self.writes = 0

    def record(  # noqa: PLR0913  the record's columns, keyword-only
        self,
        principal: Principal,
        *,
        kind: str,
        via: str,
        tables: list[str] | tuple[str, ...] = (),
        sql: str | None = None,
        params: int = 0,
        rows: int | None = None,
        nbytes: int | None = None,
        seconds: float,
        code: str | None = None,
        request_id: str | None = None,
        remote: RemoteWork | None = None,
    ) -> None:
        """Buffer one record (memory only: the caller is a request that is ending);
        ``remote``: what it ran in Snowflake, if anything."""
        if sql is not None:
            sql = sql[:MAX_SQL_CHARS]
            if self._config.redact_literals:
                sql = redact_literals(sql)
        error = None if code in (None, "OK") else bounded(str(code), 40)
        rec = QueryRecord(
            occurred_at=utcnow(self._clock),
            principal=principal.label,
            swarm=principal.swarm,
            agent=principal.agent,
            kind=kind,
            via=via,
            tables=list(tables),
            sql=sql,
            params=params,
            rows=rows,
            bytes=nbytes,
            ms=round(seconds * 1000, 3),
            outcome=outcome_of(error),
            error_code=error,
            request_id=request_id,
        )
        if remote is not None and remote.sent:
            rec.remote = "snowflake"
            rec.remote_query_ids = list(remote.query_ids)
        if self._budgets is not None and rec.outcome != "refused":
            self._budgets.charge(principal, rows=rows, nbytes=nbytes, seconds=seconds)
        self._buffer.add(rec)

    def remote_work(self, principal: Principal | None) -> RemoteWork:
        """A new request's Snowflake side, charged to ``principal``'s swarm's budgets."""
        return RemoteWork(self._budgets, principal)

    def pending(self) -> int:
        return len(self._buffer)

    def flush(self) -> int:
        """Write the buffered records in one transaction; return how many. The write lock is
        taken before the buffer (as catalog/audit.py does): a reader's flush that finds the
        buffer empty waits for the flush that took the records to commit them."""
        with self._write_lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        batch, dropped = self._buffer.take()
        if dropped:
            log.warning("query_log.dropped", records=dropped)
        if not batch:
            return 0
        # One INSERT … SELECT of the whole batch (DuckDB's executemany costs milliseconds per
        # row: 20,000 records took ~48 s that way), with no pyarrow conversion of Python values
        # (catalog/database.py insert_columns).
        columns = [(name, kind, [getattr(r, field) for r in batch]) for name, kind, field in _BATCH_COLUMNS]
        with self._db.transaction() as cur:
            insert_columns(cur, f"{SYSTEM_SCHEMA}.query_log", columns)
            self.writes += 1
        return len(batch)

    def prune(self, before: datetime, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the records of requests that ended before ``before``, ``batch`` per
        transaction; return how many."""
        deleted = 0
        while True:
            with self._write_lock, self._db.transaction() as cur:
                cur.execute(
                    f"DELETE FROM {SYSTEM_SCHEMA}.query_log WHERE id IN (SELECT id FROM "
                    f"{SYSTEM_SCHEMA}.query_log WHERE occurred_at < ? ORDER BY id LIMIT ?)",
                    [before, batch],
                )
                row = cur.fetchone()
            n = int(row[0]) if row else 0
            deleted += n
            if n < batch:
                return deleted

    def query(  # noqa: PLR0913  the filters of GET /v1/queries, keyword-only
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        swarm: str | None = None,
        agent: str | None = None,
        principal: str | None = None,
        table: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> QueryPage:
        """Records newest first, filtered; ``cursor``: only those older than that id."""
        self.flush()
        filters: list[tuple[str, Any]] = [
            ("occurred_at >= ?", since),
            ("occurred_at < ?", until),
            ("swarm = ?", swarm),
            ("agent = ?", agent),
            ("principal = ?", principal),
            ("list_contains(tables, ?)", table),
            ("outcome = ?", outcome),
            ("id < ?", cursor),
        ]
        where, params = [], []
        for clause, value in filters:
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {_COLUMNS} FROM {SYSTEM_SCHEMA}.query_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit + 1)
        with self._db.reading() as cur:
            found = cur.execute(sql, params).fetchall()
        records = [QueryRecord(**dict(zip(_FIELDS, r, strict=True))) for r in found[:limit]]
        more = len(found) > limit
        return QueryPage(queries=records, next_cursor=records[-1].id if more and records else None)

    def mine(self, principal: Principal, limit: int) -> list[QueryRecord]:
        """The caller's own last ``limit`` records (the Flight action ``my-queries``)."""
        return self.query(principal=principal.label, limit=limit).queries
