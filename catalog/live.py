"""Live tables: Snowflake tables that are queried where they are, never copied
(``[[live.tables]]``, proto_docs/federation.md).

A live table is a data table like a replicated one: :class:`~catalog.tables.TableCatalog` lists
it, so allowlists, the SQL guard and the listings treat it the same way. What differs is where
its rows come from:

* **Schema and row count** come from Snowflake's ``information_schema`` (columns typed with the
  sync worker's map, catalog/snowflake_types.py, so a live table and its replica have the same
  schema; the row count is Snowflake's own metadata, no scan), cached for
  ``[live] schema_ttl_seconds``. A failed read is never cached.
* **Binding.** A private in-memory DuckDB holds an *empty* table per live table, with those
  columns. A live query is bound there (``LIMIT 0``), so it is checked with DuckDB's own
  semantics and its result schema is the one the same SQL would have on a replica.
* **Transpiling** (:func:`transpile`): the guarded DuckDB SQL is parsed by sqlglot, every
  reference to a live table is replaced by its Snowflake source, column names by their
  stored spelling, the row cap is pushed down as ``LIMIT``, and the tree is written as
  Snowflake SQL with ``unsupported_level=RAISE``: a construct sqlglot cannot express is
  INVALID_ARGUMENT naming it, never a silently different query. Functions sqlglot does not
  know (it would pass them through unchanged) are refused too. Parameters stay ``?``
  placeholders, bound by the connector.
* **Running** (:class:`LiveRun`): one connector session per query, the connector's own
  timeout (which cancels the Snowflake query by its request id), :meth:`LiveRun.cancel` for
  Quiver's watchdog and clients that went away, results read with ``fetch_arrow_batches``.

It lives in ``catalog`` because the data plane runs the queries and may not import ``sync``;
both use catalog/snowflake_client.py to connect.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import structlog

from catalog.config import Config, LiveConfig, SnowflakeConfig
from catalog.database import CursorPool, quote_ident
from catalog.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from catalog.snowflake_client import AUTH_ERRNOS, SecretUnreadable, connect_args, scrub
from catalog.snowflake_names import SnowflakeTable, quote_snowflake, split_snowflake_name
from catalog.snowflake_types import SourceColumn
from catalog.tables import TableRef

log = structlog.get_logger("live")

#: Snowflake's "object does not exist or not authorized" (a dropped or renamed source).
MISSING_OBJECT_ERRNOS = {2003, 2043}
#: Snowflake's "SQL execution canceled" (its answer to an abort request).
CANCELLED_ERRNO = 604


#: A live table's Snowflake source by its stored identifiers (one class with the sync worker's).
LiveSource = SnowflakeTable


@dataclass(frozen=True, slots=True)
class LiveColumn:
    name: str  # Quiver's (the replica's) name: lower case unless created quoted
    source: str  # as stored in Snowflake
    duckdb_type: str


@dataclass(frozen=True, slots=True)
class LiveDescription:
    ref: TableRef
    source: LiveSource
    columns: tuple[LiveColumn, ...]
    schema: pa.Schema
    rows: int


def parse_live_source(text: str, sf: SnowflakeConfig) -> LiveSource:
    parts = split_snowflake_name(text)
    defaults = [split_snowflake_name(sf.database or "")[0], split_snowflake_name(sf.schema or "")[0]]
    full = [*defaults[: 3 - len(parts)], *parts]
    return LiveSource(full[0], full[1], full[2])


class LiveTables:
    """The configured live tables, their cached descriptions, the binder and the sessions."""

    def __init__(self, config: Config, *, connector: Callable[..., Any] | None = None) -> None:
        self._sf = config.snowflake
        self.config: LiveConfig = config.live
        self._entries: dict[tuple[str, str], tuple[TableRef, LiveSource]] = {}
        for entry in config.live.tables:
            schema, _, name = entry.target.partition(".")
            ref = TableRef(schema.strip(), name.strip())
            self._entries[ref.key()] = (ref, parse_live_source(entry.source, self._sf))
        self._connector = connector
        self._lock = threading.Lock()
        self._described: dict[tuple[str, str], tuple[float, LiveDescription]] = {}
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        #: Metadata reads sent to Snowflake (for tests).
        self.metadata_reads = 0
        self._binder = duckdb.connect(":memory:")
        self._binder.execute("SET enable_external_access = false")
        self._bound: dict[tuple[str, str], tuple[LiveColumn, ...]] = {}
        self._cursors = CursorPool(self._binder)
        self._sessions = threading.BoundedSemaphore(config.live.max_concurrent)
        self.results = LiveResults(
            config.live.cache_ttl_seconds, config.cache.max_memory_bytes, config.cache.max_entry_bytes
        )

    # --- the catalog ----------------------------------------------------------------------------
    def refs(self) -> list[TableRef]:
        return [ref for ref, _ in self._entries.values()]

    def is_live(self, ref: TableRef) -> bool:
        return ref.key() in self._entries

    def cached(self, ref: TableRef) -> LiveDescription | None:
        """The description last read, however old (no Snowflake call): for listings."""
        hit = self._described.get(ref.key())
        return hit[1] if hit is not None else None

    #: After a failed read, a table's description is not asked of Snowflake again for this
    #: long: the same refusal is given at once. An unreachable Snowflake costs the connector's
    #: login timeout per attempt; without this every listing would wait that long per table.
    FAILURE_SECONDS = 10.0

    def describe(self, ref: TableRef) -> LiveDescription:
        """Columns and row count from Snowflake, cached for ``schema_ttl_seconds``; one reader
        per table at a time (the others wait for its answer). UNAVAILABLE when Snowflake
        cannot answer or the source is gone: the description is not kept, the refusal is
        repeated for :attr:`FAILURE_SECONDS` without asking again."""
        key = ref.key()
        hit = self._described.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            hit = self._described.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            failed = self._failed.get(key)
            if failed is not None and failed[0] > time.monotonic():
                raise Unavailable(failed[1])
            try:
                described = self._read_description(ref)
            except Unavailable as e:
                self._failed[key] = (time.monotonic() + self.FAILURE_SECONDS, e.detail)
                raise
            self._failed.pop(key, None)
            self._described[key] = (time.monotonic() + self.config.schema_ttl_seconds, described)
            return described

    def _read_description(self, ref: TableRef) -> LiveDescription:
        entry = self._entries.get(ref.key())
        if entry is None:
            raise Unavailable(f"{ref.qualified} is not a live table")
        ref, src = entry
        self.metadata_reads += 1
        with self.session() as session:
            rows = session.rows(
                f"SELECT column_name, data_type, numeric_precision, numeric_scale "
                f"FROM {quote_snowflake(src.database)}.information_schema.columns "
                "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                [src.schema, src.name],
            )
            counted = session.rows(
                f"SELECT row_count FROM {quote_snowflake(src.database)}.information_schema.tables "
                "WHERE table_schema = ? AND table_name = ?",
                [src.schema, src.name],
            )
        if not rows:
            raise Unavailable(
                f"the live table {ref.qualified} cannot be read: its Snowflake source {src.label} "
                "does not exist (dropped or renamed?) or the [snowflake] role may not see it; "
                "an admin must fix [[live.tables]]"
            )
        columns = []
        for name, dtype, p, s in rows:
            col = SourceColumn(
                str(name), str(dtype), int(p) if p is not None else None, int(s) if s is not None else None
            )
            columns.append(LiveColumn(col.target_name, col.name, col.duckdb_type))
        schema = self._bind_table(ref, tuple(columns))
        count = int(counted[0][0]) if counted and counted[0][0] is not None else -1
        return LiveDescription(ref, src, tuple(columns), schema, count)

    # --- the binder -----------------------------------------------------------------------------
    def _bind_table(self, ref: TableRef, columns: tuple[LiveColumn, ...]) -> pa.Schema:
        """(Re)create the empty stand-in of ``ref`` in the binder; its Arrow schema."""
        with self._lock:
            if self._bound.get(ref.key()) != columns:
                cols = ", ".join(f"{quote_ident(c.name)} {c.duckdb_type}" for c in columns)
                self._binder.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(ref.schema)}")
                self._binder.execute(f"CREATE OR REPLACE TABLE {ref.sql} ({cols})")
                self._bound[ref.key()] = columns
            return self._binder.cursor().sql(f"SELECT * FROM {ref.sql} LIMIT 0").to_arrow_table().schema

    @contextlib.contextmanager
    def binder(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of the binder, where every described live table has an empty stand-in of
        its name (rule validation binds a row filter there: catalog/rules.py)."""
        cur = self._binder.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def bind(self, sql: str, params: Sequence[Any], refs: Sequence[TableRef]) -> pa.Schema:
        """The result schema of the guarded ``sql`` over live tables ``refs``, from DuckDB's
        binder on their empty stand-ins (nothing runs in Snowflake). A binder error is the
        caller's (INVALID_ARGUMENT, with DuckDB's words)."""
        for ref in refs:
            self.describe(ref)
        with self._cursors.use() as cur:
            try:
                rel = cur.sql(f"SELECT * FROM (\n{sql}\n) LIMIT 0", params=list(params) or None)
                return rel.to_arrow_table().schema
            except duckdb.Error as e:
                raise InvalidArgument(f"the query does not bind: {str(e).splitlines()[0]}") from None

    # --- sessions -------------------------------------------------------------------------------
    def session(self) -> LiveSession:
        return LiveSession(self._sf, self._connector, self._sessions, self.config.query_timeout_seconds)

    def prepare(self, sql: str, params: Sequence[Any], *, timeout_seconds: float) -> LiveRun:
        """A run of ``sql`` (Snowflake dialect, ``?`` placeholders) in a session of its own, not
        yet started: the caller arms its deadline on :meth:`LiveRun.cancel` first, so a cancel
        that comes while Snowflake runs the query reaches it."""
        timeout = min(timeout_seconds, self.config.query_timeout_seconds)
        return LiveRun(self.session(), sql, list(params), timeout)

    def close(self) -> None:
        self._binder.close()


class LiveResults:
    """Results of live queries kept for ``[live] cache_ttl_seconds`` (0: none), in memory,
    within ``max_bytes`` (least recently stored dropped first). Keyed by the Snowflake text
    (which holds the row cap) and the parameters: the guard and the allowlist have already
    decided before a lookup. A result is stored only when its stream was read to its end
    without an error — never from a failed, cancelled or cut-short run. Snowflake's data has
    no data version Quiver could key on: the TTL is the freshness bound."""

    def __init__(self, ttl_seconds: float, max_bytes: int, max_entry_bytes: int) -> None:
        self.ttl = ttl_seconds
        self._max_bytes = max_bytes
        self._max_entry = min(max_entry_bytes, max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[float, pa.Table]] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    @staticmethod
    def key(sql: str, params: Sequence[Any]) -> tuple[str, str]:
        return (sql, repr([(type(p).__name__, p) for p in params]))

    def get(self, key: tuple[str, str]) -> pa.Table | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                self._drop(key)
                return None
            self.hits += 1
            return hit[1]

    def put(self, key: tuple[str, str], table: pa.Table) -> None:
        if self.ttl <= 0 or table.nbytes > self._max_entry:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (time.monotonic() + self.ttl, table)
            self._bytes += table.nbytes
            while self._bytes > self._max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, str]) -> None:
        _, table = self._entries.pop(key)
        self._bytes -= table.nbytes


class LiveSession:
    """One Snowflake connection, counted against ``[live] max_concurrent``; errors become
    Quiver's (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) with secrets scrubbed."""

    def __init__(
        self,
        sf: SnowflakeConfig,
        connector: Callable[..., Any] | None,
        slots: threading.BoundedSemaphore,
        timeout: float,
    ) -> None:
        self._sf = sf
        self._connector = connector
        self._slots = slots
        self._secrets: list[str] = []
        self.con: Any = None
        self._held = False
        self.timeout = timeout
        self.cancelled = False
        self.timed_out = False

    def __enter__(self) -> LiveSession:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def open(self) -> None:
        if not self._slots.acquire(timeout=self.timeout):
            raise Unavailable(
                "every Snowflake session for live tables is busy ([live] max_concurrent); retry shortly"
            )
        self._held = True
        try:
            args, self._secrets = connect_args(self._sf)
        except SecretUnreadable as e:
            self.close()
            raise Unavailable(f"cannot connect to Snowflake: {e}") from None
        connect = self._connector
        if connect is None:
            import snowflake.connector

            connect = snowflake.connector.connect
        try:
            self.con = connect(**args)
        except Exception as e:  # noqa: BLE001 - every connector failure is one sentence
            self.close()
            raise self.error("cannot connect to Snowflake", e) from None

    def close(self) -> None:
        con, self.con = self.con, None
        if con is not None:
            try:
                con.close()
            except Exception as e:  # noqa: BLE001 - a dead session must not mask the real error
                log.debug("live.close_failed", error=self.scrub(str(e)))
        if self._held:
            self._held = False
            self._slots.release()

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def error(self, what: str, exc: BaseException) -> Exception:
        """The Quiver error for a connector failure (its text bounded and scrubbed)."""
        errno = getattr(exc, "errno", None)
        detail = self.scrub(
            str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
            if str(exc).strip()
            else type(exc).__name__
        )
        if self.timed_out:
            return DeadlineExceeded(
                f"the live query ran longer than {self.timeout:g} s and was cancelled in Snowflake "
                "([live] query_timeout_seconds, [limits] query_timeout_seconds)"
            )
        if self.cancelled:
            return Cancelled("the live query was cancelled (in Snowflake too)")
        if (
            errno == CANCELLED_ERRNO
            or "execution canceled" in detail.lower()
            or "cancelled by the client" in detail.lower()
        ):
            self.timed_out = True
            return self.error(what, exc)
        if errno in AUTH_ERRNOS or "incorrect username or password" in detail.lower():
            return Unavailable(
                f"{what}: Snowflake refused Quiver's credentials ({detail}); an admin must fix [snowflake]"
            )
        if errno in MISSING_OBJECT_ERRNOS:
            return Unavailable(
                f"{what}: a live table's Snowflake source is gone or not visible to Quiver's role ({detail})"
            )
        if _refused_query(exc):
            # The query's own fault (a value that does not convert, a type Snowflake will not
            # compare): retrying cannot help, rewriting it can.
            return InvalidArgument(f"Snowflake refused the query: {detail}")
        return Unavailable(f"{what}: {detail}")

    def rows(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        try:
            return list(self.con.cursor().execute(sql, params, timeout=max(1, int(self.timeout))).fetchall())
        except Exception as e:  # noqa: BLE001
            raise self.error("reading a live table's metadata from Snowflake failed", e) from None


def _refused_query(exc: BaseException) -> bool:
    """A Snowflake answer that rejects the query itself: SQLSTATE class 22 (data exception)
    or 42 (syntax or access rule), as opposed to the network, the session or the service."""
    from snowflake.connector.errors import ProgrammingError

    state = str(getattr(exc, "sqlstate", "") or "")
    return isinstance(exc, ProgrammingError) and state[:2] in ("22", "42")


class LiveRun:
    """One live query: started in its own session, its Arrow batches read as they come,
    cancelled by :meth:`cancel` (the watchdog, a client that went away) or by the connector's
    timeout — both ask Snowflake to abort it, so no warehouse work is left running."""

    def __init__(self, session: LiveSession, sql: str, params: list[Any], timeout: float) -> None:
        self.session = session
        session.timeout = timeout
        self.sql = sql
        self.params = params
        self.timeout = timeout
        self._cur: Any = None
        self.query_id: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        self.session.open()
        try:
            with self._lock:
                if self.session.cancelled or self.session.timed_out:
                    raise RuntimeError("cancelled before it started")
                self._cur = self.session.con.cursor()
            # The connector's timeout: past it, it sends Snowflake an abort request for this
            # query's request id itself (SnowflakeCursor._execute_helper's "timebomb").
            self._cur.execute(self.sql, self.params or None, timeout=max(1, int(self.timeout + 0.999)))
            self.query_id = self._cur.sfqid
        except Exception as e:  # noqa: BLE001
            err = self.session.error("the live query failed in Snowflake", e)
            self.close()
            raise err from None
        log.info("live.query", query_id=self.query_id)

    def batches(self) -> Iterator[pa.Table]:
        try:
            yield from self._cur.fetch_arrow_batches(force_microsecond_precision=True)
        except Exception as e:  # noqa: BLE001
            raise self.session.error("reading the live query's result from Snowflake failed", e) from None

    def cancel(self, *, timed_out: bool = False) -> None:
        """Abort the query in Snowflake (by query id once known, else by request id) and
        close the session. Safe from any thread, more than once."""
        with self._lock:
            if self._closed or self.session.cancelled or self.session.timed_out:
                return  # once: the stream watcher interrupts a cancelled call on every poll
            if timed_out:
                self.session.timed_out = True
            else:
                self.session.cancelled = True
            cur, con = self._cur, self.session.con
        if cur is not None and con is not None:
            try:
                if self.query_id:
                    con.cursor().execute("SELECT SYSTEM$CANCEL_QUERY(?)", [self.query_id])
                else:
                    # Still executing: the connector's own way to abort a running request.
                    con._cancel_query(self.sql, cur._request_id)
            except Exception as e:  # noqa: BLE001 - the session is closed below anyway
                log.info("live.cancel_failed", query_id=self.query_id, error=self.session.scrub(str(e))[:200])
        log.info("live.cancelled", query_id=self.query_id, timed_out=timed_out)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.session.close()
