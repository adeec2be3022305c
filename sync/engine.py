"""One sync run of one table: plan (schema), extract (Snowflake -> a private staging table),
apply (one DuckDB transaction).

Why this shape:
- Extraction lands in a TEMP table of the run's own DuckDB cursor, which no other connection
  can see; nothing a reader can see changes until the final transaction.
- The final transaction applies schema changes, the rows, the watermark, the run record and
  the table's data version together: a crash or a dead source at any point leaves the
  previous replica and watermark exactly as they were, and the next run catches up.
- ``full`` swaps the table inside that transaction (DROP + CREATE + INSERT from staging):
  readers see the old table or the new one, never a partial one.
- Incremental runs are bounded above: the run first asks for ``MAX(cursor)`` and extracts
  only ``lo < cursor <= hi``; the new watermark is ``hi``. Rows written at the source while
  the run extracts land above ``hi`` and are taken by the next run, never skipped.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time as _time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import structlog

from catalog import Catalog, TableRef, quote_ident
from catalog.config import SnowflakeConfig, SyncTableConfig
from catalog.tables import TableCatalog
from sync.errors import SyncFailed
from sync.source import SnowflakeSource, SourceTable, bind, is_transient, parse_source
from sync.state import RunRecord, SyncStateStore, TableState, encode_watermark
from sync.typemap import (
    SourceColumn,
    columns_json,
    fingerprint,
    is_widening,
    quote_snowflake,
    select_expression,
)

log = structlog.get_logger("sync")

ProgressFn = Callable[[int, int, int | None], None]

_CURSOR_TYPES = {"NUMBER", "DECIMAL", "NUMERIC", "FIXED", "INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "BYTEINT", "FLOAT", "DOUBLE", "REAL", "DATE", "TIME", "TIMESTAMP_NTZ", "TIMESTAMP_LTZ", "TIMESTAMP_TZ", "TIMESTAMP", "DATETIME", "TEXT", "VARCHAR", "STRING"}  # fmt: skip


# "Take the watermark from the rows loaded" (an unpaged run: one query, one snapshot).
_UNKNOWN = object()


@dataclass
class Plan:
    strategy: str  # full | append | merge
    columns: list[SourceColumn]
    ddl: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    reconcile: bool = False


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
        columns = source.columns(self.src)
        if not columns:
            raise SyncFailed(
                f"source table {self.src.label} does not exist or is not visible to this user/role "
                f"(check sync.tables source = {self.entry.source!r})"
            )
        cursor_col = self._find(columns, self.entry.cursor, "cursor") if self.entry.cursor else None
        keys = [self._find(columns, k, "primary_key") for k in self.entry.primary_key]
        if cursor_col is not None and cursor_col.base not in _CURSOR_TYPES:
            raise SyncFailed(
                f"cursor column {cursor_col.name} of {self.src.label} is {cursor_col.snowflake_type}; "
                "a cursor must be a number, date, time, timestamp or text"
            )
        names = [c.target_name.lower() for c in columns]
        if len(set(names)) != len(names):
            raise SyncFailed(
                f"{self.src.label} has columns whose names differ only in case; cannot replicate"
            )

        cur = self.catalog.db.cursor()
        stage = f"_quiver_stage_{uuid.uuid4().hex[:12]}"
        try:
            state = self.store.get(cur, self.key)
            existing = self._target_columns(cur)
            plan = self._plan(columns, existing, state, full=full)
            run.mode = plan.strategy
            run.schema_changes = plan.changes
            if plan.changes and self.entry.on_schema_change == "fail" and not full:
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
                log.info("sync.schema_change", table=self.key, change=change, strategy=plan.strategy)

            order = keys or ([cursor_col] if cursor_col is not None else [])
            paged = bool(self.entry.batch_rows and order)
            where, params, total, watermark = self._bounds(
                source, plan, cursor_col, state, paged=paged, want_total=estimate
            )
            old = state.watermark_value if state is not None and plan.strategy != "full" else None
            if plan.strategy == "full":
                self._load_full(
                    cur, run, source, columns, where, params, order, unique=bool(keys), total=total,
                    progress=progress, cancel=cancel, watermark=watermark, cursor_col=cursor_col,
                )  # fmt: skip
                return
            cur.execute(
                f"CREATE TEMP TABLE {quote_ident(stage)} ("
                + ", ".join(f"{quote_ident(c.target_name)} {c.duckdb_type}" for c in columns)
                + ")"
            )
            if where is not None:
                self._extract(
                    source, cur, quote_ident(stage), columns, where, params, order, unique=bool(keys), run=run,
                    total=total, progress=progress, cancel=cancel,
                )  # fmt: skip
            keys_table = None
            if plan.reconcile:
                keys_table = f"{stage}_keys"
                cur.execute(
                    f"CREATE TEMP TABLE {quote_ident(keys_table)} ("
                    + ", ".join(f"{quote_ident(k.target_name)} {k.duckdb_type}" for k in keys)
                    + ")"
                )
                probe = RunRecord(run.target, run.source, run.mode, run.trigger, run.started_at)
                self._extract(
                    source, cur, quote_ident(keys_table), keys, "TRUE", [], keys, unique=True, run=probe,
                    total=None, progress=None, cancel=cancel,
                )  # fmt: skip
            if cancel.is_set():
                raise SyncFailed("cancelled: the server is stopping")
            if watermark is _UNKNOWN:
                watermark = self._loaded_max(cur, quote_ident(stage), cursor_col, old)
            run.watermark = encode_watermark(watermark)[0]
            self._apply(cur, run, plan, stage, keys_table, columns, keys, cursor_col, watermark)
        finally:
            try:
                cur.execute(f"DROP TABLE IF EXISTS {quote_ident(stage)}")
                cur.execute(f"DROP TABLE IF EXISTS {quote_ident(stage + '_keys')}")
            except duckdb.Error:
                pass
            cur.close()

    def _find(self, columns: list[SourceColumn], wanted: str, key: str) -> SourceColumn:
        for c in columns:
            if c.name == wanted:
                return c
        matches = [c for c in columns if c.name.lower() == wanted.lower()]
        if len(matches) == 1:
            return matches[0]
        have = ", ".join(c.name for c in columns)
        raise SyncFailed(f"{key} column {wanted!r} not found in {self.src.label} (columns: {have})")

    def _target_columns(self, cur: duckdb.DuckDBPyConnection) -> dict[str, str] | None:
        rows = cur.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
            "AND lower(schema_name) = lower(?) AND lower(table_name) = lower(?) ORDER BY column_index",
            [self.ref.schema, self.ref.name],
        ).fetchall()
        return {str(n): str(t) for n, t in rows} if rows else None

    # --- plan: strategy and schema changes ---------------------------------------------------------
    def _plan(
        self,
        columns: list[SourceColumn],
        existing: dict[str, str] | None,
        state: TableState | None,
        *,
        full: bool,
    ) -> Plan:
        mode = self.entry.mode
        policy = self.entry.on_schema_change
        if existing is None:
            return Plan("full", columns)
        fp_changed = state is not None and state.schema_fingerprint not in (None, fingerprint(columns))
        lower = {k.lower(): (k, v) for k, v in existing.items()}
        changes: list[str] = []
        ddl: list[str] = []
        incompatible = False
        for c in columns:
            have = lower.get(c.target_name.lower())
            if have is None:
                changes.append(f"column {c.target_name} {c.duckdb_type} added")
                ddl.append(
                    f"ALTER TABLE {self.ref.sql} ADD COLUMN {quote_ident(c.target_name)} {c.duckdb_type}"
                )
            elif have[1].upper() != c.duckdb_type.upper():
                if is_widening(have[1], c.duckdb_type):
                    changes.append(f"column {c.target_name} widened {have[1]} -> {c.duckdb_type}")
                    ddl.append(
                        f"ALTER TABLE {self.ref.sql} ALTER COLUMN {quote_ident(have[0])} TYPE {c.duckdb_type}"
                    )
                else:
                    changes.append(
                        f"column {c.target_name} changed {have[1]} -> {c.duckdb_type} (incompatible)"
                    )
                    incompatible = True
        wanted = {c.target_name.lower() for c in columns}
        removed = [name for key, (name, _) in lower.items() if key not in wanted]
        if removed and (policy != "evolve" or fp_changed):
            for name in removed:
                keep = " (kept: NULL in new rows)" if policy == "evolve" and mode != "full" else ""
                changes.append(f"column {name} dropped at the source{keep}")
        structural = bool(ddl) or incompatible or (bool(removed) and policy != "evolve")
        if full or mode == "full":
            return Plan("full", columns, changes=changes)
        if policy == "fail" and changes:
            return Plan(mode, columns, changes=changes)
        if state is None or state.watermark is None:
            return Plan("full", columns, changes=changes)
        if structural and (policy == "resync" or incompatible):
            return Plan("full", columns, changes=[*changes, "full resync"])
        reconcile = False
        if mode == "merge" and self.entry.reconcile_seconds is not None:
            last = state.last_full_at
            reconcile = (
                last is None or (datetime.now(UTC) - last).total_seconds() >= self.entry.reconcile_seconds
            )
        return Plan(mode, columns, ddl=ddl, changes=changes, reconcile=reconcile)

    # --- bounds: which rows this run reads --------------------------------------------------------------
    def _bounds(
        self,
        source: SnowflakeSource,
        plan: Plan,
        cursor_col: SourceColumn | None,
        state: TableState | None,
        *,
        paged: bool,
        want_total: bool,
    ) -> tuple[str | None, list[Any], int | None, Any]:
        """(WHERE clause or None for "nothing to read", params, expected rows, new watermark).

        One query sees one snapshot of the source, so an unpaged run takes its new watermark
        from the rows it loaded (``_UNKNOWN`` here). Paged runs read several snapshots: they
        first fix the upper bound ``hi = MAX(cursor)`` and read ``lo < cursor <= hi``; rows
        written meanwhile land above ``hi`` and are the next run's."""
        total: int | None = None
        if not paged:
            if want_total:
                total = self._estimate(source)
            if cursor_col is None or plan.strategy == "full":
                return "TRUE", [], total, _UNKNOWN
            assert state is not None
            lo = self._low(plan, state)
            ph, p = bind(cursor_col, lo)
            return f"{quote_snowflake(cursor_col.name)} > {ph}", [p], total, _UNKNOWN
        if cursor_col is None:
            total = source.rows(f"SELECT COUNT(*) FROM {self.src.sql}")[0][0]
            return "TRUE", [], int(total), None
        q = quote_snowflake(cursor_col.name)
        if plan.strategy == "full":
            total, hi = source.rows(f"SELECT COUNT(*), MAX({q}) FROM {self.src.sql}")[0]
            if hi is None:
                return "TRUE", [], int(total), None
            ph, p = bind(cursor_col, hi)
            return f"({q} <= {ph} OR {q} IS NULL)", [p], int(total), hi
        assert state is not None
        old = state.watermark_value
        ph, p = bind(cursor_col, self._low(plan, state))
        total, hi = source.rows(f"SELECT COUNT(*), MAX({q}) FROM {self.src.sql} WHERE {q} > {ph}", [p])[0]
        if hi is None:
            return None, [], 0, old
        ph_hi, p_hi = bind(cursor_col, hi)
        new = hi if _greater(hi, old) else old
        return f"{q} > {ph} AND {q} <= {ph_hi}", [p, p_hi], int(total), new

    def _low(self, plan: Plan, state: TableState) -> Any:
        lo = state.watermark_value
        if plan.strategy == "merge" and self.entry.lookback_seconds:
            lo = _minus(lo, self.entry.lookback_seconds)
        return lo

    def _estimate(self, source: SnowflakeSource) -> int | None:
        """Snowflake's own row count (metadata, free): only for a progress bar's ETA."""
        try:
            rows = source.rows(
                f"SELECT row_count FROM {quote_snowflake(self.src.database)}.information_schema.tables "
                "WHERE table_schema = ? AND table_name = ?",
                [self.src.schema, self.src.name],
            )
        except SyncFailed:
            return None
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def _loaded_max(
        self, cur: duckdb.DuckDBPyConnection, into: str, cursor_col: SourceColumn | None, old: Any
    ) -> Any:
        """The watermark an unpaged run reached: the largest cursor among the rows it loaded."""
        if cursor_col is None:
            return None
        rows = cur.execute(f"SELECT max({quote_ident(cursor_col.target_name)}) FROM {into}").fetchall()
        hi = rows[0][0] if rows else None
        if hi is None:
            return old
        return hi if _greater(hi, old) else old

    # --- extract: source -> staging ----------------------------------------------------------------------
    def _extract(
        self,
        source: SnowflakeSource,
        cur: duckdb.DuckDBPyConnection,
        stage: str,
        columns: list[SourceColumn],
        where: str,
        params: list[Any],
        order: list[SourceColumn],
        *,
        unique: bool,
        run: RunRecord,
        total: int | None,
        progress: ProgressFn | None,
        cancel: threading.Event,
    ) -> None:
        select = f"SELECT {', '.join(select_expression(c) for c in columns)} FROM {self.src.sql}"
        casts = ", ".join(f"CAST(c{i} AS {c.duckdb_type})" for i, c in enumerate(columns))
        loader = _Loader(cur, stage, casts, run, total, progress, cancel)  # stage: quoted SQL name
        n = self.entry.batch_rows
        if not n or not order:
            loader.load(source.batches(f"{select} WHERE {where}", params))
            return
        qk = [quote_snowflake(k.name) for k in order]
        idx = [columns.index(k) for k in order]
        not_null = " AND ".join(f"{k} IS NOT NULL" for k in qk)
        order_by = ", ".join(qk)
        last: list[Any] | None = None
        op = ">"
        while True:
            conds, ps = [f"({where})", not_null], list(params)
            if last is not None:
                if unique:
                    cond, extra = _after(order, last)
                else:
                    ph, p = bind(order[0], last[0])
                    cond, extra = f"{qk[0]} {op} {ph}", [p]
                conds.append(cond)
                ps += extra
            sql = f"{select} WHERE {' AND '.join(conds)} ORDER BY {order_by} LIMIT {int(n)}"
            rows, first, final = loader.load(source.batches(sql, ps), idx)
            if rows < n or final is None:
                break
            if unique:
                last = final
                continue
            # Paging by a cursor that is not unique: rows sharing the page's last value may
            # continue on the next page. Drop them here and read that value again from the start.
            m = final[0]
            deleted = cur.execute(
                f"DELETE FROM {stage} WHERE {quote_ident(order[0].target_name)} = ?", [m]
            ).fetchall()
            run.rows_read -= int(deleted[0][0]) if deleted else 0
            if first is not None and first[0] == m:
                ph, p = bind(order[0], m)
                tie = f"{select} WHERE ({where}) AND {qk[0]} = {ph}"
                loader.load(source.batches(tie, [*params, p]))
                op = ">"
            else:
                op = ">="
            last = [m]
        # Rows whose key is NULL never satisfy a page condition: read them in one go.
        any_null = " OR ".join(f"{k} IS NULL" for k in qk)
        loader.load(source.batches(f"{select} WHERE ({where}) AND ({any_null})", params))

    # --- apply: one transaction ----------------------------------------------------------------------------
    def _apply(
        self,
        cur: duckdb.DuckDBPyConnection,
        run: RunRecord,
        plan: Plan,
        stage: str,
        keys_table: str | None,
        columns: list[SourceColumn],
        keys: list[SourceColumn],
        cursor_col: SourceColumn | None,
        watermark: Any,
    ) -> None:
        target = self.ref.sql
        st = quote_ident(stage)
        cols = ", ".join(quote_ident(c.target_name) for c in columns)
        changed = False
        cur.execute("BEGIN")
        try:
            for statement in plan.ddl:
                cur.execute(statement)
                changed = True
            if plan.strategy == "merge":
                match = " AND ".join(
                    f"{target}.{quote_ident(k.target_name)} IS NOT DISTINCT FROM s.{quote_ident(k.target_name)}"
                    for k in keys
                )
                key_cols = ", ".join(quote_ident(k.target_name) for k in keys)
                cur.execute(
                    f"DELETE FROM {target} USING (SELECT DISTINCT {key_cols} FROM {st}) s WHERE {match}"
                )
                assert cursor_col is not None
                latest = (
                    f"QUALIFY row_number() OVER (PARTITION BY {key_cols} "
                    f"ORDER BY {quote_ident(cursor_col.target_name)} DESC NULLS LAST) = 1"
                )
                run.rows_written = _count(
                    cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {st} {latest}")
                )
                if keys_table is not None:
                    kt = quote_ident(keys_table)
                    gone = " AND ".join(
                        f"k.{quote_ident(k.target_name)} IS NOT DISTINCT FROM {target}.{quote_ident(k.target_name)}"
                        for k in keys
                    )
                    run.rows_deleted = _count(
                        cur.execute(
                            f"DELETE FROM {target} WHERE NOT EXISTS (SELECT 1 FROM {kt} k WHERE {gone})"
                        )
                    )
            else:
                run.rows_written = _count(
                    cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {st}")
                )
            changed = changed or bool(run.rows_written or run.rows_deleted)
            self._commit(cur, run, columns, watermark, full=plan.reconcile, changed=changed)
        except BaseException:
            _rollback(cur)
            raise

    def _load_full(
        self,
        cur: duckdb.DuckDBPyConnection,
        run: RunRecord,
        source: SnowflakeSource,
        columns: list[SourceColumn],
        where: str | None,
        params: list[Any],
        order: list[SourceColumn],
        *,
        unique: bool,
        total: int | None,
        progress: ProgressFn | None,
        cancel: threading.Event,
        watermark: Any,
        cursor_col: SourceColumn | None,
    ) -> None:
        """The new table is built inside one transaction that also drops the old one: until
        COMMIT it is private to this cursor (readers keep the old table), at COMMIT the swap,
        the watermark and the data version become visible together; any failure rolls all of
        it back. Loading straight into it saves copying the rows a second time."""
        target = self.ref.sql
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.ref.schema)}")
        cur.execute("BEGIN")
        try:
            cur.execute(f"DROP TABLE IF EXISTS {target}")
            cur.execute(
                f"CREATE TABLE {target} ("
                + ", ".join(f"{quote_ident(c.target_name)} {c.duckdb_type}" for c in columns)
                + ")"
            )
            if where is not None:
                self._extract(
                    source, cur, target, columns, where, params, order, unique=unique, run=run, total=total,
                    progress=progress, cancel=cancel,
                )  # fmt: skip
            if cancel.is_set():
                raise SyncFailed("cancelled: the server is stopping")
            if watermark is _UNKNOWN:
                watermark = self._loaded_max(cur, target, cursor_col, None)
            run.watermark = encode_watermark(watermark)[0]
            run.rows_written = run.rows_read
            self._commit(cur, run, columns, watermark, full=True, changed=True)
        except BaseException:
            _rollback(cur)
            raise

    def _commit(
        self,
        cur: duckdb.DuckDBPyConnection,
        run: RunRecord,
        columns: list[SourceColumn],
        watermark: Any,
        *,
        full: bool,
        changed: bool,
    ) -> None:
        """State, history and data version in the loader's transaction, then COMMIT."""
        run.ended_at = datetime.now(UTC)
        run.outcome = "ok"
        self.store.record_success(
            cur,
            run,
            watermark=encode_watermark(watermark),
            fingerprint=fingerprint(columns),
            source_columns=columns_json(columns),
            full=full,
        )
        if changed:
            TableCatalog.bump_version(cur, self.ref)
        cur.execute("COMMIT")


def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):
        cur.execute("ROLLBACK")


class _Loader:
    """Moves Arrow tables into the staging table, one at a time, counting as it goes."""

    def __init__(
        self,
        cur: duckdb.DuckDBPyConnection,
        stage: str,
        casts: str,
        run: RunRecord,
        total: int | None,
        progress: ProgressFn | None,
        cancel: threading.Event,
    ) -> None:
        self.cur = cur
        self.sql = f"INSERT INTO {stage} SELECT {casts} FROM _quiver_batch"
        self.run = run
        self.total = total
        self.progress = progress
        self.cancel = cancel

    def load(
        self, tables: Iterator[pa.Table], key_idx: list[int] | None = None
    ) -> tuple[int, list[Any] | None, list[Any] | None]:
        """Load every table; return (rows, first key, last key) of this result."""
        rows = 0
        first: list[Any] | None = None
        last: list[Any] | None = None
        for table in tables:
            if self.cancel.is_set():
                raise SyncFailed("cancelled: the server is stopping")
            if table.num_rows == 0:
                continue
            table = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
            if key_idx:
                if first is None:
                    first = [table.column(i)[0].as_py() for i in key_idx]
                last = [table.column(i)[-1].as_py() for i in key_idx]
            self.cur.register("_quiver_batch", table)
            try:
                self.cur.execute(self.sql)
            finally:
                self.cur.unregister("_quiver_batch")
            rows += table.num_rows
            self.run.rows_read += table.num_rows
            self.run.bytes += table.nbytes
            del table
            if self.progress is not None:
                self.progress(self.run.rows_read, self.run.bytes, self.total)
        return rows, first, last


def _count(result: duckdb.DuckDBPyConnection) -> int:
    rows = result.fetchall()
    return int(rows[0][0]) if rows else 0


def _after(keys: list[SourceColumn], values: list[Any]) -> tuple[str, list[Any]]:
    """Keyset condition "(k1, k2, ...) > (v1, v2, ...)" spelt out, for composite keys."""
    ors: list[str] = []
    params: list[Any] = []
    for i in range(len(keys)):
        ands = []
        for j in range(i + 1):
            ph, p = bind(keys[j], values[j])
            ands.append(f"{quote_snowflake(keys[j].name)} {'>' if j == i else '='} {ph}")
            params.append(p)
        ors.append("(" + " AND ".join(ands) + ")")
    return "(" + " OR ".join(ors) + ")", params


def _minus(value: Any, seconds: float) -> Any:
    """The watermark moved back by the lookback (temporal cursors; numbers have no lookback)."""
    if isinstance(value, datetime):
        return value - timedelta(seconds=seconds)
    if isinstance(value, date):
        return value - timedelta(days=math.ceil(seconds / 86400))
    return value


def _greater(a: Any, b: Any) -> bool:
    if b is None:
        return True
    try:
        return bool(a > b)
    except TypeError:
        return True
