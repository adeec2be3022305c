"""DoGet: one endpoint of a plan becomes a Flight stream fed by DuckDB.

The stream is DuckDB's Arrow ``RecordBatchReader`` handed to ``flight.RecordBatchStream``:
the gRPC thread pulls batches from DuckDB in C++; Python never sees a row, and memory stays
bounded by a few batches whatever the result size (gRPC flow control pauses DuckDB when the
client reads slowly). Two shortcuts avoid DuckDB altogether: a scan of a table held by the
hot-table cache streams a zero-copy slice of it (flight_server/table_cache.py), and a query
found in the result cache streams the stored batches.

Row caps. A query (and a percent sample) has a row cap — the server's ``[limits] max_rows``
or the caller's ``max_rows`` — and a result cut at it must say so (flight_server/truncation.py,
proto_docs/descriptors.md "Cut results"). So these have the head of their result (up to
1 MiB) read in the handler: a small result is then complete — stored in the result cache,
streamed from memory by C++, its cursor kept for the next request — and whether it was cut is
known. A larger one streams on through a Python generator over its batches that cuts it at
the cap (and tees it into the cache); the batch that carries the cut is the last. Paths
without a cap — scans, cached tables, uncut cache hits, async results that were not cut — stay
in C++ from end to end; a cut result replayed (cache hit, async result) is a generator over
its batches, so that its last batch carries the flag.

Plan once. GetFlightInfo of a query starts it here (:meth:`Streamer.run_at_info`, on a
worker bounded by the admission slots): a result whose head is the whole result is held for
the first DoGet (flight_server/ready.py ``ReadyResult``); a query still running when
GetFlightInfo answers is handed over — the first DoGet of its ticket takes the run
(:meth:`Streamer.claim`, ``HeldRun``) and streams it like a run of its own (:meth:`Streamer._taken`),
so a slow query is planned and run once.

Lifetime. Everything a stream holds — its cursor, its query deadline, its concurrency slot —
is released by the middleware's ``call_completed``, which Flight calls when the stream ends,
fails or the client goes away (for a run taken over, those GetFlightInfo took). ``to_arrow_reader`` runs blocking operators (sorts,
aggregates, joins) before it returns, so most timeouts and errors are raised here, inside the
handler, as a proper Flight error with ``extra_info``; so are those raised mid-stream on the
generator path of a capped query. A stream interrupted *after* its first batch on a C++ path
(a random sample of rows, say) fails inside the C++ stream instead; the client then sees a
FlightServerError whose message contains ``INTERRUPT Error: Interrupted!`` (Quiver's client
maps it to DEADLINE_EXCEEDED; proto_docs/errors.md explains).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import structlog
from prometheus_client import CollectorRegistry, Counter

from catalog import Catalog, Principal, TableRef, Unavailable
from catalog.limits import Effective
from catalog.query_log import RemoteWork
from catalog.query_port import RunningQuery
from flight_server import inline, live
from flight_server.admission import Admission, release_all
from flight_server.cache import CacheKey, ResultCache
from flight_server.errors import check_result_type, classify, duckdb_error, stream_error
from flight_server.limits import Deadline, Watchdog
from flight_server.middleware import CallState
from flight_server.plans import (
    BATCH_ROWS,
    ArtefactPart,
    CachedPart,
    LivePart,
    MixedPart,
    Plan,
    ProfilePart,
    ResultPart,
    SqlPart,
    TablePart,
    limited,
)
from flight_server.profiles import PROFILE_SCHEMA, ProfileCache
from flight_server.ready import HeldRun, ReadyPool
from flight_server.results import QueryManager
from flight_server.running import QueryRuns
from flight_server.table_cache import Fill, Snapshot
from flight_server.truncation import RowCap
from flight_server.versions import VersionWatch, read_layout

log = structlog.get_logger("flight_server")

#: The IPC options of every stream, built once: without them each stream builds its own from
#: environment variables (``ARROW_PRE_0_15_IPC_FORMAT``…), ~5 µs of a point query's DoGet.
#: The defaults they give (current format, metadata V5) are these.
_IPC = pa.ipc.IpcWriteOptions()

__all__ = ["Streamer", "arrow_stream", "table_snapshot"]


def _speed_key(part: SqlPart) -> tuple[str, ...] | None:
    """What :meth:`Streamer.run_at_info` remembers a query's speed by: its shape template, or
    its normalized text (a text the guard answered from its text cache has no template)."""
    if part.template is not None:
        return part.template
    return None if part.normalized is None else (part.normalized,)


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.inlined = Counter(
            "quiver_inline_results_total",
            "Query results sent inline in a FlightInfo (no DoGet fetched them).",
            registry=registry,
        )
        self.inlined_bytes = Counter(
            "quiver_inline_bytes_total",
            "Bytes of the Arrow IPC streams sent inline in FlightInfos (the endpoints' app_metadata).",
            registry=registry,
        )


class Streamer:
    def __init__(
        self,
        catalog: Catalog,
        watchdog: Watchdog,
        profiles: ProfileCache,
        queries: QueryManager,
        cache: ResultCache,
        versions: VersionWatch,
        limits_for: Callable[[Principal], Effective],
    ) -> None:
        self.catalog = catalog
        # A principal's limits (its swarm's query timeout): Admission.limits_for.
        self._limits_for = limits_for
        self.watchdog = watchdog
        self.profiles = profiles
        self._queries = queries
        self.cache = cache
        self.versions = versions
        self._cursors = _SpareCursors(catalog)
        #: Runs for callers outside Flight (run_query), while they hold their cursor.
        self.runs = QueryRuns()
        self.ready = ReadyPool(float(catalog.config.limits.ticket_ttl_seconds), clock=catalog.clock)
        #: Queries (and percent samples) run by DuckDB, at GetFlightInfo or DoGet: a count for
        #: tests and /v1/status (a fresh point query is run, and planned, once).
        self.executions = 0
        #: The workers of runs GetFlightInfo starts (:meth:`run_at_info`): each holds an
        #: admission slot while it runs, so there are never more than the slots.
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, catalog.config.limits.max_concurrent_total),
            thread_name_prefix="quiver-info-run",
        )
        #: Runs started by GetFlightInfo not yet released (stopped at shutdown).
        self._held: set[HeldRun] = set()
        self._held_lock = threading.Lock()
        #: Shape templates (GuardedQuery.template), or texts where the guard gave none (a
        #: text it answered from its text cache: a ``?`` query run again), whose last run at
        #: GetFlightInfo came back within the budget: run on the calling thread
        #: (:meth:`run_at_info`). Bounded, oldest first out; one that overran leaves it.
        self._quick: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._quick_lock = threading.Lock()
        #: GetFlightInfo runs of a quick template that overran the budget (interrupted; their
        #: DoGet ran them again): a count for tests.
        self.quick_overruns = 0
        #: GetFlightInfo runs of a quick template, on the calling thread: a count for tests.
        self.quick_runs = 0
        #: Results sent inline in a FlightInfo (:meth:`inline`), and the bytes of their IPC
        #: streams: /v1/status "queries" and ``quiver_inline_*`` in the catalog's registry.
        self.inlined = 0
        self.inlined_bytes = 0
        self._inline_lock = threading.Lock()
        self._metrics = _Metrics(catalog.metrics.registry)

    def timeout_for(self, principal: Principal | None) -> float:
        """The query timeout of ``principal``'s request: ``[limits] query_timeout_seconds`` or
        its swarm's override (catalog/limits.py)."""
        if principal is None:
            return float(self.catalog.config.limits.query_timeout_seconds)
        return self._limits_for(principal).query_timeout_seconds

    def close(self) -> None:
        """Stop the runs GetFlightInfo handed over that no DoGet took, and close the spare
        cursors (at server shutdown)."""
        with self._held_lock:
            held = list(self._held)
        for run in held:
            run.interrupt()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._cursors.close()

    def open(  # noqa: C901, PLR0911, PLR0912, PLR0915  a dispatch on the part's kind
        self, plan: Plan, index: int, state: CallState, held: HeldRun | None = None
    ) -> flight.FlightDataStream:
        """The stream of endpoint ``index``; ``held``: the run GetFlightInfo handed over to this
        DoGet (:meth:`claim`), streamed instead of running the query again."""
        part = plan.parts[index]
        if held is not None and isinstance(part, SqlPart):
            return self._taken(held, part, state)
        if isinstance(part, ArtefactPart):
            assert state.principal is not None
            # Read from the memory-mapped IPC file: C++ streams its batches, no DuckDB.
            art, reader = self.catalog.artefacts.open_table(state.principal, part.id)
            if art.kind == "table":  # written and checked by Quiver at upload
                return flight.RecordBatchStream(reader, options=_IPC)
            # A Parquet or Arrow-stream file as sent by its uploader may be corrupt past its
            # footer: that failure is labelled (INVALID_ARGUMENT), not a bare C++ error.
            return flight.GeneratorStream(reader.schema, _labelled(reader, state.request_id, None, 0.0))
        if isinstance(part, LivePart):  # rows from Snowflake (flight_server/live.py)
            return live.open_stream(
                self.catalog,
                self.watchdog,
                self.timeout_for(state.principal),
                part,
                state,
                self.cache.volatile,
            )
        if isinstance(part, MixedPart):  # live tables pulled, joined in DuckDB (flight_server/live.py)
            return live.open_mixed(
                self.catalog, self.watchdog, self.timeout_for(state.principal), part, state
            )
        if isinstance(part, TablePart):  # a metadata listing, built at planning: from memory
            return flight.RecordBatchStream(part.table, options=_IPC)
        if isinstance(part, ResultPart):
            assert state.principal is not None
            _, reader, _ = self._queries.open_result(state.principal, part.id)
            cap = self._queries.result_info(state.principal, part.id).row_cap
            if cap is not None and cap.truncated:  # cut: the stream says so, as the FlightInfo did
                state.fields["truncated"] = True
                return _cut_stream(reader.schema, reader, cap)
            return flight.RecordBatchStream(reader, options=_IPC)
        if isinstance(part, CachedPart):
            entry = part.entry()
            if entry is not None:
                # A zero-copy slice of the table in memory: C++ streams it, no DuckDB.
                data = entry.table.slice(part.offset, part.length)
                if part.columns is not None:
                    data = data.select(list(part.columns))
                state.fields["cache"] = "table"
                return _counted(state, data)
            state.fields["cache"] = "table-evicted"
            part = part.fallback
        if isinstance(part, SqlPart) and part.ready is not None:
            # The result GetFlightInfo read whole, for this ticket's first DoGet: from memory.
            batches = part.ready.take()
            if batches is not None:
                state.fields["cache"] = "ready"
                schema = part.ready.schema
                if part.ready.truncated and part.row_cap is not None:
                    state.fields["truncated"] = True
                    _count_batches(state, batches)
                    return _cut_stream(schema, batches, part.row_cap)
                # Its size was summed as it was read: not measured again (Table.nbytes walks
                # every buffer of every column).
                return _counted(state, pa.Table.from_batches(batches, schema=schema), part.ready.size)
        key: CacheKey | None = None
        if isinstance(part, SqlPart) and part.normalized is not None:
            # The result cache first: a hit needs no cursor and no deadline.
            key, hit, cut = self._lookup(plan, part, state)
            if hit is not None:
                state.fields["cache"] = "hit"
                if cut and part.row_cap is not None:  # a cut result says so on every replay
                    state.fields["truncated"] = True
                    return _cut_stream(hit.schema, hit, part.row_cap)
                return flight.RecordBatchStream(hit, options=_IPC)
            state.fields["cache"] = "miss" if key is not None else "off"
        cur = self._cursors.take()
        lease = _Lease(cur)
        state.cleanups.append(lease.close)
        deadline: Deadline | None = None
        timeout = self.timeout_for(state.principal)
        if plan.timeout:
            deadline = self.watchdog.arm(timeout, cur.interrupt)
            state.deadline = deadline
            state.cleanups.append(lambda: Watchdog.disarm(deadline))
        try:
            if isinstance(part, ProfilePart):
                table = self._profile(part, cur, timeout, live.remote_of(self.catalog, state))
                return _counted(state, table)
            if part.label_errors:  # a split query's part: nothing to cut, errors labelled
                self.executions += 1
                reader = self._sql(cur, part, None)
                return flight.GeneratorStream(
                    reader.schema, _labelled(reader, state.request_id, deadline, timeout), options=_IPC
                )
            if part.row_cap is not None:  # a query or a percent sample: a cut must be reported
                return self._capped_stream(cur, key, part, state, deadline, lease)
            if part.fill is not None:  # the first scan of a table: it fills the hot-table cache
                return self._filling_stream(cur, part, state, deadline)
            # No row cap (a scan): C++ streams DuckDB's reader, Python never sees a batch.
            return flight.RecordBatchStream(self._sql(cur, part, None), options=_IPC)
        except duckdb.Error as e:
            # Was the caller's SQL wrapped in a LIMIT (DuckDB's line numbers are one off)?
            wrapped = isinstance(part, SqlPart) and part.limit is not None
            raise duckdb_error(
                e,
                timed_out=deadline is not None and deadline.fired,
                timeout_seconds=timeout,
                wrapped=wrapped,
                quote_sql=not (isinstance(part, SqlPart) and part.ruled),
            ) from None

    #: How long GetFlightInfo waits for the head of a query it started (at most half the query
    #: timeout): long enough for a point query or an aggregate to come back whole (held as a
    #: ready result), short enough that GetFlightInfo of a long query still answers at once —
    #: the run then goes on and is handed over to DoGet.
    INFO_RUN_SECONDS = 0.25
    #: Shape templates remembered as quick (:attr:`_quick`).
    QUICK_TEMPLATES = 4096
    #: A run counts as quick when it came back within this share of the budget: a query
    #: near the budget (an aggregate of 0.1-0.2 s) stays on a worker — the switch is nothing
    #: beside its run — instead of flipping between quick and overrun (run twice) with the
    #: machine's load.
    QUICK_SHARE = 0.25

    def _is_quick(self, template: tuple[str, ...] | None) -> bool:
        return template is not None and template in self._quick

    def _mark_quick(self, template: tuple[str, ...] | None, quick: bool) -> None:
        if template is None:
            return
        with self._quick_lock:
            if not quick:
                self._quick.pop(template, None)
            elif template not in self._quick:
                self._quick[template] = None
                if len(self._quick) > self.QUICK_TEMPLATES:
                    self._quick.popitem(last=False)

    def run_at_info(
        self, admission: Admission, principal: Principal, tables: tuple[TableRef, ...], part: SqlPart
    ) -> tuple[pa.Schema | None, SqlPart, bool] | None:
        """GetFlightInfo of a query: start it once and wait for the head of its result, as DoGet
        would read it (:meth:`_capped_stream`). It is admitted like a stream — a slot of its
        own, a cursor, the query deadline (counted from now) — and runs on a worker, so that
        it can outlive this call; once handed over it is listed for admins as a run
        (``via: "flight"``). A query whose shape template came back within a quarter of the
        budget last time (a point query) runs on the calling thread instead (:meth:`_run_here`): no
        thread switch, and if it overruns after all, the old way (interrupted, run again by
        DoGet).

        Returns the result's schema, the part to put in the ticket, and whether the head was
        the whole result:

        * **whole** within :attr:`INFO_RUN_SECONDS`: stored in the result cache (when
          cacheable) and held with the part as a one-shot
          :class:`~flight_server.ready.ReadyResult`; everything the run held is released.
        * **larger than the head** within the budget: closed (``False``); its DoGet runs it
          again, and the planner may split it (a property of the text, remembered).
        * **still running** when the budget passed: *handed over* — the part carries the run
          (:class:`~flight_server.ready.HeldRun`), which keeps running and keeps its slot,
          cursor and deadline for the first DoGet of the ticket (:meth:`claim`); the schema is
          the reader's when DuckDB returned it already, else None (the caller probes the
          binder). A run nobody takes is stopped by its deadline, a cancel or shutdown.

        None when it failed within the budget: the caller takes the schema from the binder
        (whose refusals are GetFlightInfo's, as before) and DoGet runs it again, reporting the
        failure where it always has. A result already in the result cache is not run: its
        schema is the entry's, and DoGet is a cache hit."""
        cap = part.row_cap
        assert cap is not None  # a query always has a cap
        key: CacheKey | None = None
        if part.normalized is not None:
            key = self._key(tables, part)
            entry = self.cache.peek(key)
            if entry is not None:
                return entry.schema, part, True
        timeout = self.timeout_for(principal)
        budget = min(self.INFO_RUN_SECONDS, timeout / 2)
        run = HeldRun()
        reuse = [False]  # the cursor goes back to the spare ones only after a clean, whole read
        held: list[Callable[[], None]] = []
        close = release_all(held, "query.release_failed")
        query = "plan-" + secrets.token_hex(6)
        quick = self._is_quick(_speed_key(part))
        began = time.monotonic()
        held.append(admission.acquire(principal, query, call=False))
        try:
            cur = self._cursors.take()

            def let_go() -> None:
                if not (reuse[0] and not deadline.fired and self._cursors.give_back(cur)):
                    cur.close()

            held.append(let_go)
            deadline = self.watchdog.arm(timeout, run.interrupt)
            held.append(lambda: Watchdog.disarm(deadline))
            run.bind(deadline, cur.interrupt, close, query)
            started = self._run_here if quick else self._on_worker
            if not started(run, cur, part, key, budget):
                return None  # a quick template that overran: its DoGet runs it again
        except BaseException:
            close()
            raise
        if not run.wait_head(budget):
            # Listed for admins, who may cancel it, until a DoGet takes it (then its stream is).
            names = tuple(ref.qualified for ref in tables)
            run.listed(self.runs.track(principal.label, part.sql, names, deadline, via="flight"))
            if self.ready.ttl < timeout:  # its ticket expires before its deadline: so does the run
                expiry = self.watchdog.arm(self.ready.ttl, run.expire)
                run.on_release(lambda: Watchdog.disarm(expiry))
            log.debug("query.handed_over", seconds=budget)
            return run.schema, dataclasses.replace(part, held=run), False
        try:
            ran = run.result()
        except Exception as e:  # noqa: BLE001 - left to DoGet, which reports it
            log.debug("query.info_run_failed", error=type(e).__name__, timed_out=deadline.fired)
            run.release()
            return None
        assert isinstance(ran, _InfoRun)
        self._mark_quick(_speed_key(part), time.monotonic() - began < budget * self.QUICK_SHARE)
        if not ran.complete:  # larger than the head: its DoGet runs it again
            ran.close()
            run.release()
            return ran.schema, part, False
        reuse[0] = True
        run.release()
        if key is not None:
            self.cache.count_miss()  # the lookup DoGet would have counted
        self.cache.store(key, ran.schema, ran.head, ran.size, truncated=ran.cut)
        ready = self.ready.hold(ran.schema, ran.head, ran.size, ran.cut)
        return ran.schema, (dataclasses.replace(part, ready=ready) if ready is not None else part), True

    def _run_here(
        self, run: HeldRun, cur: duckdb.DuckDBPyConnection, part: SqlPart, key: CacheKey | None, budget: float
    ) -> bool:
        """Run a query of a quick template on the calling thread, as a worker would: handing
        a query to a worker and back costs a point query two thread switches (0.2-0.4 ms on
        two busy cores, tests/bench/PROFILE.md section 7). One that overruns the budget is
        interrupted there and released (False: its DoGet runs it again, as before hand-overs
        existed); its template is no longer quick, so the next text of it runs once, on a
        worker."""
        self.quick_runs += 1
        gave_up = self.watchdog.arm(budget, cur.interrupt)
        try:
            self._info_run(run, cur, part, key)
        finally:
            Watchdog.disarm(gave_up)
        if not gave_up.fired:
            return True
        self._mark_quick(_speed_key(part), False)
        self.quick_overruns += 1
        log.debug("query.info_run_gave_up", slow=True, template_quick=True)
        run.release()  # its cursor is not reused: the interrupt may have come late
        return False

    def _on_worker(
        self, run: HeldRun, cur: duckdb.DuckDBPyConnection, part: SqlPart, key: CacheKey | None, budget: float
    ) -> bool:
        """Start a query on a worker, so that it can outlive GetFlightInfo (handed over to
        DoGet when it is still running after ``budget``); tracked until released."""
        del budget  # the caller waits for it
        with self._held_lock:
            self._held.add(run)
        run.on_release(lambda: self._forget(run))
        self._workers.submit(self._info_run, run, cur, part, key)
        return True

    def _info_run(
        self, run: HeldRun, cur: duckdb.DuckDBPyConnection, part: SqlPart, key: CacheKey | None
    ) -> None:
        """A worker: run the query GetFlightInfo started and read its head; the rest of the
        result stays in DuckDB (the reader is open, nothing buffered here) for the DoGet."""
        cap = part.row_cap
        assert cap is not None
        reader: pa.RecordBatchReader | None = None
        try:
            self.executions += 1
            limit = part.limit + 1 if part.limit is not None else None
            reader = arrow_stream(cur, limited(part.sql, limit), part.params)
            run.schema = reader.schema
            check_result_type(reader.schema)
            head, size, complete, cut = _read_head(reader, self.cache.memory_entry_bytes, cap.max_rows)
        except BaseException as e:  # noqa: BLE001 - reported by GetFlightInfo or the DoGet
            if reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()
            run.finish(error=e)
            return
        run.finish(_InfoRun(reader.schema, head, size, complete, cut, reader, key))

    def held_runs(self) -> dict[str, int]:
        """Runs GetFlightInfo handed over and not yet released: how many, and how many of them
        DuckDB is still running (a count for tests and logs)."""
        with self._held_lock:
            runs = list(self._held)
        return {"held": len(runs), "running": sum(not run.done for run in runs)}

    def _forget(self, run: HeldRun) -> None:
        with self._held_lock:
            self._held.discard(run)

    def inline(self, plan: Plan, state: CallState, limit: int) -> bytes | None:
        """The whole result of a one-endpoint query as an Arrow IPC stream, for its FlightInfo
        (flight_server/inline.py), when it is in memory already and at most ``limit`` bytes of
        Arrow data: the ready result GetFlightInfo read (taken: no DoGet will), or a result
        cache entry held in memory (counted as the hit the DoGet would have counted). Its rows
        and bytes are counted for the query log. None for anything else — a cut result, a
        run still going on, a cached file, a split plan — which goes the usual way."""
        if len(plan.parts) != 1:
            return None
        part = plan.parts[0]
        if not isinstance(part, SqlPart) or part.row_cap is None or part.held is not None:
            return None
        batches: Sequence[pa.RecordBatch] | None = None
        if part.ready is not None:
            ready = part.ready
            if ready.truncated or ready.size > limit:
                return None
            batches = ready.take()
            schema, size = ready.schema, ready.size
            state.fields["cache"] = "ready"
        elif part.normalized is not None:
            key = self._key(plan.tables, part)
            entry = self.cache.peek(key)
            if entry is None or entry.batches is None or entry.truncated or entry.bytes > limit:
                return None
            entry = self.cache.get(key)
            if entry is not None:
                batches = entry.batches
                schema, size = entry.schema, entry.bytes
                state.fields["cache"] = "hit"
        if batches is None:  # taken or evicted meanwhile
            return None
        if state.query is not None:
            state.query.sent(sum(b.num_rows for b in batches), size)
        data = inline.encode(schema, batches)
        with self._inline_lock:
            self.inlined += 1
            self.inlined_bytes += len(data)
        self._metrics.inlined.inc()
        self._metrics.inlined_bytes.inc(len(data))
        return data

    def inline_counts(self) -> tuple[int, int]:
        """Results sent inline since start, and the bytes of their IPC streams (read together)."""
        with self._inline_lock:
            return self.inlined, self.inlined_bytes

    @staticmethod
    def claim(plan: Plan, index: int) -> HeldRun | None:
        """The run GetFlightInfo handed over with this endpoint's ticket, claimed for this DoGet
        (the first DoGet only; None for any other, which runs the query itself)."""
        part = plan.parts[index]
        if isinstance(part, SqlPart) and part.held is not None and part.held.take():
            return part.held
        return None

    def _taken(self, run: HeldRun, part: SqlPart, state: CallState) -> flight.FlightDataStream:
        """DoGet of a run it took over (:meth:`claim`): wait for its head, then stream it as
        :meth:`_capped_stream` streams a run of its own, under the run's deadline (counted from
        GetFlightInfo). An error of the run is mapped as DoGet's own would be."""
        deadline = run.deadline
        state.deadline = deadline
        state.fields["cache"] = "handed-over"
        try:
            ran = run.result()
        except Exception as e:  # noqa: BLE001 - DuckDB's errors arrive through Arrow (OSError …)
            raise self._failure(e, part, state, deadline) from None
        assert isinstance(ran, _InfoRun)
        cap = part.row_cap
        assert cap is not None
        if ran.key is not None:
            self.cache.count_miss()
        if ran.complete:
            self.cache.store(ran.key, ran.schema, ran.head, ran.size, truncated=ran.cut)
            return self._stream_capped(_Capped(ran.schema, ran.head, ran.cut), part, state, deadline, None)
        flag = _Cut()
        rest = _capped(ran.reader, cap.max_rows - sum(b.num_rows for b in ran.head), flag)
        teed = self.cache.tee(ran.key, rest, ran.head, truncated=flag.__bool__)
        return self._stream_capped(
            _Capped(teed.schema, ran.head, False, teed, flag), part, state, deadline, None
        )

    def run_query(
        self,
        admission: Admission,
        principal: Principal,
        tables: tuple[TableRef, ...],
        part: SqlPart,
        *,
        timeout_seconds: float | None = None,
    ) -> RunningQuery:
        """A capped query run for a caller outside Flight (catalog/query_port.py): DoGet's
        path without the Flight stream around it — one admission slot (a query of its own),
        the query timeout on its cursor, the result cache (a hit needs no cursor), the head
        read here (:meth:`_run_capped`) so that refusals, binder errors and a timeout are
        raised before any row is sent. The reader goes on in C++ where DoGet's does, and
        raises classified classified QuiverErrors mid-stream. Everything is held
        until :meth:`RunningQuery.close`."""
        cap = part.row_cap
        assert cap is not None  # a query always has a cap
        timeout = self.timeout_for(principal) if timeout_seconds is None else float(timeout_seconds)
        release = admission.acquire(principal, "run-" + secrets.token_hex(6))
        held: list[Callable[[], None]] = [release]
        close = release_all(held, "query.release_failed")

        versions: dict[str, int] = {}
        if tables:
            current = self.versions.current()
            versions = {ref.qualified: current.get(ref.key(), 0) for ref in tables}

        def running(
            reader: pa.RecordBatchReader, truncated: bool | None, cut: Callable[[], bool | None] | None
        ) -> RunningQuery:
            return RunningQuery(
                reader=reader,
                max_rows=cap.max_rows,
                reason=cap.reason,
                tables=tables,
                versions=versions,
                sql=part.normalized or part.sql,
                params=part.params,
                truncated=truncated,
                _cut=cut,
                _release=close,
            )

        deadline: Deadline | None = None
        try:
            key: CacheKey | None = None
            if part.normalized is not None:
                key = self._key(tables, part)
                entry = self.cache.get(key) if key is not None else None
                if entry is not None:
                    return running(self.cache.open(entry), entry.truncated, None)
            cur = self._cursors.take()
            lease = _Lease(cur)
            held.append(lease.close)
            deadline = self.watchdog.arm(timeout, cur.interrupt)
            held.append(lambda: Watchdog.disarm(deadline))
            # Listed for admins, who may cancel it (GET /v1/queries?running=true), until closed.
            names = tuple(ref.qualified for ref in tables)
            held.append(self.runs.track(principal.label, part.sql, names, deadline))
            ran = self._run_capped(cur, key, part)
            if ran.rest is None:
                reader = pa.RecordBatchReader.from_batches(ran.schema, iter(ran.head))
                return running(reader, ran.cut, None)
            flag = ran.flag
            assert flag is not None
            ended = threading.Event()
            reader = _classified(
                ran.rest, deadline, timeout, part.limit is not None, ended, quote_sql=not part.ruled
            )

            def cut() -> bool | None:
                # Cut is known as soon as the cut batch passed; "not cut" only at the end.
                return True if flag else (False if ended.is_set() else None)

            return running(reader, None, cut)
        except BaseException as e:
            close()
            if isinstance(e, Exception):
                err = classify(
                    e,
                    timed_out=deadline is not None and deadline.fired,
                    timeout_seconds=timeout,
                    wrapped=part.limit is not None,
                    quote_sql=not part.ruled,
                )
                if err is not None and err is not e:
                    raise err from None
            raise

    def _profile(
        self, part: ProfilePart, cur: duckdb.DuckDBPyConnection, timeout: float, work: RemoteWork
    ) -> pa.Table:
        if self.catalog.tables.is_live(part.ref):  # aggregates pushed down to Snowflake
            return live.profile(self.catalog, self.watchdog, timeout, part, work)
        if part.cached_only:
            cached = self.profiles.cached(part.ref, part.columns, cursor=cur, relation=part.relation)
            return cached if cached is not None else PROFILE_SCHEMA.empty_table()
        return self.profiles.profile(part.ref, part.columns, cursor=cur, relation=part.relation)

    def read_plan(
        self, admission: Admission, principal: Principal, plan: Plan, work: RemoteWork | None = None
    ) -> pa.Table:
        """The whole result of a sample or profile plan for a caller outside Flight
        (catalog/query_port.py ``read``): each part opened as DoGet opens it — the hot-table
        cache's slice, the profile cache, or DuckDB — under one admission slot and the query
        timeout. Only for plans bounded by construction (``[limits] max_sample_rows``, one row
        per column): the result is read whole. ``work``: what it runs in Snowflake (a live
        table's), for the caller's query-log record."""
        if work is None:
            work = self.catalog.query_log.remote_work(principal)
        if plan.kind not in ("sample", "profile"):
            raise ValueError(f"read_plan reads samples and profiles, not {plan.kind!r}")
        tables: list[pa.Table] = []
        with admission.planning(principal, self._cursors, call=True) as (cur, deadline):
            try:
                for part in plan.parts:
                    if isinstance(part, CachedPart):
                        entry = part.entry()
                        if entry is not None:
                            data = entry.table.slice(part.offset, part.length)
                            tables.append(
                                data.select(list(part.columns)) if part.columns is not None else data
                            )
                            continue
                        part = part.fallback
                    if isinstance(part, ProfilePart):
                        tables.append(self._profile(part, cur, deadline.seconds, work))
                    elif isinstance(part, SqlPart):
                        self.executions += 1
                        reader = arrow_stream(cur, limited(part.sql, part.max_rows), part.params)
                        tables.append(reader.read_all())
                    elif isinstance(part, LivePart):  # a live table's sample, from Snowflake
                        tables.append(
                            live.read_part(self.catalog, self.watchdog, deadline.seconds, part, work)
                        )
                    else:  # pragma: no cover - samples and profiles have no other parts
                        raise TypeError(f"unexpected part {type(part).__name__}")
            except duckdb.Error as e:
                quote = not any(
                    (isinstance(p, SqlPart) and p.ruled) or (isinstance(p, ProfilePart) and p.relation)
                    for p in plan.parts
                )
                raise duckdb_error(
                    e, timed_out=deadline.fired, timeout_seconds=deadline.seconds, quote_sql=quote
                ) from None
        if not tables:
            return plan.schema.empty_table()
        return pa.concat_tables([t.cast(plan.schema) if t.schema != plan.schema else t for t in tables])

    def _key(self, tables: tuple[TableRef, ...], part: SqlPart) -> CacheKey | None:
        """The result cache's key of a query. It holds the data versions of its tables
        (:class:`VersionWatch`), read before the query runs, so the rows stored under it are of
        that version or newer — a newer version seen later drops the entry."""
        assert part.normalized is not None
        versions: dict[tuple[str, str], int] = {}
        if tables:
            current = self.versions.current()
            versions = {ref.key(): current.get(ref.key(), 0) for ref in tables}
        return self.cache.key(part.normalized, part.params, part.max_rows, versions, template=part.template)

    def _lookup(
        self, plan: Plan, part: SqlPart, state: CallState | None = None
    ) -> tuple[CacheKey | None, pa.RecordBatchReader | None, bool]:
        """The result cache's key of a query (:meth:`_key`), its cached rows on a hit, and
        whether those were cut at the row cap."""
        key = self._key(plan.tables, part)
        entry = self.cache.get(key) if key is not None else None
        if entry is None:
            return key, None, False
        if state is not None and state.query is not None:  # the query log counts a hit whole
            state.query.sent(entry.rows, entry.bytes)
        return key, self.cache.open(entry), entry.truncated

    def _capped_stream(
        self,
        cur: duckdb.DuckDBPyConnection,
        key: CacheKey | None,
        part: SqlPart,
        state: CallState,
        deadline: Deadline | None,
        lease: _Lease,
    ) -> flight.FlightDataStream:
        """A query (or percent sample) under a row cap, run and streamed — and stored in the
        result cache when ``key`` is set (a cacheable query missing from it).

        The cap is cut here, not by DuckDB alone, so that a cut is known exactly and reported
        (flight_server/truncation.py): the caller's own ``max_rows`` is DuckDB's ``LIMIT
        max_rows + 1`` (DuckDB can still stop early), the server's ``[limits] max_rows`` is cut
        from the stream (no LIMIT: wrapping every query costs DuckDB a noticeable share of a
        point query, figures in tests/bench/RESULTS.md); either way the row
        past the cap is read, never sent, and the last batch sent carries the cut.

        The head of the result (up to 1 MiB) is read here, in the handler: a small result (a
        point query) is then complete — cached, and streamed from memory by C++ without a
        Python generator in the way — and an error or timeout is raised as a proper
        FlightError. A larger result streams on through a Python generator over its *batches*
        (the cap's cut, and the cache's tee): an error it raises mid-stream would reach the
        client as a Python traceback, so the generator turns any failure into the FlightError
        of proto_docs/errors.md (a timeout mid-stream is then DEADLINE_EXCEEDED with extra_info)."""
        try:
            ran = self._run_capped(cur, key, part)
        except Exception as e:  # noqa: BLE001 - DuckDB's errors arrive through Arrow (OSError …)
            raise self._failure(e, part, state, deadline) from None
        return self._stream_capped(ran, part, state, deadline, lease)

    def _failure(
        self, e: BaseException, part: SqlPart, state: CallState, deadline: Deadline | None
    ) -> flight.FlightError:
        """The FlightError of a failed run of a capped query (proto_docs/errors.md): a timeout
        of its deadline is DEADLINE_EXCEEDED, DuckDB's line numbers are one off when the SQL
        was wrapped in a LIMIT, and a ruled query's SQL is never quoted. Worked out only on
        failure (the principal's timeout is a limits lookup)."""
        timeout = deadline.seconds if deadline is not None else self.timeout_for(state.principal)
        return stream_error(
            e,
            state.request_id,
            timed_out=deadline is not None and deadline.fired,
            timeout_seconds=timeout,
            wrapped=part.limit is not None,
            quote_sql=not part.ruled,
        )

    def _stream_capped(
        self,
        ran: _Capped,
        part: SqlPart,
        state: CallState,
        deadline: Deadline | None,
        lease: _Lease | None,
    ) -> flight.FlightDataStream:
        """The stream of a capped result whose head was read (:meth:`_capped_stream`, or a run
        handed over by GetFlightInfo, whose cursor is never reused: ``lease`` None)."""
        cap = part.row_cap
        assert cap is not None
        if ran.rest is None:
            if ran.cut:
                state.fields["truncated"] = True
                _count_batches(state, ran.head)
                return _cut_stream(ran.schema, ran.head, cap)
            # The cursor is done with (its result read to the end, no transaction): the next
            # request may use it, unless its deadline is close enough to fire.
            # A split query's part read its rows in a transaction of its own: never reused.
            if (
                lease is not None
                and part.layout is None
                and (deadline is None or time.monotonic() < deadline.at - 1.0)
            ):
                if deadline is not None:
                    Watchdog.disarm(deadline)
                lease.recycle(self._cursors)
            return _counted(state, pa.Table.from_batches(ran.head, schema=ran.schema))
        teed, flag = ran.rest, ran.flag
        assert flag is not None
        metadata = cap.stream_metadata()

        facts = state.query

        def batches() -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
            try:
                for batch in teed:
                    if facts is not None:
                        facts.sent(batch.num_rows, batch.nbytes)
                    # _capped raised the flag just before it passed on the cut batch, its last.
                    if flag:
                        state.fields["truncated"] = True
                        yield batch, metadata
                    else:
                        yield batch
            except Exception as e:  # noqa: BLE001 - every failure becomes a FlightError
                raise self._failure(e, part, state, deadline) from None

        return flight.GeneratorStream(teed.schema, batches(), options=_IPC)

    def _run_capped(self, cur: duckdb.DuckDBPyConnection, key: CacheKey | None, part: SqlPart) -> _Capped:
        """Run a capped part on ``cur`` and read the head of its result (the one place a
        capped result is run, for DoGet and for :meth:`run_query`): a complete head is stored
        in the result cache; a longer result goes on as a reader cut at the cap and teed into
        the cache, whose flag is raised when it was cut."""
        cap = part.row_cap
        assert cap is not None
        self.executions += 1
        reader = self._sql(cur, part, part.limit + 1 if part.limit is not None else None)
        head, size, complete, cut = _read_head(reader, self.cache.memory_entry_bytes, cap.max_rows)
        if complete:
            self.cache.store(key, reader.schema, head, size, truncated=cut)
            return _Capped(reader.schema, head, cut)
        flag = _Cut()
        rest = _capped(reader, cap.max_rows - sum(b.num_rows for b in head), flag)
        teed = self.cache.tee(key, rest, head, truncated=flag.__bool__)
        return _Capped(teed.schema, head, False, teed, flag)

    def _filling_stream(
        self, cur: duckdb.DuckDBPyConnection, part: SqlPart, state: CallState, deadline: Deadline | None
    ) -> flight.FlightDataStream:
        """A part of the first scan of a table: streamed from DuckDB like any scan, its batches
        handed to the hot-table cache's :class:`~flight_server.table_cache.Fill` once it has
        sent them all (flight_server/table_cache.py "Fill") — only when the snapshot it read
        is the layout the fill is keyed by. A Python generator over *batches*."""
        fill = part.fill
        assert fill is not None
        try:
            if part.layout is None:  # one endpoint, no layout check: keep what it reads if it is the fill's
                cur.execute("BEGIN TRANSACTION")
                now = read_layout(cur, fill.layout.ref, begin=False)
                reader = arrow_stream(cur, part.sql, part.params)
                if now != fill.layout:
                    fill.abandon("changed")
            else:  # checked: the part's layout is the fill's
                reader = self._sql(cur, part, None)
        except Unavailable:  # the table changed since GetFlightInfo: nothing to fill
            fill.abandon("changed")
            raise
        except Exception:
            fill.abandon("failed")
            raise
        if not fill.live:
            return flight.RecordBatchStream(reader, options=_IPC)
        state.fields["cache"] = "table-fill"
        timeout = deadline.seconds if deadline is not None else self.timeout_for(state.principal)
        feeding = _feeding(reader, fill, part.fill_index, state.request_id, deadline, timeout)
        return flight.GeneratorStream(reader.schema, feeding, options=_IPC)

    @staticmethod
    def _sql(cur: duckdb.DuckDBPyConnection, part: SqlPart, limit: int | None) -> Any:
        if part.layout is not None:
            # The layout check and the rows share one snapshot: the transaction stays open
            # (read-only) until the cursor is closed at the end of the stream.
            cur.execute("BEGIN TRANSACTION")
            now = read_layout(cur, part.layout.ref, begin=False)
            if now != part.layout:
                log.info(
                    "scan.layout_changed",
                    table=part.layout.ref.qualified,
                    version=part.layout.version,
                    now=now.version,
                )
                raise Unavailable(
                    f"table {part.layout.ref.qualified} changed since GetFlightInfo; call "
                    "GetFlightInfo again (the endpoints of one FlightInfo never mix data versions)"
                )
        return arrow_stream(cur, limited(part.sql, limit), part.params)


@dataclasses.dataclass(slots=True)
class _Capped:
    """A capped result started by :meth:`Streamer._run_capped`: its head, and either whether
    the head (the whole result) was cut, or the reader of the whole result (head included)
    with the flag raised when it is cut."""

    schema: pa.Schema
    head: list[pa.RecordBatch]
    cut: bool
    rest: pa.RecordBatchReader | None = None
    flag: _Cut | None = None


@dataclasses.dataclass(slots=True)
class _InfoRun:
    """What a run started by GetFlightInfo read: the head of its result, whether that is the
    whole result (and cut at the cap), the open reader of the rest, and the result cache's
    key (read before the run started)."""

    schema: pa.Schema
    head: list[pa.RecordBatch]
    size: int
    complete: bool
    cut: bool
    reader: pa.RecordBatchReader
    key: CacheKey | None

    def close(self) -> None:
        self.reader.close()


class _SpareCursors:
    """A few idle DuckDB cursors, ready for the next request.

    Creating and closing a cursor (a DuckDB connection) costs a tenth of a point query or so
    (tests/bench/RESULTS.md, "Costs the code relies on"). A cursor whose query was read to the end inside the handler —
    no open result, no transaction (queries never BEGIN; only scans do, and their cursors
    are not given back), its deadline disarmed long before it could fire — is as good as
    new, so it is kept for the next request (any thread: a cursor is used by one request at
    a time, and gRPC's threads come and go). At most ``size`` are kept.
    """

    def __init__(self, catalog: Catalog, size: int = 8) -> None:
        self._catalog = catalog
        self._spare: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self.size = size

    def take(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._spare:
                return self._spare.pop()
        return self._catalog.db.cursor()

    def give_back(self, cur: duckdb.DuckDBPyConnection) -> bool:
        with self._lock:
            if len(self._spare) >= self.size:
                return False
            self._spare.append(cur)
            return True

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, []
        for cur in spare:
            cur.close()


class _Lease:
    """A request's cursor: closed when the call ends, unless given back for reuse."""

    __slots__ = ("_cur",)

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._cur: duckdb.DuckDBPyConnection | None = cur

    def recycle(self, cursors: _SpareCursors) -> None:
        cur, self._cur = self._cur, None
        if cur is not None and not cursors.give_back(cur):
            cur.close()

    def close(self) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            cur.close()


_submit: Callable[..., Any] | None
try:  # DuckDB's own submit step (see arrow_stream)
    from duckdb._seam import submit as _submit
except ImportError:  # pragma: no cover - another duckdb release: the public API is used
    _submit = None


@contextlib.contextmanager
def table_snapshot(catalog: Catalog, ref: TableRef) -> Iterator[Snapshot]:
    """One table's layout and rows in one read-only snapshot, for the hot-table cache's idle
    fill (flight_server/table_cache.py "IdleFiller"): the entry it stores is keyed by the
    layout of exactly the rows it read."""
    cur = catalog.db.cursor()
    try:
        cur.execute("BEGIN TRANSACTION")
        layout = read_layout(cur, ref, begin=False)
        yield Snapshot(layout, lambda: arrow_stream(cur, f"SELECT * FROM {ref.sql}"), cur.interrupt)
    finally:
        cur.close()  # ends the read-only transaction


def arrow_stream(
    cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = (), batch_rows: int = BATCH_ROWS
) -> pa.RecordBatchReader:
    """DuckDB's Arrow stream of one statement the guard accepted, run once.

    DuckDB 2.0's relation API (``cur.sql(q).to_arrow_reader()``) parses and binds the
    statement in Python to build a lazy relation, then parses and binds it again to run it:
    about a quarter of a point query's own time (tests/bench/RESULTS.md, "Costs the code
    relies on"). Quiver builds no
    relation — it only streams — so it hands the text to the engine's submit step, the one
    that relation API ends in (``duckdb._seam.submit``, format "stream"): same engine, same
    execution, same errors, no Python-side relation (which also means no replacement scans
    of Python variables). It is a private entry point of the duckdb package, pinned in
    constraints.txt; without it the public API is used. tests/test_dataplane.py checks that
    both give the same rows."""
    values = list(params) if params else None
    if _submit is not None:
        return _submit(cur, sql, values, "stream", batch_rows).arrow_reader()
    return cur.sql(sql, params=values).to_arrow_reader(batch_rows)


def _classified(
    reader: pa.RecordBatchReader,
    deadline: Deadline,
    timeout: float,
    wrapped: bool,
    ended: threading.Event,
    *,
    quote_sql: bool = True,
) -> pa.RecordBatchReader:
    """``reader``, whose failures mid-stream are raised as the QuiverError
    :func:`~flight_server.errors.classify` gives (a fault of ours stays what it was: the
    caller logs it); ``ended`` is set once it was read to its end."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
            ended.set()
        except Exception as e:
            err = classify(
                e, timed_out=deadline.fired, timeout_seconds=timeout, wrapped=wrapped, quote_sql=quote_sql
            )
            if err is None or err is e:
                raise
            raise err from None

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def _read_head(
    reader: pa.RecordBatchReader, max_bytes: int, cap: int | None = None
) -> tuple[list[pa.RecordBatch], int, bool, bool]:
    """Batches of ``reader`` up to a little over ``max_bytes`` and at most ``cap`` rows: the
    batches, their size, whether that is the whole result, and whether it was cut at ``cap``
    (then the reader is closed). Cut means a row beyond ``cap`` existed: a result of exactly
    ``cap`` rows is complete and not cut (the reader is read on to its end to know)."""
    head: list[pa.RecordBatch] = []
    size = rows = 0
    while size <= max_bytes:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return head, size, True, False
        if cap is not None and rows + batch.num_rows > cap:
            reader.close()
            if rows < cap:  # else the cut falls between two batches: the last one is whole
                batch = batch.slice(0, cap - rows)
                head.append(batch)
                size += batch.nbytes
            return head, size, True, True
        head.append(batch)
        size += batch.nbytes
        rows += batch.num_rows
    return head, size, False, False


def _labelled(
    reader: pa.RecordBatchReader, request_id: str, deadline: Deadline | None, timeout_seconds: float
) -> Iterator[pa.RecordBatch]:
    """``reader``'s batches, a failure mid-stream turned into the FlightError of
    proto_docs/errors.md (a C++ stream would end in an unlabelled one)."""
    try:
        yield from reader
    except Exception as e:  # noqa: BLE001 - every failure becomes a FlightError
        timed_out = deadline is not None and deadline.fired
        raise stream_error(e, request_id, timed_out=timed_out, timeout_seconds=timeout_seconds) from None


def _feeding(
    reader: pa.RecordBatchReader,
    fill: Fill,
    index: int,
    request_id: str,
    deadline: Deadline | None,
    timeout_seconds: float,
) -> Iterator[pa.RecordBatch]:
    """``reader``'s batches, kept for ``fill`` (part ``index``) and handed over once the last
    one was sent; a part over the budget stops keeping them, a failure or a client that goes
    away ends the fill. Any failure becomes the FlightError of proto_docs/errors.md."""
    kept: list[pa.RecordBatch] = []
    size, keep, finished, failed = 0, True, False, False
    fill.feeding(+1)
    try:
        for batch in reader:
            if keep:
                size += batch.nbytes
                if fill.fits(size):
                    kept.append(batch)
                else:
                    keep, kept = False, []
                    fill.too_large()
            yield batch
        finished = True
        if keep:  # before the stream ends: a scan that follows this one finds the entry
            fill.complete(index, kept, size, reader.schema)
    except Exception as e:  # noqa: BLE001 - every failure becomes a FlightError
        failed = True
        timed_out = deadline is not None and deadline.fired
        raise stream_error(e, request_id, timed_out=timed_out, timeout_seconds=timeout_seconds) from None
    finally:
        fill.feeding(-1)
        if not finished and keep:  # failed, or the client went away (the generator was closed)
            fill.abandon("failed" if failed else "cancelled")


class _Cut:
    """Raised (true) once :func:`_capped` cut its stream at the cap."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = False

    def __bool__(self) -> bool:
        return self.cut


def _capped(reader: pa.RecordBatchReader, rows: int, flag: _Cut) -> pa.RecordBatchReader:
    """The first ``rows`` rows of ``reader`` (the row cap, cut from the stream); ``flag`` is
    raised just before the cut batch — the last, possibly empty — is passed on, when a row
    beyond the cap existed."""

    def batches() -> Iterator[pa.RecordBatch]:
        left = rows
        for batch in reader:
            if batch.num_rows > left:
                flag.cut = True
                reader.close()
                yield batch.slice(0, left)
                return
            left -= batch.num_rows
            yield batch

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def _counted(state: CallState, table: pa.Table, nbytes: int | None = None) -> flight.FlightDataStream:
    """A whole table streamed by C++, its rows and bytes (``nbytes``, when the caller summed
    them already) counted for the query log first."""
    if state.query is not None:
        state.query.sent(table.num_rows, table.nbytes if nbytes is None else nbytes)
    return flight.RecordBatchStream(table, options=_IPC)


def _count_batches(state: CallState, batches: Iterable[pa.RecordBatch]) -> None:
    """Count batches held in memory (a cut result) for the query log."""
    if state.query is not None:
        for batch in batches:
            state.query.sent(batch.num_rows, batch.nbytes)


def _cut_stream(schema: pa.Schema, batches: Iterable[pa.RecordBatch], cap: RowCap) -> flight.FlightDataStream:
    """A cut result (known cut: read whole, or replayed from a cache or a stored async result):
    its batches, the last one carrying the cut as ``app_metadata``. A Python generator over
    *batches* (one batch of look-ahead), only ever for a result that was cut."""
    metadata = cap.stream_metadata()

    def tagged() -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
        last: pa.RecordBatch | None = None
        for batch in batches:
            if last is not None:
                yield last
            last = batch
        yield (last if last is not None else pa.RecordBatch.from_pylist([], schema=schema)), metadata

    return flight.GeneratorStream(schema, tagged(), options=_IPC)
