"""The data plane's side of live tables (catalog/live.py, proto_docs/federation.md): plans
whose rows come from Snowflake, and their DoGet streams.

Planning. A guarded query that reads live tables only is bound by DuckDB on the tables'
empty stand-ins (its schema is the one a replica would give), transpiled to Snowflake's
dialect with the row cap pushed down as ``LIMIT cap + 1`` (catalog/live_sql.py), and planned
as one :class:`~flight_server.plans.LivePart`; nothing runs in Snowflake at GetFlightInfo.
A PATH scan is ``SELECT *`` of the source, a sample Snowflake's ``SAMPLE``; both go the same
way. A query that joins live and stored tables is a :class:`~flight_server.plans.MixedPart`:
one pull per live table (the columns the query names, the filters on that table alone;
``[live] max_pulled_rows``), the caller's query rewritten to read the pulled tables, its
schema from a ``LIMIT 0`` probe with empty Arrow tables registered in their place. A profile
is one aggregate query pushed down (count, NULLs, approximate distinct values, min/max,
mean/stddev; no quartiles or top values). Async queries of live tables are refused (not built
yet).

Streaming. DoGet holds the admission slot the server took for it (concurrency), arms the
query timeout — which cancels the Snowflake query, not only the stream — and starts the
query in a session of its own (``[live] max_concurrent`` at once). Batches arrive from
``fetch_arrow_batches``, are cast to the planned schema (column names are DuckDB's, types the
binder's), cut at the cap, which is then reported like any cut (flight_server/truncation.py).
A client that goes away is noticed by flight_server/running.py, which interrupts the call's
deadline: that cancels the Snowflake query as well. The Snowflake query id is logged with
the call (``live_query_id``) and kept in its query-log record, every pull's id for a mixed
query (``remote_query_ids``, catalog/query_log.py); the request's first query sent takes
one ``live_queries_per_day`` of its swarm's budget (catalog/budgets.py), refused before
anything is sent when it is spent. A mixed query pulls its live tables first (each under what is
left of the one timeout), registers them on a cursor of its own and streams the local
query's result. A finished live result is kept for ``[live] cache_ttl_seconds``
(catalog/live.py ``LiveResults``). The query port (``run_query``: ``POST /v1/query``, MCP,
exports) runs both kinds the same way.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import structlog

from catalog import (
    Catalog,
    DeadlineExceeded,
    InvalidArgument,
    Principal,
    QuiverError,
    ResourceExhausted,
    TableRef,
    Unavailable,
)
from catalog.live import LiveColumn, LiveDescription, LiveResults, LiveRun, LiveTables
from catalog.live_sql import split_mixed, transpile
from catalog.query_log import RemoteWork
from catalog.query_port import RunningQuery
from catalog.snowflake_names import quote_snowflake
from catalog.sqlguard import GuardedQuery
from flight_server.admission import Admission, release_all
from flight_server.errors import check_result_type, classify, duckdb_error, flight_error, stream_error
from flight_server.limits import Deadline, Watchdog
from flight_server.middleware import CallState
from flight_server.plans import BATCH_ROWS, LivePart, MixedPart, Plan, ProfilePart, SqlPart, limited
from flight_server.profiles import MAX_VALUE_CHARS, PROFILE_SCHEMA
from flight_server.truncation import RowCap

log = structlog.get_logger("flight_server")


def reads_live(catalog: Catalog, tables: tuple[TableRef, ...]) -> bool:
    return catalog.tables.live is not None and any(catalog.tables.is_live(t) for t in tables)


def require_live(catalog: Catalog) -> LiveTables:
    live = catalog.tables.live
    assert live is not None  # only called for tables it lists
    return live


def check_budget(catalog: Catalog, principal: Principal) -> None:
    """At planning, before a live table's description may be read from Snowflake: refuse a
    caller whose ``live_queries_per_day`` is spent (catalog/budgets.py). The live query is
    counted when it is sent (:class:`~catalog.query_log.RemoteWork`)."""
    try:
        catalog.budgets.check_live(principal)
    except ResourceExhausted:
        catalog.metrics.admission_refusals.labels("budget").inc()
        raise


def remote_of(catalog: Catalog, state: CallState) -> RemoteWork:
    """The call's Snowflake side, kept on its query-log facts (made on first use)."""
    facts = state.query
    if facts is None:
        return catalog.query_log.remote_work(state.principal)
    if facts.remote is None:
        facts.remote = catalog.query_log.remote_work(state.principal)
    return facts.remote


def query_plan(
    catalog: Catalog, guarded: GuardedQuery, part: SqlPart, admission: Admission, principal: Principal
) -> Plan:
    """The plan of a guarded query that reads live tables (see the module docs)."""
    live = require_live(catalog)
    check_budget(catalog, principal)
    if any(not live.is_live(t) for t in guarded.tables):
        return _mixed_plan(catalog, guarded, part, admission, principal)
    described = {t.key(): live.describe(t) for t in guarded.tables}
    schema = live.bind(guarded.sql, part.params, guarded.tables)
    check_result_type(schema)
    _flat_result(schema)
    cap = part.row_cap
    assert cap is not None  # a query always has a cap
    sql = transpile(guarded.sql, described, limit=cap.max_rows + 1)
    live_part = LivePart(sql, part.params, schema, cap, normalized=guarded.normalized)
    return _live_query_plan(guarded, part, live_part, guarded.tables[0])


def _mixed_plan(
    catalog: Catalog, guarded: GuardedQuery, part: SqlPart, admission: Admission, principal: Principal
) -> Plan:
    """A query joining live and stored tables: the pulls of its live tables (columns and own
    filters pushed down), the rest in DuckDB. A live table pulled without a filter whose row
    count (Snowflake's metadata) is above ``[live] max_pulled_rows`` is refused here."""
    live = require_live(catalog)
    most = live.config.max_pulled_rows
    described = {t.key(): live.describe(t) for t in guarded.tables if live.is_live(t)}
    local_sql, pulls = split_mixed(guarded.sql, described, max_rows=most)
    _one_select(local_sql)
    schemas = []
    for pull in pulls:
        desc = described[pull.ref.key()]
        if not pull.filtered and desc.rows > most:
            raise InvalidArgument(
                f"this query would pull all {desc.rows:,} rows of the live table {pull.ref.qualified} "
                f"out of Snowflake, above [live] max_pulled_rows ({most:,}); add a filter on that "
                "table alone (a WHERE condition on its columns, qualified by its alias) or query "
                "the live tables on their own, where all the work is pushed down"
            )
        if pull.view is not None:  # a pushed-down view: its own result schema
            schemas.append(live.bind(pull.view, (), [pull.ref]))
        else:
            schemas.append(pa.schema([desc.schema.field(c) for c in pull.columns]))
    with admission.planning(principal) as (cur, deadline):
        try:
            for pull, schema in zip(pulls, schemas, strict=True):
                cur.register(pull.name, schema.empty_table())
            probe = cur.sql(f"SELECT * FROM (\n{local_sql}\n) LIMIT 0", params=list(part.params) or None)
            schema = probe.to_arrow_table().schema
        except duckdb.Error as e:
            raise duckdb_error(
                e, timed_out=deadline.fired, timeout_seconds=deadline.seconds, wrapped=True
            ) from None
        finally:
            for pull in pulls:
                cur.unregister(pull.name)
    check_result_type(schema)
    cap = part.row_cap
    assert cap is not None
    mixed = MixedPart(local_sql, part.params, schema, cap, tuple(pulls), tuple(schemas))
    return _live_query_plan(guarded, part, mixed, pulls[0].ref)


def _live_query_plan(
    guarded: GuardedQuery, part: SqlPart, one: LivePart | MixedPart, first: TableRef
) -> Plan:
    """The plan of a query with live tables: one endpoint (no split), the query timeout, the
    caller's row cap; its description names the first live table read."""
    return Plan(
        "query",
        one.schema,
        -1,
        (one,),
        guarded.tables,
        f"live:{first.qualified}",
        timeout=True,
        row_cap=part.row_cap,
        sql=guarded.sql,
        params=len(part.params),
    )


def _flat_result(schema: pa.Schema) -> None:
    """A list, struct or map result column (``list(x)``, ``array_agg``, a struct literal)
    comes back from Snowflake as semi-structured JSON text, not the value DuckDB binds it to:
    refused before anything runs, rather than failing on the cast afterwards."""
    for f in schema:
        if pa.types.is_nested(f.type):
            raise InvalidArgument(
                f"this query reads live tables (queried in Snowflake) and its column {f.name[:80]!r} "
                f"is a {f.type}, which Snowflake returns as semi-structured JSON; aggregate or "
                "select scalar values instead (proto_docs/federation.md lists what is pushed down)"
            )


def _one_select(sql: str) -> None:
    """The rewritten local text (sqlglot wrote it from the guarded one) is still one SELECT:
    defence in depth, since the guard checked the caller's text, not this one."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise InvalidArgument(
            f"the query cannot be rewritten for a mixed query: {str(e).splitlines()[0]}"
        ) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise InvalidArgument("the query cannot be rewritten for a mixed query: it is not one SELECT")


def scan_plan(catalog: Catalog, ref: TableRef, max_rows: int, *, parts: bool) -> Plan:
    """A PATH scan of a live table: every column of its source, capped at ``[limits] max_rows``."""
    desc = require_live(catalog).describe(ref)
    cap = RowCap(max_rows, "server_max_rows")
    part = LivePart(
        f"SELECT {_columns(desc, None)} FROM {desc.source.sql} LIMIT {max_rows + 1}", (), desc.schema, cap
    )
    return Plan(
        "scan",
        desc.schema,
        desc.rows,
        (part,) if parts else (),
        (ref,),
        ref.qualified,
        timeout=True,
        row_cap=cap,
    )


def sample_plan(
    catalog: Catalog,
    ref: TableRef,
    *,
    columns: list[str] | None,
    rows: int | None,
    percent: float | None,
    seed: int | None,
    method: str | None,
    cap: int,
) -> Plan:
    """A sample of a live table, pushed down: ``SAMPLE (n ROWS)`` / ``SAMPLE BERNOULLI (p)``
    (with ``SEED`` when given), or the first rows (``LIMIT``)."""
    desc = require_live(catalog).describe(ref)
    schema = desc.schema
    if columns is not None:
        schema = pa.schema([schema.field(n) for n in columns], metadata=schema.metadata)
    select = f"SELECT {_columns(desc, columns)} FROM {desc.source.sql}"
    repeat = f" SEED ({int(seed)})" if seed is not None else ""
    if percent is not None:
        expected = desc.rows * percent / 100 if desc.rows >= 0 else 0
        if expected > cap:
            raise InvalidArgument(
                f"a {percent:g}% sample of {ref.qualified} is about {expected:,.0f} rows, above the "
                f"limit of {cap:,} ([limits] max_sample_rows); use percent <= {100 * cap / desc.rows:.4g} "
                "or rows <= the limit"
            )
        sql = f"{select} SAMPLE BERNOULLI ({percent:.12f}){repeat} LIMIT {cap + 1}"
        row_cap = RowCap(cap, "max_sample_rows")
        total = -1
    else:
        assert rows is not None
        if method == "random":
            sql = f"{select} SAMPLE ({int(rows)} ROWS){repeat}"
        else:
            sql = f"{select} LIMIT {int(rows)}"
        row_cap = RowCap(int(rows), "max_sample_rows")
        total = min(desc.rows, rows) if desc.rows >= 0 else -1
    part = LivePart(sql, (), schema, row_cap)
    return Plan(
        "sample",
        schema,
        total,
        (part,),
        (ref,),
        ref.qualified,
        timeout=True,
        row_cap=row_cap if percent is not None else None,
    )


def _columns(desc: LiveDescription, names: list[str] | None) -> str:
    """The source's columns as Snowflake names them, aliased to Quiver's names."""
    wanted = desc.columns if names is None else [c for n in names for c in desc.columns if c.name == n]
    return ", ".join(f"{quote_snowflake(c.source)} AS {quote_snowflake(c.name)}" for c in wanted)


# --- running -------------------------------------------------------------------------------------
class _Started:
    """A live query started under its deadline; ``cleanups`` release it (in order)."""

    def __init__(self, run: LiveRun, deadline: Deadline) -> None:
        self.run = run
        self.deadline = deadline
        self.cut = False
        self.ended = threading.Event()


def _start(
    live: LiveTables,
    watchdog: Watchdog,
    timeout: float,
    part: LivePart,
    cleanups: list[Callable[[], None]],
    work: RemoteWork,
    state: CallState | None = None,
) -> _Started:
    """Arm the deadline, then start ``part`` in Snowflake. The deadline's interrupt cancels
    the Snowflake query: as a timeout when the watchdog fired it, as a cancel when the stream
    watcher (a client that left) or an admin did. ``work`` takes the request's live query
    from its budget before anything is sent, and gets the query id."""
    work.begin()
    seconds = min(timeout, live.config.query_timeout_seconds)
    run = live.prepare(part.sql, part.params, timeout_seconds=seconds)

    def interrupt() -> None:
        run.cancel(timed_out=deadline.fired)

    deadline = watchdog.arm(seconds, interrupt)
    cleanups.append(lambda: Watchdog.disarm(deadline))
    if state is not None:
        # Before the query starts: a client that leaves while Snowflake runs it is noticed
        # (flight_server/running.py interrupts the call's deadline) and the query cancelled.
        state.deadline = deadline
    cleanups.append(run.close)
    run.start()
    work.ran(run.query_id)
    return _Started(run, deadline)


def _cut_batches(
    started: _Started, part: LivePart, results: LiveResults | None = None, key: tuple[str, str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Snowflake's batches in the planned schema, at most the cap's rows; ``started.cut`` is
    raised just before the cut batch (the last) is passed on. With ``key``, a result read to
    its end (cut or not: the cut is the same on a replay) is stored in ``results``; a failed
    or abandoned one never is."""
    left = part.cap.max_rows
    kept: list[pa.RecordBatch] | None = [] if key is not None else None
    try:
        for table in started.run.batches():
            for batch in _conform(table, part.schema).to_batches():
                if batch.num_rows > left:
                    started.cut = True
                    batch = batch.slice(0, left)
                    if kept is not None:
                        kept.append(batch)
                    yield batch
                    break
                left -= batch.num_rows
                if kept is not None:
                    kept.append(batch)
                yield batch
            if started.cut:
                break
        if results is not None and key is not None and kept is not None:
            results.put(key, _Kept(kept, part.schema, started.cut).table())
    finally:
        started.ended.set()
        started.run.close()


def _cache_key(part: LivePart, volatile: Callable[[str], bool]) -> tuple[str, str] | None:
    if part.normalized is None or volatile(part.normalized):
        return None
    return LiveResults.key(part.sql, part.params)


def open_stream(
    catalog: Catalog,
    watchdog: Watchdog,
    timeout: float,
    part: LivePart,
    state: CallState,
    volatile: Callable[[str], bool],
) -> flight.FlightDataStream:
    """DoGet of a live part (see the module docs), with the DoGet's admission slot held;
    everything is released by the call's cleanups."""
    live = require_live(catalog)
    key = _cache_key(part, volatile)
    hit = live.results.get(key) if key is not None else None
    if hit is not None:
        state.fields["cache"] = "live-hit"
        return flight.GeneratorStream(part.schema, _tagged_cached(hit, part, state))
    try:
        started = _start(live, watchdog, timeout, part, state.cleanups, remote_of(catalog, state), state)
    except QuiverError as e:
        raise flight_error(e) from None
    if started.run.query_id:
        state.fields["live_query_id"] = started.run.query_id
    return flight.GeneratorStream(part.schema, _tagged(started, part, state, live.results, key))


def _tagged(
    started: _Started, part: LivePart, state: CallState, results: LiveResults, key: tuple[str, str] | None
) -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
    facts = state.query
    try:
        for batch in _cut_batches(started, part, results, key):
            if facts is not None:
                facts.sent(batch.num_rows, batch.nbytes)
            if started.cut:
                state.fields["truncated"] = True
                yield batch, part.cap.stream_metadata()
            else:
                yield batch
    except QuiverError as e:
        raise flight_error(e) from None


def _run_mixed(
    catalog: Catalog,
    watchdog: Watchdog,
    timeout: float,
    part: MixedPart,
    cleanups: list[Callable[[], None]],
    work: RemoteWork,
    state: CallState | None = None,
) -> tuple[pa.RecordBatchReader, Deadline]:
    """Pull each live table of a mixed query (all within the one query timeout), then start
    the local query on a cursor of its own with the pulled tables registered (read one row
    past the cap). Raises QuiverErrors; ``cleanups`` release what it took."""
    live = require_live(catalog)
    ends = time.monotonic() + timeout
    pulled: list[pa.Table] = []
    most = live.config.max_pulled_rows
    for pull, schema in zip(part.pulls, part.pull_schemas, strict=True):
        left = ends - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"the query ran longer than {timeout:g} s ([limits] query_timeout_seconds)"
            )
        one = LivePart(pull.sql, (), schema, RowCap(most, "server_max_rows"))
        started = _start(live, watchdog, left, one, cleanups, work, state)
        batches = list(_cut_batches(started, one))
        if started.cut:
            raise InvalidArgument(
                f"the live table {pull.ref.qualified} has more than {most:,} rows matching this "
                "query's filters on it, above [live] max_pulled_rows; narrow the filter on that table"
            )
        pulled.append(pa.Table.from_batches(batches, schema=schema))
    if state is not None:
        state.fields["live_pulled_rows"] = sum(t.num_rows for t in pulled)
    stack = contextlib.ExitStack()
    cleanups.append(stack.close)
    cur = stack.enter_context(catalog.db.reading())
    deadline = watchdog.arm(max(0.001, ends - time.monotonic()), cur.interrupt)
    if state is not None:
        state.deadline = deadline
    cleanups.append(lambda: Watchdog.disarm(deadline))
    for pull, table in zip(part.pulls, pulled, strict=True):
        cur.register(pull.name, table)
    try:
        sql = limited(part.sql, part.cap.max_rows + 1)
        return cur.sql(sql, params=list(part.params) or None).to_arrow_reader(BATCH_ROWS), deadline
    except duckdb.Error as e:
        raise duckdb_error(e, timed_out=deadline.fired, timeout_seconds=timeout, wrapped=True) from None


def open_mixed(
    catalog: Catalog, watchdog: Watchdog, timeout: float, part: MixedPart, state: CallState
) -> flight.FlightDataStream:
    """DoGet of a mixed query (:func:`_run_mixed`), cut at the cap."""
    try:
        reader, deadline = _run_mixed(
            catalog, watchdog, timeout, part, state.cleanups, remote_of(catalog, state), state
        )
    except QuiverError as e:
        raise flight_error(e) from None
    return flight.GeneratorStream(part.schema, _local_batches(reader, part, state, deadline, timeout))


def _mixed_running(
    catalog: Catalog,
    watchdog: Watchdog,
    timeout: float,
    part: MixedPart,
    held: list[Callable[[], None]],
    work: RemoteWork,
) -> tuple[pa.RecordBatchReader, Callable[[], bool | None]]:
    """A mixed query for the query port: its reader (cut at the cap, errors as QuiverErrors)
    and whether it was cut."""
    reader, deadline = _run_mixed(catalog, watchdog, timeout, part, held, work)
    flag = {"cut": False, "ended": False}

    def batches() -> Iterator[pa.RecordBatch]:
        left = part.cap.max_rows
        try:
            for batch in reader:
                if batch.num_rows > left:
                    flag["cut"] = True
                    yield batch.slice(0, left)
                    return
                left -= batch.num_rows
                yield batch
        except Exception as e:
            err = classify(e, timed_out=deadline.fired, timeout_seconds=timeout, wrapped=True)
            if err is None:
                raise
            raise err from None
        finally:
            flag["ended"] = True

    def cut() -> bool | None:
        return True if flag["cut"] else (False if flag["ended"] else None)

    return pa.RecordBatchReader.from_batches(part.schema, batches()), cut


def read_part(
    catalog: Catalog, watchdog: Watchdog, timeout: float, part: LivePart, work: RemoteWork
) -> pa.Table:
    """A live sample read whole, for the query port's ``read`` (MCP's sample tool): the
    caller holds the admission slot; the result is bounded by the sample's own cap."""
    held: list[Callable[[], None]] = []
    close = release_all(held, "live.release_failed")
    try:
        started = _start(require_live(catalog), watchdog, timeout, part, held, work)
        return pa.Table.from_batches(list(_cut_batches(started, part)), schema=part.schema)
    finally:
        close()


# --- profiles --------------------------------------------------------------------------------------
_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "DECIMAL", "DOUBLE")
_TEMPORAL_TYPES = ("DATE", "TIME", "TIMESTAMP")


def _profile_aggregates(i: int, col: LiveColumn) -> list[str]:
    """Snowflake aggregates of one column for its profile row (``c<i>_<stat>``): count and
    approximate distinct values for every type but JSON and binary (count only), min/max as
    text for numbers, times and text, mean/stddev for numbers."""
    c = quote_snowflake(col.source)
    out = [f"COUNT({c}) AS c{i}_n"]
    t = col.duckdb_type.upper()
    if t in ("JSON", "BLOB"):
        return out
    out.append(f"APPROX_COUNT_DISTINCT({c}) AS c{i}_d")
    if t.startswith(_NUMERIC_TYPES + _TEMPORAL_TYPES) or t == "VARCHAR":
        out += [
            f"LEFT(TO_VARCHAR(MIN({c})), {MAX_VALUE_CHARS}) AS c{i}_min",
            f"LEFT(TO_VARCHAR(MAX({c})), {MAX_VALUE_CHARS}) AS c{i}_max",
        ]
    if t.startswith(_NUMERIC_TYPES):
        out += [f"CAST(AVG({c}) AS DOUBLE) AS c{i}_mean", f"CAST(STDDEV_SAMP({c}) AS DOUBLE) AS c{i}_sd"]
    return out


def profile(
    catalog: Catalog, watchdog: Watchdog, timeout: float, part: ProfilePart, work: RemoteWork
) -> pa.Table:
    """A live table's profile (PROFILE_SCHEMA): one aggregate query pushed down to Snowflake,
    one row per column; quartiles and top values are not computed for live tables (NULL).
    Kept for ``[live] cache_ttl_seconds`` like a live result; ``cached_only`` answers what is
    kept, or nothing."""
    live = require_live(catalog)
    desc = live.describe(part.ref)
    cols = [c for c in desc.columns if part.columns is None or c.name in part.columns]
    select = ["COUNT(*) AS qv_rows"] + [a for i, c in enumerate(cols) for a in _profile_aggregates(i, c)]
    sql = f"SELECT {', '.join(select)} FROM {desc.source.sql}"
    key = LiveResults.key(sql, ["profile"])
    hit = live.results.get(key)
    if hit is not None or part.cached_only:
        return hit if hit is not None else PROFILE_SCHEMA.empty_table()
    held: list[Callable[[], None]] = []
    close = release_all(held, "live.release_failed")
    try:
        one = LivePart(sql, (), pa.schema([]), RowCap(1, "server_max_rows"))
        started = _start(live, watchdog, timeout, one, held, work)
        row = _single_row(started.run)
    finally:
        close()
    rows = int(row["QV_ROWS"])
    records = []
    for i, col in enumerate(cols):
        n = row.get(f"C{i}_N")
        count = int(n) if n is not None else 0
        nulls = rows - count
        distinct = row.get(f"C{i}_D")
        records.append(
            {
                "name": col.name,
                "type": col.duckdb_type,
                "count": rows,
                "nulls": nulls,
                "null_fraction": nulls / rows if rows else None,
                "approx_distinct": min(int(distinct), count) if distinct is not None else None,
                "min": row.get(f"C{i}_MIN"),
                "max": row.get(f"C{i}_MAX"),
                "mean": _float(row.get(f"C{i}_MEAN")),
                "stddev": _float(row.get(f"C{i}_SD")),
                "q25": None,
                "q50": None,
                "q75": None,
                "top_values": None,
            }
        )
    metadata = dict(PROFILE_SCHEMA.metadata or {})
    metadata[b"quiver.quartiles"] = b"not computed for live tables"
    table = pa.Table.from_pylist(records, schema=PROFILE_SCHEMA).replace_schema_metadata(metadata)
    live.results.put(key, table)
    return table


def _single_row(run: LiveRun) -> dict[str, Any]:
    """The one row of an aggregate, by Snowflake's (upper-case) column names."""
    tables = list(run.batches())
    if not tables or sum(t.num_rows for t in tables) != 1:
        raise Unavailable("Snowflake answered a profile's aggregate without its one row; retry")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return {name.upper(): value for name, value in table.to_pylist()[0].items()}


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _mixed_query(
    catalog: Catalog,
    admission: Admission,
    watchdog: Watchdog,
    principal: Principal,
    plan: Plan,
    part: MixedPart,
    timeout: float,
) -> RunningQuery:
    held: list[Callable[[], None]] = [admission.acquire(principal, "live-" + secrets.token_hex(6))]
    close = release_all(held, "live.release_failed")
    work = catalog.query_log.remote_work(principal)
    try:
        reader, cut = _mixed_running(catalog, watchdog, timeout, part, held, work)
    except BaseException:
        close()
        raise
    return _running(plan, part, reader, cut=cut, release=close, remote=work)


def _running(
    plan: Plan,
    part: LivePart | MixedPart,
    reader: pa.RecordBatchReader,
    *,
    truncated: bool | None = None,
    cut: Callable[[], bool | None] | None = None,
    release: Callable[[], None] | None = None,
    remote: RemoteWork | None = None,
) -> RunningQuery:
    """The query port's handle on a live query's rows (a cached result: ``truncated`` known;
    a running one: ``cut`` asked at the end, ``release`` gives its slot back)."""
    return RunningQuery(
        reader=reader,
        max_rows=part.cap.max_rows,
        reason=part.cap.reason,
        tables=plan.tables,
        versions={},
        sql=plan.sql or part.sql,
        params=part.params,
        truncated=truncated,
        _cut=cut,
        _release=release,
        remote=remote,
    )


def _local_batches(
    reader: pa.RecordBatchReader, part: MixedPart, state: CallState, deadline: Deadline, timeout: float
) -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
    left = part.cap.max_rows
    facts = state.query
    try:
        for batch in reader:
            if batch.num_rows > left:
                state.fields["truncated"] = True
                cut = batch.slice(0, left)
                if facts is not None:
                    facts.sent(cut.num_rows, cut.nbytes)
                yield cut, part.cap.stream_metadata()
                return
            left -= batch.num_rows
            if facts is not None:
                facts.sent(batch.num_rows, batch.nbytes)
            yield batch
    except Exception as e:  # noqa: BLE001 - every failure becomes a FlightError
        raise stream_error(
            e, state.request_id, timed_out=deadline.fired, timeout_seconds=timeout, wrapped=True
        ) from None


class _Kept:
    """A finished live result for the cache; a cut one is marked in its schema metadata, so
    a replay reports the same cut."""

    def __init__(self, batches: list[pa.RecordBatch], schema: pa.Schema, cut: bool) -> None:
        self.batches, self.schema, self.cut = batches, schema, cut

    def table(self) -> pa.Table:
        table = pa.Table.from_batches(self.batches, schema=self.schema)
        return table.replace_schema_metadata(
            {**(self.schema.metadata or {}), _CUT_KEY: b"1" if self.cut else b"0"}
        )


_CUT_KEY = b"quiver.live.cut"


def _tagged_cached(
    table: pa.Table, part: LivePart, state: CallState
) -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
    cut = (table.schema.metadata or {}).get(_CUT_KEY) == b"1"
    table = table.replace_schema_metadata(part.schema.metadata)
    batches = table.to_batches() or [pa.RecordBatch.from_pylist([], schema=part.schema)]
    facts = state.query
    for i, batch in enumerate(batches):
        if facts is not None:
            facts.sent(batch.num_rows, batch.nbytes)
        if cut and i == len(batches) - 1:
            state.fields["truncated"] = True
            yield batch, part.cap.stream_metadata()
        else:
            yield batch


def run_query(
    catalog: Catalog,
    admission: Admission,
    watchdog: Watchdog,
    principal: Principal,
    plan: Plan,
    timeout: float,
    volatile: Callable[[str], bool],
) -> RunningQuery:
    """A live query for a caller outside Flight (``POST /v1/query``, MCP, exports): one
    admission slot, the deadline, the Snowflake query started before this returns (so its
    refusals come before any byte is sent); released by :meth:`RunningQuery.close`."""
    (part,) = plan.parts
    if isinstance(part, MixedPart):
        return _mixed_query(catalog, admission, watchdog, principal, plan, part, timeout)
    assert isinstance(part, LivePart)
    live = require_live(catalog)
    key = _cache_key(part, volatile)
    hit = live.results.get(key) if key is not None else None
    if hit is not None:
        was_cut = (hit.schema.metadata or {}).get(_CUT_KEY) == b"1"
        table = hit.replace_schema_metadata(part.schema.metadata)
        reader = pa.RecordBatchReader.from_batches(part.schema, table.to_batches())
        return _running(plan, part, reader, truncated=was_cut)
    held: list[Callable[[], None]] = [admission.acquire(principal, "live-" + secrets.token_hex(6))]
    close = release_all(held, "live.release_failed")
    work = catalog.query_log.remote_work(principal)
    try:
        started = _start(live, watchdog, timeout, part, held, work)
    except BaseException:
        close()
        raise
    reader = pa.RecordBatchReader.from_batches(part.schema, _cut_batches(started, part, live.results, key))

    def cut() -> bool | None:
        return True if started.cut else (False if started.ended.is_set() else None)

    return _running(plan, part, reader, cut=cut, release=close, remote=work)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Snowflake's answer in the planned schema: columns by position (Snowflake upper-cases
    unquoted output names), cast to the binder's types (a NUMBER count to BIGINT, …)."""
    if table.num_columns != len(schema):
        raise Unavailable(
            f"Snowflake answered {table.num_columns} columns where {len(schema)} were planned: a "
            "live table's source changed; retry (its schema is read again)"
        )
    table = table.rename_columns(schema.names)
    try:
        return table.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise Unavailable(
            f"Snowflake's answer does not fit the planned schema ({str(e).splitlines()[0][:200]}): a live "
            "table's source changed type; retry once its schema is read again"
        ) from None
