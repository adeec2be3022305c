"""The result cache: hits for the same question (whatever its spelling), misses once the data
moved, bounded size, nothing cached from broken or abandoned streams, never a volatile query —
with the real SQL guard, a real DuckDB file and the real IPC files on disk. The last tests go
through a running server: Flight queries, GET /v1/status and GET /metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from prometheus_client import CollectorRegistry

from catalog import Principal, TableRef
from catalog.clock import SYSTEM_CLOCK, Clock
from catalog.config import CacheConfig
from catalog.database import Database
from catalog.policy import Policy
from catalog.sqlguard import GuardedQuery, SqlGuard
from catalog.tables import TableCatalog
from flight_server.cache import CacheKey, ResultCache, _walk_volatile
from tests.harness import FakeClock, Server, call_options

ADMIN = Principal(
    kind="admin", jti="j-admin", subject="admin", expires_at=datetime.now(UTC) + timedelta(hours=1)
)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    root = tmp_path_factory.mktemp("cache")
    database = Database(root / "c.duckdb", temp_dir=root / "tmp", lockdown=False)
    with database.transaction() as cur:
        cur.execute(
            "CREATE SCHEMA s;"
            "CREATE TABLE s.nums AS SELECT i, i % 10 AS k, 'v' || i AS v FROM range(50000) t(i);"
            "CREATE TABLE s.other AS SELECT i FROM range(10) t(i);"
        )
        TableCatalog.bump_version(cur, TableRef("s", "nums"))
    yield database
    database.close()


@pytest.fixture(scope="module")
def guard(db: Database) -> SqlGuard:
    tables = TableCatalog(db)
    return SqlGuard(tables, Policy(tables), db.catalog_name)


class Harness:
    """Runs a guarded query the way the server does: versions, key, lookup, tee."""

    def __init__(self, db: Database, guard: SqlGuard, cache: ResultCache) -> None:
        self.db, self.guard, self.cache = db, guard, cache
        self.tables = TableCatalog(db)
        self.executed = 0
        self.registry = CollectorRegistry()

    def key(
        self, sql: str, params: list[Any] | None = None, max_rows: int | None = None
    ) -> tuple[GuardedQuery, CacheKey | None]:
        q = self.guard.check(ADMIN, sql)
        with self.db.reading() as cur:
            current = self.tables.versions(cur)
        versions = {ref: current.get(ref.key(), 0) for ref in q.tables}
        return q, self.cache.key(q.normalized, params or [], max_rows, versions)

    def run(self, sql: str, params: list[Any] | None = None) -> tuple[pa.RecordBatchReader, bool]:
        q, key = self.key(sql, params)
        entry = self.cache.get(key)
        if entry is not None:
            reader = self.cache.open(entry)
            assert reader is not None
            return reader, True
        self.executed += 1
        cur = self.db.cursor()
        reader = cur.sql(q.sql, params=params or []).to_arrow_reader(4096)
        return self.cache.tee(key, reader), False

    def table(self, sql: str, params: list[Any] | None = None) -> tuple[pa.Table, bool]:
        reader, hit = self.run(sql, params)
        return reader.read_all(), hit


@pytest.fixture
def make(db: Database, guard: SqlGuard, tmp_path: Path) -> Iterator[Any]:
    caches: list[ResultCache] = []

    def build(clock: Clock = SYSTEM_CLOCK, **config: Any) -> Harness:
        registry = CollectorRegistry()
        cache = ResultCache(
            tmp_path / "cache",
            CacheConfig(**config),
            db=db,
            tables=TableCatalog(db),
            registry=registry,
            sweep_seconds=3600,
            clock=clock,
        )
        caches.append(cache)
        harness = Harness(db, guard, cache)
        harness.registry = registry
        return harness

    yield build
    for c in caches:
        c.close()


def _files(h: Harness) -> list[str]:
    return sorted(p.name for p in h.cache.dir.iterdir())


# Small results live in memory, larger ones in files; "disk" forces files for every entry.
TIERS = {"memory": {}, "disk": {"max_memory_bytes": 0}}


@pytest.fixture(params=sorted(TIERS))
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_identical_requests_hit_whatever_the_spelling(make: Any, tier: str) -> None:
    h = make(**TIERS[tier])
    first, hit = h.table("SELECT i, v FROM s.nums WHERE k = ? ORDER BY i", [3])
    assert not hit and first.num_rows == 5000
    again, hit = h.table("select i,   v\n  from s.nums -- a comment\n where k = ?  order by i;", [3])
    assert hit and again.equals(first)
    assert h.executed == 1
    stats = h.cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert getattr(stats, f"{tier}_entries") == 1 and stats.bytes == getattr(stats, f"{tier}_bytes") > 0
    if tier == "disk":
        (entry_file,) = _files(h)
        assert entry_file.endswith(".arrows")
        assert stats.bytes == (h.cache.dir / entry_file).stat().st_size
    else:
        assert _files(h) == []  # a small result never touches a file
    # The entry carries what GetFlightInfo needs without opening the file.
    _, key = h.key("SELECT i, v FROM s.nums WHERE k = ? ORDER BY i", [3])
    entry = h.cache.get(key)
    assert entry is not None and entry.rows == 5000 and entry.schema.equals(first.schema)


def test_parameters_and_max_rows_are_part_of_the_key(make: Any) -> None:
    h = make()
    keys = {h.key("SELECT count(*) FROM s.nums WHERE i > ?", [p])[1] for p in (1, 1.0, "1", True, None)}
    assert len(keys) == 5
    _, a = h.key("SELECT * FROM s.nums", [], 10)
    _, b = h.key("SELECT * FROM s.nums", [], 20)
    assert a != b
    assert h.table("SELECT count(*) AS n FROM s.nums WHERE i > ?", [10])[0].column(0)[0].as_py() == 49989
    assert h.table("SELECT count(*) AS n FROM s.nums WHERE i > ?", [20])[0].column(0)[0].as_py() == 49979
    assert h.executed == 2


def test_a_new_data_version_misses_and_drops_the_old_entry(make: Any, db: Database, tier: str) -> None:
    h = make(**TIERS[tier])
    sql = "SELECT count(*) AS n FROM s.nums"
    assert h.table(sql)[0].column(0)[0].as_py() == 50000
    assert h.table(sql)[1] is True
    old_file = _files(h)[0] if tier == "disk" else "none"
    with db.transaction() as cur:
        cur.execute("INSERT INTO s.nums VALUES (50000, 0, 'new')")
        TableCatalog.bump_version(cur, TableRef("s", "nums"))
    try:
        # The lookup with the new version misses, and the old file is gone at once.
        _, key = h.key(sql)
        assert key is not None
        assert old_file not in _files(h)
        assert h.cache.stats().evicted["stale"] == 1 and h.cache.stats().entries == 0
        table, hit = h.table(sql)
        assert not hit and table.column(0)[0].as_py() == 50001
        assert h.table(sql)[1] is True
    finally:
        with db.transaction() as cur:
            cur.execute("DELETE FROM s.nums WHERE i = 50000")
            TableCatalog.bump_version(cur, TableRef("s", "nums"))


def test_sweeper_drops_entries_of_changed_tables_without_a_lookup(make: Any, db: Database) -> None:
    h = make()
    h.table("SELECT max(i) FROM s.other")
    h.table("SELECT max(i) FROM s.nums")
    assert h.cache.stats().entries == 2
    with db.transaction() as cur:
        TableCatalog.bump_version(cur, TableRef("s", "other"))
    assert h.cache.sweep() == 1
    assert h.cache.stats().entries == 1
    assert h.table("SELECT max(i) FROM s.nums")[1] is True


def test_lru_eviction_by_total_size(make: Any, tier: str) -> None:
    probe = make(**TIERS[tier])
    one, _ = probe.table("SELECT * FROM s.nums WHERE k = 0")
    size = probe.cache.stats().bytes
    assert one.num_rows == 5000 and size > 0
    # Room for three entries of this size, not four.
    budget = int(size * 3.5)
    if tier == "disk":
        h = make(max_bytes=budget, max_entry_bytes=size * 2, max_memory_bytes=0)
    else:
        h = make(max_memory_bytes=budget)
    for k in (0, 1, 2):
        h.table("SELECT * FROM s.nums WHERE k = ?", [k])
    assert h.table("SELECT * FROM s.nums WHERE k = ?", [0])[1] is True  # 0 is now most recent
    h.table("SELECT * FROM s.nums WHERE k = ?", [3])  # evicts 1, the least recently used
    stats = h.cache.stats()
    assert stats.entries == 3 and stats.evicted["size"] == 1 and stats.bytes <= budget
    assert len(_files(h)) == (3 if tier == "disk" else 0)
    hits = {k: h.table("SELECT * FROM s.nums WHERE k = ?", [k])[1] for k in (0, 2, 3)}
    assert hits == {0: True, 2: True, 3: True}
    assert h.table("SELECT * FROM s.nums WHERE k = ?", [1])[1] is False


def test_results_above_the_entry_limit_stream_but_are_not_cached(make: Any, tier: str) -> None:
    h = make(max_entry_bytes=50_000, **TIERS[tier])
    table, hit = h.table("SELECT * FROM s.nums")
    assert not hit and table.num_rows == 50000  # the client got every row
    assert h.cache.stats().too_large == 1 and h.cache.stats().entries == 0
    assert _files(h) == []
    assert h.table("SELECT * FROM s.nums")[1] is False


def test_a_result_found_too_large_is_not_teed_again_at_the_same_versions(
    make: Any, tier: str, db: Database
) -> None:
    """Teeing a result that outgrows ``max_entry_bytes`` writes up to that many bytes to a file
    and deletes it: the key (text, parameters, cap, data versions) is remembered, and the same
    query is then streamed without a tee — every row still sent, nothing stored, no file. A
    newer data version is a new key: tried again (its result may be smaller)."""
    h = make(max_entry_bytes=50_000, **TIERS[tier])
    for _ in range(3):
        table, hit = h.table("SELECT * FROM s.nums WHERE i >= ?", [7])
        assert not hit and table.num_rows == 50000 - 7
        stats = h.cache.stats()
        assert (stats.too_large, stats.entries) == (1, 0) and _files(h) == []
    with db.transaction() as cur:
        TableCatalog.bump_version(cur, TableRef("s", "nums"))
    table, _ = h.table("SELECT * FROM s.nums WHERE i >= ?", [7])
    assert table.num_rows == 50000 - 7 and h.cache.stats().too_large == 2


def test_results_beyond_the_memory_threshold_spill_to_a_file(make: Any) -> None:
    h = make()  # defaults: entries up to 1 MiB in memory
    table, _ = h.table("SELECT * FROM s.nums")  # ~1.3 MB
    assert table.nbytes > 1024 * 1024
    stats = h.cache.stats()
    assert (stats.memory_entries, stats.disk_entries) == (0, 1)
    assert len(_files(h)) == 1
    again, hit = h.table("SELECT * FROM s.nums")
    assert hit and again.equals(table)


def test_abandoned_and_failed_streams_leave_nothing(make: Any, tier: str) -> None:
    h = make(**TIERS[tier])
    reader, hit = h.run("SELECT * FROM s.nums")
    assert not hit
    reader.read_next_batch()
    del reader  # the client went away after one batch
    assert h.cache.stats().entries == 0 and _files(h) == []

    reader, _ = h.run("SELECT CASE WHEN i > 40000 THEN error('boom') ELSE i END AS x FROM s.nums")
    with pytest.raises(Exception, match="boom"):
        reader.read_all()
    del reader
    assert h.cache.stats().entries == 0 and _files(h) == []


def test_volatile_queries_are_never_cached(make: Any) -> None:
    h = make()
    for sql in (
        "SELECT random() AS r FROM s.other",
        "SELECT i, now() AS t FROM s.other",
        "SELECT current_date AS d",
        "SELECT gen_random_uuid() AS u",
        "SELECT * FROM s.nums USING SAMPLE 10%",
        "SELECT * FROM s.other ORDER BY random()",
    ):
        assert h.key(sql)[1] is None, sql
    assert h.cache.stats().uncacheable == 6
    # A seeded sample is reproducible, so it may be cached.
    assert h.key("SELECT * FROM s.nums USING SAMPLE 10% (bernoulli, 42)")[1] is not None
    assert h.key("SELECT sum(range) FROM range(10)")[1] is not None


def test_volatility_scan_of_the_text_agrees_with_the_walk_of_the_tree(make: Any) -> None:
    """A fresh text's volatility is first decided by a scan of its normalized text (no
    volatile name, no sample: cacheable without decoding the tree); whatever the scan cannot
    rule out goes to the walk. Both must agree on every kind of text, the tricky ones too."""
    h = make()
    texts = {
        "SELECT * FROM s.nums WHERE i = 4711": False,
        "SELECT RANDOM() AS r": True,
        "SELECT 'é' AS e, random() AS r": True,  # non-ASCII: \u escapes, decided by the walk
        "SELECT 'é' AS e FROM s.other": False,
        "SELECT 'random() now()' AS literal": False,  # names inside a string: the walk says no
        "SELECT x.now FROM (SELECT i AS now FROM s.other) x": False,
        "SELECT * FROM (SELECT * FROM s.nums USING SAMPLE 5) t": True,
        "SELECT * FROM (SELECT * FROM s.nums USING SAMPLE 5 (reservoir, 7)) t": False,
        "SELECT i FROM s.other WHERE i < (SELECT max(i) * random() FROM s.other)": True,
        "SELECT current_timestamp AS t": True,
    }
    for sql, volatile in texts.items():
        normalized = h.guard.check(ADMIN, sql).normalized
        walked = _walk_volatile(json.loads(normalized), h.cache._volatile)
        assert walked is volatile, sql
        assert h.cache._compute_volatile(normalized) is volatile, sql


def test_ttl_expiry(make: Any) -> None:
    clock = FakeClock()
    h = make(ttl_seconds=60, clock=clock)
    h.table("SELECT 1 AS one FROM s.other")
    clock.advance(59)
    assert h.table("SELECT 1 AS one FROM s.other")[1] is True
    clock.advance(1)
    assert h.table("SELECT 1 AS one FROM s.other")[1] is False
    assert h.cache.stats().evicted["expired"] == 1


def test_disabled_cache_never_keys(make: Any) -> None:
    h = make(enabled=False)
    assert h.key("SELECT 1 AS one FROM s.other")[1] is None
    assert h.table("SELECT 1 AS one FROM s.other")[1] is False
    assert h.table("SELECT 1 AS one FROM s.other")[1] is False and h.executed == 2


def test_metrics_in_the_registry(make: Any) -> None:
    h = make()
    h.table("SELECT 2 AS two FROM s.other")
    h.table("SELECT 2 AS two FROM s.other")
    registry = h.registry  # the registry the cache was given
    assert registry.get_sample_value("quiver_cache_hits_total") == 1
    assert registry.get_sample_value("quiver_cache_misses_total") == 1
    assert registry.get_sample_value("quiver_cache_bytes") == h.cache.stats().bytes > 0


def test_leftover_files_are_removed_at_start(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "abc.arrows").write_bytes(b"x")
    (d / "abc.1234.partial").write_bytes(b"x")
    cache = ResultCache(d, CacheConfig(), registry=CollectorRegistry())
    try:
        assert list(d.iterdir()) == []
    finally:
        cache.close()


# --- through a running server ------------------------------------------------------------------


def _query(client: flight.FlightClient, token: str, sql: str, params: list[Any] | None = None) -> pa.Table:
    cmd = {"kind": "query", "sql": sql, "params": params or []}
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(cmd)), call_options(token))
    return pa.concat_tables(client.do_get(e.ticket, call_options(token)).read_all() for e in info.endpoints)


def _cache_status(server: Server) -> dict[str, Any]:
    status = server.http().get("/v1/status")
    assert status.status_code == 200, status.text
    body = status.json()
    if "cache" not in body:
        pytest.skip("the server does not register the result cache yet (core wires ResultCache)")
    return body["cache"]


def test_server_cache_hit_miss_and_stats_in_status_and_metrics(server: Server) -> None:
    before = _cache_status(server)
    client = server.flight()
    agent = server.demo_token
    assert agent is not None
    with server.catalog.db.transaction() as cur:
        cur.execute("CREATE OR REPLACE TABLE demo.cache_probe AS SELECT i, i % 3 AS g FROM range(1000) t(i)")
        TableCatalog.bump_version(cur, TableRef("demo", "cache_probe"))
    sql = "SELECT g, count(*) AS n FROM demo.cache_probe WHERE i >= ? GROUP BY g ORDER BY g"
    first = _query(client, agent, sql, [10])
    mid = _cache_status(server)
    second = _query(
        client,
        agent,
        "select g, count(*) as n\nfrom demo.cache_probe where i >= ?\ngroup by g order by g",
        [10],
    )
    after = _cache_status(server)
    assert second.equals(first)
    assert after["hits"] == mid["hits"] + 1 and mid["misses"] >= before["misses"] + 1
    assert after["entries"] >= 1 and after["bytes"] > 0

    # An admin asking the same thing gets the same rows from the same entry.
    assert _query(client, server.admin_token, sql, [10]).equals(first)
    assert _cache_status(server)["hits"] == after["hits"] + 1

    # New data: a miss with the new rows.
    with server.catalog.db.transaction() as cur:
        cur.execute("INSERT INTO demo.cache_probe VALUES (5000, 0)")
        TableCatalog.bump_version(cur, TableRef("demo", "cache_probe"))
    changed = _query(client, agent, sql, [10])
    assert changed.column("n").to_pylist()[0] == first.column("n").to_pylist()[0] + 1
    final = _cache_status(server)
    assert final["misses"] >= after["misses"] + 1

    metrics = server.http().get("/metrics")
    assert metrics.status_code == 200
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.text.splitlines()
        if line.startswith(("quiver_cache_hits_total", "quiver_cache_misses_total", "quiver_cache_bytes"))
    }
    assert samples["quiver_cache_hits_total"] == final["hits"]
    assert samples["quiver_cache_misses_total"] == final["misses"]
    assert samples["quiver_cache_bytes"] == final["bytes"]


def _point(client: flight.FlightClient, opts: flight.FlightCallOptions, sql: str) -> int:
    body = json.dumps({"kind": "query", "sql": sql}).encode()
    info = client.get_flight_info(flight.FlightDescriptor.for_command(body), opts)
    return sum(client.do_get(e.ticket, opts).read_all().num_rows for e in info.endpoints)


def test_volatility_is_decided_once_per_guard_shape_and_still_refuses_volatile_shapes(
    server: Server,
) -> None:
    """Fresh-text point queries of one shape (a new literal each time): the result cache reads
    the tree for volatile functions for the first texts only (a full parse has no template),
    then remembers the verdict per shape template (GuardedQuery.template) — it depends on
    function and column names, never on a literal's value. A volatile shape stays volatile
    for every fresh text: its results are never replayed from the cache, while the same text
    of a plain shape is (racing threads, as agents send them)."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    cache = flight_server.cache
    client = server.flight()
    opts = call_options(server.mint(agent="volatile-shapes"))
    plain = "SELECT customer_id FROM demo.customers WHERE customer_id = {k}"
    volatile = "SELECT customer_id, random() AS r FROM demo.customers WHERE customer_id = {k}"
    for k in range(1, 6):  # the shapes are learnt and proven (full parses)
        assert _point(client, opts, plain.format(k=k)) == 1
        assert _point(client, opts, volatile.format(k=k)) == 1
    scans, hits = cache.volatile_scans, cache.stats().hits
    errors: list[BaseException] = []

    def agent(n: int) -> None:
        try:
            own = server.flight()
            for k in range(6 + 20 * n, 26 + 20 * n):
                assert _point(own, opts, volatile.format(k=k)) == 1
            own.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[:1]
    for k in range(6, 46):
        assert _point(client, opts, plain.format(k=k)) == 1
    assert cache.volatile_scans == scans  # 120 fresh texts, no tree read for volatility
    assert cache.stats().hits == hits
    # The same text again: the plain shape's result is replayed, the volatile one's never.
    assert _point(client, opts, plain.format(k=45)) == 1
    assert cache.stats().hits == hits + 1
    assert _point(client, opts, volatile.format(k=45)) == 1
    assert _point(client, opts, volatile.format(k=45)) == 1
    assert cache.stats().hits == hits + 1
