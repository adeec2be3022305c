"""One sync run of one table, start to end: the retries around it and the order of its
steps. The steps live by concern:

- sync/cursor.py - the cursor and key columns, and how the watermark moves (pure);
- sync/schema_diff.py - how the source's columns differ from the replica's (pure);
- sync/strategy.py - full, append or merge, or refused (pure);
- sync/extract.py - the rows to read (bounds) and reading them, in keyset pages;
- sync/apply.py - the one DuckDB transaction that makes them the replica, with the source's
  table and column comments (catalog/descriptions.py).

Why this shape:
- Extraction lands in a TEMP table of the run's own DuckDB cursor, which no other connection
  can see; nothing a reader can see changes until the final transaction.
- The final transaction applies schema changes, the rows, the watermark, the run record and
  the table's data version together: a crash or a dead source at any point leaves the
  previous replica and watermark exactly as they were, and the next run catches up.
- ``full`` swaps the table inside that transaction (DROP + CREATE, rows loaded straight into
  the new table): readers see the old table or the new one, never a partial one.
- Incremental runs are bounded above: the run first asks for ``MAX(cursor)`` and extracts
  only ``lo < cursor <= hi``; the new watermark is ``hi``. Rows written at the source while
  the run extracts land above ``hi`` and are taken by the next run, never skipped.
"""

from __future__ import annotations

import dataclasses
import threading
import time as _time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import duckdb
import structlog

from catalog import Catalog, TableRef, quote_ident
from catalog.config import SnowflakeConfig, SyncTableConfig
from catalog.descriptions import SourceComments
from sync import apply, extract
from sync.context import ProgressFn, RunContext
from sync.cursor import UNKNOWN, Keyset, resolve_roles
from sync.errors import SyncFailed
from sync.schema_diff import diff_schema
from sync.source import SnowflakeSource, SourceTable, is_transient, parse_source
from sync.state import RunRecord, SyncStateStore, encode_watermark
from sync.strategy import Plan, choose_plan

log = structlog.get_logger("sync")


class TableSync:
    """Runs one ``[[sync.tables]]`` entry. Never runs twice at once (the service makes sure)."""

    def __init__(
        self,
        catalog: Catalog,
        entry: SyncTableConfig,
        snowflake: SnowflakeConfig,
        store: SyncStateStore,
        *,
        source_factory: Callable[[], SnowflakeSource] | None = None,
    ) -> None:
        self.catalog = catalog
        self.entry = entry
        self.store = store
        schema, name = entry.target.split(".")
        self.ref = TableRef(schema, name)
        self.key = entry.target.lower()
        self.src: SourceTable = parse_source(entry.source, snowflake.database, snowflake.schema)
        self._source_factory = source_factory or (lambda: SnowflakeSource(snowflake))

    # --- the run, with retries -------------------------------------------------------------------
    def run(
        self,
        *,
        full: bool = False,
        trigger: str = "schedule",
        retry_seconds: float = 30.0,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        on_error: Callable[[str], None] | None = None,
        estimate: bool = False,
    ) -> RunRecord:
        cancel = cancel or threading.Event()
        run = RunRecord(self.key, self.src.label, self.entry.mode, trigger, datetime.now(UTC))
        deadline = _time.monotonic() + retry_seconds
        delay = 1.0
        log.info("sync.run.started", table=self.key, source=self.src.label, trigger=trigger, full=full)
        while True:
            source = self._source_factory()
            try:
                self._attempt(run, source, full=full, progress=progress, cancel=cancel, estimate=estimate)
                break
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none kills the worker
                message, transient = self._describe(e, source)
                run.error = message
                if on_error is not None:
                    on_error(message)
                if transient and not cancel.is_set() and _time.monotonic() + delay <= deadline:
                    log.warning("sync.run.retrying", table=self.key, error=message, in_seconds=delay)
                    cancel.wait(delay)
                    delay = min(delay * 2, 30.0)
                    run.rows_read = run.bytes = run.rows_written = run.rows_deleted = 0
                    run.schema_changes = []
                    continue
                run.outcome = "failed"
                run.ended_at = datetime.now(UTC)
                try:
                    self.store.record_failure(run, configured_mode=self.entry.mode)
                except Exception as rec:  # noqa: BLE001 - e.g. the database closed during shutdown
                    log.warning("sync.run.not_recorded", table=self.key, error=str(rec))
                log.error("sync.run.failed", table=self.key, error=message, seconds=round(run.seconds, 3))
                return run
            finally:
                source.close()
        run.outcome = "ok"
        run.error = None
        log.info(
            "sync.run.finished",
            table=self.key,
            mode=run.mode,
            rows_read=run.rows_read,
            rows_written=run.rows_written,
            rows_deleted=run.rows_deleted,
            bytes=run.bytes,
            watermark=run.watermark,
            seconds=round(run.seconds, 3),
        )
        for change in run.schema_changes:
            self.catalog.audit.record(
                "sync.schema_change", outcome="ok", actor="sync", target=self.key, detail=change
            )
        return run

    def _describe(self, exc: Exception, source: SnowflakeSource) -> tuple[str, bool]:
        if isinstance(exc, SyncFailed):
            return source.scrub(exc.message), exc.transient
        if isinstance(exc, duckdb.TransactionException):
            return f"replica write conflict: {exc}", True
        if isinstance(exc, duckdb.Error):
            return source.scrub(f"writing the replica failed: {exc}"), False
        log.error("sync.run.internal_error", table=self.key, exc_info=exc)
        return source.scrub(f"internal error: {type(exc).__name__}: {exc}"), is_transient(exc)

    # --- one attempt -----------------------------------------------------------------------------
    def _attempt(
        self,
        run: RunRecord,
        source: SnowflakeSource,
        *,
        full: bool,
        progress: ProgressFn | None,
        cancel: threading.Event,
        estimate: bool = False,
    ) -> None:
        source.connect()
        found, column_comments = source.columns_and_comments(self.src)
        columns = tuple(found)
        roles = resolve_roles(
            columns,
            cursor=self.entry.cursor,
            primary_key=self.entry.primary_key,
            label=self.src.label,
            configured_source=self.entry.source,
        )
        table_read, table_comment = source.table_comment(self.src)
        comments = SourceComments.clean(
            table_comment,
            {c.target_name: column_comments.get(c.name) for c in columns},
            table_read=table_read,
        )
        cur = self.catalog.db.cursor()
        stage = f"_quiver_stage_{uuid.uuid4().hex[:12]}"
        try:
            ctx = RunContext(
                entry=self.entry,
                key=self.key,
                src=self.src,
                ref=self.ref,
                source=source,
                columns=columns,
                roles=roles,
                state=self.store.get(cur, self.key),
                store=self.store,
                cur=cur,
                run=run,
                cancel=cancel,
                progress=progress,
                log=log.bind(table=self.key),
                comments=comments,
            )
            plan = self._plan(ctx, full=full)
            if plan.strategy == "full":
                self._load_full(ctx, plan, estimate=estimate)
            else:
                self._load_incremental(ctx, plan, stage, estimate=estimate)
        finally:
            try:
                cur.execute(f"DROP TABLE IF EXISTS {quote_ident(stage)}")
                cur.execute(f"DROP TABLE IF EXISTS {quote_ident(stage + '_keys')}")
            except duckdb.Error:
                pass
            cur.close()

    def _plan(self, ctx: RunContext, *, full: bool) -> Plan:
        """Diff the schemas, choose the strategy, and refuse or report the changes."""
        replica = apply.replica_columns(ctx.cur, ctx.ref)
        state = ctx.state
        diff = None
        if replica is not None:
            diff = diff_schema(
                ctx.columns,
                replica,
                self.entry,
                target_sql=ctx.ref.sql,
                last_fingerprint=state.schema_fingerprint if state is not None else None,
            )
        plan = choose_plan(diff, self.entry, state, full=full, now=datetime.now(UTC))
        ctx.run.mode = plan.strategy
        ctx.run.schema_changes = list(plan.changes)
        if plan.refused:
            detail = "; ".join(plan.changes)
            self.catalog.audit.record(
                "sync.schema_change", outcome="refused", actor="sync", target=self.key, detail=detail
            )
            raise SyncFailed(
                f'schema of {self.src.label} changed ({detail}); on_schema_change = "fail" stops this '
                "table: fix the source, or accept the new schema with a full run "
                f"(quiver sync run --table {self.key} --full)"
            )
        for change in plan.changes:
            ctx.log.info("sync.schema_change", change=change, strategy=plan.strategy)
        return plan

    def _load_full(self, ctx: RunContext, plan: Plan, *, estimate: bool) -> None:
        """The new table is built inside one transaction that also drops the old one: until
        COMMIT it is private to this cursor (readers keep the old table), at COMMIT the swap,
        the watermark and the data version become visible together; any failure rolls all of
        it back. Loading straight into it saves copying the rows a second time."""
        bounds = extract.read_bounds(ctx, plan, want_total=estimate)
        apply.ensure_schema(ctx)
        with apply.transaction(ctx.cur):
            target = apply.replace_table(ctx)
            if bounds.where is not None:
                extract.extract(ctx, target, ctx.columns, bounds, ctx.roles.keyset)
            ctx.check_cancel()
            watermark = bounds.watermark
            if watermark is UNKNOWN:
                watermark = extract.loaded_max(ctx.cur, target, ctx.roles.cursor, None)
            ctx.run.watermark = encode_watermark(watermark)[0]
            ctx.run.rows_written = ctx.run.rows_read
            apply.commit(ctx, watermark, full=True, changed=True)

    def _load_incremental(self, ctx: RunContext, plan: Plan, stage: str, *, estimate: bool) -> None:
        """Extract into a private staging table (and, for a reconciling merge, every source
        key into another), then apply both in one transaction."""
        bounds = extract.read_bounds(ctx, plan, want_total=estimate)
        state = ctx.state
        old = state.watermark_value if state is not None else None
        staged = apply.create_temp_table(ctx.cur, stage, ctx.columns)
        if bounds.where is not None:
            extract.extract(ctx, staged, ctx.columns, bounds, ctx.roles.keyset)
        keys_table = None
        if plan.reconcile:
            keys = ctx.roles.primary_key
            keys_table = apply.create_temp_table(ctx.cur, f"{stage}_keys", keys)
            # The key scan counts into a record of its own: rows_read is the rows of the data.
            run = ctx.run
            probe = RunRecord(run.target, run.source, run.mode, run.trigger, run.started_at)
            scan = dataclasses.replace(ctx, run=probe, progress=None)
            extract.extract(scan, keys_table, keys, extract.EVERYTHING, Keyset(keys, unique=True))
        ctx.check_cancel()
        watermark = bounds.watermark
        if watermark is UNKNOWN:
            watermark = extract.loaded_max(ctx.cur, staged, ctx.roles.cursor, old)
        ctx.run.watermark = encode_watermark(watermark)[0]
        apply.apply_incremental(ctx, plan, staged, keys_table, watermark)
