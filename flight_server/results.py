"""Async queries: submit now, poll, fetch the result later.

An agent with a long query should not hold a stream open for minutes, nor lose the work
when its connection drops. ``submit-query`` checks the query (the guard runs at once, so a
refusal is immediate and nothing is queued), answers a query id, and a worker thread runs it
into an Arrow IPC stream file under ``DATA_DIR/results/``, written batch by batch as DuckDB
produces them (never the whole result in memory). ``query-status`` reports the state;
``cancel-query`` interrupts DuckDB; the finished result is fetched with GetFlightInfo/DoGet on
``{"kind": "result", "id": ...}`` as a memory-mapped, zero-copy stream of the file.

Rules:

- A query id belongs to the principal (token subject) that submitted it; for anyone else it
  does not exist (NOT_FOUND, the same answer as an unknown id: existence never leaks).
- Each principal may have ``[results] max_active_per_principal`` queries queued or running
  (beyond: RESOURCE_EXHAUSTED); ``[results] workers`` run at once, the rest wait "queued".
- A running query is interrupted after ``[results] timeout_seconds`` (DEADLINE_EXCEEDED) and
  a result larger than ``[results] max_result_bytes`` fails (RESOURCE_EXHAUSTED), as does one
  that would take the results kept on disk beyond ``[results] max_total_bytes``.
- Status and result stay ``[results] ttl_seconds`` after the query finished; a sweeper
  deletes them then. Results live in memory and on local disk only: a restart forgets them.

Interface for the Flight server (flight_server/server.py decodes the action bodies into
typed Structs, flight_server/commands.py; the planner prepares a query, ``Planner.prepare``)::

    queries = QueryManager.for_catalog(catalog)
    ACTION_DESCRIPTIONS                                     # name -> description (ListActions)
    queries.submit(principal, prepared) -> QueryStatus      # submit-query (PreparedQuery), async export (PreparedTask)
    queries.status(principal, id) -> QueryStatus            # query-status
    queries.cancel(principal, id) -> QueryStatus            # cancel-query
    queries.result_info(principal, id) -> ResultInfo        # GetFlightInfo/GetSchema of a result
    queries.open_result(principal, id) -> (schema, reader, rows)  # DoGet of a result
    queries.close()                                          # at server shutdown
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import msgspec
import pyarrow as pa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from catalog import (
    Cancelled,
    Catalog,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Principal,
    QuiverError,
    ResourceExhausted,
    Unavailable,
)
from catalog.clock import SYSTEM_CLOCK, Clock, iso
from catalog.config import ResultsConfig
from catalog.database import Database
from catalog.errors import bounded
from catalog.running import RunningQueryInfo, shown_sql, shown_tables
from catalog.status import AsyncQueriesStatus
from flight_server.errors import classify
from flight_server.truncation import CapReason, RowCap

log = structlog.get_logger(__name__)

QueryState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES = ("queued", "running")
RESULT_SUFFIX = ".arrows"
PARTIAL_SUFFIX = ".partial"

#: Runs the (already guarded) query on the cursor it is given and returns DuckDB's Arrow
#: stream. The cursor is the manager's: interrupting it cancels the query.
Runner = Callable[[duckdb.DuckDBPyConnection], pa.RecordBatchReader]


class QueryError(msgspec.Struct, kw_only=True):
    """Why a query failed or was cancelled: the code and sentence of its QuiverError."""

    code: str
    detail: str


class QueryStatus(msgspec.Struct, kw_only=True):
    """The answer of ``submit-query``, ``query-status`` and ``cancel-query``
    (proto_docs/actions.md). Times are ISO 8601 in UTC (``commands.iso``)."""

    id: str
    state: QueryState
    sql: str
    rows: int
    bytes: int
    elapsed_seconds: float
    submitted_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    cancel_requested: bool
    # Cut at the row cap (proto_docs/actions.md): never a silent partial answer.
    truncated: bool
    max_rows: int | None
    max_rows_reason: CapReason | None
    error: QueryError | None
    #: Only for a task (an async ``export``): its kind, and its answer once it succeeded.
    kind: str | msgspec.UnsetType = msgspec.UNSET
    export: dict[str, Any] | msgspec.UnsetType | None = msgspec.UNSET


@dataclass(frozen=True, slots=True)
class PreparedQuery:
    """A query that passed the guard and the request checks, ready to run later."""

    run: Runner
    #: What ``query-status`` shows as the query (the normalized SQL is a good choice).
    sql: str = ""
    #: The row cap: ``run`` reads at most ``max_rows + 1`` rows (one more, so a cut is exact)
    #: and the manager keeps ``max_rows`` of them, reporting ``truncated`` in query-status.
    max_rows: int | None = None
    max_rows_reason: CapReason = "server_max_rows"
    #: The tables it reads (what an admin's running-query list shows).
    tables: tuple[str, ...] = ()
    #: False when the SQL run is a rewrite for ruled tables: errors do not quote its text.
    quote_sql: bool = True


#: A background task (an ``export`` with ``"async": true``): runs on a worker, reports its
#: progress as (rows, bytes) written — the call raises CANCELLED once the task was cancelled
#: or ran past ``[results] timeout_seconds`` — and returns its answer, which query-status
#: then shows under ``"export"``.
Task = Callable[[Callable[[int, int], None]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class PreparedTask:
    """A task that passed its request checks, ready to run later (see :data:`Task`)."""

    run: Task
    #: What ``query-status`` shows as the query.
    sql: str = ""
    kind: str = "export"
    tables: tuple[str, ...] = ()


ACTION_DESCRIPTIONS: dict[str, str] = {
    "submit-query": (
        'Run a query in the background. Body: {"sql": "...", "params": [...], "max_rows": N} '
        '(as the "query" descriptor). Answers {"id", "state", ...} at once; poll query-status, '
        'then GetFlightInfo/DoGet {"kind": "result", "id": ...}.'
    ),
    "query-status": (
        'State of a submitted query. Body: {"id": "..."}. Answers {"id", "state" (queued | running '
        '| succeeded | failed | cancelled), "rows", "bytes", "elapsed_seconds", "error", "truncated" '
        '(the result was cut at "max_rows", for "max_rows_reason"), ...}.'
    ),
    "cancel-query": (
        'Cancel a queued or running query (interrupts it). Body: {"id": "..."}. Answers its '
        "status; cancelling a finished query changes nothing."
    ),
}

_ERROR_CLASSES: dict[str, type[QuiverError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "UNAVAILABLE": Unavailable,
}


@dataclass(frozen=True, slots=True)
class ResultInfo:
    id: str
    schema: pa.Schema
    rows: int
    bytes: int
    #: The cap the result was read under, with whether it cut the result (known: it finished).
    row_cap: RowCap | None = None


@dataclass(eq=False)
class _Query:
    id: str
    subject: str
    label: str
    sql: str
    path: Path
    max_rows: int | None = None
    max_rows_reason: CapReason = "server_max_rows"
    truncated: bool = False
    submitted_at: float = field(default_factory=time.time)
    state: QueryState = "queued"
    started: float | None = None  # monotonic
    finished: float | None = None  # monotonic
    finished_at: float | None = None  # wall clock
    started_at: float | None = None  # wall clock
    expires: float | None = None  # the manager's Clock.monotonic()
    rows: int = 0
    bytes: int = 0
    schema: pa.Schema | None = None
    error: QuiverError | None = None
    cancel_requested: bool = False
    timed_out: bool = False
    future: Future[None] | None = None
    #: A task (an async export) instead of a query: no result file; its answer instead.
    task_kind: str | None = None
    answer: dict[str, Any] | None = None
    tables: tuple[str, ...] = ()
    quote_sql: bool = True  # False: a rewrite for ruled tables (PreparedQuery.quote_sql)
    wake: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.finished = Counter(
            "quiver_async_queries_total",
            "Async queries finished, by final state.",
            ["state"],
            registry=registry,
        )
        self.active = Gauge(
            "quiver_async_queries_active",
            "Async queries queued or running.",
            registry=registry,
        )
        self.result_bytes = Gauge(
            "quiver_async_result_bytes",
            "Bytes of async query results kept on disk.",
            registry=registry,
        )


class QueryManager:
    def __init__(
        self,
        db: Database,
        results_dir: Path,
        config: ResultsConfig,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._db = db
        self.dir = results_dir
        # What a result's expiry reads (catalog/clock.py); run times are the host's.
        self._clock = clock
        self.config = config
        self._metrics = _Metrics(registry)
        self._queries: dict[str, _Query] = {}
        self._lock = threading.Lock()
        # Bytes on disk: results kept plus results being written.
        self._disk_bytes = 0
        self._closed = threading.Event()
        #: Marks the data plane busy while a worker runs a query or task (they run outside
        #: the admission slots): the hot-table cache's idle fill waits for it
        #: (flight_server/table_cache.py ``Activity.begin``; set by the Flight server).
        self.activity: Callable[[], Callable[[], None]] | None = None
        results_dir.mkdir(parents=True, exist_ok=True)
        results_dir.chmod(0o700)
        # Query state lives in memory: files from an earlier process are orphans.
        for stale in results_dir.iterdir():
            if stale.suffix in (RESULT_SUFFIX, PARTIAL_SUFFIX):
                stale.unlink(missing_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="quiver-async")
        self._sweeper = threading.Thread(target=self._sweep_loop, name="quiver-results-sweeper", daemon=True)
        self._sweeper.start()

    @classmethod
    def for_catalog(cls, catalog: Catalog) -> QueryManager:
        """The manager of ``quiver serve``: results in DATA_DIR/results, ``[results]`` config,
        metrics in the catalog's registry (its :meth:`stats` are /v1/status "async_queries")."""
        return cls(
            catalog.db,
            catalog.data_dir / "results",
            catalog.config.results,
            registry=catalog.metrics.registry,
            clock=catalog.clock,
        )

    # --- submitting ------------------------------------------------------------------------
    def submit(self, principal: Principal, prepared: PreparedQuery | PreparedTask) -> QueryStatus:
        """Queue ``prepared`` for ``principal``; answers its status (state "queued")."""
        if self._closed.is_set():
            raise Unavailable("the server is shutting down; submit the query again after the restart")
        query_id = "q_" + secrets.token_urlsafe(18)
        query = _Query(
            id=query_id,
            subject=principal.subject,
            label=principal.label,
            sql=prepared.sql,
            path=self.dir / f"{query_id}{RESULT_SUFFIX}",
            tables=prepared.tables,
        )
        if isinstance(prepared, PreparedTask):
            query.task_kind = prepared.kind
        else:
            query.max_rows = prepared.max_rows
            query.max_rows_reason = prepared.max_rows_reason
            query.quote_sql = prepared.quote_sql
        with self._lock:
            active = sum(
                1
                for q in self._queries.values()
                if q.subject == principal.subject and q.state in ACTIVE_STATES
            )
            limit = self.config.max_active_per_principal
            if active >= limit:
                raise ResourceExhausted(
                    f"you have {active} async queries queued or running (the limit is {limit}); "
                    "wait for one to finish (query-status) or cancel one (cancel-query)"
                )
            self._queries[query_id] = query
            self._metrics.active.inc()
            if isinstance(prepared, PreparedTask):
                query.future = self._pool.submit(self._busy, self._execute_task, query, prepared.run)
            else:
                query.future = self._pool.submit(self._busy, self._execute, query, prepared.run)
            # Under the lock, which the worker takes to start: the answer is "queued", as
            # documented, even when the query then fails within a millisecond.
            answer = self._describe(query)
        log.info("query.submitted", id=query_id, principal=principal.label)
        return answer

    # --- running (worker threads) ------------------------------------------------------------
    def _busy(self, work: Callable[[_Query, Any], None], query: _Query, run: Any) -> None:
        """``work(query, run)``, with the data plane marked busy meanwhile (:attr:`activity`)."""
        end = self.activity() if self.activity is not None else None
        try:
            work(query, run)
        finally:
            if end is not None:
                end()

    def _execute(self, query: _Query, run: Runner) -> None:
        with self._lock:
            if query.state != "queued":  # cancelled while waiting
                return
            query.state = "running"
            query.started = time.monotonic()
            query.started_at = time.time()
        partial = query.path.with_suffix(PARTIAL_SUFFIX)
        cur: duckdb.DuckDBPyConnection | None = None
        watchdog: threading.Thread | None = None
        outcome: QueryState = "failed"
        try:
            cur = self._db.cursor()
            watchdog = threading.Thread(
                target=self._watch, args=(query, cur), name=f"quiver-watch-{query.id}", daemon=True
            )
            watchdog.start()
            self._check_cancel(query)
            reader = run(cur)
            self._write(query, reader, partial)
            os.replace(partial, query.path)
            outcome = "succeeded"
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the query's state
            outcome = self._fail(query, exc)
        finally:
            partial.unlink(missing_ok=True)
            query.done.set()
            query.wake.set()
            if watchdog is not None:
                watchdog.join()
            if cur is not None:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
            self._finish(query, outcome)

    def _execute_task(self, query: _Query, task: Task) -> None:
        """A task on a worker: its progress is the query's rows and bytes; a cancel or the
        timeout stops it at its next progress report (the task's own query is interrupted by
        its own deadline, which the caller sets to ``[results] timeout_seconds``)."""
        with self._lock:
            if query.state != "queued":  # cancelled while waiting
                return
            query.state = "running"
            query.started = time.monotonic()
            query.started_at = time.time()
        watchdog = threading.Thread(
            target=self._watch_task, args=(query,), name=f"quiver-watch-{query.id}", daemon=True
        )
        watchdog.start()
        outcome: QueryState = "failed"

        def progress(rows: int, written: int) -> None:
            query.rows, query.bytes = rows, written
            self._check_cancel(query)

        try:
            self._check_cancel(query)
            query.answer = task(progress)
            outcome = "succeeded"
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the task's state
            outcome = self._fail(query, exc)
        finally:
            query.done.set()
            query.wake.set()
            watchdog.join()
            self._finish(query, outcome)

    def _watch_task(self, query: _Query) -> None:
        if not query.wake.wait(self.config.timeout_seconds) and not query.done.is_set():
            query.timed_out = True

    def _write(self, query: _Query, reader: pa.RecordBatchReader, partial: Path) -> None:
        """Stream the reader into an Arrow IPC stream file, batch by batch: memory stays at
        one batch whatever the result's size, and status shows the progress. The reader
        yields at most ``max_rows + 1`` rows: when the extra row comes, the result is cut at
        ``max_rows`` and marked ``truncated`` (exact: a result of ``max_rows`` rows is not)."""
        limit, total = self.config.max_result_bytes, self.config.max_total_bytes
        cap = query.max_rows
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            query.schema = reader.schema
            for batch in reader:
                if cap is not None and query.rows + batch.num_rows > cap:
                    batch = batch.slice(0, cap - query.rows)
                    query.truncated = True
                writer.write_batch(batch)
                query.rows += batch.num_rows
                grew = sink.tell() - query.bytes
                with self._lock:
                    query.bytes += grew
                    self._disk_bytes += grew
                    over_total = self._disk_bytes > total
                if query.bytes > limit:
                    raise ResourceExhausted(
                        f"the result exceeds {limit} bytes ([results] max_result_bytes); "
                        "select fewer columns or rows, or aggregate"
                    )
                if over_total:
                    raise ResourceExhausted(
                        f"the results kept on this server would exceed {total} bytes ([results] "
                        "max_total_bytes); fetch and let earlier results expire, or ask for less"
                    )
                self._check_cancel(query)
                if query.truncated:
                    break  # the rest (one row: the query read max_rows + 1) is not kept
        grew = partial.stat().st_size - query.bytes  # the end-of-stream marker
        with self._lock:
            query.bytes += grew
            self._disk_bytes += grew

    @staticmethod
    def _check_cancel(query: _Query) -> None:
        if query.cancel_requested or query.timed_out:
            raise Cancelled("cancelled")

    def _watch(self, query: _Query, cur: duckdb.DuckDBPyConnection) -> None:
        """Interrupt the query on cancel or timeout. DuckDB ignores an interrupt that arrives
        before the query starts, so keep interrupting until the worker is done."""
        woken = query.wake.wait(self.config.timeout_seconds)
        if query.done.is_set():
            return
        if not woken:
            query.timed_out = True
        while not query.done.is_set():
            with contextlib.suppress(duckdb.Error):
                cur.interrupt()
            query.done.wait(0.05)

    def _fail(self, query: _Query, exc: BaseException) -> QueryState:
        if query.cancel_requested:
            query.error = Cancelled(f"query {query.id} was cancelled (cancel-query)")
            return "cancelled"
        if query.timed_out:
            query.error = DeadlineExceeded(
                f"query {query.id} ran longer than {self.config.timeout_seconds:g} s "
                "([results] timeout_seconds) and was interrupted"
            )
            return "failed"
        error = classify(exc, quote_sql=query.quote_sql)
        if error is None:
            log.error("query.internal_error", id=query.id, exc_info=exc)
            error = QuiverError(f"internal error (query id {query.id}); the server log has the details")
        query.error = error
        return "cancelled" if isinstance(error, Cancelled) else "failed"

    def _finish(self, query: _Query, outcome: QueryState) -> None:
        with self._lock:
            if outcome != "succeeded" and query.task_kind is None:  # its partial file is gone
                self._disk_bytes -= query.bytes
            query.state = outcome
            query.finished = time.monotonic()
            query.finished_at = time.time()
            query.expires = self._clock.monotonic() + self.config.ttl_seconds
            self._metrics.active.dec()
            self._metrics.finished.labels(outcome).inc()
            self._metrics.result_bytes.set(self._result_bytes())
        log.info(
            "query.finished",
            id=query.id,
            principal=query.label,
            state=outcome,
            rows=query.rows,
            bytes=query.bytes,
            ms=round(((query.finished or 0) - (query.started or query.finished or 0)) * 1000, 3),
            error=query.error.code if query.error else None,
        )

    # --- asking ------------------------------------------------------------------------------
    def _get(self, principal: Principal, query_id: str) -> _Query:
        if not query_id:
            raise InvalidArgument('"id" must be the query id string that submit-query returned')
        query = self._queries.get(query_id)
        now = self._clock.monotonic()
        if (
            query is None
            or query.subject != principal.subject
            or (query.expires is not None and query.expires <= now)
        ):
            raise NotFound(
                f"unknown or expired query id {bounded(query_id, 40)!r}: results are kept "
                f"{self.config.ttl_seconds:g} s after the query finished; submit it again"
            )
        return query

    def status(self, principal: Principal, query_id: str) -> QueryStatus:
        return self._describe(self._get(principal, query_id))

    def cancel(self, principal: Principal, query_id: str, *, wait_seconds: float = 2.0) -> QueryStatus:
        """Cancel a queued or running query and wait briefly for it to stop; a finished one
        is left as it is."""
        query = self._get(principal, query_id)
        self._cancel(query, wait_seconds)
        log.info("query.cancel_requested", id=query.id, principal=principal.label)
        return self._describe(query)

    def listing(self) -> list[RunningQueryInfo]:
        """Every queued or running async query and export, of every principal (an admin's
        ``GET /v1/queries?running=true``)."""
        with self._lock:
            active = [q for q in self._queries.values() if q.state in ACTIVE_STATES]
            return [
                RunningQueryInfo(
                    id=q.id,
                    principal=q.label,
                    kind="async",
                    what=q.task_kind or "query",
                    sql=shown_sql(q.sql),
                    tables=shown_tables(q.tables),
                    started_at=iso(q.started_at if q.started_at is not None else q.submitted_at),
                    rows=q.rows,
                    via="flight",
                )
                for q in active
            ]

    def cancel_any(self, query_id: str, *, wait_seconds: float = 2.0) -> bool | None:
        """An admin's cancel of any principal's active query: None when none of that id is
        queued or running, else whether it had stopped when this returned."""
        with self._lock:
            query = self._queries.get(query_id)
            if query is None or query.state not in ACTIVE_STATES:
                return None
        self._cancel(query, wait_seconds)
        log.info("query.cancel_requested", id=query.id, by="admin")
        return query.done.is_set()

    def _cancel(self, query: _Query, wait_seconds: float) -> None:
        with self._lock:
            if query.state not in ACTIVE_STATES:
                return
            query.cancel_requested = True
            if query.state == "queued" and query.future is not None and query.future.cancel():
                query.error = Cancelled(f"query {query.id} was cancelled (cancel-query)")
                query.done.set()
                cancelled_before_start = True
            else:
                cancelled_before_start = False
        if cancelled_before_start:
            self._finish(query, "cancelled")
        else:
            query.wake.set()
            query.done.wait(wait_seconds)

    def result_info(self, principal: Principal, query_id: str) -> ResultInfo:
        """Schema and size of a succeeded query's result, or the error that explains why
        there is none (the query's own error, CANCELLED, or UNAVAILABLE while running)."""
        query = self._get(principal, query_id)
        if query.task_kind is not None:
            raise InvalidArgument(
                f"{query.id} is an {query.task_kind}, not a query: it has no result to fetch; its "
                f"artefact is in query-status under {query.task_kind!r} once it succeeded"
            )
        state = query.state
        if state in ACTIVE_STATES:
            raise Unavailable(
                f"query {query.id} is {state}; poll query-status until its state is succeeded, "
                "then fetch the result"
            )
        if state == "cancelled":
            raise Cancelled(f"query {query.id} was cancelled; it has no result")
        if state == "failed":
            err = query.error or QuiverError("the query failed")
            cls = _ERROR_CLASSES.get(err.code, QuiverError)
            raise cls(f"query {query.id} failed: {err.detail}")
        assert query.schema is not None
        cap = None
        if query.max_rows is not None:
            cap = RowCap(query.max_rows, query.max_rows_reason, query.truncated)
        return ResultInfo(query.id, query.schema, query.rows, query.bytes, cap)

    def open_result(self, principal: Principal, query_id: str) -> tuple[pa.Schema, pa.RecordBatchReader, int]:
        """A zero-copy reader over the result file (memory-mapped), for DoGet."""
        info = self.result_info(principal, query_id)
        query = self._queries[info.id]
        try:
            source = pa.memory_map(str(query.path), "r")
        except FileNotFoundError:
            raise NotFound(f"the result of query {info.id} has expired; submit the query again") from None
        reader = pa.ipc.open_stream(source)
        return info.schema, reader, info.rows

    def _describe(self, query: _Query) -> QueryStatus:
        now = time.monotonic()
        elapsed = 0.0 if query.started is None else (query.finished or now) - query.started
        expires_at = None
        if query.expires is not None:
            expires_at = iso(self._clock.time() + (query.expires - self._clock.monotonic()))
        status = QueryStatus(
            id=query.id,
            state=query.state,
            sql=query.sql,
            rows=query.rows,
            bytes=query.bytes,
            elapsed_seconds=round(elapsed, 6),
            submitted_at=iso(query.submitted_at),
            started_at=iso(query.started_at),
            finished_at=iso(query.finished_at),
            expires_at=expires_at,
            cancel_requested=query.cancel_requested,
            # Cut at the row cap (proto_docs/actions.md): never a silent partial answer.
            truncated=query.truncated,
            max_rows=query.max_rows,
            max_rows_reason=query.max_rows_reason if query.max_rows is not None else None,
            error=None
            if query.error is None
            else QueryError(code=query.error.code, detail=query.error.detail),
        )
        if query.task_kind is not None:
            status.kind = query.task_kind
            status.export = query.answer
        return status

    # --- housekeeping ----------------------------------------------------------------------------
    def _result_bytes(self) -> int:
        return sum(q.bytes for q in self._queries.values() if q.state == "succeeded" and q.task_kind is None)

    def sweep(self) -> int:
        """Forget queries whose TTL passed and delete their files; returns how many."""
        now = self._clock.monotonic()
        with self._lock:
            expired = [q for q in self._queries.values() if q.expires is not None and q.expires <= now]
            for q in expired:
                del self._queries[q.id]
                if q.state == "succeeded" and q.task_kind is None:
                    self._disk_bytes -= q.bytes
            self._metrics.result_bytes.set(self._result_bytes())
        for q in expired:
            q.path.unlink(missing_ok=True)
        if expired:
            log.info("results.swept", count=len(expired))
        return len(expired)

    def _sweep_loop(self) -> None:
        interval = min(30.0, max(0.2, self.config.ttl_seconds / 4))
        while not self._closed.wait(interval):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - the sweeper must outlive one bad pass
                log.warning("results.sweep_failed", error=str(e))

    def stats(self) -> AsyncQueriesStatus:
        with self._lock:
            queries = list(self._queries.values())
        return AsyncQueriesStatus(
            queued=sum(1 for q in queries if q.state == "queued"),
            running=sum(1 for q in queries if q.state == "running"),
            retained=sum(1 for q in queries if q.state not in ACTIVE_STATES),
            result_bytes=sum(q.bytes for q in queries if q.state == "succeeded" and q.task_kind is None),
        )

    def close(self) -> None:
        """Stop the sweeper, cancel what still runs, delete every result file."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            active = [q for q in self._queries.values() if q.state in ACTIVE_STATES]
        for q in active:
            q.cancel_requested = True
            if q.future is not None:
                q.future.cancel()
            q.wake.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for q in active:
                if q.state == "queued":  # never started: the future was cancelled
                    q.state = "cancelled"
            queries = list(self._queries.values())
            self._queries.clear()
        for q in queries:
            q.path.unlink(missing_ok=True)
        self._sweeper.join(5)
