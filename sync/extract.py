"""Extraction: which source rows a run reads (its bounds), and reading them - in keyset pages
when ``batch_rows`` is set - into a DuckDB table of the run's own cursor.

Rows go Snowflake -> Arrow -> DuckDB one Arrow table at a time; Python never holds more than
one. Every bound and page key is a typed bound parameter (sync/source.py ``bind``), never
SQL text made from a value.

Why the bounds look as they do: one query sees one snapshot of the source, so an unpaged run
takes its new watermark from the rows it loaded. A paged run reads several snapshots, so it
first fixes the upper bound ``hi = MAX(cursor)`` and reads ``lo < cursor <= hi``; rows written
meanwhile land above ``hi`` and are the next run's, never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from catalog import quote_ident
from catalog.snowflake_names import quote_snowflake
from sync.context import RunContext
from sync.cursor import UNKNOWN, Keyset, advance, lower_bound
from sync.errors import SyncFailed
from sync.source import bind
from sync.strategy import Plan
from sync.typemap import SourceColumn, select_expression


@dataclass(frozen=True, slots=True)
class Bounds:
    """The rows a run reads: ``where`` (Snowflake SQL, None for "nothing new to read") with its
    bound ``params``, the expected row count if known (for progress), and the watermark the
    run reaches (:data:`~sync.cursor.UNKNOWN`: the largest cursor among the rows loaded)."""

    where: str | None
    params: list[Any] = field(default_factory=list)
    total: int | None = None
    watermark: Any = None


EVERYTHING = Bounds("TRUE")


def read_bounds(ctx: RunContext, plan: Plan, *, want_total: bool) -> Bounds:
    """Ask the source (at most one query) where this run starts and ends. ``want_total``:
    also Snowflake's row count of an unpaged read, for a progress bar."""
    cursor = ctx.roles.cursor
    paged = bool(ctx.batch_rows and ctx.roles.keyset.columns)
    if not paged:
        total = estimate_rows(ctx) if want_total else None
        if cursor is None or plan.strategy == "full":
            return Bounds("TRUE", [], total, UNKNOWN)
        assert ctx.state is not None  # an incremental plan needs a recorded watermark
        ph, p = bind(cursor, _low(ctx, plan))
        return Bounds(f"{quote_snowflake(cursor.name)} > {ph}", [p], total, UNKNOWN)
    if cursor is None:
        count = ctx.source.rows(f"SELECT COUNT(*) FROM {ctx.src.sql}")[0][0]
        return Bounds("TRUE", [], int(count), None)
    q = quote_snowflake(cursor.name)
    if plan.strategy == "full":
        count, hi = ctx.source.rows(f"SELECT COUNT(*), MAX({q}) FROM {ctx.src.sql}")[0]
        if hi is None:
            return Bounds("TRUE", [], int(count), None)
        ph, p = bind(cursor, hi)
        return Bounds(f"({q} <= {ph} OR {q} IS NULL)", [p], int(count), hi)
    assert ctx.state is not None
    old = ctx.state.watermark_value
    ph, p = bind(cursor, _low(ctx, plan))
    count, hi = ctx.source.rows(f"SELECT COUNT(*), MAX({q}) FROM {ctx.src.sql} WHERE {q} > {ph}", [p])[0]
    if hi is None:
        return Bounds(None, [], 0, old)
    ph_hi, p_hi = bind(cursor, hi)
    return Bounds(f"{q} > {ph} AND {q} <= {ph_hi}", [p, p_hi], int(count), advance(hi, old))


def _low(ctx: RunContext, plan: Plan) -> Any:
    assert ctx.state is not None
    return lower_bound(
        ctx.state.watermark_value, strategy=plan.strategy, lookback_seconds=ctx.entry.lookback_seconds
    )


def estimate_rows(ctx: RunContext) -> int | None:
    """Snowflake's own row count (metadata, free): only for a progress bar's ETA."""
    try:
        rows = ctx.source.rows(
            f"SELECT row_count FROM {quote_snowflake(ctx.src.database)}.information_schema.tables "
            "WHERE table_schema = ? AND table_name = ?",
            [ctx.src.schema, ctx.src.name],
        )
    except SyncFailed:
        return None
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def extract(
    ctx: RunContext, into: str, columns: Sequence[SourceColumn], bounds: Bounds, keyset: Keyset
) -> None:
    """Read the rows within ``bounds`` into the DuckDB table ``into`` (quoted SQL name): one
    query, or keyset pages of ``ctx.batch_rows`` ordered by ``keyset`` when both are set.
    Counts go to ``ctx.run``."""
    assert bounds.where is not None
    where, params = bounds.where, bounds.params
    select = f"SELECT {', '.join(select_expression(c) for c in columns)} FROM {ctx.src.sql}"
    loader = _Loader(ctx, into, columns, bounds.total)
    n = ctx.batch_rows
    order = list(keyset.columns)
    if not n or not order:
        loader.load(ctx.source.batches(f"{select} WHERE {where}", params))
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
            if keyset.unique:
                cond, extra = after(order, last)
            else:
                ph, p = bind(order[0], last[0])
                cond, extra = f"{qk[0]} {op} {ph}", [p]
            conds.append(cond)
            ps += extra
        sql = f"{select} WHERE {' AND '.join(conds)} ORDER BY {order_by} LIMIT {int(n)}"
        rows, first, final = loader.load(ctx.source.batches(sql, ps), idx)
        if rows < n or final is None:
            break
        if keyset.unique:
            last = final
            continue
        # Paging by a cursor that is not unique: rows sharing the page's last value may
        # continue on the next page. Drop them here and read that value again from the start.
        m = final[0]
        deleted = ctx.cur.execute(
            f"DELETE FROM {into} WHERE {quote_ident(order[0].target_name)} = ?", [m]
        ).fetchall()
        ctx.run.rows_read -= int(deleted[0][0]) if deleted else 0
        if first is not None and first[0] == m:
            ph, p = bind(order[0], m)
            tie = f"{select} WHERE ({where}) AND {qk[0]} = {ph}"
            loader.load(ctx.source.batches(tie, [*params, p]))
            op = ">"
        else:
            op = ">="
        last = [m]
    # Rows whose key is NULL never satisfy a page condition: read them in one go.
    any_null = " OR ".join(f"{k} IS NULL" for k in qk)
    loader.load(ctx.source.batches(f"{select} WHERE ({where}) AND ({any_null})", params))


def after(keys: Sequence[SourceColumn], values: Sequence[Any]) -> tuple[str, list[Any]]:
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


def loaded_max(cur: duckdb.DuckDBPyConnection, into: str, cursor: SourceColumn | None, old: Any) -> Any:
    """The watermark an unpaged run reached: the largest cursor among the rows it loaded
    into ``into`` (quoted SQL name), never below ``old``."""
    if cursor is None:
        return None
    rows = cur.execute(f"SELECT max({quote_ident(cursor.target_name)}) FROM {into}").fetchall()
    return advance(rows[0][0] if rows else None, old)


class _Loader:
    """Moves Arrow tables into a DuckDB table, one at a time, counting as it goes."""

    def __init__(
        self, ctx: RunContext, into: str, columns: Sequence[SourceColumn], total: int | None
    ) -> None:
        casts = ", ".join(f"CAST(c{i} AS {c.duckdb_type})" for i, c in enumerate(columns))
        self.ctx = ctx
        self.sql = f"INSERT INTO {into} SELECT {casts} FROM _quiver_batch"
        self.total = total

    def load(
        self, tables: Iterator[pa.Table], key_idx: list[int] | None = None
    ) -> tuple[int, list[Any] | None, list[Any] | None]:
        """Load every table; return (rows, first key, last key) of this result."""
        ctx, run = self.ctx, self.ctx.run
        rows = 0
        first: list[Any] | None = None
        last: list[Any] | None = None
        for table in tables:
            ctx.check_cancel()
            if table.num_rows == 0:
                continue
            table = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
            if key_idx:
                if first is None:
                    first = [table.column(i)[0].as_py() for i in key_idx]
                last = [table.column(i)[-1].as_py() for i in key_idx]
            ctx.cur.register("_quiver_batch", table)
            try:
                ctx.cur.execute(self.sql)
            finally:
                ctx.cur.unregister("_quiver_batch")
            rows += table.num_rows
            run.rows_read += table.num_rows
            run.bytes += table.nbytes
            del table
            if ctx.progress is not None:
                ctx.progress(run.rows_read, run.bytes, self.total)
        return rows, first, last
