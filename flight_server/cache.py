"""The result cache: the same question about the same data is answered once.

Agents ask the same thing again and again (a dashboard refresh, a retry, a fleet of agents
running one prompt). A query result is cached as an Arrow IPC stream file in
``DATA_DIR/cache/`` under a key made of

- the guard's normalized SQL (DuckDB's parse tree: whitespace, comments and keyword case do
  not matter), the bound parameters (JSON, so ``1``, ``1.0`` and ``"1"`` differ), ``max_rows``
  and anything else the caller passes as ``extra`` (e.g. an endpoint's partition), and
- the data version of every table the query reads.

A writer that changes a table bumps its version, so entries of the old version can never be
served again; they are also deleted eagerly as soon as a newer version is seen (a lookup,
or the sweeper that reads the versions). Entries expire ``[cache] ttl_seconds`` after they were
written; the directory is bounded by ``[cache] max_bytes`` (least recently used entries are
evicted) and results above ``[cache] max_entry_bytes`` are not cached at all.

Queries whose result can differ between two runs on the same data are never cached:
volatile functions (``random()``, ``now()``, ``gen_random_uuid()``, ``current_date`` …) and
samples without a seed. The key does not contain the principal: an admin and an agent asking
the same query of the same table versions get the same rows, and the guard has already
checked that each of them may read every table involved before the lookup.

Why tee rather than "execute into the file, then stream the file": the first request must
not wait for the whole result to be written before its first byte; with a tee the client
receives each batch as DuckDB produces it, and the same batch is appended to the cache file
(one write to the page cache per batch of ~100k rows). The entry becomes visible only when
the stream completed; a stream that fails or that the client abandons leaves nothing behind.

Interface for the Flight server (``core`` wires it)::

    cache = ResultCache.for_catalog(catalog)        # metrics, /v1/status "cache", sweeper
    key = cache.key(guarded.normalized, params, max_rows, versions, extra=None)  # None: not cacheable
    entry = cache.get(key)                          # CacheEntry (schema, rows, bytes) or None; counts hit/miss
    reader = cache.open(entry)                      # zero-copy reader, None if evicted meanwhile
    reader = cache.tee(key, reader)                 # on a miss: stream AND fill the cache
    cache.close()                                   # at server shutdown
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from catalog import Catalog, TableRef
from catalog.config import CacheConfig
from catalog.database import Database
from catalog.tables import TableCatalog

log = structlog.get_logger(__name__)

ENTRY_SUFFIX = ".arrows"
PARTIAL_SUFFIX = ".partial"

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


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: str
    #: (table key, data version) of every table read, sorted.
    tables: tuple[tuple[TableKey, int], ...]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: CacheKey
    path: Path
    schema: pa.Schema
    rows: int
    bytes: int
    created: float  # monotonic
    expires: float  # monotonic


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
    ) -> None:
        self.dir = cache_dir
        self.config = config
        self._tables = tables
        self._db = db
        self._metrics = _Metrics(registry)
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._latest: dict[TableKey, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.max_entry_bytes = min(config.max_entry_bytes, config.max_bytes)
        self.hits = self.misses = self.uncacheable = self.too_large = 0
        self.evicted = {"size": 0, "stale": 0, "expired": 0}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.chmod(0o700)
        # The index lives in memory: files of an earlier process are orphans.
        for stale in cache_dir.iterdir():
            if stale.suffix in (ENTRY_SUFFIX, PARTIAL_SUFFIX):
                stale.unlink(missing_ok=True)
        self._volatile = TIME_AND_CHANCE | self._duckdb_volatile(db)
        self._is_volatile = lru_cache(maxsize=4096)(self._compute_volatile)
        interval = sweep_seconds if sweep_seconds is not None else min(30.0, max(0.5, config.ttl_seconds / 2))
        self._sweeper = threading.Thread(
            target=self._sweep_loop, args=(interval,), name="quiver-cache-sweeper", daemon=True
        )
        self._sweeper.start()

    @classmethod
    def for_catalog(cls, catalog: Catalog) -> ResultCache:
        """The cache of ``quiver serve``: DATA_DIR/cache, ``[cache]`` config, metrics in the
        catalog's registry and a ``cache`` section in GET /v1/status."""
        cache = cls(
            catalog.data_dir / "cache",
            catalog.config.cache,
            db=catalog.db,
            tables=catalog.tables,
            registry=catalog.metrics.registry,
        )
        catalog.status_sections["cache"] = cache.stats
        return cache

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
        try:
            tree = json.loads(normalized)
        except ValueError:
            return True  # not a parse tree: do not trust it with the cache
        return _walk_volatile(tree, self._volatile)

    # --- keys ------------------------------------------------------------------------------------
    def key(
        self,
        normalized: str,
        params: Sequence[Any],
        max_rows: int | None,
        versions: Mapping[TableRef, int] | Mapping[TableKey, int],
        *,
        extra: Any = None,
    ) -> CacheKey | None:
        """The cache key of a guarded query, or None when its result must not be cached
        (cache disabled, volatile functions, unseeded samples, parameters that are not JSON).

        ``versions``: the data version of every table the query reads (``GuardedQuery.tables``
        looked up in ``TableCatalog.versions``), read in the snapshot that will produce the
        rows. Seeing a newer version than before drops the older entries of that table.
        """
        if not self.config.enabled:
            return None
        if self._is_volatile(normalized):
            with self._lock:
                self.uncacheable += 1
            return None
        tables = tuple(
            sorted(
                ((k.key() if isinstance(k, TableRef) else (k[0].lower(), k[1].lower())), int(v))
                for k, v in versions.items()
            )
        )
        try:
            material = json.dumps(
                {
                    "sql": normalized,
                    "params": list(params),
                    "max_rows": max_rows,
                    "tables": tables,
                    "extra": extra,
                },
                sort_keys=True,
                separators=(",", ":"),
                allow_nan=True,
            )
        except (TypeError, ValueError):
            with self._lock:
                self.uncacheable += 1
            return None
        self._observe_versions(tables)
        return CacheKey(hashlib.sha256(material.encode()).hexdigest(), tables)

    def _observe_versions(self, tables: Sequence[tuple[TableKey, int]]) -> int:
        newer = []
        with self._lock:
            for table, version in tables:
                if version > self._latest.get(table, -1):
                    if table in self._latest:
                        newer.append(table)
                    self._latest[table] = version
            doomed = self._stale_locked() if newer else []
        self._delete(doomed, "stale")
        return len(doomed)

    def _stale_locked(self) -> list[CacheEntry]:
        doomed = [
            e for e in self._entries.values() if any(v < self._latest.get(t, v) for t, v in e.key.tables)
        ]
        for e in doomed:
            del self._entries[e.key.digest]
        return doomed

    # --- reading -----------------------------------------------------------------------------------
    def get(self, key: CacheKey | None) -> CacheEntry | None:
        """The live entry for ``key`` (counted as a hit) or None (counted as a miss)."""
        if key is None:
            return None
        now = time.monotonic()
        expired: list[CacheEntry] = []
        with self._lock:
            entry = self._entries.get(key.digest)
            if entry is not None and entry.expires <= now:
                del self._entries[key.digest]
                expired.append(entry)
                entry = None
            if entry is None:
                self.misses += 1
                self._metrics.misses.inc()
            else:
                self._entries.move_to_end(key.digest)
                self.hits += 1
                self._metrics.hits.inc()
        self._delete(expired, "expired")
        return entry

    def open(self, entry: CacheEntry) -> pa.RecordBatchReader | None:
        """A zero-copy reader over the entry's file; None when it was evicted meanwhile
        (then execute the query instead)."""
        with self._lock:
            # Under the lock: eviction unlinks under it too, and an open mapping survives unlink.
            try:
                source = pa.memory_map(str(entry.path), "r")
            except FileNotFoundError:
                return None
        return pa.ipc.open_stream(source)

    # --- filling -------------------------------------------------------------------------------------
    def tee(self, key: CacheKey | None, reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
        """``reader``'s batches, passed on as they come and appended to a cache file; the
        entry is committed when the stream ends, dropped if it fails, is abandoned or grows
        beyond ``max_entry_bytes`` (the client still gets every batch)."""
        if key is None:
            return reader
        return pa.RecordBatchReader.from_batches(reader.schema, self._teeing(key, reader))

    def _teeing(self, key: CacheKey, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        partial = self.dir / f"{key.digest}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        sink: pa.OSFile | None = pa.OSFile(str(partial), "wb")
        writer: pa.ipc.RecordBatchStreamWriter | None = pa.ipc.new_stream(sink, reader.schema)
        rows = 0
        complete = False
        try:
            for batch in reader:
                if writer is not None and sink is not None:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    if sink.tell() > self.max_entry_bytes:
                        writer.close()
                        sink.close()
                        writer = sink = None
                        partial.unlink(missing_ok=True)
                        with self._lock:
                            self.too_large += 1
                yield batch
            complete = True
        finally:
            if writer is not None and sink is not None:
                with contextlib.suppress(Exception):
                    writer.close()
                    sink.close()
            if complete and writer is not None:
                self._commit(key, partial, reader.schema, rows)
            else:
                partial.unlink(missing_ok=True)

    def _commit(self, key: CacheKey, partial: Path, schema: pa.Schema, rows: int) -> None:
        size = partial.stat().st_size
        final = self.dir / f"{key.digest}{ENTRY_SUFFIX}"
        now = time.monotonic()
        entry = CacheEntry(key, final, schema, rows, size, now, now + self.config.ttl_seconds)
        evicted: list[CacheEntry] = []
        with self._lock:
            stale = any(v < self._latest.get(t, v) for t, v in key.tables)
            if stale or key.digest in self._entries or self._closed.is_set():
                partial.unlink(missing_ok=True)  # a newer version exists, or another stream won
                return
            os.replace(partial, final)
            self._entries[key.digest] = entry
            total = self._bytes_locked()
            while total > self.config.max_bytes and len(self._entries) > 1:
                _, victim = self._entries.popitem(last=False)
                evicted.append(victim)
                total -= victim.bytes
            self._gauges_locked()
        self._delete(evicted, "size")
        log.debug("cache.stored", key=key.digest[:16], rows=rows, bytes=size, evicted=len(evicted))

    # --- removal ------------------------------------------------------------------------------------
    def _delete(self, entries: Sequence[CacheEntry], reason: str | None) -> None:
        if not entries:
            return
        with self._lock:
            for e in entries:
                e.path.unlink(missing_ok=True)
            if reason is not None:
                self.evicted[reason] += len(entries)
            self._gauges_locked()
        if reason is not None:
            self._metrics.evictions.labels(reason).inc(len(entries))

    def _bytes_locked(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def _gauges_locked(self) -> None:
        self._metrics.bytes.set(self._bytes_locked())
        self._metrics.entries.set(len(self._entries))

    def invalidate(self, table: TableRef | TableKey, version: int | None = None) -> int:
        """Drop the entries that read ``table`` (those older than ``version`` when given)."""
        t = table.key() if isinstance(table, TableRef) else (table[0].lower(), table[1].lower())
        with self._lock:
            if version is not None:
                self._latest[t] = max(version, self._latest.get(t, version))
            doomed = [
                e
                for e in self._entries.values()
                if any(tk == t and (version is None or v < version) for tk, v in e.key.tables)
            ]
            for e in doomed:
                del self._entries[e.key.digest]
        self._delete(doomed, "stale")
        return len(doomed)

    def sweep(self) -> int:
        """Drop expired entries and, with a catalog at hand, entries of outdated versions."""
        dropped = 0
        if self._tables is not None and self._db is not None:
            with self._db.reading() as cur:
                current = self._tables.versions(cur)
            dropped = self._observe_versions(list(current.items()))
        now = time.monotonic()
        with self._lock:
            expired = [e for e in self._entries.values() if e.expires <= now]
            for e in expired:
                del self._entries[e.key.digest]
            stale = self._stale_locked()
        self._delete(expired, "expired")
        self._delete(stale, "stale")
        return dropped + len(expired) + len(stale)

    def _sweep_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.sweep()
            except (duckdb.Error, OSError, RuntimeError) as e:
                log.warning("cache.sweep_failed", error=str(e))

    def clear(self) -> int:
        """Drop every entry (not counted as evictions)."""
        with self._lock:
            doomed = list(self._entries.values())
            self._entries.clear()
        self._delete(doomed, None)
        return len(doomed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": self.config.enabled,
                "entries": len(self._entries),
                "bytes": self._bytes_locked(),
                "max_bytes": self.config.max_bytes,
                "max_entry_bytes": self.max_entry_bytes,
                "ttl_seconds": self.config.ttl_seconds,
                "hits": self.hits,
                "misses": self.misses,
                "uncacheable": self.uncacheable,
                "too_large": self.too_large,
                "evicted": dict(self.evicted),
            }

    def close(self) -> None:
        """Stop the sweeper and delete every cached file."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._sweeper.join(5)
        self.clear()
