"""The hot-table cache: tables that are scanned again are served from memory.

A full scan through DuckDB redoes DuckDB's whole scan and Arrow conversion on every request,
on the same cores that then send the bytes. For a table read again and again (agents reload
the same dimension tables all day) that work is wasted: once the table is an Arrow table in
memory, a scan is just the transport — no slower than a bare ``pyarrow.flight`` server
streaming a ready table (tests/bench/RESULTS.md, "Flight data plane", has the figures).

How it works:

* **Key.** An entry is one table at one data version, like every cache of the data plane
  (profiles, query results): every writer bumps the version in the transaction of its change
  (``TableCatalog.bump_version``). ``GetFlightInfo`` looks the current version up through the
  :class:`~flight_server.versions.VersionWatch` (a ``stat`` of the database files while
  nothing was committed), so a new ``GetFlightInfo`` never gets an old snapshot, and an entry
  of an older version is dropped as soon as a newer one is seen.
* **Fill when idle** (``[cache] table_fill = "idle"``, the default). The scan that misses
  streams from DuckDB exactly like an uncached scan — C++ moves DuckDB's batches, Python
  keeps none — and only queues its table (:meth:`TableCache.want`). One background thread
  (:class:`IdleFiller`) loads queued tables once no request has run for ``IDLE_SECONDS``
  (:class:`Activity`: every Flight call holds it from its start to its end, and every query
  any other path runs — POST /v1/query, MCP, async queries, exports — while it runs), in
  one snapshot — layout and rows together, so the entry is keyed by what it holds — and
  yields at the next batch as soon as a call starts (nothing is stored; the table is first
  again at the next idle moment). Why not fill while the first scan streams: keeping every
  batch the scan sends makes each new batch fresh memory (~30,000 more minor page faults
  for a 250 MB table, measured from /proc) where an uncached scan reuses what it freed, and
  puts a Python generator on every batch; that made the first scan 5-14 % slower than the
  same scan with the cache off (tests/bench/bench_agent.py, first-scan rows). Loading while
  idle costs the first scan nothing and, on two cores, never competes with a request; the
  price is that the table is held only after the next idle moment, not at once.
* **Fill by the scan** (``table_fill = "scan"``). The first scan's endpoints stream from
  DuckDB (each in the snapshot whose layout it checks), and hand the batches they sent to a
  :class:`Fill` as they pass — Python only keeps references to batches. When every endpoint
  has been read whole, the parts, in endpoint order, become the entry, keyed by the layout
  all of them checked: the table is held as soon as the first scan ends. A scan that finds a
  fill running (of its own table or another) is served by DuckDB without one. A part that
  fails or whose client goes away ends the fill; a fill whose endpoints are not all read
  within ``FILL_SECONDS`` lapses; either way the next scan starts another. The idle fill is
  a :class:`Fill` of one part: only one fill of either kind runs at a time.
* **Budget.** Entries share ``[cache] table_memory_bytes`` (default: 1/8 of the memory the
  process may use; 0 disables the cache). Least recently used entries are evicted to make
  room. A table larger than the budget is never cached: its size is estimated from the row
  count and column widths before the fill, and a fill stops as soon as the batches read
  exceed the budget (the scan itself streams on; the attempt is remembered for that
  layout, so it is not retried). Memory is therefore at most the budget plus one fill.
* **After a restart** (``[cache] reload_hot_tables``, :meth:`TableCache.remember`). The cache
  names the tables it holds — never their data — in ``DATA_DIR/hot-tables.json``, rewritten
  when that set changes; the next start queues them for the idle fill, so they load in the
  background as after a miss (a database's buffer-pool dump and reload): the agents of a
  restarted server do not pay the cold first scan (DuckDB decompressing every block into
  fresh buffers) for the tables they were using. A table that changed between runs is
  loaded as it is now (its next scan would load that too); one that was dropped or no longer
  fits is skipped; a corrupt file is ignored.
* **Endpoints.** A cached scan is split exactly like a DuckDB scan; each endpoint is a
  zero-copy slice of the one cached table, so every endpoint of a ``FlightInfo`` serves the
  same snapshot and mixing versions is impossible by construction. Tickets hold the entry
  weakly: an entry evicted before its ``DoGet`` is read from DuckDB instead, with the layout
  check of the DuckDB path (UNAVAILABLE when the table changed meanwhile).

The Arrow batches come from DuckDB's C++ reader; Python only keeps references to batches.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import pyarrow as pa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from catalog import TableRef
from catalog.resources import memory_available
from catalog.status import CachedTable as CachedTableStatus
from catalog.status import TableCacheStatus, TableReloadStatus
from flight_server.versions import Layout

log = structlog.get_logger("flight_server")

#: Layouts that were too large to cache, remembered so that a scan does not retry the fill.
TOO_LARGE_MEMORY = 1024
#: A fill lapses when the endpoints of the scan that feeds it are not all read within this
#: long, or when none of them has been streaming for FILL_IDLE_SECONDS (a client that read
#: only some of them): the next scan, of any table, may then start a fill.
FILL_SECONDS = 60.0
FILL_IDLE_SECONDS = 5.0
#: An idle fill (``[cache] table_fill = "idle"``) starts once the data plane has had no call
#: in progress for this long, and yields as soon as one starts.
IDLE_SECONDS = 0.25
#: How long shutdown waits for an idle fill to notice it should stop (it checks between
#: batches, and its DuckDB query is interrupted).
STOP_SECONDS = 5.0
#: The file in the data dir that names the tables the cache holds (``[cache]
#: reload_hot_tables``): names, versions and sizes, never data. A larger file is not read.
HOT_TABLES_FILE = "hot-tables.json"
MAX_HOT_TABLES_BYTES = 1024**2

_Count = Annotated[int, msgspec.Meta(ge=0)]


class HotTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One table the cache held: enough to find it again and to skip it when it no longer
    fits (``bytes``); ``version`` and ``rows`` say which rows were held (for whoever reads
    the file: a table that changed since is loaded as it is now)."""

    schema: str
    name: str
    version: _Count
    rows: _Count
    bytes: _Count


class HotTables(msgspec.Struct, forbid_unknown_fields=True):
    """``DATA_DIR/hot-tables.json``: the tables held, most recently used first."""

    tables: list[HotTable]


def resolve_budget(setting: int | str) -> int:
    """``[cache] table_memory_bytes``: bytes, 0 (off) or "auto" (1/8 of the memory available)."""
    if setting == "auto":
        return memory_available() // 8
    return max(0, int(setting))


#: Bytes per row of Arrow types of a fixed width, for the size estimate before a fill.
def _fixed_width(t: pa.DataType) -> int:
    if pa.types.is_boolean(t):
        return 1
    try:
        return max(1, t.bit_width // 8)
    except ValueError:
        # Variable width (strings, lists …): count its offsets only — a lower bound.
        return 4


def estimate_bytes(schema: pa.Schema, rows: int) -> int:
    """A lower bound of the Arrow size of ``rows`` rows of ``schema``."""
    return rows * sum(_fixed_width(f.type) for f in schema)


@dataclass(eq=False, slots=True, weakref_slot=True)
class CachedTable:
    """One table in one layout, held in memory. Weakly referenceable: tickets hold it weakly."""

    ref: TableRef
    layout: Layout
    table: pa.Table
    bytes: int
    filled_seconds: float
    hits: int = 0

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    @property
    def rows(self) -> int:
        return self.table.num_rows


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.hits = Counter("quiver_table_cache_hits_total", "Scans served from memory.", registry=registry)
        self.misses = Counter(
            "quiver_table_cache_misses_total", "Scans of tables not in memory.", registry=registry
        )
        self.bytes = Gauge("quiver_table_cache_bytes", "Bytes of tables held in memory.", registry=registry)
        self.entries = Gauge("quiver_table_cache_entries", "Tables held in memory.", registry=registry)
        self.fills = Counter(
            "quiver_table_cache_fills_total",
            "Attempts to load a table into memory, by outcome (ok, too_large, failed).",
            ["outcome"],
            registry=registry,
        )
        self.idle = Counter(
            "quiver_table_cache_idle_fills_total",
            "Idle fills (tables loaded while the data plane was idle), by outcome "
            "(ok, yielded: a call arrived, stale: nothing held at the version read when it ended).",
            ["outcome"],
            registry=registry,
        )
        self.queued = Gauge(
            "quiver_table_cache_queued", "Tables waiting for an idle fill.", registry=registry
        )
        self.reloads = Counter(
            "quiver_table_cache_reloads_total",
            "Tables of the previous run's hot-table cache loaded again after a restart, by outcome "
            "(ok, dropped, changed, too_large, failed, skipped).",
            ["outcome"],
            registry=registry,
        )
        self.evictions = Counter(
            "quiver_table_cache_evictions_total",
            "Tables dropped from memory, by reason (size, stale, shutdown).",
            ["reason"],
            registry=registry,
        )


class Fill:
    """One table being loaded into memory by the scan that missed it (:meth:`TableCache.begin_fill`).

    Each endpoint of that scan streams its rows from DuckDB, in the snapshot whose layout it
    checked, and passes its batches here when it has read them all (:meth:`complete`); the
    table is the parts in endpoint order — rowid order, the order a scan returns — stored
    once every part has arrived. A part that fails or whose client goes away ends the fill
    (:meth:`abandon`), and so does a part over the budget (remembered for that layout, as
    too large); a fill whose parts do not all arrive within ``FILL_SECONDS`` lapses, and the
    next scan starts another. The first scan therefore costs no second read of the table."""

    def __init__(self, cache: TableCache, ref: TableRef, layout: Layout, parts: int) -> None:
        self._cache = cache
        self.ref = ref
        self.layout = layout
        self.started = self._touched = time.monotonic()
        self._parts: list[list[pa.RecordBatch] | None] = [None] * parts
        self._size = 0
        self._feeding = 0
        self._lock = threading.Lock()
        self._over = False

    def expired(self) -> bool:
        now = time.monotonic()
        if now - self.started > FILL_SECONDS:
            return True
        return self._feeding == 0 and now - self._touched > FILL_IDLE_SECONDS

    @property
    def live(self) -> bool:
        return not self._over and not self.expired()

    def feeding(self, delta: int) -> None:
        """A part's stream starts (+1) or ends (-1) feeding this fill."""
        with self._lock:
            self._feeding += delta
            self._touched = time.monotonic()

    def fits(self, size: int) -> bool:
        """Whether a part of ``size`` bytes, beside the parts already complete, fits the budget."""
        return self._size + size <= self._cache.budget

    def complete(self, index: int, batches: list[pa.RecordBatch], size: int, schema: pa.Schema) -> None:
        """Part ``index`` read whole: kept; the entry is stored when it was the last one."""
        with self._lock:
            if self._over or self._parts[index] is not None:
                return  # ended, or this part was read twice (its ticket redeemed again)
            if self.expired():
                self._over = True
                done = None
            elif self._size + size > self._cache.budget:
                self._over = True
                done = None
                self._cache._fill_too_large(self)
            else:
                self._parts[index] = batches
                self._size += size
                if any(p is None for p in self._parts):
                    return
                self._over = True
                done = [b for part in self._parts for b in part or ()]
        if done is not None:
            self._cache._fill_done(self, pa.Table.from_batches(done, schema=schema), self._size)
        self._cache._fill_over(self)

    def too_large(self) -> None:
        """A part alone passed the budget: the table is not cached at this layout."""
        with self._lock:
            if self._over:
                return
            self._over = True
        self._cache._fill_too_large(self)
        self._cache._fill_over(self)

    def abandon(self, reason: str) -> None:
        """A part failed, or its client went away: nothing is stored."""
        with self._lock:
            if self._over and reason != "expired":
                return
            self._over = True
            self._parts = [None] * len(self._parts)
        if reason == "failed":
            self._cache._outcome("failed")
        log.info("table_cache.fill_abandoned", table=self.ref.qualified, reason=reason)
        self._cache._fill_over(self)


class Activity:
    """The data plane's requests in progress, for the idle fill: a count and a sequence number.

    Every Flight call holds one from its start until its end (for DoGet: until the stream was
    sent), and so does every admission slot (flight_server/admission.py: the queries of POST
    /v1/query, MCP and exports) and every async query's worker run (flight_server/results.py),
    so an idle fill starts only when nothing is running and yields as soon as anything starts —
    on two cores, a fill beside a request would slow that request down."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.busy = 0
        self.seq = 0
        self.quiet_since = time.monotonic()
        #: Threads waiting for the calls in progress to end (the idle fill with a table
        #: queued). The last call to end wakes them, and only them: notifying an idle filler
        #: with nothing queued would be a thread wake-up (a GIL hand-over) on every RPC.
        self.idle_waiters = 0

    def begin(self) -> Callable[[], None]:
        """A call starts; the returned function ends it (once, whatever happens)."""
        with self.cond:
            self.busy += 1
            self.seq += 1
        ended = False

        def end() -> None:
            nonlocal ended
            with self.cond:
                if ended:
                    return
                ended = True
                self.busy -= 1
                if self.busy == 0:
                    self.quiet_since = time.monotonic()
                    if self.idle_waiters:
                        self.cond.notify_all()

        return end


@dataclass(slots=True)
class Snapshot:
    """One table's rows for an idle fill: its layout, a reader of the same snapshot's rows
    (started only when called: a table already held costs no scan), and how to interrupt
    the query (shutdown)."""

    layout: Layout
    rows: Callable[[], pa.RecordBatchReader]
    interrupt: Callable[[], None]


#: Opens a :class:`Snapshot` of a table (flight_server/streams.py ``table_snapshot``); the
#: context manager ends the snapshot's transaction and closes its cursor.
SnapshotSource = Callable[[TableRef], AbstractContextManager[Snapshot]]


@dataclass(slots=True)
class _Queued:
    """A table waiting for an idle fill, loaded as it is when the fill reads it; ``reload``:
    a table of the previous run, whose outcome is counted as a reload's."""

    ref: TableRef
    reload: bool = False


class IdleFiller:
    """Loads the tables that missed into the hot-table cache while the data plane is idle.

    A scan that misses streams from DuckDB exactly like an uncached scan (the C++ reader,
    no Python per batch, no batch kept) and only queues its table here. One background
    thread takes the queue in order once no Flight call has run for ``IDLE_SECONDS``
    (:class:`Activity`), reads the table again in one snapshot — its layout and its rows
    together, so the entry is keyed by exactly what it holds — and stores it through a
    :class:`Fill` of one part (the budget, the one-fill-at-a-time rule and the too-large
    memory are the inline fill's). When a call starts, the fill yields at the next batch:
    nothing is stored, the table goes back to the head of the queue, and the fill begins
    again at the next idle moment. Shutdown stops it (its query is interrupted)."""

    def __init__(
        self,
        cache: TableCache,
        source: SnapshotSource,
        activity: Activity,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._cache = cache
        self._source = source
        self._activity = activity
        self._cond = activity.cond  # one condition: a call that ends wakes the filler
        self.idle_seconds = idle_seconds
        self._queue: OrderedDict[tuple[str, str], _Queued] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._interrupt: Callable[[], None] | None = None
        self.outcomes = {"ok": 0, "yielded": 0, "stale": 0}
        self.running: str | None = None

    def want(self, ref: TableRef, *, reload: bool = False) -> None:
        """Queue ``ref`` for an idle fill (once: a table queued twice is filled once).
        ``reload``: a table of the previous run (:meth:`TableCache.reload`)."""
        with self._cond:
            if self._stopped:
                return
            if ref.key() not in self._queue:
                self._queue[ref.key()] = _Queued(ref, reload)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="quiver-idle-fill", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            queued = len(self._queue)
        self._cache._metrics.queued.set(queued)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Stop: the running fill is interrupted and stores nothing; the queue is dropped."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            interrupt, thread = self._interrupt, self._thread
            self._cond.notify_all()
        if interrupt is not None:
            interrupt()
        if thread is not None:
            thread.join(STOP_SECONDS)

    def _next(self) -> tuple[_Queued, int] | None:
        """The next table to fill and the call sequence it starts at, once idle; None: stop."""
        a = self._activity
        with self._cond:
            while not self._stopped:
                if not self._queue:
                    self._cond.wait()  # until want() or close()
                    continue
                if a.busy:
                    a.idle_waiters += 1  # until the last call in progress ends
                    try:
                        self._cond.wait()
                    finally:
                        a.idle_waiters -= 1
                    continue
                quiet = time.monotonic() - a.quiet_since
                if quiet < self.idle_seconds:
                    self._cond.wait(self.idle_seconds - quiet)
                    continue
                _, item = self._queue.popitem(last=False)
                self.running = item.ref.qualified
                return item, a.seq
            return None

    def _run(self) -> None:
        while (picked := self._next()) is not None:
            item, seq = picked
            ref = item.ref
            try:
                outcome = self._fill(item, seq)
            except Exception as e:  # noqa: BLE001 - a failed fill is logged; the next miss queues it again
                outcome = "failed"
                log.warning("table_cache.idle_fill_failed", table=ref.qualified, error=str(e)[:200])
            with self._cond:
                self.running = None
                self._interrupt = None
                again = outcome == "yielded" and not self._stopped
                if again:
                    self._queue[ref.key()] = item
                    self._queue.move_to_end(ref.key(), last=False)  # first again at the next idle
                if outcome in self.outcomes:
                    self.outcomes[outcome] += 1
                queued = len(self._queue)
            if outcome in self.outcomes:
                self._cache._metrics.idle.labels(outcome).inc()
            self._cache._metrics.queued.set(queued)
            if item.reload and not again and outcome != "stopped" and not self._stopped:
                self._cache._reloaded(ref, outcome)

    def _interrupted(self, seq: int) -> bool:
        a = self._activity
        return self._stopped or a.busy > 0 or a.seq != seq

    def _held(self, layout: Layout) -> bool:
        """Whether this version of the table is in memory already (a scan's fill got it)."""
        return self._cache.peek(layout.ref, layout.version) is not None

    def _fill(self, item: _Queued, seq: int) -> str:
        cache, ref = self._cache, item.ref
        with self._source(ref) as snap:
            with self._cond:
                if self._stopped:
                    return "stopped"
                self._interrupt = snap.interrupt
            layout = snap.layout
            if self._held(layout):
                return "held"
            reader = snap.rows()
            if not cache.admits(ref, layout.version, layout.rows, reader.schema):
                return "too_large" if layout.rows > 0 else "skipped"  # an empty table is never held
            fill = cache.begin_fill(ref, layout, 1)
            if fill is None:
                return "skipped"
            kept: list[pa.RecordBatch] = []
            size = 0
            fill.feeding(+1)
            try:
                for batch in reader:
                    if self._interrupted(seq):
                        fill.abandon("yielded")
                        return "yielded"
                    size += batch.nbytes
                    if not fill.fits(size):
                        fill.too_large()
                        return "too_large"
                    kept.append(batch)
                if self._interrupted(seq):
                    fill.abandon("yielded")
                    return "yielded"
                fill.complete(0, kept, size, reader.schema)
            except BaseException:
                fill.abandon("failed")
                raise
            finally:
                fill.feeding(-1)
        # The table may have changed while it was read: the entry holds the snapshot it read,
        # keyed by that snapshot's version, so a newer version never gets it (TableCache.get).
        return "ok" if cache.peek(ref, layout.version) is not None else "stale"


class TableCache:
    def __init__(
        self, budget_bytes: int, *, registry: CollectorRegistry | None = None, fill: str = "scan"
    ) -> None:
        self.budget = max(0, budget_bytes)
        #: "scan": the first scan fills as it streams (:class:`Fill`); "idle": it only queues
        #: the table, and :class:`IdleFiller` loads it while the data plane is idle.
        self.fill_mode = fill
        self.idle: IdleFiller | None = None
        self._entries: OrderedDict[tuple[str, str], CachedTable] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._fill: Fill | None = None  # one fill at a time: memory is budget + one fill
        self._too_large: OrderedDict[tuple[tuple[str, str], int, int], None] = OrderedDict()
        self._metrics = _Metrics(registry)
        self.hits = self.misses = 0
        self.fills = {"ok": 0, "too_large": 0, "failed": 0}
        self.evicted = {"size": 0, "stale": 0, "shutdown": 0}
        # [cache] reload_hot_tables: the file that names the tables held (None: not kept),
        # what it says now, and the previous run's tables still waiting to be loaded again.
        self._hot_file: Path | None = None
        self._saved: list[HotTable] | None = None
        self._save_lock = threading.Lock()
        self._pending: dict[tuple[str, str], HotTable] = {}
        self._remembered = self._reloaded_ok = 0
        self._skipped: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def fill_when_idle(
        self, source: SnapshotSource, activity: Activity, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        """Fill in the background while the data plane is idle (``[cache] table_fill = "idle"``)."""
        if self.enabled and self.fill_mode == "idle":
            self.idle = IdleFiller(self, source, activity, idle_seconds)

    @property
    def defers(self) -> bool:
        """Whether a scan that misses only queues its table (:class:`IdleFiller`)."""
        return self.idle is not None

    def want(self, ref: TableRef) -> None:
        """A scan of ``ref`` missed: queue it for the idle fill."""
        if self.idle is not None:
            self.idle.want(ref)

    def stop_filling(self) -> None:
        """Shutdown begins: the idle fill stops (its query interrupted) and stores nothing."""
        if self.idle is not None:
            self.idle.close()

    def close(self) -> None:
        """Shutdown: stop the idle fill, drop every entry (the file of hot tables keeps
        naming them: they are what the next start loads again)."""
        self.stop_filling()
        self.invalidate(reason="shutdown")

    # --- the hot tables of the previous run ------------------------------------------------------
    def remember(self, path: Path, tables: Callable[[], list[TableRef]]) -> None:
        """Keep ``path`` naming the tables held, and queue the ones it names from the previous
        run for the idle fill (``[cache] reload_hot_tables``).

        The file is rewritten (a temporary file renamed over it: readers see the old or the
        new one whole) whenever the set of tables held or their versions change — a fill, an
        eviction, a newer version seen — never per scan, and not at shutdown, which drops
        every entry but leaves the file naming them. At start each table it names is queued,
        most recently used first, as a scan that missed would queue it: loaded while the data
        plane is idle, within the budget, one at a time, yielding to Flight calls, so a scan
        that arrives first streams from DuckDB as without the file. A table that is gone
        (``tables``: the stored data tables now) or whose size no longer fits what is left of
        the budget is skipped; one whose data version or row count differ from what was held
        is skipped when its fill reads them (:meth:`IdleFiller._fill`: its next scan loads it
        as any miss). A file that cannot be read or decoded is logged and ignored. Holds no
        data: a restart still reads every table from DuckDB. Off with the cache
        (``table_memory_bytes = 0``), and nothing is reloaded unless tables are filled when
        idle (``table_fill = "idle"``): the file is still kept."""
        if not self.enabled:
            return
        self._hot_file = path
        if self.idle is None:
            return
        remembered = self._read_hot_file(path)
        if remembered is None:
            return
        self._saved = remembered
        try:
            existing = {r.key(): r for r in tables()}
        except Exception as e:  # noqa: BLE001 - start never fails for a reload
            log.warning("table_cache.reload_skipped", reason="tables_unreadable", error=str(e)[:200])
            return
        room = self.budget
        queue: list[tuple[TableRef, HotTable]] = []
        with self._lock:
            self._remembered = len(remembered)
        for hot in remembered:
            key = TableRef(hot.schema, hot.name).key()
            ref = existing.get(key)
            if key in self._pending or any(r.key() == key for r, _ in queue):
                continue  # named twice: loaded once
            if ref is None:
                self._reload_skipped(TableRef(hot.schema, hot.name), "dropped")
            elif hot.bytes > room:
                self._reload_skipped(ref, "too_large")
            else:
                room -= hot.bytes
                queue.append((ref, hot))
        with self._lock:
            self._pending.update((ref.key(), hot) for ref, hot in queue)
        log.info("table_cache.reload_queued", tables=len(queue), remembered=len(remembered))
        for ref, _ in queue:
            self.idle.want(ref, reload=True)
        self._save()

    def _read_hot_file(self, path: Path) -> list[HotTable] | None:
        """The tables ``path`` names; None (logged) when it is absent, unreadable or corrupt."""
        try:
            with path.open("rb") as f:
                data = f.read(MAX_HOT_TABLES_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning(
                "table_cache.hot_tables_ignored", path=str(path), reason="unreadable", error=str(e)[:200]
            )
            return None
        if len(data) > MAX_HOT_TABLES_BYTES:
            log.warning("table_cache.hot_tables_ignored", path=str(path), reason="too_large", bytes=len(data))
            return None
        try:
            return msgspec.json.decode(data, type=HotTables).tables
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            log.warning(
                "table_cache.hot_tables_ignored", path=str(path), reason="corrupt", error=str(e)[:200]
            )
            return None

    def _reload_skipped(self, ref: TableRef, reason: str) -> None:
        with self._lock:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
        self._metrics.reloads.labels(reason).inc()
        log.info("table_cache.reload_skipped", table=ref.qualified, reason=reason)

    def _reloaded(self, ref: TableRef, outcome: str) -> None:
        """A table of the previous run is settled: loaded (``ok``, ``held``: a scan's fill got
        it first) or skipped (``stale``: it changed while read, counted as ``changed``; ``too_large``,
        ``failed``, ``skipped``: another fill in the way)."""
        with self._lock:
            self._pending.pop(ref.key(), None)
        if outcome in ("ok", "held"):
            with self._lock:
                self._reloaded_ok += 1
            self._metrics.reloads.labels("ok").inc()
            log.info("table_cache.reloaded", table=ref.qualified)
        else:
            self._reload_skipped(ref, "changed" if outcome == "stale" else outcome)
        self._save()

    def _listing(self) -> list[HotTable]:
        """What the file should say: the tables held, most recently used first, then the
        previous run's tables not loaded yet (a restart during the reload keeps them). Under
        ``_lock``."""
        held = [
            HotTable(e.ref.schema, e.ref.name, e.layout.version, e.rows, e.bytes)
            for e in reversed(self._entries.values())
        ]
        return held + [t for k, t in self._pending.items() if k not in self._entries]

    def _save(self) -> None:
        """Rewrite the file when what it should say changed (one writer at a time, each
        writing the state it read last: the file never goes back to an older set)."""
        path = self._hot_file
        if path is None:
            return
        with self._save_lock:
            with self._lock:
                listing = self._listing()
            if listing == self._saved:
                return
            temp = path.with_name(f".{path.name}.tmp")
            try:
                temp.write_bytes(msgspec.json.encode(HotTables(listing)))
                os.replace(temp, path)
            except OSError as e:
                log.warning("table_cache.hot_tables_not_saved", path=str(path), error=str(e)[:200])
                temp.unlink(missing_ok=True)
                return
            self._saved = listing

    # --- lookups ------------------------------------------------------------------------------
    def holds(self, ref: TableRef) -> bool:
        """Whether some version of ``ref`` is in memory (cheap: no lookup is counted)."""
        return ref.key() in self._entries

    def get(self, ref: TableRef, version: int, *, count_miss: bool = True) -> CachedTable | None:
        """The entry of ``ref`` at data ``version``, counted as a hit (and, with ``count_miss``,
        its absence as a miss). An entry of an older version is dropped on the way."""
        if not self.enabled:
            return None
        key = ref.key()
        stale: CachedTable | None = None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.layout.version != version:
                if entry.layout.version < version:
                    stale = self._entries.pop(key)
                    self._used -= stale.bytes
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
                entry.hits += 1
                self.hits += 1
            elif count_miss:
                self.misses += 1
        if entry is not None:
            self._metrics.hits.inc()
        elif count_miss:
            self._metrics.misses.inc()
        if stale is not None:
            self._dropped([stale], "stale")
            self._save()
        return entry

    def peek(self, ref: TableRef, version: int) -> CachedTable | None:
        """The entry of ``ref`` at data ``version``, if held — not counted, not touched (a
        caller that may not use it yet)."""
        with self._lock:
            entry = self._entries.get(ref.key())
        return entry if entry is not None and entry.layout.version == version else None

    def admits(self, ref: TableRef, version: int, rows: int, schema: pa.Schema) -> bool:
        """Whether a fill may fit the budget (by a lower-bound estimate of the Arrow size)."""
        if not self.enabled or rows <= 0:
            return False
        with self._lock:
            if (ref.key(), version, rows) in self._too_large:
                return False
        return estimate_bytes(schema, rows) <= self.budget

    # --- filling -------------------------------------------------------------------------------
    def begin_fill(self, ref: TableRef, layout: Layout, parts: int) -> Fill | None:
        """A fill of ``ref`` at ``layout`` fed by the scan that missed: its ``parts`` endpoints
        stream from DuckDB as usual and hand their batches over as they pass
        (:meth:`Fill.complete`); the entry is stored once every part has been read whole.
        None when no fill may start: one is running (of this table or another: memory is the
        budget plus one fill), this layout was too large before, or another scan's fill stored
        this version since the caller looked."""
        if not self.enabled or parts < 1:
            return None
        key = ref.key()
        with self._lock:
            if (key, layout.version, layout.rows) in self._too_large:
                return None
            held = self._entries.get(key)
            if held is not None and held.layout.version >= layout.version:
                return None  # filled by another scan since this one looked
            running = self._fill
            if running is not None and running.live:
                return None
            self._fill = fill = Fill(self, ref, layout, parts)
        if running is not None:
            running.abandon("lapsed")
        return fill

    def _fill_over(self, fill: Fill) -> None:
        with self._lock:
            if self._fill is fill:
                self._fill = None

    def _fill_too_large(self, fill: Fill) -> None:
        self._outcome("too_large")
        with self._lock:
            self._too_large[(fill.ref.key(), fill.layout.version, fill.layout.rows)] = None
            while len(self._too_large) > TOO_LARGE_MEMORY:
                self._too_large.popitem(last=False)
        log.info("table_cache.too_large", table=fill.ref.qualified, budget=self.budget)

    def _fill_done(self, fill: Fill, table: pa.Table, size: int) -> None:
        seconds = time.monotonic() - fill.started
        entry = CachedTable(fill.ref, fill.layout, table, size, seconds)
        self._store(entry)
        self._outcome("ok")
        log.info(
            "table_cache.filled",
            table=fill.ref.qualified,
            version=fill.layout.version,
            rows=table.num_rows,
            bytes=size,
            ms=round(seconds * 1000, 1),
        )

    def _outcome(self, outcome: str) -> None:
        with self._lock:
            self.fills[outcome] += 1
        self._metrics.fills.labels(outcome).inc()

    def _store(self, entry: CachedTable) -> None:
        key = entry.ref.key()
        evicted: list[CachedTable] = []
        stale: list[CachedTable] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.bytes
                if old.layout.version > entry.layout.version:
                    # A newer snapshot got in first (a slow fill of an older layout): keep it.
                    self._entries[key] = old
                    self._used += old.bytes
                    return
                stale.append(old)
            while self._entries and self._used + entry.bytes > self.budget:
                _, victim = self._entries.popitem(last=False)
                self._used -= victim.bytes
                evicted.append(victim)
            self._entries[key] = entry
            self._used += entry.bytes
        self._dropped(stale, "stale")
        self._dropped(evicted, "size")
        self._save()

    def _dropped(self, entries: list[CachedTable], reason: str) -> None:
        with self._lock:
            if entries:
                self.evicted[reason] += len(entries)
            used, count = self._used, len(self._entries)
        if entries:
            self._metrics.evictions.labels(reason).inc(len(entries))
            for e in entries:
                log.info("table_cache.evicted", table=e.ref.qualified, reason=reason, bytes=e.bytes)
        self._metrics.bytes.set(used)
        self._metrics.entries.set(count)

    # --- maintenance ---------------------------------------------------------------------------
    def invalidate(self, ref: TableRef | None = None, *, reason: str = "stale") -> int:
        """Drop the entry of ``ref`` (every entry when None); ``reason`` labels the eviction
        (``shutdown`` when the server stops: nothing was stale)."""
        with self._lock:
            keys = [ref.key()] if ref is not None else list(self._entries)
            doomed = [self._entries.pop(k) for k in keys if k in self._entries]
            for e in doomed:
                self._used -= e.bytes
        self._dropped(doomed, reason)
        if reason != "shutdown":
            self._save()
        return len(doomed)

    def stats(self) -> TableCacheStatus:
        idle = self.idle
        queued = idle.queued if idle is not None else 0
        idle_fills = dict(idle.outcomes) if idle is not None else {}
        filling = idle.running if idle is not None else None
        with self._lock:
            return TableCacheStatus(
                fill_mode=self.fill_mode if self.enabled else "off",
                queued=queued,
                idle_fills=idle_fills,
                idle_filling=filling,
                reload=TableReloadStatus(
                    enabled=self._hot_file is not None and idle is not None,
                    remembered=self._remembered,
                    reloaded=self._reloaded_ok,
                    skipped=dict(self._skipped),
                    pending=len(self._pending),
                    done=not self._pending,
                ),
                enabled=self.enabled,
                entries=len(self._entries),
                bytes=self._used,
                budget_bytes=self.budget,
                hits=self.hits,
                misses=self.misses,
                fills=dict(self.fills),
                evicted=dict(self.evicted),
                tables=[
                    CachedTableStatus(
                        table=e.ref.qualified, version=e.layout.version, rows=e.rows, bytes=e.bytes
                    )
                    for e in reversed(self._entries.values())
                ],
            )
