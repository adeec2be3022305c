"""Apply: the rows a run extracted become the replica, in one DuckDB transaction together
with the schema changes, the watermark, the run record and the table's data version.

Two shapes (proto_docs/sync.md, "Strategies"):

- **incremental** (append, merge): the rows were staged in a TEMP table of the run's cursor;
  :func:`apply_incremental` applies the plan's DDL, then inserts (append) or replaces rows by
  key keeping the latest per key (merge), and a reconciling merge deletes the rows whose key
  the source no longer has;
- **full**: :func:`replace_table` drops and recreates the replica inside the run's open
  transaction and the rows are loaded straight into it (no second copy); until COMMIT the
  new table is private to the cursor and readers keep the old one.

Either way :func:`commit` records the state, the history and the source's table and column
comments (catalog/descriptions.py) on the same cursor and commits; any failure before it
rolls everything back (:func:`transaction`), leaving the replica, its comments and the
watermark exactly as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from catalog import TableRef, quote_ident
from catalog.descriptions import own_comments, record_source_comments, restore_comments
from catalog.tables import TableCatalog
from sync.context import RunContext
from sync.state import encode_watermark
from sync.strategy import Plan
from sync.typemap import SourceColumn, columns_json, fingerprint


def replica_columns(cur: duckdb.DuckDBPyConnection, ref: TableRef) -> dict[str, str] | None:
    """The replica's ``{column: DuckDB type}`` in column order, or None if it does not exist."""
    rows = cur.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "AND lower(schema_name) = lower(?) AND lower(table_name) = lower(?) ORDER BY column_index",
        [ref.schema, ref.name],
    ).fetchall()
    return {str(n): str(t) for n, t in rows} if rows else None


def create_temp_table(cur: duckdb.DuckDBPyConnection, name: str, columns: Sequence[SourceColumn]) -> str:
    """A TEMP table of the cursor (invisible to every other connection); its quoted name."""
    quoted = quote_ident(name)
    cur.execute(f"CREATE TEMP TABLE {quoted} ({_column_defs(columns)})")
    return quoted


@contextlib.contextmanager
def transaction(cur: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN; on any failure (cancellation included) ROLLBACK and re-raise. The block ends
    with :func:`commit`."""
    cur.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            cur.execute("ROLLBACK")
        raise


def replace_table(ctx: RunContext) -> str:
    """Inside the open transaction: drop the replica and create it empty with the source's
    columns; its quoted name, to load into. (The schema is created beforehand.) The old
    table's own descriptions (DuckDB comments: an admin's) are put on the new one."""
    target = ctx.ref.sql
    kept = own_comments(ctx.cur, ctx.ref)
    ctx.cur.execute(f"DROP TABLE IF EXISTS {target}")
    ctx.cur.execute(f"CREATE TABLE {target} ({_column_defs(ctx.columns)})")
    restore_comments(ctx.cur, ctx.ref, kept)
    return target


def ensure_schema(ctx: RunContext) -> None:
    ctx.cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(ctx.ref.schema)}")


def apply_incremental(
    ctx: RunContext, plan: Plan, stage: str, keys_table: str | None, watermark: Any
) -> None:
    """The staged rows (``stage``, quoted) into the replica in one transaction: DDL first, then
    append or merge; with ``keys_table`` (quoted: every key the source has), also delete the
    rows whose key is gone."""
    cur, run = ctx.cur, ctx.run
    target = ctx.ref.sql
    cols = ", ".join(quote_ident(c.target_name) for c in ctx.columns)
    keys = ctx.roles.primary_key
    changed = False
    with transaction(cur):
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
                f"DELETE FROM {target} USING (SELECT DISTINCT {key_cols} FROM {stage}) s WHERE {match}"
            )
            cursor = ctx.roles.cursor
            assert cursor is not None  # the configuration requires a cursor for merge
            latest = (
                f"QUALIFY row_number() OVER (PARTITION BY {key_cols} "
                f"ORDER BY {quote_ident(cursor.target_name)} DESC NULLS LAST) = 1"
            )
            run.rows_written = _count(
                cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage} {latest}")
            )
            if keys_table is not None:
                gone = " AND ".join(
                    f"k.{quote_ident(k.target_name)} IS NOT DISTINCT FROM {target}.{quote_ident(k.target_name)}"
                    for k in keys
                )
                run.rows_deleted = _count(
                    cur.execute(
                        f"DELETE FROM {target} WHERE NOT EXISTS (SELECT 1 FROM {keys_table} k WHERE {gone})"
                    )
                )
        else:
            run.rows_written = _count(
                cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage}")
            )
        changed = changed or bool(run.rows_written or run.rows_deleted)
        commit(ctx, watermark, full=plan.reconcile, changed=changed)


def commit(ctx: RunContext, watermark: Any, *, full: bool, changed: bool) -> None:
    """State, history, the source's comments and (if the rows or the schema changed) the data
    version, on the run's cursor inside its transaction; then COMMIT. ``full`` records this
    run as a full pass (a full load or a reconciling merge). Comments alone are no data
    change: they do not bump the data version."""
    run = ctx.run
    run.ended_at = datetime.now(UTC)
    run.outcome = "ok"
    columns = list(ctx.columns)
    ctx.store.record_success(
        ctx.cur,
        run,
        watermark=encode_watermark(watermark),
        fingerprint=fingerprint(columns),
        source_columns=columns_json(columns),
        full=full,
    )
    if ctx.comments is not None and record_source_comments(ctx.cur, ctx.ref, ctx.comments):
        ctx.log.info(
            "sync.comments.changed",
            columns=len(ctx.comments.columns),
            table_comment_read=ctx.comments.table is not None,
        )
    if changed:
        TableCatalog.bump_version(ctx.cur, ctx.ref)
    ctx.cur.execute("COMMIT")


def _column_defs(columns: Sequence[SourceColumn]) -> str:
    return ", ".join(f"{quote_ident(c.target_name)} {c.duckdb_type}" for c in columns)


def _count(result: duckdb.DuckDBPyConnection) -> int:
    rows = result.fetchall()
    return int(rows[0][0]) if rows else 0
