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
* **Fill.** On the first scan of a table (a cache miss), ``GetFlightInfo`` reads the table
  with DuckDB's Arrow reader in one read-only transaction, together with its layout (version,
  row count, largest rowid), and stores the batches. Synchronously: on two cores, filling first and then streaming from
  memory costs no more than DuckDB streaming while the client receives (both compete for
  the same cores), and every later scan is served from memory. Only one fill runs at a time;
  a scan that finds another table being filled is served by DuckDB, one that finds its own
  table being filled waits for that fill instead of starting a second.
* **Budget.** Entries share ``[cache] table_memory_bytes`` (default: 1/8 of the memory the
  process may use; 0 disables the cache). Least recently used entries are evicted to make
  room. A table larger than the budget is never cached: its size is estimated from the row
  count and column widths before the fill, and a fill stops as soon as the batches read
  exceed the budget (the scan then goes to DuckDB; the attempt is remembered for that
  layout, so it is not retried). Memory is therefore at most the budget plus one fill.
* **Endpoints.** A cached scan is split exactly like a DuckDB scan; each endpoint is a
  zero-copy slice of the one cached table, so every endpoint of a ``FlightInfo`` serves the
  same snapshot and mixing versions is impossible by construction. Tickets hold the entry
  weakly: an entry evicted before its ``DoGet`` is read from DuckDB instead, with the layout
  check of the DuckDB path (UNAVAILABLE when the table changed meanwhile).

The Arrow batches come from DuckDB's C++ reader; Python only keeps references to batches.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from catalog import TableRef
from catalog.resources import memory_available
from catalog.status import CachedTable as CachedTableStatus
from catalog.status import TableCacheStatus
from flight_server.versions import Layout

log = structlog.get_logger("flight_server")

#: Layouts that were too large to cache, remembered so that a scan does not retry the fill.
TOO_LARGE_MEMORY = 1024
#: How long a scan waits for a fill of its own table that another request started.
FILL_WAIT_SECONDS = 60.0


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
        self.evictions = Counter(
            "quiver_table_cache_evictions_total",
            "Tables dropped from memory, by reason (size, stale, shutdown).",
            ["reason"],
            registry=registry,
        )


@dataclass(slots=True)
class _Fill:
    done: threading.Event = field(default_factory=threading.Event)
    result: CachedTable | None = None


#: Reads the table in one snapshot: (its layout, a reader of every row), the transaction open.
Opener = Callable[[duckdb.DuckDBPyConnection], tuple[Layout, pa.RecordBatchReader]]


class TableCache:
    def __init__(self, budget_bytes: int, *, registry: CollectorRegistry | None = None) -> None:
        self.budget = max(0, budget_bytes)
        self._entries: OrderedDict[tuple[str, str], CachedTable] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._fill_lock = threading.Lock()  # one fill at a time: memory is budget + one fill
        self._fills: dict[tuple[str, str], _Fill] = {}
        self._too_large: OrderedDict[tuple[tuple[str, str], int, int], None] = OrderedDict()
        self._metrics = _Metrics(registry)
        self.hits = self.misses = 0
        self.fills = {"ok": 0, "too_large": 0, "failed": 0}
        self.evicted = {"size": 0, "stale": 0, "shutdown": 0}

    @property
    def enabled(self) -> bool:
        return self.budget > 0

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
        return entry

    def admits(self, ref: TableRef, version: int, rows: int, schema: pa.Schema) -> bool:
        """Whether a fill may fit the budget (by a lower-bound estimate of the Arrow size)."""
        if not self.enabled or rows <= 0:
            return False
        with self._lock:
            if (ref.key(), version, rows) in self._too_large:
                return False
        return estimate_bytes(schema, rows) <= self.budget

    # --- filling -------------------------------------------------------------------------------
    def fill(
        self,
        ref: TableRef,
        version: int,
        cursor: Callable[[], duckdb.DuckDBPyConnection],
        opener: Opener,
    ) -> CachedTable | None:
        """Load ``ref`` into memory as of now, or wait for the fill of it that runs, or take
        the entry such a fill stored since the caller's lookup (``version`` or newer).

        The entry is keyed by the layout read in the fill's own snapshot, so it is never
        older than what the caller saw. None when it could not be cached: another table is
        being filled (not waited for), it is larger than the budget, or the fill failed
        (logged; the scan then goes to DuckDB, which reports its own errors).
        """
        if not self.enabled:
            return None
        key = ref.key()
        with self._lock:
            done = self._entries.get(key)
            if done is not None and done.layout.version >= version:
                return done  # filled by another request since this one looked
            running = self._fills.get(key)
            mine = running is None
            if running is None:
                running = self._fills[key] = _Fill()
        if not mine:
            running.done.wait(FILL_WAIT_SECONDS)
            return running.result
        try:
            if not self._fill_lock.acquire(blocking=False):
                return None  # another table is being filled: serve this scan from DuckDB
            try:
                running.result = self._load(ref, cursor, opener)
            finally:
                self._fill_lock.release()
            return running.result
        finally:
            with self._lock:
                self._fills.pop(key, None)
            running.done.set()

    def _load(
        self, ref: TableRef, cursor: Callable[[], duckdb.DuckDBPyConnection], opener: Opener
    ) -> CachedTable | None:
        started = time.perf_counter()
        cur = cursor()
        try:
            layout, reader = opener(cur)
            batches: list[pa.RecordBatch] = []
            size = 0
            for batch in reader:  # batches, not rows: DuckDB converts in C++
                size += batch.nbytes
                if size > self.budget:
                    reader.close()
                    self._outcome("too_large")
                    with self._lock:
                        self._too_large[(ref.key(), layout.version, layout.rows)] = None
                        while len(self._too_large) > TOO_LARGE_MEMORY:
                            self._too_large.popitem(last=False)
                    log.info("table_cache.too_large", table=ref.qualified, budget=self.budget)
                    return None
                batches.append(batch)
            table = pa.Table.from_batches(batches, schema=reader.schema)
        except duckdb.Error as e:
            self._outcome("failed")
            log.warning("table_cache.fill_failed", table=ref.qualified, error=str(e))
            return None
        finally:
            cur.close()
        seconds = time.perf_counter() - started
        entry = CachedTable(ref, layout, table, size, seconds)
        self._store(entry)
        self._outcome("ok")
        log.info(
            "table_cache.filled",
            table=ref.qualified,
            version=layout.version,
            rows=table.num_rows,
            bytes=size,
            ms=round(seconds * 1000, 1),
        )
        return entry

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
        return len(doomed)

    def stats(self) -> TableCacheStatus:
        with self._lock:
            return TableCacheStatus(
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
