"""The hot-table cache (flight_server/table_cache.py) on real servers, filled by the first
scan as it streams (``[cache] table_fill = "scan"``): scans served from
memory are the table DuckDB has, in order; a new data version is never served from an old
snapshot; the budget holds; concurrent scans share one fill; the allowlist, ticket binding
and the version rule still hold at DoGet."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import ConfigError, TableRef, load_config
from catalog.tables import TableCatalog
from flight_server.table_cache import TableCache
from flight_server.versions import read_layout
from tests.harness import SCAN_FILL, SMALL_SPLIT, Server, call_options, error_info, start_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The fill by the first scan as it streams ("scan"); the default, the idle fill, is
    # tests/test_idle_fill.py's.
    s = start_server(tmp_path_factory.mktemp("scan_cache"), flight=SMALL_SPLIT, cache=SCAN_FILL)
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA hot")
        cur.execute("CREATE TABLE hot.t AS SELECT range AS id, range * 2 AS v FROM range(45000)")
        TableCatalog.bump_version(cur, TableRef("hot", "t"))
    yield s
    s.stop()


def _cache(s: Server) -> TableCache:
    assert s.runtime.flight is not None
    return s.runtime.flight.table_cache


def _scan(
    client: flight.FlightClient, opts: flight.FlightCallOptions, schema: str, table: str
) -> tuple[flight.FlightInfo, pa.Table]:
    info = client.get_flight_info(flight.FlightDescriptor.for_path(schema, table), opts)
    return info, pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def _duckdb(s: Server, sql: str) -> pa.Table:
    with s.catalog.db.reading() as cur:
        return cur.sql(sql).to_arrow_table()


def _bump(s: Server, sql: str, table: str) -> None:
    schema, name = table.split(".")
    with s.catalog.db.transaction() as cur:
        cur.execute(sql)
        TableCatalog.bump_version(cur, TableRef(schema, name))


def test_cached_scans_are_duckdbs_table_in_order(server: Server) -> None:
    client, opts = server.flight(), call_options(server.demo_token)
    want = _duckdb(server, "SELECT * FROM demo.events ORDER BY rowid")
    before = _cache(server).stats()
    first_info, first = _scan(client, opts, "demo", "events")  # fills the cache
    again_info, again = _scan(client, opts, "demo", "events")  # served from memory
    after = _cache(server).stats()
    assert first.equals(want) and again.equals(want)
    assert first_info.schema == want.schema and again_info.total_records == 50_000
    assert 4 <= len(again_info.endpoints) <= 8 and again_info.ordered
    assert after.fills["ok"] == before.fills["ok"] + 1
    assert after.hits >= before.hits + 1
    assert ("demo.events", 50_000) in [(t.table, t.rows) for t in after.tables]
    # The same figures in GET /v1/status (section "cache", key "tables") and in /metrics.
    status = server.http().get("/v1/status").json()["cache"]["tables"]
    assert status["entries"] == after.entries and status["budget_bytes"] > 0
    metrics = server.http().get("/metrics").text
    assert "quiver_table_cache_hits_total" in metrics and "quiver_table_cache_bytes" in metrics


def test_the_python_client_reads_the_cached_table(server: Server) -> None:
    from quiver_client import QuiverClient

    want = _duckdb(server, "SELECT * FROM demo.orders ORDER BY rowid")
    assert server.demo_token is not None  # a demo server
    with QuiverClient(server.flight_url, server.demo_token) as qc:
        assert qc.read("demo.orders").equals(want)
        assert qc.read("demo.orders").equals(want)
        assert qc.read_stream("demo.orders").read_all().equals(want)


def test_a_new_version_is_never_served_from_the_old_snapshot(server: Server) -> None:
    client, opts = server.flight(), call_options(server.admin_token)
    _, first = _scan(client, opts, "hot", "t")  # the first scan (DuckDB) fills the cache
    old_info, old = _scan(client, opts, "hot", "t")  # served from memory
    assert first.equals(old) and len(old_info.endpoints) >= 2
    _bump(server, "UPDATE hot.t SET v = -1 WHERE id = 0", "hot.t")
    # Until someone asks for the new version, the old cached FlightInfo serves its own
    # snapshot, from every endpoint alike.
    stale = pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in old_info.endpoints])
    assert stale.equals(old) and stale.column("v")[0].as_py() == 0
    _, new = _scan(client, opts, "hot", "t")
    assert new.column("v")[0].as_py() == -1
    assert new.equals(_duckdb(server, "SELECT * FROM hot.t ORDER BY rowid"))
    held = [t for t in _cache(server).stats().tables if t.table == "hot.t"]
    assert [t.version for t in held] == [TableCatalog(server.catalog.db).version(TableRef("hot", "t"))]
    # The new version dropped the old snapshot: the old FlightInfo's endpoints now fail the
    # DuckDB path's version check instead of mixing versions.
    for endpoint in old_info.endpoints:
        with pytest.raises(flight.FlightUnavailableError) as caught:
            client.do_get(endpoint.ticket, opts).read_all()
        assert error_info(caught.value)["code"] == "UNAVAILABLE"
    _bump(server, "UPDATE hot.t SET v = 0 WHERE id = 0", "hot.t")


def test_first_rows_samples_come_from_the_cached_table(server: Server) -> None:
    client, opts = server.flight(), call_options(server.demo_token)
    _scan(client, opts, "demo", "customers")  # cached now
    hits = _cache(server).stats().hits

    def sample(**body: Any) -> pa.Table:
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "sample", **body}).encode())
        info = client.get_flight_info(descriptor, opts)
        assert len(info.endpoints) == 1
        return client.do_get(info.endpoints[0].ticket, opts).read_all()

    assert sample(table="demo.customers", rows=25).equals(
        _duckdb(server, "SELECT * FROM demo.customers ORDER BY rowid LIMIT 25")
    )
    picked = sample(table="demo.customers", rows=5000, columns=["NAME", "customer_id"])
    want = _duckdb(server, "SELECT name, customer_id FROM demo.customers ORDER BY rowid")
    assert picked.equals(want)
    assert _cache(server).stats().hits == hits + 2


def test_concurrent_scans_share_one_fill(server: Server) -> None:
    with server.catalog.db.transaction() as cur:
        cur.execute(
            "CREATE TABLE hot.shared AS SELECT range AS id, md5(range::VARCHAR) AS h FROM range(60000)"
        )
        TableCatalog.bump_version(cur, TableRef("hot", "shared"))
    want = _duckdb(server, "SELECT * FROM hot.shared ORDER BY rowid")
    fills = _cache(server).stats().fills["ok"]
    barrier = threading.Barrier(4)
    results: list[pa.Table] = []
    errors: list[BaseException] = []

    def scan() -> None:
        client, opts = flight.FlightClient(server.flight_url), call_options(server.admin_token)
        try:
            barrier.wait()
            results.append(_scan(client, opts, "hot", "shared")[1])
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 4 and all(r.equals(want) for r in results)
    assert _cache(server).stats().fills["ok"] == fills + 1


def _fresh_table(s: Server, name: str, rows: int = 45_000) -> TableRef:
    with s.catalog.db.transaction() as cur:
        cur.execute(
            f"CREATE TABLE hot.{name} AS SELECT range AS id, md5(range::VARCHAR) AS h FROM range({rows})"
        )
        TableCatalog.bump_version(cur, TableRef("hot", name))
    return TableRef("hot", name)


def test_the_first_scan_streams_from_duckdb_and_fills_with_what_it_sent(server: Server) -> None:
    """GetFlightInfo of the first scan does not wait for a fill: its endpoints stream from
    DuckDB and the cache keeps what they sent, once every endpoint was read whole."""
    cache = _cache(server)
    ref = _fresh_table(server, "first")
    want = _duckdb(server, "SELECT * FROM hot.first ORDER BY rowid")
    fills = cache.stats().fills["ok"]
    client, opts = server.flight(), call_options(server.admin_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("hot", "first"), opts)
    assert len(info.endpoints) >= 2 and info.total_records == 45_000
    assert not cache.holds(ref)  # nothing was read at GetFlightInfo
    parts = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]
    assert pa.concat_tables(parts).equals(want)
    assert cache.holds(ref) and cache.stats().fills["ok"] == fills + 1
    hits = cache.stats().hits
    again_info, again = _scan(client, opts, "hot", "first")
    assert again.equals(want) and cache.stats().hits == hits + 1
    assert len(again_info.endpoints) == len(info.endpoints)
    # A first-scan ticket redeemed again reads the same rows and stores nothing twice.
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().equals(parts[0])
    assert cache.stats().fills["ok"] == fills + 1


def test_a_first_scan_read_in_part_or_abandoned_stores_nothing(server: Server) -> None:
    cache = _cache(server)
    ref = _fresh_table(server, "partial", rows=200_000)
    client, opts = server.flight(), call_options(server.admin_token)
    fills = cache.stats().fills["ok"]
    info = client.get_flight_info(flight.FlightDescriptor.for_path("hot", "partial"), opts)
    assert len(info.endpoints) >= 2
    # One endpoint read whole, another left after its first batch: no entry.
    client.do_get(info.endpoints[0].ticket, opts).read_all()
    reader = client.do_get(info.endpoints[1].ticket, opts)
    reader.read_chunk()
    reader.cancel()
    client.close()
    assert not cache.holds(ref)
    # The next scan starts a fill of its own and completes it.
    client = server.flight()
    wait_until(lambda: cache._fill is None or not cache._fill.live, 20, what="the abandoned fill to end")
    _, got = _scan(client, opts, "hot", "partial")
    assert got.equals(_duckdb(server, "SELECT * FROM hot.partial ORDER BY rowid"))
    assert cache.holds(ref) and cache.stats().fills["ok"] == fills + 1


def test_a_first_scan_of_a_changed_table_fails_cleanly_and_stores_nothing(server: Server) -> None:
    cache = _cache(server)
    ref = _fresh_table(server, "moving")
    client, opts = server.flight(), call_options(server.admin_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("hot", "moving"), opts)
    first = client.do_get(info.endpoints[0].ticket, opts).read_all()
    _bump(server, "UPDATE hot.moving SET h = 'changed' WHERE id = 0", "hot.moving")
    with pytest.raises(flight.FlightUnavailableError) as caught:
        client.do_get(info.endpoints[1].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "UNAVAILABLE"
    assert not cache.holds(ref) and first.column("h")[0].as_py() != "changed"
    # The new version is read, and cached, by the next scan.
    _, got = _scan(client, opts, "hot", "moving")
    assert got.column("h")[0].as_py() == "changed"
    assert cache.holds(ref)
    held = [t for t in cache.stats().tables if t.table == "hot.moving"]
    assert [t.version for t in held] == [TableCatalog(server.catalog.db).version(ref)]


def test_a_scan_during_another_tables_fill_is_served_by_duckdb(server: Server) -> None:
    cache = _cache(server)
    with server.catalog.db.transaction() as cur:
        cur.execute("CREATE TABLE hot.waiting AS SELECT range AS id FROM range(30000)")
        TableCatalog.bump_version(cur, TableRef("hot", "waiting"))
    client, opts = server.flight(), call_options(server.admin_token)
    with server.catalog.db.reading() as cur:
        other = read_layout(cur, TableRef("hot", "t"), begin=True)
    running = cache.begin_fill(other.ref, other, 2)  # another table's fill is running
    assert running is not None
    try:
        info, got = _scan(client, opts, "hot", "waiting")
    finally:
        running.abandon("test")
    assert got.equals(_duckdb(server, "SELECT * FROM hot.waiting ORDER BY rowid"))
    assert not cache.holds(TableRef("hot", "waiting"))
    # DuckDB endpoints: the layout rule applies to them (a change between endpoints).
    _bump(server, "INSERT INTO hot.waiting VALUES (30000)", "hot.waiting")
    with pytest.raises(flight.FlightUnavailableError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "UNAVAILABLE"
    # The next scan fills the cache.
    _scan(client, opts, "hot", "waiting")
    assert cache.holds(TableRef("hot", "waiting"))


def test_an_evicted_entry_is_read_from_duckdb_with_the_version_rule(server: Server) -> None:
    cache = _cache(server)
    ref = TableRef("hot", "t")
    client, opts = server.flight(), call_options(server.admin_token)
    _scan(client, opts, "hot", "t")
    info, before = _scan(client, opts, "hot", "t")
    assert cache.holds(ref)
    cache.invalidate(ref)
    gc.collect()  # the tickets hold the entry weakly: it is gone now
    fallback = pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])
    assert fallback.equals(before)
    # Evicted and changed: an endpoint can no longer be served from that snapshot.
    info, _ = _scan(client, opts, "hot", "t")
    cache.invalidate(ref)
    gc.collect()
    _bump(server, "INSERT INTO hot.t VALUES (45000, 90000)", "hot.t")
    with pytest.raises(flight.FlightUnavailableError) as caught:
        client.do_get(info.endpoints[1].ticket, opts).read_all()
    assert "call GetFlightInfo again" in error_info(caught.value)["detail"]
    _bump(server, "DELETE FROM hot.t WHERE id = 45000", "hot.t")


def test_allowlist_and_ticket_binding_hold_for_cached_scans(server: Server) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "hotnarrow", "tables": ["demo.*"]}).status_code == 201
    mine = call_options(server.mint("agent", "hotnarrow", "h1"))
    theirs = call_options(server.mint("agent", "hotnarrow", "h2"))
    client = server.flight()
    _scan(client, mine, "demo", "events")
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), mine)
    assert _cache(server).holds(TableRef("demo", "events"))
    with pytest.raises(flight.FlightUnauthorizedError) as caught:
        client.do_get(info.endpoints[0].ticket, theirs).read_all()
    assert error_info(caught.value)["code"] == "PERMISSION_DENIED"
    assert http.put("/v1/swarms/hotnarrow/allowlist", json={"tables": ["demo.customers"]}).status_code == 200
    for endpoint in info.endpoints:
        with pytest.raises(flight.FlightUnauthorizedError) as caught:
            client.do_get(endpoint.ticket, mine).read_all()
        assert error_info(caught.value)["code"] == "PERMISSION_DENIED"
    # Nor does the cache answer a new GetFlightInfo for a table no longer allowed.
    with pytest.raises(flight.FlightUnauthorizedError):
        client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), mine)


# --- the budget -------------------------------------------------------------------------------------
BUDGET = 2_000_000


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("scan_cache_small"),
        demo=False,
        cache={"table_memory_bytes": BUDGET, **SCAN_FILL},
        flight=SMALL_SPLIT,
    )
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA b")
        for name in ("one", "two", "three"):  # 100,000 BIGINTs: 800 kB each
            cur.execute(f"CREATE TABLE b.{name} AS SELECT range AS id FROM range(100000)")
            TableCatalog.bump_version(cur, TableRef("b", name))
        # 2.4 MB of BIGINTs: over the budget by the estimate alone.
        cur.execute("CREATE TABLE b.wide AS SELECT range AS id FROM range(300000)")
        # Strings: the estimate (offsets only) fits, the real size (~3 MB) does not.
        cur.execute("CREATE TABLE b.text AS SELECT repeat('x', 100) || range::VARCHAR AS s FROM range(30000)")
    yield s
    s.stop()


def test_the_budget_is_configured_and_lru_evicts(small: Server) -> None:
    cache = _cache(small)
    assert (
        cache.budget == BUDGET
        and small.http().get("/v1/status").json()["cache"]["tables"]["budget_bytes"] == BUDGET
    )
    client, opts = small.flight(), call_options(small.admin_token)
    for name in ("one", "two"):
        _scan(client, opts, "b", name)
    _scan(client, opts, "b", "one")  # "one" is now the most recently used
    _, three = _scan(client, opts, "b", "three")
    stats = cache.stats()
    assert stats.evicted["size"] == 1 and stats.bytes <= BUDGET
    assert cache.holds(TableRef("b", "one")) and cache.holds(TableRef("b", "three"))
    assert not cache.holds(TableRef("b", "two"))
    assert three.equals(_duckdb(small, "SELECT * FROM b.three ORDER BY rowid"))


def test_a_table_larger_than_the_budget_is_never_cached(small: Server) -> None:
    cache = _cache(small)
    client, opts = small.flight(), call_options(small.admin_token)
    held = cache.stats().bytes
    attempts = cache.stats().fills["too_large"]
    for _ in range(2):
        _, wide = _scan(client, opts, "b", "wide")  # refused by the estimate: no fill at all
        _, text = _scan(client, opts, "b", "text")  # the fill stops at the budget, once
        assert wide.equals(_duckdb(small, "SELECT * FROM b.wide ORDER BY rowid"))
        assert text.equals(_duckdb(small, "SELECT * FROM b.text ORDER BY rowid"))
    stats = cache.stats()
    assert not cache.holds(TableRef("b", "wide")) and not cache.holds(TableRef("b", "text"))
    assert stats.fills["too_large"] == attempts + 1  # not retried for the same version
    assert stats.bytes == held <= BUDGET


def test_a_zero_budget_turns_the_cache_off() -> None:
    assert load_config(None, environ={"QUIVER_CACHE_TABLE_MEMORY_BYTES": "0"}).cache.table_memory_bytes == 0
    assert load_config(None, environ={}).cache.table_memory_bytes == "auto"
    assert TableCache(0).enabled is False
    for bad in ("-1", "lots"):
        with pytest.raises(ConfigError, match=r"cache\.table_memory_bytes"):
            load_config(None, environ={"QUIVER_CACHE_TABLE_MEMORY_BYTES": bad})
