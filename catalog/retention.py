"""Retention: how the catalog's history stays bounded on a server that runs for a year.

Two tables grow with time rather than with the data: the audit log (every refused token from
the internet is an event) and the token records (one per mint and refresh, and one more
admin token per renewal of ``DATA_DIR/admin.token``). With ``[audit] retention_days = N``
(default 90; 0 keeps everything), the housekeeping thread deletes, at most once per
:data:`INTERVAL_SECONDS`:

- audit events that occurred more than N days ago (in batches, catalog/audit.py);
- token records that *expired* more than N days ago. Nothing needs them: every token of a
  chain, and every agent token a swarm token minted, expires no later than the record it
  refers to (a refresh never extends its chain's root, a minted token never outlives its
  issuer), so no live token's lineage loses a row. Deleted under the admin-write lock
  (catalog/writes.py), like every other change to token records.

The query log (catalog/query_log.py) has its own ``[query_log] retention_days`` (default 30;
0 keeps everything): records of requests that ended longer ago are deleted on the same pass.

The journal's own retention (Quiver's log lines) is the system's: journald's
``SystemMaxUse``/``MaxRetentionSec``. See proto_docs/configuration.md, ``[audit]``.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import duckdb
import msgspec
import structlog

from catalog.audit import AuditLog
from catalog.config import AuditConfig, QueryLogConfig
from catalog.database import SYSTEM_SCHEMA
from catalog.metrics import Metrics
from catalog.query_log import QueryLog
from catalog.writes import AdminWrites

log = structlog.get_logger(__name__)

#: Seconds between retention passes of the housekeeping thread (the first runs at once).
INTERVAL_SECONDS = 3600.0
#: Token records one transaction deletes.
TOKEN_BATCH = 10_000


class RetentionReport(msgspec.Struct, kw_only=True):
    cutoff: datetime | None  # None: retention_days = 0, nothing is deleted
    audit_events: int
    token_records: int
    query_records: int = 0


class Retention:
    def __init__(
        self,
        config: AuditConfig,
        audit: AuditLog,
        writes: AdminWrites,
        metrics: Metrics,
        query_log: QueryLog | None = None,
        query_log_config: QueryLogConfig | None = None,
    ) -> None:
        self._config = config
        self._query_log = query_log
        self._query_log_config = query_log_config or QueryLogConfig()
        self._audit = audit
        self._writes = writes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time of the next pass

    def run_if_due(self) -> RetentionReport | None:
        """One pass when :data:`INTERVAL_SECONDS` have gone by since the last (housekeeping)."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return None
            self._next = now + INTERVAL_SECONDS
        return self.run()

    def run(self, now: datetime | None = None) -> RetentionReport:
        """Delete what is older than the retention as of ``now`` (default: the current time)."""
        current = now or datetime.now(UTC)
        queries = self._prune_queries(current)
        days = self._config.retention_days
        if days == 0:
            return RetentionReport(cutoff=None, audit_events=0, token_records=0, query_records=queries)
        cutoff = current - timedelta(days=days)
        events = self._audit.prune(cutoff)
        records = self._prune_tokens(cutoff)
        self._metrics.retention_deleted.labels("audit").inc(events)
        self._metrics.retention_deleted.labels("tokens").inc(records)
        if events or records:
            log.info(
                "retention.pruned",
                cutoff=cutoff.isoformat(),
                audit_events=events,
                token_records=records,
            )
        return RetentionReport(
            cutoff=cutoff, audit_events=events, token_records=records, query_records=queries
        )

    def _prune_queries(self, now: datetime) -> int:
        days = self._query_log_config.retention_days
        if self._query_log is None or days == 0:
            return 0
        cutoff = now - timedelta(days=days)
        deleted = self._query_log.prune(cutoff)
        self._metrics.retention_deleted.labels("query_log").inc(deleted)
        if deleted:
            log.info("retention.pruned_queries", cutoff=cutoff.isoformat(), query_records=deleted)
        return deleted

    def _prune_tokens(self, cutoff: datetime) -> int:
        def batch(cur: duckdb.DuckDBPyConnection) -> int:
            jtis = [
                r[0]
                for r in cur.execute(
                    f"SELECT jti FROM {SYSTEM_SCHEMA}.tokens WHERE expires_at < ? ORDER BY expires_at LIMIT ?",
                    [cutoff, TOKEN_BATCH],
                ).fetchall()
            ]
            if jtis:
                cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.tokens WHERE jti IN (SELECT unnest(?))", [jtis])
            return len(jtis)

        deleted = 0
        while True:
            n = self._writes.run("delete expired token records", batch)
            deleted += n
            if n < TOKEN_BATCH:
                return deleted
