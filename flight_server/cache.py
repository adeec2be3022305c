"""The result cache: the same question about the same data is answered once.

Agents ask the same thing again and again (a dashboard refresh, a retry, a fleet of agents
running one prompt). A query result is cached — small results (up to 1 MiB) as their Arrow
batches in memory, larger ones as Arrow IPC stream files in ``DATA_DIR/cache/`` — under a
key made of

- the guard's normalized SQL (DuckDB's parse tree: whitespace, comments and keyword case do
  not matter), the bound parameters (JSON, so ``1``, ``1.0`` and ``"1"`` differ), ``max_rows``
  and anything else the caller passes as ``extra`` (e.g. an endpoint's partition), and
- the data version of every table the query reads.

A writer that changes a table bumps its version, so entries of the old version can never be
served again; they are also deleted eagerly as soon as a newer version is seen (a lookup,
or the sweeper that reads the versions). Entries expire ``[cache] ttl_seconds`` after they were
written; memory entries are bounded by ``[cache] max_memory_bytes`` and files by ``[cache]
max_bytes`` (least recently used entries are evicted), and results above ``[cache]
max_entry_bytes`` are not cached at all.

Queries whose result can differ between two runs on the same data are never cached:
volatile functions (``random()``, ``now()``, ``gen_random_uuid()``, ``current_date`` …) and
samples without a seed. The key does not contain the principal: an admin and an agent asking
the same query of the same table versions get the same rows, and the guard has already
checked that each of them may read every table involved before the lookup.

Why tee rather than "execute into the file, then stream the file": the first request must
not wait for the whole result to be written before its first byte; with a tee the client
receives each batch as DuckDB produces it, and the same batch is kept (a reference, no copy)
or appended to the cache file (one write to the page cache per batch of ~100k rows). Small
results never touch a file: creating one costs about as much as a whole point query. The
entry becomes visible only when the stream completed; a stream that fails or that the client
abandons leaves nothing behind.

Interface for the Flight server (flight_server/server.py builds it; the streamer uses it)::

    cache = ResultCache.for_catalog(catalog)        # metrics, /v1/status "cache", sweeper
    key = cache.key(guarded.normalized, params, max_rows, versions, extra=None)  # None: not cacheable
    entry = cache.get(key)                          # CacheEntry (schema, rows, bytes) or None; counts hit/miss
    reader = cache.open(entry)                      # zero-copy reader, None if evicted meanwhile
    reader = cache.tee(key, reader, head, truncated=flag)  # on a miss: stream AND fill the cache
    cache.store(key, schema, batches, size, truncated=cut)  # a small result read whole

A result cut at its row cap is stored with ``truncated`` set (known only once the stream
ended: ``tee`` asks its ``truncated`` callable then); a hit on it must report the cut again
(flight_server/truncation.py) — the key holds ``max_rows``, so the same key means the same cap.
    cache.close()                                   # at server shutdown
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from catalog import Catalog, TableRef
from catalog.clock import SYSTEM_CLOCK, Clock
from catalog.config import CacheConfig
from catalog.database import Database
from catalog.sqlguard import sql_digest as sql_digest  # also the planner's: one digest
from catalog.status import ResultCacheStatus
from catalog.tables import TableCatalog, fold

log = structlog.get_logger(__name__)

ENTRY_SUFFIX = ".arrows"
PARTIAL_SUFFIX = ".partial"
#: Results up to this size are kept in memory (their batches, no copy), within
#: ``[cache] max_memory_bytes``; larger ones go to files. Writing a file costs about as much
#: as a whole point query (tests/bench/RESULTS.md, "Costs the code relies on"): small
#: results must not pay it.
MEMORY_ENTRY_BYTES = 1024 * 1024

#: How many keys of results too large to keep are remembered (:meth:`ResultCache.tee`).
OVERSIZE_KEYS = 1024

TableKey = tuple[str, str]

#: Functions whose result depends on the moment or on chance, beyond those DuckDB itself
#: marks VOLATILE (read from ``duckdb_functions()`` when a database is at hand).
TIME_AND_CHANCE = frozenset(
    {
        "random",
        "setseed",
        "uuid",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "now",
        "today",
        "current_date",
        "current_time",
        "current_timestamp",
        "current_localtime",
        "current_localtimestamp",
        "get_current_time",
        "get_current_timestamp",
        "transaction_timestamp",
        "localtime",
        "localtimestamp",
        "nextval",
        "currval",
        "txid_current",
        "current_query",
        "current_query_id",
        "current_transaction_id",
        "current_connection_id",
    }
)


def _walk_volatile(node: Any, volatile: frozenset[str]) -> bool:
    if isinstance(node, dict):
        cls = node.get("class")
        if cls == "FUNCTION" and str(node.get("function_name", "")).lower() in volatile:
            return True
        if cls == "COLUMN_REF":
            # current_date, current_timestamp … parse as column references of that name.
            names = node.get("column_names") or []
            if len(names) == 1 and str(names[0]).lower() in volatile:
                return True
        sample = node.get("sample")
        if isinstance(sample, dict) and not sample.get("repeatable", False):
            return True
        return any(_walk_volatile(v, volatile) for v in node.values())
    if isinstance(node, list):
        return any(_walk_volatile(v, volatile) for v in node)
    return False


_KEY_ENCODER = msgspec.json.Encoder()
#: Guard shape templates whose volatility verdict is remembered (ResultCache._volatile_query).
VOLATILE_TEMPLATES = 4096


def _plain(value: Any) -> bool:
    """A JSON scalar that msgspec and json encode alike, and distinctly (``1``, ``1.0``,
    ``"1"``, ``true``; not NaN or infinities, which msgspec writes as null)."""
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return True
    return isinstance(value, float) and math.isfinite(value)


def _table_key(table: TableRef | TableKey) -> TableKey:
    """A table as the cache keys it: folded the way DuckDB matches names (``TableRef.key``)."""
    return table.key() if isinstance(table, TableRef) else (fold(table[0]), fold(table[1]))


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: str
    #: (table key, data version) of every table read, sorted.
    tables: tuple[tuple[TableKey, int], ...]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: CacheKey
    schema: pa.Schema
    rows: int
    bytes: int
    created: float  # monotonic
    expires: float  # monotonic
    #: A small result's batches, held in memory (no file) — or None for a file entry.
    batches: tuple[pa.RecordBatch, ...] | None = None
    #: The Arrow IPC stream file of a larger result — or None for a memory entry.
    path: Path | None = None
    #: The result was cut at its row cap (the key's ``max_rows``): a hit reports the cut.
    truncated: bool = False

    @property
    def tier(self) -> str:
        return "memory" if self.batches is not None else "disk"


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.hits = Counter("quiver_cache_hits_total", "Result cache hits.", registry=registry)
        self.misses = Counter("quiver_cache_misses_total", "Result cache misses.", registry=registry)
        self.bytes = Gauge("quiver_cache_bytes", "Bytes of cached results on disk.", registry=registry)
        self.entries = Gauge("quiver_cache_entries", "Cached results.", registry=registry)
        self.evictions = Counter(
            "quiver_cache_evictions_total",
            "Entries removed before use, by reason (size, stale, expired).",
            ["reason"],
            registry=registry,
        )


class ResultCache:
    def __init__(
        self,
        cache_dir: Path,
        config: CacheConfig,
        *,
        db: Database | None = None,
        tables: TableCatalog | None = None,
        registry: CollectorRegistry | None = None,
        sweep_seconds: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.dir = cache_dir
        self._clock = clock  # what entry expiry reads (catalog/clock.py)
        self.config = config
        self._tables = tables
        self._db = db
        self._metrics = _Metrics(registry)
        # Two LRU pools, each within its own byte budget: small results in memory, the rest
        # in files. A digest lives in at most one of them.
        self._tiers: dict[str, OrderedDict[str, CacheEntry]] = {
            "memory": OrderedDict(),
            "disk": OrderedDict(),
        }
        self._budget = {"memory": config.max_memory_bytes, "disk": config.max_bytes}
        self._used = {"memory": 0, "disk": 0}
        self._latest: dict[TableKey, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.max_entry_bytes = min(config.max_entry_bytes, config.max_bytes)
        self.memory_entry_bytes = min(MEMORY_ENTRY_BYTES, config.max_memory_bytes, self.max_entry_bytes)
        self.hits = self.misses = self.uncacheable = self.too_large = 0
        # Keys whose result outgrew max_entry_bytes while it was teed: the same query at the
        # same data versions (the key holds them) is streamed without a tee next time, instead
        # of writing up to max_entry_bytes to a file only to delete it again.
        self._oversize: OrderedDict[str, None] = OrderedDict()
        self.evicted = {"size": 0, "stale": 0, "expired": 0}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.chmod(0o700)
        # The index lives in memory: files of an earlier process are orphans.
        for stale in cache_dir.iterdir():
            if stale.suffix in (ENTRY_SUFFIX, PARTIAL_SUFFIX):
                stale.unlink(missing_ok=True)
        self._volatile = TIME_AND_CHANCE | self._duckdb_volatile(db)
        self._is_volatile = lru_cache(maxsize=4096)(self._compute_volatile)
        self._template_verdicts: dict[tuple[str, ...], bool] = {}
        #: Texts whose volatility was decided by reading them (a count for tests).
        self.volatile_scans = 0
        interval = sweep_seconds if sweep_seconds is not None else min(30.0, max(0.5, config.ttl_seconds / 2))
        self._sweeper = threading.Thread(
            target=self._sweep_loop, args=(interval,), name="quiver-cache-sweeper", daemon=True
        )
        self._sweeper.start()

    @classmethod
    def for_catalog(cls, catalog: Catalog) -> ResultCache:
        """The cache of ``quiver serve``: DATA_DIR/cache, ``[cache]`` config, metrics in the
        catalog's registry. Its :meth:`stats` are the top of GET /v1/status "cache", which the
        Flight server completes with the hot-table cache (``QuiverFlightServer.cache_status``)."""
        return cls(
            catalog.data_dir / "cache",
            catalog.config.cache,
            db=catalog.db,
            tables=catalog.tables,
            registry=catalog.metrics.registry,
            clock=catalog.clock,
        )

    @staticmethod
    def _duckdb_volatile(db: Database | None) -> frozenset[str]:
        if db is None:
            return frozenset()
        with db.reading() as cur:
            rows = cur.execute(
                "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE stability = 'VOLATILE'"
            ).fetchall()
        return frozenset(r[0] for r in rows)

    def _compute_volatile(self, normalized: str) -> bool:
        self.volatile_scans += 1
        # A fresh literal is a new text, so this runs for every fresh-text query without a shape
        # template (_volatile_query): first a scan
        # of the text itself. The guard's normalized tree is compact, sorted, ASCII-only JSON
        # (non-ASCII as \u escapes), so a volatile function or column name the walk would find
        # is a substring of its lower case, and a sample is ``"sample":{``. Neither present (and
        # no escape the walk would decode): not volatile, without decoding kilobytes of JSON.
        # Anything else — a column merely named like one — is decided by the walk.
        if "\\u" not in normalized and '"sample":{' not in normalized:
            lowered = normalized.lower()
            if not any(name in lowered for name in self._volatile):
                return False
        try:
            tree = json.loads(normalized)
        except ValueError:
            return True  # not a parse tree: do not trust it with the cache
        return _walk_volatile(tree, self._volatile)

    def _volatile_query(self, normalized: str, template: tuple[str, ...] | None) -> bool:
        """:meth:`volatile`, remembered per guard shape template when there is one
        (``GuardedQuery.template``): texts of one template differ only in the values of literal
        constants, which the verdict never reads (function names, column names and samples
        are the template's), so a fresh literal costs no scan of its whole tree. Bounded."""
        if template is None:
            return bool(self._is_volatile(normalized))
        verdict = self._template_verdicts.get(template)
        if verdict is None:
            verdict = bool(self._is_volatile(normalized))
            verdicts = self._template_verdicts
            if len(verdicts) >= VOLATILE_TEMPLATES:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del verdicts[next(iter(verdicts))]  # the oldest (racing threads: any one)
            verdicts[template] = verdict
        return verdict

    # --- keys ------------------------------------------------------------------------------------
    def volatile(self, normalized: str) -> bool:
        """Whether a guarded query calls a volatile function (its result must never be
        replayed): also what live results are kept by (flight_server/live.py)."""
        return bool(self._is_volatile(normalized))

    def key(
        self,
        normalized: str,
        params: Sequence[Any],
        max_rows: int | None,
        versions: Mapping[TableRef, int] | Mapping[TableKey, int],
        *,
        extra: Any = None,
        template: tuple[str, ...] | None = None,
    ) -> CacheKey | None:
        """The cache key of a guarded query, or None when its result must not be cached
        (cache disabled, volatile functions, unseeded samples, parameters that are not JSON).

        ``versions``: the data version of every table the query reads (``GuardedQuery.tables``
        looked up in ``TableCatalog.versions``), read in the snapshot that will produce the
        rows. Seeing a newer version than before drops the older entries of that table.
        """
        if not self.config.enabled:
            return None
        if self._volatile_query(normalized, template):
            with self._lock:
                self.uncacheable += 1
            return None
        tables = tuple(sorted((_table_key(k), int(v)) for k, v in versions.items()))
        digest = sql_digest(normalized)
        if extra is None and all(_plain(p) for p in params):
            # The common case (scalar parameters): msgspec, several times faster than json.
            material = _KEY_ENCODER.encode((digest, params, max_rows, tables)).decode()
        else:
            try:
                material = json.dumps(
                    {
                        "sql": digest,
                        "params": list(params),
                        "max_rows": max_rows,
                        "tables": tables,
                        "extra": extra,
                    },
                    sort_keys=True,
                    separators=(",", ":"),
                )
            except (TypeError, ValueError):
                with self._lock:
                    self.uncacheable += 1
                return None
        self._observe_versions(tables)
        return CacheKey(hashlib.sha256(material.encode()).hexdigest(), tables)

    def _observe_versions(self, tables: Sequence[tuple[TableKey, int]]) -> int:
        newer = False
        with self._lock:
            for table, version in tables:
                seen = self._latest.get(table)
                if seen is None or version > seen:
                    newer = newer or seen is not None
                    self._latest[table] = version
            doomed = self._take_locked(self._is_stale_locked) if newer else []
        self._delete(doomed, "stale")
        return len(doomed)

    def _is_stale_locked(self, entry: CacheEntry) -> bool:
        return any(v < self._latest.get(t, v) for t, v in entry.key.tables)

    def _take_locked(self, doomed: Callable[[CacheEntry], bool]) -> list[CacheEntry]:
        """Remove and return the entries of both tiers for which ``doomed`` is true."""
        out = []
        for tier, pool in self._tiers.items():
            for digest in [d for d, e in pool.items() if doomed(e)]:
                entry = pool.pop(digest)
                self._used[tier] -= entry.bytes
                out.append(entry)
        return out

    # --- reading -----------------------------------------------------------------------------------
    def get(self, key: CacheKey | None) -> CacheEntry | None:
        """The live entry for ``key`` (counted as a hit) or None (counted as a miss). Call it
        once per request: each call counts."""
        if key is None:
            return None
        now = self._clock.monotonic()
        expired: list[CacheEntry] = []
        with self._lock:
            entry = None
            for tier, pool in self._tiers.items():
                entry = pool.get(key.digest)
                if entry is None:
                    continue
                if entry.expires <= now:
                    del pool[key.digest]
                    self._used[tier] -= entry.bytes
                    expired.append(entry)
                    entry = None
                else:
                    pool.move_to_end(key.digest)
                break
            if entry is None:
                self.misses += 1
                self._metrics.misses.inc()
            else:
                self.hits += 1
                self._metrics.hits.inc()
        self._delete(expired, "expired")
        return entry

    def peek(self, key: CacheKey | None) -> CacheEntry | None:
        """The live entry for ``key`` without using it (GetFlightInfo, for the schema): nothing
        is counted — the DoGet that follows counts the hit, or :meth:`count_miss` the miss
        that GetFlightInfo answered by running the query (flight_server/streams.py)."""
        if key is None:
            return None
        now = self._clock.monotonic()
        with self._lock:
            for pool in self._tiers.values():
                entry = pool.get(key.digest)
                if entry is not None:
                    return entry if entry.expires > now else None
        return None

    def count_miss(self) -> None:
        """A lookup that missed, answered elsewhere (see :meth:`peek`)."""
        with self._lock:
            self.misses += 1
            self._metrics.misses.inc()

    def open(self, entry: CacheEntry) -> pa.RecordBatchReader | None:
        """A reader over the entry (memory: its batches; disk: the memory-mapped file, zero
        copy); None when the file was evicted meanwhile (then execute the query instead)."""
        if entry.batches is not None:
            return pa.RecordBatchReader.from_batches(entry.schema, entry.batches)
        assert entry.path is not None
        with self._lock:
            # Under the lock: eviction unlinks under it too, and an open mapping survives unlink.
            try:
                source = pa.memory_map(str(entry.path), "r")
            except FileNotFoundError:
                return None
        return pa.ipc.open_stream(source)

    # --- filling -------------------------------------------------------------------------------------
    def tee(
        self,
        key: CacheKey | None,
        reader: pa.RecordBatchReader,
        head: Sequence[pa.RecordBatch] = (),
        *,
        truncated: Callable[[], bool] | None = None,
    ) -> pa.RecordBatchReader:
        """``head`` (batches already read from ``reader``) then ``reader``'s batches, passed on
        as they come and kept for the cache: in memory up to 1 MiB (no copy: the batches
        themselves), beyond that appended to a file. The entry is committed when the stream
        ends, dropped if it fails, is abandoned or grows beyond ``max_entry_bytes`` (the
        client still gets every batch); ``truncated``, asked then, says whether the stream
        was cut at its row cap (stored with the entry)."""
        if key is None or key.digest in self._oversize:
            if not head:
                return reader
            return pa.RecordBatchReader.from_batches(reader.schema, itertools.chain(head, reader))
        return pa.RecordBatchReader.from_batches(reader.schema, self._teeing(key, reader, head, truncated))

    def store(
        self,
        key: CacheKey | None,
        schema: pa.Schema,
        batches: Sequence[pa.RecordBatch],
        size: int,
        *,
        truncated: bool = False,
    ) -> None:
        """Keep a complete small result (already read; ``size``: its batches' bytes;
        ``truncated``: cut at its row cap) in memory; larger ones go through :meth:`tee`.
        Does nothing for a result too large for the memory tier."""
        if key is None:
            return
        if size > self.memory_entry_bytes:
            return
        rows = sum(b.num_rows for b in batches)
        self._commit(key, schema, rows, size, batches=tuple(batches), truncated=truncated)

    def _teeing(  # noqa: C901  one state machine over the stream: held, spilled, given up
        self,
        key: CacheKey,
        reader: pa.RecordBatchReader,
        head: Sequence[pa.RecordBatch] = (),
        truncated: Callable[[], bool] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        schema = reader.schema
        held: list[pa.RecordBatch] | None = []
        held_bytes = rows = 0
        partial: Path | None = None
        sink: pa.OSFile | None = None
        writer: pa.ipc.RecordBatchStreamWriter | None = None
        gave_up = complete = False
        try:
            for batch in itertools.chain(head, reader):
                if not gave_up:
                    rows += batch.num_rows
                    if held is not None:
                        held.append(batch)
                        held_bytes += batch.nbytes
                        if held_bytes > self.memory_entry_bytes:  # too big for memory: spill
                            partial = self.dir / f"{key.digest}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
                            sink = pa.OSFile(str(partial), "wb")
                            writer = pa.ipc.new_stream(sink, schema)
                            for b in held:
                                writer.write_batch(b)
                            held = None
                    elif writer is not None:
                        writer.write_batch(batch)
                    if sink is not None and sink.tell() > self.max_entry_bytes:
                        gave_up = True
                        with self._lock:
                            self.too_large += 1
                            self._oversize[key.digest] = None
                            if len(self._oversize) > OVERSIZE_KEYS:
                                self._oversize.popitem(last=False)
                        self._close_quietly(writer, sink)
                        writer = sink = None
                        if partial is not None:
                            partial.unlink(missing_ok=True)
                yield batch
            complete = True
        finally:
            self._close_quietly(writer, sink)
            if complete and not gave_up:
                cut = truncated is not None and truncated()
                if held is not None:
                    self._commit(key, schema, rows, held_bytes, batches=tuple(held), truncated=cut)
                elif partial is not None:
                    size = partial.stat().st_size
                    self._commit(key, schema, rows, size, partial=partial, truncated=cut)
            if partial is not None:
                partial.unlink(missing_ok=True)

    @staticmethod
    def _close_quietly(writer: pa.ipc.RecordBatchStreamWriter | None, sink: pa.OSFile | None) -> None:
        with contextlib.suppress(Exception):
            if writer is not None:
                writer.close()
        with contextlib.suppress(Exception):
            if sink is not None:
                sink.close()

    def _commit(
        self,
        key: CacheKey,
        schema: pa.Schema,
        rows: int,
        size: int,
        *,
        batches: tuple[pa.RecordBatch, ...] | None = None,
        partial: Path | None = None,
        truncated: bool = False,
    ) -> None:
        now = self._clock.monotonic()
        tier = "memory" if batches is not None else "disk"
        path = None if partial is None else self.dir / f"{key.digest}{ENTRY_SUFFIX}"
        expires = now + self.config.ttl_seconds
        entry = CacheEntry(key, schema, rows, size, now, expires, batches, path, truncated)
        evicted: list[CacheEntry] = []
        with self._lock:
            known = any(key.digest in pool for pool in self._tiers.values())
            if known or self._is_stale_locked(entry) or self._closed.is_set():
                return  # another stream won, or a newer version exists: nothing to keep
            if partial is not None and path is not None:
                os.replace(partial, path)
            pool = self._tiers[tier]
            pool[key.digest] = entry
            self._used[tier] += size
            while self._used[tier] > self._budget[tier] and pool:
                _, victim = pool.popitem(last=False)
                self._used[tier] -= victim.bytes
                evicted.append(victim)
            self._gauges_locked()
        self._delete(evicted, "size")
        if partial is not None:  # small entries come by the hundred per second: not logged
            log.debug(
                "cache.stored", key=key.digest[:16], tier=tier, rows=rows, bytes=size, evicted=len(evicted)
            )

    # --- removal ------------------------------------------------------------------------------------
    def _delete(self, entries: Sequence[CacheEntry], reason: str | None) -> None:
        if not entries:
            return
        with self._lock:
            for e in entries:
                if e.path is not None:
                    e.path.unlink(missing_ok=True)
            if reason is not None:
                self.evicted[reason] += len(entries)
            self._gauges_locked()
        if reason is not None:
            self._metrics.evictions.labels(reason).inc(len(entries))

    def _gauges_locked(self) -> None:
        self._metrics.bytes.set(self._used["memory"] + self._used["disk"])
        self._metrics.entries.set(sum(len(p) for p in self._tiers.values()))

    def sweep(self) -> int:
        """Drop expired entries and, with a catalog at hand, entries of outdated versions."""
        dropped = 0
        if self._tables is not None and self._db is not None:
            with self._db.reading() as cur:
                current = self._tables.versions(cur)
            dropped = self._observe_versions(list(current.items()))
        now = self._clock.monotonic()
        with self._lock:
            expired = self._take_locked(lambda e: e.expires <= now)
        self._delete(expired, "expired")
        return dropped + len(expired)

    def _sweep_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.sweep()
            except (duckdb.Error, OSError, RuntimeError) as e:
                log.warning("cache.sweep_failed", error=str(e))

    def clear(self) -> int:
        """Drop every entry (not counted as evictions)."""
        with self._lock:
            doomed = self._take_locked(lambda _entry: True)
        self._delete(doomed, None)
        return len(doomed)

    def stats(self) -> ResultCacheStatus:
        with self._lock:
            return ResultCacheStatus(
                enabled=self.config.enabled,
                entries=sum(len(p) for p in self._tiers.values()),
                bytes=self._used["memory"] + self._used["disk"],
                memory_entries=len(self._tiers["memory"]),
                memory_bytes=self._used["memory"],
                disk_entries=len(self._tiers["disk"]),
                disk_bytes=self._used["disk"],
                max_bytes=self.config.max_bytes,
                max_memory_bytes=self.config.max_memory_bytes,
                max_entry_bytes=self.max_entry_bytes,
                ttl_seconds=self.config.ttl_seconds,
                hits=self.hits,
                misses=self.misses,
                uncacheable=self.uncacheable,
                too_large=self.too_large,
                evicted=dict(self.evicted),
            )

    def close(self) -> None:
        """Stop the sweeper and delete every cached file."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._sweeper.join(5)
        self.clear()
